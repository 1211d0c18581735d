"""Zoom-in objectives (docs/design.md §5): CLIP InfoNCE within each level, message passing between
levels (children averaged into their parent), and ROI consistency between a panel's patch tokens
and its regions' crops.

All functions see the global batch: under jit with sharded inputs the similarity matrix spans every
device's examples (XLA inserts the gathers), so the number does not depend on the mesh.

Identical texts. A batch can hold one text several times (a caption reused for regions without a
clause, a generic sub-caption, a figure published twice); data.samples tags every text with an id
(batch_layout's text ids: the same text, the same id). Plain InfoNCE would make such pairs each
other's negatives, asking the model to tell apart two copies of one text. Here they are positives:
a pair whose texts are identical is left out of the other's denominator, so every (image, text)
pair is scored against true negatives only. With all texts distinct this is exactly CLIP's loss; in
the image->text direction it is CLIP over the batch's distinct texts. We prefer it to the
sum-of-positives form (-log Σ_pos softmax), which rewards a text by how often it is repeated and,
for a text with several images, lets one of them carry the others.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoomin_jax.batch_layout import LAYOUTS
from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD
from zoomin_jax.recipes import check_loss_weights


def l2_normalize(x, eps: float = 1e-12):
    # rsqrt of the clamped squared norm: a zero vector (a parent with no valid child) gets a zero
    # gradient, where the gradient of norm() at 0 is NaN.
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def clip_loss(a, b, scale, mask=None, same=None):
    """½[CE(s·â b̂ᵀ, I) + CE(s·b̂ âᵀ, I)] over the batch. Rows where `mask` is False take part
    neither as queries nor as negatives; with no valid row the loss is 0. `same` [n, n] (symmetric)
    marks pairs of rows that are positives of each other (identical texts): each is left out of the
    other's denominator (see the module docstring)."""
    a, b = l2_normalize(a), l2_normalize(b)
    logits = scale * a @ b.T
    # The positives as row-wise dot products, not jnp.diagonal(logits): diagonal's gather (and, in
    # the backward pass, scatter-add) of the sharded logits puts collectives inside a conditional,
    # where XLA:CPU's multi-process collectives mixed up gradients between devices.
    positive = scale * jnp.sum(a * b, axis=-1)
    n = logits.shape[0]
    valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
    scored = valid[:, None] & valid[None, :]
    if same is not None:
        scored &= ~same | jnp.eye(n, dtype=bool)
    # A finite fill, not -inf: invalid rows are computed and zeroed, and must not turn gradients NaN.
    logits = jnp.where(scored, logits, -1e9)
    a_to_b = jnp.where(valid, jax.nn.logsumexp(logits, axis=1) - positive, 0.0)
    b_to_a = jnp.where(valid, jax.nn.logsumexp(logits, axis=0) - positive, 0.0)
    count = jnp.maximum(valid.sum(), 1)
    return 0.5 * (a_to_b.sum() + b_to_a.sum()) / count


def same_text(ids):
    """[n] text ids -> [n, n] pairs with identical texts."""
    return ids[:, None] == ids[None, :]


def same_children(ids, mask):
    """[n, K] child text ids and mask -> [n, n] pairs of parents whose valid children hold the same
    texts (as multisets), so their child-text means are identical."""
    # Padding becomes the largest id and sorts last; a real id equal to it still compares right,
    # since the counts of valid children must match too.
    keys = jnp.sort(jnp.where(mask, ids, jnp.iinfo(ids.dtype).max), axis=1)
    count = mask.sum(axis=1)
    return (count[:, None] == count[None, :]) & (keys[:, None, :] == keys[None, :, :]).all(axis=-1)


