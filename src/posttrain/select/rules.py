"""Method selection by rules over the data kind, the data profile and the machine, with a written rationale.

Guarantees: an explicit method wins (and the rationale says it was explicit, and warns when it does not fit the
data kind's needs); otherwise the choice follows the data kind: prompts with a verifier -> GRPO, preference pairs ->
DPO, demonstrations -> SFT. Every number in the rationale is measured (rows, parameter count, memory) or computed
from them; nothing is invented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# What each method trains on (the data kind it needs).
METHOD_KIND = {"sft": "sft", "dpo": "preference", "grpo": "verifiable"}


@dataclass(frozen=True)
class Machine:
    ram_bytes: int
    cuda_devices: int
    gpu_bytes: int

    @staticmethod
    def detect() -> "Machine":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpu = torch.cuda.get_device_properties(0).total_memory if n else 0
        return Machine(int(ram), n, int(gpu))

    def describe(self) -> str:
        gpus = f"{self.cuda_devices} CUDA device(s), {self.gpu_bytes / 2**30:.1f} GiB on the first" \
            if self.cuda_devices else "no GPU"
        return f"{self.ram_bytes / 2**30:.1f} GiB RAM, {gpus}"


@dataclass(frozen=True)
class Selection:
    method: str
    rationale: str
    runner_up: str | None
    explicit: bool


def _fp32_copy_bytes(num_params: int) -> int:
    return 4 * num_params


def select_method(kind: str, rows: int, num_params: int, machine: Machine, explicit: str | None = None) -> Selection:
    budget = machine.gpu_bytes or machine.ram_bytes
    copy = _fp32_copy_bytes(num_params)
    facts = (f"the data is '{kind}' ({rows} rows); the model has {num_params:,} parameters "
             f"(~{copy / 2**20:.1f} MiB per fp32 copy); the machine has {machine.describe()}")
    if explicit and explicit != "auto":
        need = METHOD_KIND.get(explicit)
        if need is None:
            raise ValueError(f"unknown method {explicit!r}; available: {', '.join(sorted(METHOD_KIND))}")
        fit = "" if need == kind else (f" Warning: {explicit.upper()} trains on '{need}' data but this data is "
                                       f"'{kind}'.")
        return Selection(explicit, f"{explicit.upper()} was set explicitly in the configuration; {facts}.{fit}",
                         None, True)
    if kind == "verifiable":
        # Policy + optimizer state (2 moments) + optional reference: ~4 copies.
        return Selection("grpo", f"GRPO: {facts}. Prompts with checkable answers let GRPO learn from the "
                                 "verifier's reward directly, with a group baseline instead of a value network and "
                                 f"no reward model (policy, AdamW state and an optional reference need about "
                                 f"{4 * copy / 2**20:.1f} MiB of the {budget / 2**30:.1f} GiB available).",
                         "ppo", False)
    if kind == "preference":
        return Selection("dpo", f"DPO: {facts}. Preference pairs train DPO offline against a frozen reference "
                                f"(policy, AdamW state and reference: about {4 * copy / 2**20:.1f} MiB of the "
                                f"{budget / 2**30:.1f} GiB available), with no reward model and no sampling.",
                         "ipo", False)
    if kind == "sft":
        return Selection("sft", f"SFT: {facts}. Demonstrations (prompt and completion) are learnt by supervised "
                                "fine-tuning on the completion tokens; preference methods need pairs or a verifier.",
                         None, False)
    raise ValueError(f"no method available yet for data of kind {kind!r} (supported: verifiable -> GRPO, "
                     "preference -> DPO, sft -> SFT)")
