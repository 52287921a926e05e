"""One pass over rows that share a common prefix, the prefix's tokens computed once.

Rows of a training batch often begin with the same tokens: the chat template's header, a system prompt. For a
verified Llama-family decoder (the layer arithmetic `logprobs.last_layer_plan` vouches for) this module runs the
decoder layer by layer itself, with the prefix's tokens and every row's own tokens packed into one token matrix, so
each linear layer (projections, MLP) sees the prefix once and runs as one matmul; attention is split: the prefix
attends causally to itself, each row's tokens to the prefix's keys and then causally to its own real tokens.
A two-pass alternative (prefix through the model, then the rows on its key/value cache) computes the same values
but pays a second, nearly full-size weight-gradient matmul per linear layer for the few prefix tokens, which
cancelled the saving on small models.

Guarantees: the states equal the model's own forward on the unshared rows up to float rounding (the caller checks
this once per model class and dtype against the model's forward, values and gradients, and falls back for good
otherwise); the last layer computes its queries, attention output and MLP only at the positions the caller keeps
(keys and values everywhere), like `logprobs._last_layer_at`; nothing here handles sliding windows shorter than the
rows, attention dropout, or gradient checkpointing: callers do not come here then.
"""

from __future__ import annotations

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


def prefix_shared_states(decoder: torch.nn.Module, prefix_ids: torch.Tensor, rest_ids: torch.Tensor,
                         rest_mask: torch.Tensor, keep_prefix_last: bool,
                         keep_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prefix's last final-normed state [1, H] or [0, H] when not kept, the rows' final-normed states at
    `keep_rest` [n, H], row-major).

    `prefix_ids` [P] sits at positions 0..P-1 of every row; `rest_ids` [B, C] (right-padded, `rest_mask` 1 on real
    tokens) continues each row at positions P.. . Padding columns are computed and never attended to."""
    p, (b, c) = prefix_ids.shape[0], rest_ids.shape
    layers = decoder.layers[:decoder.config.num_hidden_layers]
    x = decoder.embed_tokens(torch.cat([prefix_ids, rest_ids.reshape(-1)]))[None]  # [1, P + B*C, H]
    h = x.shape[-1]
    positions = torch.arange(p + c, device=rest_ids.device)[None]
    cos, sin = decoder.rotary_emb(x, positions)  # [1, P + C, d]
    cos_p, sin_p = cos[:, None, :p], sin[:, None, :p]  # [1, 1, P, d]
    cos_r, sin_r = cos[:, None, p:], sin[:, None, p:]  # [1, 1, C, d]
    # A row's query at column i sees the whole prefix and its own real columns <= i; padded queries see the prefix.
    own = torch.ones((c, c), dtype=torch.bool, device=rest_ids.device).tril()[None] & rest_mask.bool()[:, None, :]
    allowed = torch.cat([torch.ones((b, c, p), dtype=torch.bool, device=rest_ids.device), own], dim=2)[:, None]
    x = x[0]
    keep_rest = keep_rest.bool()
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        d = attention.head_dim
        normed = layer.input_layernorm(x)
        # split (not slicing) keeps the backward a concatenation instead of zero-filled full-size gradients
        k_p, k_r = attention.k_proj(normed).split([p, b * c])
        v_p, v_r = attention.v_proj(normed).split([p, b * c])
        k_p = rotate(k_p.view(1, p, -1, d).transpose(1, 2), cos_p, sin_p)  # [1, kv, P, d]
        k_r = rotate(k_r.view(b, c, -1, d).transpose(1, 2), cos_r, sin_r)  # [B, kv, C, d]
        v_p, v_r = v_p.view(1, p, -1, d).transpose(1, 2), v_r.view(b, c, -1, d).transpose(1, 2)
        k_all = torch.cat([k_p.expand(b, -1, -1, -1), k_r], dim=2)  # [B, kv, P + C, d]
        v_all = torch.cat([v_p.expand(b, -1, -1, -1), v_r], dim=2)
        last = index == len(layers) - 1
        if not last:
            q_p, q_r = attention.q_proj(normed).split([p, b * c])
            q_p = rotate(q_p.view(1, p, -1, d).transpose(1, 2), cos_p, sin_p)  # [1, heads, P, d]
            q_r = rotate(q_r.view(b, c, -1, d).transpose(1, 2), cos_r, sin_r)  # [B, heads, C, d]
            o_p = _attend(q_p, k_p, v_p, None, attention.scaling, causal=True)  # [1, heads, P, d]
            o_r = _attend(q_r, k_all, v_all, allowed, attention.scaling)       # [B, heads, C, d]
            attended = torch.cat([o_p[0].transpose(0, 1).reshape(p, -1),
                                  o_r.transpose(1, 2).reshape(b * c, -1)])
            x = x + attention.o_proj(attended)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            continue
        # Last layer: queries, attention output and MLP only where a state is read (keys/values above: everywhere).
        parts = []
        if keep_prefix_last:
            q = attention.q_proj(normed[p - 1:p]).view(1, 1, -1, d).transpose(1, 2)
            q = rotate(q, cos_p[..., p - 1:p, :], sin_p[..., p - 1:p, :])
            o = _attend(q, k_p, v_p, None, attention.scaling)  # the last prefix query sees every prefix key
            parts.append(x[p - 1:p] + attention.o_proj(o[0].transpose(0, 1).reshape(1, -1)))
        counts = keep_rest.sum(1)
        n = int(counts.max()) if b else 0
        if n:
            cols = torch.argsort((~keep_rest).to(torch.int8), dim=1, stable=True)[:, :n]  # kept columns first
            valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]
            rows_x = x[p:].view(b, c, h)
            take = cols[..., None].expand(-1, -1, h)
            q = attention.q_proj(torch.gather(normed[p:].view(b, c, h), 1, take)).view(b, n, -1, d).transpose(1, 2)
            q = rotate(q, torch.gather(cos_r.expand(b, -1, -1, -1), 2, cols[:, None, :, None].expand(-1, 1, -1, d)),
                       torch.gather(sin_r.expand(b, -1, -1, -1), 2, cols[:, None, :, None].expand(-1, 1, -1, d)))
            sees = torch.gather(allowed[:, 0], 1, cols[..., None].expand(-1, -1, p + c))[:, None]
            o = _attend(q, k_all, v_all, sees, attention.scaling)
            out = torch.gather(rows_x, 1, take) + attention.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            parts.append(out[valid])
        x = torch.cat(parts) if parts else x.new_zeros((0, h))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return decoder.norm(x[:1] if keep_prefix_last else x[:0]), decoder.norm(x[1:] if keep_prefix_last else x)
