"""Reference models for KL-anchored objectives: a frozen copy, log-probs precomputed once, or (for a LoRA policy)
the policy's own network with its adapter disabled or with a frozen copy of its adapter.

Guarantees:
- The reference equals the policy *before the first update* in every mode, so at step 0 the log-ratios are exactly
  0 (DPO loss ln 2, reward margins 0, KL 0; ALGORITHMS.md pitfall 17). With LoRA this holds bit for bit when the
  adapter's dropout is 0 (the policy trains in train mode, the reference always runs in eval mode).
- The reference never receives gradients (forwards under `torch.no_grad()`) and never adds trainable parameters:
  after `make_reference` the policy's set of parameters with `requires_grad` is what it was before, so the engine,
  which optimises exactly those, trains only the policy's own weights (its own adapter, for a LoRA policy).
- The adapter modes share the policy's network and switch it for the duration of one reference forward; the
  policy's active adapter, enabled adapters, per-module train/eval flags and per-parameter `requires_grad` flags
  are restored afterwards, also when the forward raises.

Modes (`make_reference(policy, mode)`):
- "copy": a deep copy of the policy, frozen, in eval mode (any model; costs a second copy of the weights).
- "precompute": not a live model; trainers cache log-probs of the initial policy with
  `run_frozen`.
- "adapter_disabled": a LoRA `PeftModel` whose adapter is still at its init (every B = 0, so base == policy); the
  reference is the base network, run inside `disable_adapter()`. No extra memory. Refused for an adapter that has
  already been trained (that reference would be the base model, not the policy: huggingface/trl#1340).
- "adapter_copy": a LoRA `PeftModel`; the active adapter is copied into a second, frozen adapter named "ref", and
  reference forwards activate "ref" then switch back (what TRL does for a policy that starts from an SFT adapter).
  Extra memory: one adapter. Building it again replaces an existing "ref"; `release()` removes it.
- "auto": "adapter_copy" for a LoRA `PeftModel` whose adapter is trained (some B != 0), "adapter_disabled" for one
  whose adapter is fresh, "copy" for anything else (a plain model, or a non-LoRA peft method).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Literal, Protocol, TypeVar

import torch

from ..data.collate import CompletionBatch
from .logprobs import sequence_logprobs, token_logprobs

T = TypeVar("T")

ReferenceMode = Literal["copy", "precompute", "adapter_disabled", "adapter_copy", "auto"]
LIVE_MODES = ("copy", "adapter_disabled", "adapter_copy", "auto")
REF_ADAPTER = "ref"


class Reference(Protocol):
    """What a trainer needs from a reference model: log-probs of a batch, without gradients."""

    def sequence_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor: ...

    def token_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor: ...

    def run(self, fn: Callable[[torch.nn.Module], T]) -> T:
        """fn(reference network), without gradients, in the reference's state (for custom scoring paths)."""
        ...


def make_reference(policy: torch.nn.Module, mode: str) -> Reference:
    """The live reference for `mode` (see the module docstring). "precompute" is not a live model: trainers cache
    log-probs with `run_frozen` instead."""
    if mode == "auto":
        mode = resolve_reference_mode(policy)
    if mode == "copy":
        return FrozenReference(policy)
    if mode == "adapter_disabled":
        return AdapterDisabledReference(policy)
    if mode == "adapter_copy":
        return AdapterCopyReference(policy)
    raise ValueError(f"unknown live reference mode {mode!r}; expected one of: {', '.join(LIVE_MODES)} "
                     "(\"precompute\" is handled by the trainer)")


def resolve_reference_mode(policy: torch.nn.Module) -> str:
    """What "auto" means for `policy`: "adapter_copy", "adapter_disabled" or "copy"."""
    if not _is_lora_peft(policy):
        return "copy"
    return "adapter_copy" if adapter_is_trained(policy) else "adapter_disabled"


def adapter_is_trained(policy: Any) -> bool:
    """True when some LoRA B matrix of the active adapter is non-zero, i.e. the adapter changes the base model's
    function (trained, loaded, or initialised away from identity as PiSSA/OLoRA do)."""
    name = _single_active_adapter(policy)
    for pname, p in policy.named_parameters():
        parts = pname.split(".")
        for i in range(len(parts) - 1):
            if parts[i] in ("lora_B", "lora_embedding_B") and parts[i + 1] == name and bool(p.detach().any()):
                return True
    return False


class FrozenReference:
    """A deep copy of the policy taken at construction, frozen and in eval mode."""

    def __init__(self, policy: torch.nn.Module):
        self.model = copy.deepcopy(policy)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def run(self, fn: Callable[[torch.nn.Module], T]) -> T:
        return fn(self.model)

    @torch.no_grad()
    def sequence_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        return sequence_logprobs(self.model, batch, temperature)[0]

    @torch.no_grad()
    def token_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        return token_logprobs(self.model, batch, temperature)


class _SharedNetworkReference:
    """A reference that borrows the policy's network for each forward (see `_switched`)."""

    def __init__(self, policy: Any):
        self.model = policy

    @contextlib.contextmanager
    def _switched(self) -> Iterator[None]:
        raise NotImplementedError

    def run(self, fn: Callable[[torch.nn.Module], T]) -> T:
        with _borrowed(self.model), self._switched():
            return fn(self.model)

    def sequence_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        with _borrowed(self.model), self._switched():
            return sequence_logprobs(self.model, batch, temperature)[0]

    def token_logprobs(self, batch: CompletionBatch, temperature: float = 1.0) -> torch.Tensor:
        with _borrowed(self.model), self._switched():
            return token_logprobs(self.model, batch, temperature)


