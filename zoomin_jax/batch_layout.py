"""Each level's batch, described once: its child level, every array with its shape and dtype, its
loss terms. data.samples builds examples to it, losses reads its keys, bench_train's random batches,
the compile check's abstract batches (zoomin_jax.aot) and the hand FLOP count (flops.py) are made
from it, and tests/test_data.py holds the sampler's real output to it. A new array or level
is a change here, not a KeyError while tracing.

Light on purpose (numpy only), like recipes.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from zoomin_jax.recipes import JOINT, LEVEL_TERMS, LEVELS

CONTEXT_LENGTH = 77  # CLIP token ids per text


@dataclasses.dataclass(frozen=True)
class Level:
    """One level's batch: the parent example's arrays, and its children's (the level below). An
    example (data.samples) has a fixed number of child slots with a mask; a step's batch
    (data.packing) carries the children's crops, texts and boxes packed into a fixed number of slots
    per device, each with its parent's position among that device's examples, and keeps the per-example
    mask and text ids (small) for the loss's bookkeeping."""
    name: str
    child: str | None           # the level below, whose crops each example carries
    terms: tuple[str, ...]      # the loss terms its step computes (recipes.LEVEL_TERMS)
    child_boxes: bool           # children's boxes in the parent's patch-token grid (ROI consistency)

    image = "image"
    tokens = "tokens"           # token ids, or a frozen text tower's cached embeddings
    text_id = "text_id"         # equal for identical texts (data.samples.text_ids)

    def _child_key(self, what: str) -> str:
        if self.child is None:
            raise KeyError(f"the {self.name} level has no children")
        return f"{self.child}_{what}"

    @property
    def child_images(self) -> str:
        return self._child_key("images")

    @property
    def child_tokens(self) -> str:
        return self._child_key("tokens")

    @property
    def child_text_id(self) -> str:
        return self._child_key("text_id")

    @property
    def child_mask(self) -> str:
        return self._child_key("mask")

    @property
    def child_grid_boxes(self) -> str:
        return self._child_key("grid_boxes")

    @property
    def child_parent(self) -> str:
        return self._child_key("parent")

    @property
    def child_dropped(self) -> str:
        return self._child_key("dropped")

    @property
    def packed_keys(self) -> tuple[str, ...]:
        """The per-child arrays a step's batch carries packed (data.packing): the large ones."""
        return (self.child_images, self.child_tokens) + ((self.child_grid_boxes,) if self.child_boxes else ())


LAYOUTS = {
    "figure": Level("figure", "panel", LEVEL_TERMS["figure"], child_boxes=False),
    "panel": Level("panel", "region", LEVEL_TERMS["panel"], child_boxes=True),
    "region": Level("region", None, LEVEL_TERMS["region"], child_boxes=False),
}


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes a run fixes: crop side, child slots per parent of each level, what a text is
    (CONTEXT_LENGTH int32 token ids, or a cached embedding of `text_width` float32), the devices a
    batch is split over and the packed child slots per device of each level (a level not named:
    every example's slots, so nothing can be dropped)."""
    image_size: int
    children: tuple[tuple[str, int], ...]   # (parent level, child slots per example)
    text_width: int = CONTEXT_LENGTH
    text_cached: bool = False
    shards: int = 1
    packed: tuple[tuple[str, int], ...] = ()   # (parent level, child slots per device)

    @classmethod
    def of(cls, image_size: int, max_panels: int, max_regions: int, text_embedding: int | None = None) -> Dims:
        """`text_embedding`: the cached text embedding's width, or None for token ids."""
        return cls(image_size, (("figure", max_panels), ("panel", max_regions)),
                   text_embedding or CONTEXT_LENGTH, text_embedding is not None)

    def slots(self, level: str) -> int:
        return dict(self.children).get(level, 0)

    def slots_per_shard(self, level: str, batch: int) -> int:
        """Packed child slots per device in a batch of `batch` examples."""
        return dict(self.packed).get(level, batch // self.shards * self.slots(level))

    @property
    def text_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.text_cached else np.int32)


@dataclasses.dataclass(frozen=True)
class Array:
    shape: tuple[int, ...]
    dtype: np.dtype


def example_arrays(level: str, dims: Dims) -> dict[str, Array]:
    """{key: Array} of one example of `level` (no batch axis)."""
    layout = LAYOUTS[level]
    size, text = dims.image_size, (dims.text_width,)
    arrays = {layout.image: Array((size, size, 3), np.dtype(np.uint8)),
              layout.tokens: Array(text, dims.text_dtype),
              layout.text_id: Array((), np.dtype(np.int32))}
    if layout.child is not None:
        slots = dims.slots(level)
        arrays |= {layout.child_images: Array((slots, size, size, 3), np.dtype(np.uint8)),
                   layout.child_tokens: Array((slots, *text), dims.text_dtype),
                   layout.child_text_id: Array((slots,), np.dtype(np.int32)),
                   layout.child_mask: Array((slots,), np.dtype(bool))}
        if layout.child_boxes:
            arrays[layout.child_grid_boxes] = Array((slots, 4), np.dtype(np.float32))
    return arrays


def batch_arrays(level: str, batch: int, dims: Dims) -> dict:
    """{key: Array} of a step's batch of `batch` examples, children packed; for JOINT {level: that of
    each level}."""
    if level == JOINT:
        return {name: batch_arrays(name, batch, dims) for name in LEVELS}
    arrays = {key: Array((batch, *array.shape), array.dtype) for key, array in example_arrays(level, dims).items()}
    layout = LAYOUTS[level]
    if layout.child is not None:
        slots = dims.shards * dims.slots_per_shard(level, batch)
        arrays |= {key: Array((slots, *arrays[key].shape[2:]), arrays[key].dtype) for key in layout.packed_keys}
        arrays |= {layout.child_parent: Array((slots,), np.dtype(np.int32)),
                   layout.child_dropped: Array((batch,), np.dtype(np.int32))}
    return arrays


def images_per_step(level: str, batch: int, dims: Dims) -> int:
    """The crops a step of `batch` examples puts through the vision tower: its examples and every
    packed child slot, filled or not."""
    return batch + (dims.shards * dims.slots_per_shard(level, batch) if LAYOUTS[level].child else 0)
