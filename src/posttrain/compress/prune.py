"""Unstructured and N:M weight pruning of linear layers: magnitude (the baseline) and a reference Wanda.

Guarantees:
- Masks are chosen per output row (weights compete only within the row that feeds one output unit, as in Wanda,
  Sun et al. 2023, whose per-row comparison group also suits magnitude pruning of LLMs). With a `sparsity` s, every
  pruned row of width n gets exactly round(s * n) zeros (zeros that were already there count as candidates like any
  other weight), so the layer's sparsity is exactly round(s * n) / n.
- N:M (e.g. "2:4") keeps the N largest scores in every group of M consecutive inputs of a row, so `check_nm` holds
  for every pruned layer and the sparsity is exactly 1 - N/M; the input width must be a multiple of M.
- Every `nn.Linear` is pruned except those whose name matches `skip` (the LM head by default: it is tied to the
  embeddings in many models and is the most sensitive layer). Pruned weights are stored as dense zeros: torch's
  semi-structured 2:4 kernels are CUDA-only, so there is no CPU speed-up, only the pattern (COMPRESSION.md §4.2).
- `prune_wanda` is a short reference implementation (score |W_ij| * ||X_j||_2 over calibration tokens, Sun et al.
  2023). It is what `prune:wanda` runs when llm-compressor is not installed (`compress.api` dispatches to
  llm-compressor's Wanda when it imports and records which implementation ran in `details.implementation`), and
  the tests' reference for the reconstruction comparisons; SparseGPT is llm-compressor's only (`compress.llmc`).
  It scores every layer from one pass of the dense model (not layer by layer on already-pruned inputs, as Wanda's
  own code and llm-compressor do), so its masks can differ from theirs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

DEFAULT_SKIP = ("lm_head",)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" -> (N, M) with 0 < N < M."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m


def _skipped(name: str, skip: Sequence[str]) -> bool:
    # A pattern matches the full dotted name or its last component ("lm_head" or "*.down_proj").
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in skip)


def prunable_linears(model: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]


def keep_mask(scores: torch.Tensor, sparsity: float | None, pattern: str | None = None) -> torch.Tensor:
    """Boolean mask of the weights to keep, from per-weight `scores` [out, in] (higher = more important).

    Unstructured: the round(sparsity * in) lowest scores of each row are dropped. N:M: the N highest of every M
    consecutive scores of a row are kept. Ties are broken by position (a stable sort), so the result is
    deterministic."""
    rows, cols = scores.shape
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"pattern {pattern} implies sparsity {1 - n / m}, but sparsity={sparsity} was asked")
        if cols % m:
            raise ValueError(f"an {pattern} pattern needs the input width ({cols}) to be a multiple of {m}")
        groups = scores.reshape(rows, cols // m, m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(rows, cols)
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = int(round(sparsity * cols))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, drop, False)
    return mask


@torch.no_grad()
def _apply(linear: nn.Linear, mask: torch.Tensor) -> float:
    linear.weight.mul_(mask.to(linear.weight.dtype))
    return float((linear.weight == 0).float().mean())


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float | None = 0.5, pattern: str | None = None,
                    skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, float]:
    """Zero the smallest-|W| weights of each row of every linear layer but `skip`; returns {layer: sparsity}.

    With `pattern="2:4"` the sparsity is implied (0.5); pass `sparsity=None` or the matching value."""
    stats = {}
    for name, linear in prunable_linears(model, skip):
        stats[name] = _apply(linear, keep_mask(linear.weight.abs().float(), sparsity, pattern))
    return stats


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive inputs of every row has at most `n` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


@dataclass
class SparsityReport:
    layers: dict[str, float] = field(default_factory=dict)
    zeros: int = 0
    total: int = 0

    @property
    def overall(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@torch.no_grad()
def sparsity_report(model: nn.Module, skip: Sequence[str] = ()) -> SparsityReport:
    """Measured share of exact zeros in each linear layer's weight (all of them by default), and overall."""
    report = SparsityReport()
    for name, linear in prunable_linears(model, skip):
        zeros, total = int((linear.weight == 0).sum()), linear.weight.numel()
        report.layers[name] = zeros / total
        report.zeros += zeros
        report.total += total
    return report


# -- calibration inputs, shared with structured pruning -------------------------------------------------------------
def calibration_inputs(batches: Iterable[Any], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, T], attention_mask [B, T]) from calibration items: a list of token ids, a LongTensor [T] or
    [B, T], a dict with input_ids (and attention_mask), or a batch object with those attributes (CompletionBatch)."""
    for item in batches:
        if isinstance(item, dict):
            ids, mask = item["input_ids"], item.get("attention_mask")
        elif hasattr(item, "input_ids"):
            ids, mask = item.input_ids, getattr(item, "attention_mask", None)
        else:
            ids, mask = item, None
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        yield ids.to(device), mask.to(device)


def run_calibration(model: nn.Module, batches: Iterable[Any], before: Callable[[torch.Tensor], None]) -> None:
    """Run `model` (no grad, eval mode) on each calibration batch, calling `before(token_mask [B, T] bool)` first
    so that hooks know which positions are real tokens while the batch runs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in calibration_inputs(batches, device):
                before(mask.bool())
                positions = (mask.cumsum(1) - 1).clamp(min=0) * mask  # count real tokens only (left padding)
                model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    finally:
        model.train(was_training)


@torch.no_grad()
def input_feature_norms(model: nn.Module, batches: Iterable[Any],
                        linears: Sequence[tuple[str, nn.Linear]]) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input feature j of each linear, over every real (non-pad) calibration token."""
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device) for name, lin in linears}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach()
            sums[name] += x[current["mask"]].double().pow(2).sum(0)
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears]
    try:
        run_calibration(model, batches, lambda mask: current.__setitem__("mask", mask))
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def prune_wanda(model: nn.Module, calib_batches: Iterable[Any], sparsity: float | None = 0.5,
                pattern: str | None = None, skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, float]:
    """Wanda (Sun et al. 2023): drop, per output row, the weights with the lowest |W_ij| * ||X_j||_2, X_j being input
    feature j over the calibration tokens of the dense model. Reference implementation (see the module docstring);
    returns {layer: sparsity}."""
    calib = list(calib_batches)
    linears = prunable_linears(model, skip)
    norms = input_feature_norms(model, calib, linears)
    stats = {}
    for name, linear in linears:
        scores = linear.weight.abs().float() * norms[name][None, :]
        stats[name] = _apply(linear, keep_mask(scores, sparsity, pattern))
    return stats
