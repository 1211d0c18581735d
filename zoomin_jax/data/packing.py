"""Packed children: a figure (panel) batch carries the panel (region) crops that exist, in a fixed
number of child slots per device, instead of max_panels (max_regions) slots per example of which the
median figure fills two (batch_layout says the layout).

The slots per device are sized from the child counts the shard indexes hold (their histogram): the `quantile` of a
device's total over its examples, those counts drawn independently (exact, by convolving their
distribution). A batch whose children overflow its slots drops the overflow, evenly (each example's
first child before any example's second) and counts it per example in `{child}_dropped`.

Light on purpose (numpy only): it runs in grain's workers.
"""
from __future__ import annotations

import numpy as np

from zoomin_jax.batch_layout import LAYOUTS


def capped(histogram, max_children: int) -> np.ndarray:
    """[max_children + 1] items per child count, counts above max_children counted at it (an example
    holds at most that many)."""
    histogram = np.asarray(histogram, np.int64)
    out = np.zeros(max_children + 1, np.int64)
    out[:min(len(histogram), max_children + 1)] = histogram[:max_children + 1]
    out[max_children] += histogram[max_children + 1:].sum()
    return out


def median(histogram) -> float:
    """The median child count of the items a histogram counts."""
    cumulative = np.cumsum(histogram)
    middle = np.searchsorted(cumulative, [(cumulative[-1] - 1) // 2, cumulative[-1] // 2], side="right")
    return float(middle.mean())


def slots_for(histogram, max_children: int, examples: int, quantile: float) -> int:
    """Child slots for `examples` examples: the `quantile` of their total child count, each
    example's count (capped at `max_children`) drawn from the items `histogram` counts
    (histogram[c]: items holding c children); at least 1."""
    counts = capped(histogram, max_children)
    single = counts / max(1, counts.sum())
    total = np.ones(1)
    for _ in range(examples):
        total = np.convolve(total, single)
    covered = np.searchsorted(np.cumsum(total), quantile - 1e-12)
    return int(max(1, min(covered, examples * max_children)))


def pack(batch: dict, level: str, shards: int, slots: int) -> dict:
    """A batch of per-example child slots (as data.samples makes it) -> the packed layout: the batch's
    examples split into `shards` equal runs (one per device), each run's children in `slots` slots
    with their parent's position in the run (-1: empty slot); the child mask and text ids keep only
    the children packed."""
    layout = LAYOUTS[level]
    mask = batch[layout.child_mask]
    examples = mask.shape[0]
    if examples % shards:
        raise ValueError(f"a batch of {examples} examples does not split into {shards} equal runs")
    per_shard = examples // shards
    rank = np.cumsum(mask, axis=1) - 1                    # each child's position among its parent's
    parent_of, slot_of = np.nonzero(mask)
    shard_of = parent_of // per_shard
    # Within each shard, children in order of (rank, parent): every parent's first child, then every
    # second one...; the first `slots` are kept, then put back in parent order.
    order = np.lexsort((parent_of, rank[parent_of, slot_of], shard_of))
    position = np.arange(len(order)) - np.searchsorted(shard_of[order], shard_of[order])
    kept = order[position < slots]
    kept = kept[np.lexsort((slot_of[kept], parent_of[kept]))]
    kept_mask = np.zeros_like(mask)
    kept_mask[parent_of[kept], slot_of[kept]] = True
    dropped = (mask.sum(axis=1) - kept_mask.sum(axis=1)).astype(np.int32)
    target = shard_of[kept] * slots + (np.arange(len(kept)) - np.searchsorted(shard_of[kept], shard_of[kept]))
    out = {key: value for key, value in batch.items() if key not in layout.packed_keys}
    for key in layout.packed_keys:
        packed = np.zeros((shards * slots, *batch[key].shape[2:]), batch[key].dtype)
        packed[target] = batch[key][parent_of[kept], slot_of[kept]]
        out[key] = packed
    parent = np.full(shards * slots, -1, np.int32)
    parent[target] = parent_of[kept] % per_shard
    out[layout.child_mask] = kept_mask
    if layout.child_text_id in batch:
        out[layout.child_text_id] = np.where(kept_mask, batch[layout.child_text_id], 0)
    out[layout.child_parent], out[layout.child_dropped] = parent, dropped
    return out


class PackChildren:
    """pack() as a grain map over batches (module level: picklable for spawned workers)."""

    def __init__(self, level: str, shards: int, slots: int):
        self.level, self.shards, self.slots = level, shards, slots

    def __call__(self, batch: dict) -> dict:
        return pack(batch, self.level, self.shards, self.slots)