def by_shard(x, shards: int):
    """[n, ...] -> [shards, n / shards, ...]: each device's run of a batch (batch_layout's shards)."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def membership(parent, parents: int, shards: int):
    """[K] packed children's parents (position in their shard's run of parents, -1: empty slot) ->
    [shards, K / shards, parents / shards] one-hot. Children reach their parents by matmuls batched
    over the shard axis, which the batch's sharding splits: each device works on its own parents and
    children only (no scatter or gather whose indices XLA would have to resolve across devices)."""
    return (by_shard(parent, shards)[..., None] == jnp.arange(parents // shards)).astype(jnp.float32)


def child_means(children, parent, parents: int, shards: int):
    """Mean of each parent's packed children: [K, D] children, [K] parent (as `membership`) ->
    [parents, D] (zeros where a parent has none)."""
    member = membership(parent, parents, shards)
    sums = jnp.einsum("skb,skd->sbd", member, by_shard(children.astype(jnp.float32), shards))
    return (sums / jnp.maximum(member.sum(axis=1), 1.0)[..., None]).reshape(parents, -1)


def roi_pool(grid, boxes, parent, shards: int = 1):
    """The mean of each box's parent's token grid over the box, every token weighted by the area of it
    the box covers.

    grid: [B, g, g, W] patch tokens; boxes: [K, 4] as x0, y0, x1, y1 in token units (token j covers
    [j, j+1)); parent: [K], each box's grid (as `membership`: its position in its shard's run of
    grids, -1 for an empty slot). Returns [K, W]; an empty box (padding) pools to zeros.

    DESIGN: the overlap-weighted token mean rather than torchvision's adaptive bilinear sampling. It
    is the exact mean of what the box covers (for any size, from a fraction of a token to the whole
    grid) and it is a fixed amount of work: two [g] weight vectors per box and one contraction,
    where adaptive sampling's ceil(box) x ceil(box) points per box would, under jit's static shapes,
    have to be padded to g x g bilinear gathers for every box. Where box edges lie on token edges the
    two agree (torchvision's roi_align with aligned=True then samples exactly the token centres)."""
    edges = jnp.arange(grid.shape[1], dtype=jnp.float32)

    def cover(lo, hi):  # [K] edges -> [K, g]: the length of each token row/column inside the box
        return jnp.clip(jnp.minimum(hi[..., None], edges + 1) - jnp.maximum(lo[..., None], edges), 0.0, 1.0)

    wx, wy = cover(boxes[:, 0], boxes[:, 2]), cover(boxes[:, 1], boxes[:, 3])
    area = wx.sum(-1) * wy.sum(-1)
    weights = jnp.einsum("skb,sky,skx->skbyx", membership(parent, grid.shape[0], shards), by_shard(wy, shards),
                         by_shard(wx, shards))
    pooled = jnp.einsum("skbyx,sbyxw->skw", weights, by_shard(grid.astype(jnp.float32), shards))
    return pooled.reshape(boxes.shape[0], -1) / jnp.where(area > 0, area, 1.0)[:, None]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    weights: tuple[tuple[str, float], ...] = ()   # term -> weight; terms not named weigh 1, weight 0 skips one
    text_frozen: bool = False      # text embeddings carry no gradient (the text tower is not trained)
    frozen_blocks: int = 0         # leading vision blocks under stop_gradient
    remat: str = "none"            # how the trainable vision blocks are rematerialised (models.clip.REMAT_POLICIES)
    shards: int = 1                # devices a batch is split over (batch_layout.Dims.shards)

    def __post_init__(self):
        check_loss_weights(dict(self.weights))

    def weight(self, term: str) -> float:
        return dict(self.weights).get(term, 1.0)


def pixels_to_model(images):
    """uint8 [..., H, W, 3] -> normalised float32 (open_clip's mean/std), on device."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)


def _encode_images(model, images, cfg: LossConfig):
    """[..., H, W, 3] uint8 -> (embeddings [..., D], patch grid [..., g, g, W]). Embeddings leave the
    model in float32 whatever its compute dtype: the losses' softmaxes are summed in float32."""
    lead = images.shape[:-3]
    cls, grid = model.visual.tokens(pixels_to_model(images.reshape(-1, *images.shape[-3:])), cfg.frozen_blocks,
                                    cfg.remat)
    embeddings = model.visual.head(cls).astype(jnp.float32)
    return embeddings.reshape(*lead, -1), grid.reshape(*lead, *grid.shape[1:])


def _encode_texts(model, tokens, cfg: LossConfig):
    """Token ids through the text tower, or precomputed (frozen-tower) embeddings as they are."""
    if jnp.issubdtype(tokens.dtype, jnp.floating):
        return tokens
    lead = tokens.shape[:-1]
    embeddings = model.encode_text(tokens.reshape(-1, tokens.shape[-1])).reshape(*lead, -1).astype(jnp.float32)
    return jax.lax.stop_gradient(embeddings) if cfg.text_frozen else embeddings


def level_losses(model, batch: dict, level: str, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """(weighted total, {term: unweighted value} and, for a level with children, the children its
    batch dropped (data.packing)) for one level's batch (laid out as batch_layout.LAYOUTS[level]
    says); a term of weight 0 is neither computed nor logged. Text ids mark identical texts as
    positives; a batch without them has all texts distinct.

    DESIGN: the text-side message-passing term is computed even when the text tower is frozen. Its
    texts are then constants, but logit_scale, which the paper's recipe trains, still gets a gradient
    from it: skipping it would train logit_scale on a different objective than the paper's and log a
    total that is not the objective. With the text cache it costs a [B, B] similarity: on the tiny
    preset (bench_train, configs/demo_cpu.py, text tower frozen, one CPU device, 10-step medians of two
    runs) the figure / panel steps took 16 / 13-18 ms with it and 15-16 / 11-16 ms without. Token ids
    through the frozen tower instead cost its forward pass over every child text (45-55 / 40-46 ms vs
    21-25 / 15-19 ms): that is what data.text_cache is for."""
    scale = model.scale()
    layout = LAYOUTS[level]
    weighted = {term for term in layout.terms if cfg.weight(term)}
    image, grid = _encode_images(model, batch[layout.image], cfg)
    text = _encode_texts(model, batch[layout.tokens], cfg)
    ids = batch.get(layout.text_id)
    same = None if ids is None else same_text(ids)
    terms, counts = {}, {}
    if level in weighted:
        terms[level] = clip_loss(image, text, scale, same=same)
    if layout.child is not None:
        mask, parent, parents = batch[layout.child_mask], batch[layout.child_parent], image.shape[0]
        has_children, filled = mask.any(axis=1), parent >= 0
        counts[layout.child_dropped] = batch[layout.child_dropped].sum().astype(jnp.float32)
        image_term, text_term = f"{level}_{layout.child}_image", f"{level}_{layout.child}_text"
        if image_term in weighted or "roi" in weighted:
            child_images, _ = _encode_images(model, batch[layout.child_images], cfg)
            if image_term in weighted:
                mean_images = child_means(l2_normalize(child_images), parent, parents, cfg.shards)
                terms[image_term] = clip_loss(image, mean_images, scale, has_children)
            if "roi" in weighted:
                pooled = roi_pool(grid, batch[layout.child_grid_boxes], parent, cfg.shards)
                terms["roi"] = clip_loss(model.visual.head(pooled).astype(jnp.float32), child_images, scale, filled)
        if text_term in weighted:
            child_texts = _encode_texts(model, batch[layout.child_tokens], cfg)
            mean_texts = child_means(l2_normalize(child_texts), parent, parents, cfg.shards)
            # Parents are the same pair when their own texts or their children's texts are identical:
            # a row (or column) equal to the positive one cannot be a negative.
            parents_same = None if ids is None else same | same_children(batch[layout.child_text_id], mask)
            terms[text_term] = clip_loss(text, mean_texts, scale, has_children, parents_same)
    total = sum(cfg.weight(term) * value for term, value in terms.items())
    return total, terms | counts
