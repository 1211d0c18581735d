"""Model FLOPs of a training step counted by hand, for what the step actually computes: the frozen
vision prefix forward only, the trainable blocks forward and backward (again forward under remat),
no text tower when texts come from the cache. A multiply-add is 2 FLOPs; layer norms, softmax,
GELU and the losses (a few B x B matrices) are left out, so this is the matmul work, which is
what a matmul peak is a peak of. bench_train prints it next to XLA's own count of the compiled
step (cost_analysis), which includes everything XLA emits.
"""
from __future__ import annotations

import dataclasses

from zoomin_jax.batch_layout import Dims, images_per_step
from zoomin_jax.models.config import CLIPConfig
from zoomin_jax.recipes import JOINT, LEVELS


def block_forward(tokens: int, width: int, mlp_ratio: float) -> int:
    """One pre-LN transformer block on `tokens` tokens: q|k|v and out projections, the two attention
    products (scores and weighted values), the MLP's two matmuls."""
    hidden = int(width * mlp_ratio)
    return 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one training step encodes."""
    images: int                 # through the vision tower (parents and every child slot)
    texts: int                  # through the text tower (0 when cached)
    frozen_blocks: int          # leading vision blocks without a backward pass
    text_trains: bool           # whether the text tower gets a backward pass
    remat: bool                 # trainable blocks' forward recomputed in the backward pass


def step_shape(cfg: CLIPConfig, level: str, batch: int, dims: Dims, frozen_blocks: int, text_frozen: bool,
               remat: str) -> StepShape:
    """The images and texts a `level` step of `batch` examples laid out as `dims` encodes: a figure
    (panel) step encodes its parents and all their packed child slots, filled or not; the child texts
    only when the text tower trains (their terms are constants otherwise); no text when they are cached."""
    if level == JOINT:
        shapes = [step_shape(cfg, name, batch, dims, frozen_blocks, text_frozen, remat) for name in LEVELS]
        return dataclasses.replace(shapes[0], images=sum(s.images for s in shapes), texts=sum(s.texts for s in shapes))
    images = images_per_step(level, batch, dims)
    texts = 0 if dims.text_cached else (batch if text_frozen else images)
    return StepShape(images=images, texts=texts, frozen_blocks=frozen_blocks,
                     text_trains=not text_frozen, remat=remat != "none")


def step_flops(cfg: CLIPConfig, shape: StepShape) -> int:
    vision, text = cfg.vision, cfg.text
    tokens = vision.grid ** 2 + 1
    block = block_forward(tokens, vision.width, vision.mlp_ratio)
    stem = 2 * vision.grid ** 2 * 3 * vision.patch_size ** 2 * vision.width
    head = 2 * vision.width * cfg.embed_dim
    # The frozen prefix (with the stem, when no block before it trains) runs forward only; the rest
    # forward and backward, where a matmul's input gradient and its weight gradient each cost its
    # forward (the first trained block's input gradient is not needed: < 1% on ViT-L-14, not subtracted).
    frozen = stem + shape.frozen_blocks * block if shape.frozen_blocks else 0
    trained = (vision.layers - shape.frozen_blocks) * block + head + (0 if shape.frozen_blocks else stem)
    per_image = frozen + trained * (3 + (1 if shape.remat else 0))
    text_block = block_forward(text.context_length, text.width, text.mlp_ratio)
    text_forward = text.layers * text_block + 2 * text.width * cfg.embed_dim
    per_text = text_forward * (3 if shape.text_trains else 1)
    return shape.images * per_image + shape.texts * per_text