class AdapterDisabledReference(_SharedNetworkReference):
    """The policy's base network: the LoRA policy run with its adapters disabled. Needs an untrained adapter."""

    def __init__(self, policy: Any):
        _require_lora(policy, "adapter_disabled")
        if adapter_is_trained(policy):
            raise ValueError("reference 'adapter_disabled' needs an adapter at its init (B = 0); this adapter is "
                             "trained, so the base model would differ from the policy at step 0 (ALGORITHMS.md "
                             "pitfall 17). Use 'adapter_copy' or 'auto'.")
        super().__init__(policy)

    @contextlib.contextmanager
    def _switched(self) -> Iterator[None]:
        with self.model.disable_adapter():  # peft re-enables the adapter in its own finally
            yield


class AdapterCopyReference(_SharedNetworkReference):
    """A frozen copy of the policy's active LoRA adapter, held as a second adapter "ref" on the same network."""

    def __init__(self, policy: Any):
        _require_lora(policy, "adapter_copy")
        super().__init__(policy)
        self.adapter = _single_active_adapter(policy)
        if self.adapter == REF_ADAPTER:
            raise ValueError(f"the policy's active adapter is named {REF_ADAPTER!r}, the name the reference needs")
        with _flags_kept(policy):
            if REF_ADAPTER in policy.peft_config:  # a reference from an earlier run: the policy has moved since
                policy.delete_adapter(REF_ADAPTER)
            policy.add_adapter(REF_ADAPTER, copy.deepcopy(policy.peft_config[self.adapter]))
            _copy_adapter(policy, self.adapter, REF_ADAPTER)
        # Flags were restored to their state before "ref" existed; the new tensors get theirs explicitly.
        for t in _adapter_tensors(policy, REF_ADAPTER).values():
            t.requires_grad_(False)
        if policy.active_adapters != [self.adapter]:
            raise RuntimeError(f"adding the reference adapter changed the active adapter to {policy.active_adapters}")

    @contextlib.contextmanager
    def _switched(self) -> Iterator[None]:
        try:
            self.model.set_adapter(REF_ADAPTER)
            yield
        finally:
            self.model.set_adapter(self.adapter)

    def release(self) -> None:
        """Remove the "ref" adapter from the policy (the reference is unusable afterwards)."""
        if REF_ADAPTER in self.model.peft_config:
            with _flags_kept(self.model):
                self.model.delete_adapter(REF_ADAPTER)
                self.model.set_adapter(self.adapter)


@torch.no_grad()
def run_frozen(policy: torch.nn.Module, fn: Callable[[torch.nn.Module], T]) -> T:
    """fn(policy) in eval mode without gradients, restoring the mode after: scoring the initial policy once."""
    was_training = policy.training
    policy.eval()
    try:
        return fn(policy)
    finally:
        policy.train(was_training)


# -- helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _flags_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every (pre-existing) parameter's requires_grad on exit: peft's
    set_adapter / enable_adapter_layers / add_adapter rewrite requires_grad as a side effect."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


@contextlib.contextmanager
def _borrowed(model: torch.nn.Module) -> Iterator[None]:
    """A reference forward on the policy's network: eval mode, no grad, every flag restored afterwards."""
    with _flags_kept(model), torch.no_grad():
        model.eval()
        yield


def _is_lora_peft(model: Any) -> bool:
    try:
        from peft import PeftModel, PeftType
    except ImportError:  # without peft nothing can be a PeftModel
        return False
    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.LORA


def _require_lora(policy: Any, mode: str) -> None:
    if not _is_lora_peft(policy):
        raise ValueError(f"reference mode {mode!r} needs a peft LoRA model (see posttrain.models.lora.apply_lora); "
                         f"got {type(policy).__name__}. Use 'copy', 'precompute' or 'auto'.")


def _single_active_adapter(policy: Any) -> str:
    names = list(policy.active_adapters)
    if len(names) != 1:
        raise ValueError(f"expected exactly one active adapter on the policy, found {names}")
    return names[0]


def _adapter_tensors(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Parameters and buffers of one adapter, keyed by their name with the adapter's name component blanked, so
    that two adapters of the same config have the same keys."""
    found: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts = name.split(".")
        if adapter in parts[:-1]:
            found[".".join("*" if part == adapter else part for part in parts)] = t
    return found


@torch.no_grad()
def _copy_adapter(model: torch.nn.Module, source: str, target: str) -> None:
    src, dst = _adapter_tensors(model, source), _adapter_tensors(model, target)
    if not src or set(src) != set(dst):
        raise RuntimeError(f"adapter {target!r} does not mirror {source!r}: "
                           f"{sorted(set(src) ^ set(dst))[:5] or 'no adapter tensors found'}")
    for key, s in src.items():
        d = dst[key]
        # Same dtype and device as the source, so reference forwards compute exactly what the policy computes.
        d.data = s.detach().clone()
