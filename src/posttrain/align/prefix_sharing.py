"""One packed pass over rows that share prefixes: a batch-wide prefix, rows, and completions that share a row.

Rows of a training batch often begin with the same tokens (the chat template's header, a system prompt), and
preference pairs share their prompt. For a verified Llama-family decoder (the layer arithmetic
`logprobs.last_layer_plan` vouches for) this module runs the decoder layer by layer itself on a three-level tree:

- level 0, an optional common prefix (positions 0..P-1), computed once for the whole batch;
- level 1, n rows continuing it (positions P.., right-padded);
- level 2, optional completions, each continuing one row (its `owner`) after that row's real tokens.

Every token of every level is packed into one matrix, so each linear layer (projections, MLP) runs as one matmul
and sees a shared token once; attention is split by level: a level's queries see the prefix, their row's real
tokens and, causally, their own. A two-pass alternative (shared part through the model, then the rest on its
key/value cache) computes the same values but pays a second, nearly full-size weight-gradient matmul per linear
layer for the few shared tokens, which cancelled the saving on small models.

Guarantees: the states equal the model's own forward on the unshared sequences up to float rounding (callers check
this once per decoder class and dtype against a verified path, values and gradients, and fall back for good
otherwise); the last layer computes its queries, attention output and MLP only at the positions kept (keys and
values everywhere), like `logprobs._last_layer_at`. Sliding windows shorter than the sequences, attention dropout
and gradient checkpointing are not handled here: callers do not come here then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in the verified families: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
            scaling: float, causal: bool = False) -> torch.Tensor:
    groups = queries.shape[-3] // keys.shape[-3]  # grouped-query attention: kv head h serves query heads h*g..h*g+g-1
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=-3), values.repeat_interleave(groups, dim=-3)
    return torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed,
                                                            is_causal=causal, scale=scaling)


@dataclass
class TreeStates:
    """Final-normed states where they were kept, each level row-major."""

    prefix_last: torch.Tensor  # [1, H], or [0, H] when not kept
    rows: torch.Tensor         # [kept row positions, H]
    completions: torch.Tensor  # [kept completion positions, H]


def tree_states(decoder: torch.nn.Module, prefix_ids: torch.Tensor, row_ids: torch.Tensor, row_mask: torch.Tensor,
                keep_rows: torch.Tensor, keep_prefix_last: bool = False, completion_ids: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None, owner: torch.Tensor | None = None,
                keep_completions: torch.Tensor | None = None) -> TreeStates:
    """The decoder's final states on the tree (module docstring), at the kept positions.

    `prefix_ids` [P] (P may be 0); `row_ids`/`row_mask` [n, A] right-padded, every row with at least one real token
    when P is 0; `keep_rows` [n, A] bool. Completions (optional): `completion_ids`/`completion_mask` [m, C]
    right-padded, `owner` [m] the row each one continues, `keep_completions` [m, C]. Padding is computed and never
    attended to."""
    device = row_ids.device
    p, (n, a) = int(prefix_ids.shape[0]), row_ids.shape
    if completion_ids is None:
        completion_ids = row_ids.new_zeros((0, 0))
        completion_mask = row_mask.new_zeros((0, 0))
        owner = torch.zeros(0, dtype=torch.long, device=device)
        keep_completions = torch.zeros((0, 0), dtype=torch.bool, device=device)
    m, c = completion_ids.shape
    sizes = [p, n * a, m * c]
    row_real, comp_real = row_mask.bool(), completion_mask.bool()
    row_len = row_real.sum(1)
    positions = torch.cat([torch.arange(p, device=device), (p + torch.arange(a, device=device)).repeat(n),
                           (p + row_len[owner][:, None] + torch.arange(c, device=device)[None]).reshape(-1)])
    x = decoder.embed_tokens(torch.cat([prefix_ids, row_ids.reshape(-1), completion_ids.reshape(-1)]))
    cos, sin = decoder.rotary_emb(x[None], positions[None])
    cos, sin = cos[0][:, None], sin[0][:, None]  # [N, 1, d]: per token, broadcast over heads
    # Who sees whom (True = attend). Rows: the prefix, then their own real tokens causally; completions: the
    # prefix, their row's real tokens, then their own causally. Padded queries still see something (finite softmax).
    own_rows = torch.ones((a, a), dtype=torch.bool, device=device).tril()[None] & row_real[:, None, :]
    rows_see = torch.cat([torch.ones((n, a, p), dtype=torch.bool, device=device), own_rows], dim=2)
    own_comps = torch.ones((c, c), dtype=torch.bool, device=device).tril()[None] & comp_real[:, None, :]
    comps_see = torch.cat([torch.ones((m, c, p), dtype=torch.bool, device=device),
                           row_real[owner][:, None, :].expand(-1, c, -1), own_comps], dim=2)
    layers = decoder.layers[:decoder.config.num_hidden_layers]
    keeps = (keep_rows.bool(), keep_completions.bool())
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        d = attention.head_dim
        last = index == len(layers) - 1  # queries, attention output and MLP only at the kept positions
        normed = layer.input_layernorm(x)
        keys = rotate(attention.k_proj(normed).view(x.shape[0], -1, d), cos, sin)
        values = attention.v_proj(normed).view(x.shape[0], -1, d)
        # split (not slicing): the backward is one concatenation instead of zero-filled full-size gradients
        k0, k1, k2 = keys.split(sizes)
        v0, v1, v2 = values.split(sizes)
        k0, v0 = k0.transpose(0, 1)[None], v0.transpose(0, 1)[None]                         # [1, kv, P, d]
        k1, v1 = k1.view(n, a, -1, d).transpose(1, 2), v1.view(n, a, -1, d).transpose(1, 2)  # [n, kv, A, d]
        level_keys = [(torch.cat([k0.expand(n, -1, -1, -1), k1], dim=2),
                       torch.cat([v0.expand(n, -1, -1, -1), v1], dim=2)), None]
        if m * c:
            k2, v2 = k2.view(m, c, -1, d).transpose(1, 2), v2.view(m, c, -1, d).transpose(1, 2)  # [m, kv, C, d]
            level_keys[1] = (torch.cat([k0.expand(m, -1, -1, -1), k1[owner], k2], dim=2),
                             torch.cat([v0.expand(m, -1, -1, -1), v1[owner], v2], dim=2))
        outs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (residual, attention output) per level
        if p and (not last or keep_prefix_last):
            start = p - 1 if last else 0  # the last layer: only the prefix's last position (it sees every key)
            q = rotate(attention.q_proj(normed[start:p]).view(p - start, -1, d), cos[start:p], sin[start:p])
            o = _attend(q.transpose(0, 1)[None], k0, v0, None, attention.scaling, causal=not last)
            outs.append((x[start:p], o[0].transpose(0, 1).reshape(p - start, -1)))
        offset = p
        for count, width, see, level, keep in ((n, a, rows_see, level_keys[0], keeps[0]),
                                               (m, c, comps_see, level_keys[1], keeps[1])):
            span = slice(offset, offset + count * width)
            offset += count * width
            if not count or not width:
                continue
            ks, vs = level
            xs, zs = x[span].view(count, width, -1), normed[span].view(count, width, -1)
            cs, ss = cos[span].view(count, width, 1, d), sin[span].view(count, width, 1, d)
            valid = None
            if last:  # each sequence's kept columns first, in order, padded to the sequence with most
                counts = keep.sum(1)
                k = int(counts.max())
                if k == 0:
                    continue
                cols = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
                valid = torch.arange(k, device=device)[None, :] < counts[:, None]
                xs, zs, cs, ss, see = (_take(z, cols) for z in (xs, zs, cs, ss, see))
            q = rotate(attention.q_proj(zs).view(count, zs.shape[1], -1, d), cs, ss).transpose(1, 2)
            o = _attend(q, ks, vs, see[:, None], attention.scaling).transpose(1, 2).reshape(count, zs.shape[1], -1)
            if valid is not None:
                xs, o = xs[valid], o[valid]
            outs.append((xs.reshape(-1, xs.shape[-1]), o.reshape(-1, o.shape[-1])))
        if not outs:
            x = x[:0]
            break
        x = torch.cat([r for r, _ in outs]) + attention.o_proj(torch.cat([o for _, o in outs]))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = decoder.norm(x)
    prefix_last, rows, completions = x.split([int(p > 0 and keep_prefix_last), int(keeps[0].sum()),
                                              int(keeps[1].sum())])
    return TreeStates(prefix_last, rows, completions)


def _take(z: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """z [B, T, ...] at columns `cols` [B, k] of each row."""
    return torch.gather(z, 1, cols.view(*cols.shape, *([1] * (z.dim() - 2))).expand(-1, -1, *z.shape[2:]))
