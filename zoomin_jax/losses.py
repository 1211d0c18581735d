"""Zoom-in objectives (DESIGN.md §5): CLIP InfoNCE within each level, message passing between
levels (children averaged into their parent), and ROI consistency between a panel's patch tokens
and its regions' crops.

All functions see the global batch: under jit with sharded inputs the similarity matrix spans every
device's examples (XLA inserts the gathers), so the number does not depend on the mesh.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD

TERMS = {"figure": ("figure", "figure_panel_image", "figure_panel_text"),
         "panel": ("panel", "panel_region_image", "panel_region_text", "roi"),
         "region": ("region",)}
ALL_TERMS = frozenset(term for terms in TERMS.values() for term in terms)


def l2_normalize(x, eps: float = 1e-12):
    # rsqrt of the clamped squared norm: a zero vector (a parent with no valid child) gets a zero
    # gradient, where the gradient of norm() at 0 is NaN.
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def clip_loss(a, b, scale, mask=None):
    """½[CE(s·â b̂ᵀ, I) + CE(s·b̂ âᵀ, I)] over the batch. Rows where `mask` is False take part
    neither as queries nor as negatives; with no valid row the loss is 0."""
    a, b = l2_normalize(a), l2_normalize(b)
    logits = scale * a @ b.T
    n = logits.shape[0]
    valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
    # A finite fill, not -inf: invalid rows are computed and zeroed, and must not turn gradients NaN.
    logits = jnp.where(valid[:, None] & valid[None, :], logits, -1e9)
    positive = jnp.diagonal(logits)
    a_to_b = jnp.where(valid, jax.nn.logsumexp(logits, axis=1) - positive, 0.0)
    b_to_a = jnp.where(valid, jax.nn.logsumexp(logits, axis=0) - positive, 0.0)
    count = jnp.maximum(valid.sum(), 1)
    return 0.5 * (a_to_b.sum() + b_to_a.sum()) / count


def masked_mean(children, mask):
    """Mean over the valid children: [B, K, D], [B, K] -> [B, D] (zeros where none is valid)."""
    weights = mask.astype(children.dtype)[..., None]
    return (children * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def roi_align(grid, boxes, samples: int = 2):
    """Mean of samples×samples bilinear samples of a token grid inside each box.

    grid: [B, g, g, W] patch tokens; boxes: [B, K, 4] as x0, y0, x1, y1 in token units (token j
    covers [j, j+1), its centre is j + 0.5). Returns [B, K, W]."""
    g = grid.shape[1]
    steps = (jnp.arange(samples) + 0.5) / samples                        # [S]
    xs = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])   # [B, K, S]
    ys = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
    u = jnp.clip(xs - 0.5, 0, g - 1)  # in token-centre coordinates
    v = jnp.clip(ys - 0.5, 0, g - 1)
    u0, v0 = jnp.floor(u).astype(jnp.int32), jnp.floor(v).astype(jnp.int32)
    u1, v1 = jnp.minimum(u0 + 1, g - 1), jnp.minimum(v0 + 1, g - 1)
    fu, fv = u - u0, v - v0

    def gather(vi, ui):  # [B, K, S(y), S(x)] of token vectors -> [B, K, S, S, W]
        b = jnp.arange(grid.shape[0])[:, None, None, None]
        return grid[b, vi[..., :, None], ui[..., None, :]]

    wu, wv = fu[..., None, :, None], fv[..., :, None, None]
    top = gather(v0, u0) * (1 - wu) + gather(v0, u1) * wu
    bottom = gather(v1, u0) * (1 - wu) + gather(v1, u1) * wu
    return (top * (1 - wv) + bottom * wv).mean(axis=(2, 3))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    weights: tuple[tuple[str, float], ...] = ()   # term -> weight; terms not named weigh 1
    text_frozen: bool = False      # text-only terms are then constants: skipped
    frozen_blocks: int = 0         # leading vision blocks under stop_gradient
    remat: str = "none"            # how the trainable vision blocks are rematerialised (models.clip.REMAT_POLICIES)
    roi_samples: int = 2

    def weight(self, term: str) -> float:
        return dict(self.weights).get(term, 1.0)


def pixels_to_model(images):
    """uint8 [..., H, W, 3] -> normalised float32 (open_clip's mean/std), on device."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)


def _encode_images(model, images, cfg: LossConfig, with_grid: bool = False):
    """[..., H, W, 3] uint8 -> embeddings [..., D] (and the patch grid when asked)."""
    lead = images.shape[:-3]
    cls, grid = model.visual.tokens(pixels_to_model(images.reshape(-1, *images.shape[-3:])), cfg.frozen_blocks,
                                    cfg.remat)
    embeddings = model.visual.head(cls).reshape(*lead, -1)
    return (embeddings, grid.reshape(*lead, *grid.shape[1:])) if with_grid else embeddings


def _encode_texts(model, tokens, cfg: LossConfig):
    """Token ids through the text tower, or precomputed (frozen-tower) embeddings as they are."""
    if jnp.issubdtype(tokens.dtype, jnp.floating):
        return tokens
    lead = tokens.shape[:-1]
    embeddings = model.encode_text(tokens.reshape(-1, tokens.shape[-1])).reshape(*lead, -1)
    return jax.lax.stop_gradient(embeddings) if cfg.text_frozen else embeddings


def _children(embeddings, mask):
    """Masked mean of L2-normalised children, and which parents have any."""
    return masked_mean(l2_normalize(embeddings), mask), mask.any(axis=1)


def level_losses(model, batch: dict, level: str, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """(weighted total, {term: unweighted value}) for one level's batch (see `data.samples`)."""
    scale = model.scale()
    terms = {}
    if level == "region":
        terms["region"] = clip_loss(_encode_images(model, batch["image"], cfg),
                                    _encode_texts(model, batch["tokens"], cfg), scale)
    else:
        child = "panel" if level == "figure" else "region"
        with_grid = level == "panel"
        encoded = _encode_images(model, batch["image"], cfg, with_grid)
        image, grid = encoded if with_grid else (encoded, None)
        text = _encode_texts(model, batch["tokens"], cfg)
        terms[level] = clip_loss(image, text, scale)
        child_terms = [f"{level}_{child}_image"] + ([] if cfg.text_frozen else [f"{level}_{child}_text"])
        child_terms += ["roi"] if level == "panel" else []
        if not any(cfg.weight(term) for term in child_terms):  # e.g. plain figure-caption CLIP
            return cfg.weight(level) * terms[level], terms
        mask = batch[f"{child}_mask"]
        child_images = _encode_images(model, batch[f"{child}_images"], cfg)
        mean_images, has_children = _children(child_images, mask)
        terms[f"{level}_{child}_image"] = clip_loss(image, mean_images, scale, has_children)
        if not cfg.text_frozen:
            mean_texts, _ = _children(_encode_texts(model, batch[f"{child}_tokens"], cfg), mask)
            terms[f"{level}_{child}_text"] = clip_loss(text, mean_texts, scale, has_children)
        if level == "panel":
            pooled = model.visual.head(roi_align(grid, batch["region_grid_boxes"], cfg.roi_samples))
            flat = pooled.shape[0] * pooled.shape[1]
            terms["roi"] = clip_loss(pooled.reshape(flat, -1), child_images.reshape(flat, -1), scale,
                                     mask.reshape(flat))
    total = sum(cfg.weight(term) * value for term, value in terms.items())
    return total, terms
