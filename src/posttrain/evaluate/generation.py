"""Generation for benchmarks: batched, greedy or sampled, cut at stop sequences (lm-eval's `generate_until`).

Guarantees: each context is encoded the way the benchmark says (the tokenizer's own special tokens for raw text, or
none for text already rendered through a chat template), left-truncated so that context + `max_new_tokens` fits the
budget; the output is cut at the first occurrence of any stop string (the stop string itself removed) and generation
also ends at the model's end-of-sequence; batches are formed from contexts of similar length but results come back
in input order; greedy decoding is deterministic, sampling is seeded per call.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..rollout.generate import generate


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def encode_context(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def generate_until(model: Any, tokenizer: Any, contexts: Sequence[str], *, until: Sequence[str],
                   max_new_tokens: int, max_length: int, batch_size: int = 16, add_special_tokens: bool = True,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   num_samples: int = 1, seed: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[list[str]]:
    """For each context, `num_samples` continuations (a list of strings), cut at the stop strings."""
    budget = max_length - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a context in {max_length} tokens")
    encoded = []
    for text in contexts:
        ids = encode_context(tokenizer, text, add_special_tokens)
        encoded.append(ids[-budget:] if len(ids) > budget else ids)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[str]] = [[] for _ in encoded]
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        gens = generate(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens=max_new_tokens,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                        num_return_sequences=num_samples,
                        seed=None if seed is None else seed + start)
        for g in gens:
            results[chunk[g.prompt_index]].append(cut_at_stops(g.text, until))
        done += len(chunk)
        if progress is not None:
            progress(done, len(order))
    return results
