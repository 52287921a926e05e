"""Deterministic batching shared by the trainers: shuffled epochs of row indices, cut into accumulation windows.

Guarantees: given the seed, the order is reproducible; every row is seen once per epoch before any repeats; a window
is `grad_accum` micro-batches of `batch_size` rows (the last micro-batch of an epoch may be short, it is topped up
from the next epoch so every optimizer step sees the same number of rows).
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def cycle_batches(rows: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless micro-batches of `batch_size` rows, reshuffled every epoch."""
    if not rows:
        raise ValueError("no rows to train on")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order.extend(epoch)
        picked, order = order[:batch_size], order[batch_size:]
        yield [rows[i] for i in picked]


def windows(rows: Sequence[T], batch_size: int, grad_accum: int, seed: int) -> Iterator[list[list[T]]]:
    """Endless accumulation windows: lists of `grad_accum` micro-batches."""
    batches = cycle_batches(rows, batch_size, seed)
    while True:
        yield [next(batches) for _ in range(grad_accum)]
