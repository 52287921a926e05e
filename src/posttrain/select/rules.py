"""Method selection by rules over the data kind, the data profile and the machine, with a written rationale.

Guarantees: an explicit method wins (and the rationale says it was explicit); one that cannot train on the data
kind is refused; otherwise the choice follows the data kind: prompts with a verifier -> GRPO, preference pairs ->
DPO (SimPO when the machine cannot hold DPO's reference copy), unpaired labels -> KTO, demonstrations -> SFT. The
runner-up, when there is one, is a method posttrain runs (`METHOD_KINDS`, what `method:` accepts) on this data kind;
none is named where no other method fits. Every number in the rationale is measured (rows, parameter count, memory)
or computed from them; nothing is invented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The data kinds each method trains on (KTO also takes pairs: each becomes a desirable and an undesirable row).
METHOD_KINDS: dict[str, tuple[str, ...]] = {
    "sft": ("sft",), "rm": ("preference",), "dpo": ("preference",), "ipo": ("preference",),
    "simpo": ("preference",), "orpo": ("preference",), "kto": ("unpaired", "preference"), "grpo": ("verifiable",),
}
NEEDS_REFERENCE = {"dpo", "ipo", "kto"}


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


def training_bytes(num_params: int, with_reference: bool) -> int:
    """fp32 weights + gradients + two AdamW moments (4 copies), plus a frozen reference copy when needed.
    Activations are not counted: the rationale says so."""
    return _fp32_copy_bytes(num_params) * (5 if with_reference else 4)


def select_method(kind: str, rows: int, num_params: int, machine: Machine, explicit: str | None = None,
                  lora: bool = False) -> Selection:
    budget = machine.gpu_bytes or machine.ram_bytes
    where = "GPU memory" if machine.gpu_bytes else "RAM"
    copy = _fp32_copy_bytes(num_params)
    facts = (f"the data is '{kind}' ({rows} rows); the model has {num_params:,} parameters "
             f"(~{copy / 2**20:.1f} MiB per fp32 copy); the machine has {machine.describe()}")
    if explicit and explicit != "auto":
        kinds = METHOD_KINDS.get(explicit)
        if kinds is None:
            raise ValueError(f"unknown method {explicit!r}; available: {', '.join(sorted(METHOD_KINDS))}")
        if kind not in kinds:
            # Refuse here, before any model is loaded or evaluated, rather than at training time.
            raise ValueError(f"{explicit.upper()} trains on {' or '.join(repr(k) for k in kinds)} data but this data "
                             f"is '{kind}'; use a dataset of that kind, or method: auto")
        return Selection(explicit, f"{explicit.upper()} was set explicitly in the configuration; {facts}.",
                         None, True)
    if kind == "verifiable":
        return Selection("grpo", f"GRPO: {facts}. Prompts with checkable answers let GRPO learn from the "
                                 "verifier's reward directly, with a group baseline instead of a value network and "
                                 f"no reward model (weights, gradients and AdamW state: about "
                                 f"{training_bytes(num_params, False) / 2**20:.1f} MiB of {budget / 2**30:.1f} GiB "
                                 f"{where}; activations not counted). No other method here trains on prompts with a "
                                 "verifier, so there is no runner-up.", None, False)
    if kind == "preference":
        with_ref = training_bytes(num_params, not lora)
        if with_ref <= budget:
            ref = "the LoRA base with adapters disabled (no extra copy)" if lora else "a frozen reference copy"
            return Selection("dpo", f"DPO: {facts}. Preference pairs train DPO offline against {ref} (weights, "
                                    f"gradients, AdamW state and reference: about {with_ref / 2**20:.1f} MiB of "
                                    f"{budget / 2**30:.1f} GiB {where}; activations not counted), with no reward "
                                    "model and no sampling.", "simpo", False)
        return Selection("simpo", f"SimPO: {facts}. DPO would need a reference copy (about {with_ref / 2**20:.1f} MiB "
                                  f"with weights, gradients and AdamW state) which does not fit in "
                                  f"{budget / 2**30:.1f} GiB {where}; SimPO is reference-free and length-normalised "
                                  f"(about {training_bytes(num_params, False) / 2**20:.1f} MiB).", "orpo", False)
    if kind == "unpaired":
        return Selection("kto", f"KTO: {facts}. Unpaired desirable/undesirable labels are what KTO learns from "
                                "(Ethayarajh et al. 2024): no pairs are needed, only a reference point estimated "
                                "from mismatched pairs in each batch.", None, False)
    if kind == "sft":
        return Selection("sft", f"SFT: {facts}. Demonstrations (prompt and completion) are learnt by supervised "
                                "fine-tuning on the completion tokens; preference methods need pairs or a verifier.",
                         None, False)
    raise ValueError(f"no method available for data of kind {kind!r} (supported: verifiable -> GRPO, "
                     "preference -> DPO/SimPO, unpaired -> KTO, sft -> SFT)")
