"""The zoom-in objectives against plain NumPy, and on any device layout."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision
from jax.sharding import NamedSharding, PartitionSpec

from zoomin_jax.errors import UserError
from zoomin_jax.data.packing import pack
from zoomin_jax.losses import LossConfig, child_means, clip_loss, level_losses, roi_pool
from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD
from zoomin_jax.recipes import apply_variant

SCALE = 10.0


def same_ids(ids):
    return [[x == y for y in ids] for x in ids]


def numpy_clip_loss(a, b, scale, mask=None, same=None):
    """docs/design.md §5's L_CLIP, row by row: each valid pair (i, i) against the valid rows that are not
    the same pair as i (same[i][j]: identical texts)."""
    n = len(a)
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    logits = scale * a @ b.T
    losses = []
    for i in np.flatnonzero(keep):
        others = [j for j in np.flatnonzero(keep) if j == i or same is None or not same[i][j]]
        for row in (logits[i], logits[:, i]):  # a -> b, then b -> a
            losses.append(np.log(np.exp(row[others]).sum()) - row[i])
    return 0.5 * sum(losses) / len(np.flatnonzero(keep)) if losses else 0.0


def test_clip_loss_equals_numpy_on_a_hand_made_batch():
    a = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    b = np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0], [0.5, 0.5, 0.5]])
    for scale in (1.0, 14.3):
        assert np.isclose(float(clip_loss(a, b, scale)), numpy_clip_loss(a, b, scale), rtol=1e-5)
    mask = np.array([True, False, True, True])
    assert np.isclose(float(clip_loss(a, b, 10.0, mask)), numpy_clip_loss(a, b, 10.0, mask), rtol=1e-5)
    assert float(clip_loss(a, b, 10.0, np.zeros(4, bool))) == 0.0


def test_identical_texts_are_positives_not_negatives():
    """Rows 0 and 2 share one text (the same embedding twice), rows 1 and 3 another; row 3 is padding."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 6))
    texts = rng.normal(size=(5, 6))
    texts[2], texts[3] = texts[0], texts[1]
    ids = np.array([7, 9, 7, 9, 4])
    mask = np.array([True, True, True, False, True])
    same = ids[:, None] == ids[None, :]
    got = float(clip_loss(images, texts, SCALE, mask, same))
    assert np.isclose(got, numpy_clip_loss(images, texts, SCALE, mask, same_ids(ids)), rtol=1e-5)
    assert got < float(clip_loss(images, texts, SCALE, mask))  # the copies no longer compete
    # With all ids distinct it is CLIP's loss.
    assert np.isclose(float(clip_loss(images, texts, SCALE, mask, np.eye(5, dtype=bool))),
                      numpy_clip_loss(images, texts, SCALE, mask), rtol=1e-6)


def test_clip_loss_is_the_same_on_a_sharded_global_batch():
    """Positives too: rows on different devices with one id are positives of each other. Its
    gradient's program runs no collective inside a conditional: jnp.diagonal's put one there, and
    XLA:CPU's multi-process collectives then mixed up gradients between devices (2 processes x 4
    devices: 3 of 18 calls of one step on the same inputs gave another grad_norm)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    mask = rng.random(16) > 0.3
    ids = rng.integers(0, 5, 16).astype(np.int32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    loss = lambda a, b, mask, ids: clip_loss(a, b, 20.0, mask, ids[:, None] == ids[None, :])  # noqa: E731
    inputs = [jax.device_put(x, shard) for x in (a, b, mask, ids)]
    assert np.isclose(float(jax.jit(loss)(*inputs)), numpy_clip_loss(a, b, 20.0, mask, same_ids(ids)), rtol=1e-5)
    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*inputs).compile().as_text()
    assert "all-gather" in program and "conditional" not in program


def test_clip_loss_gradients_stay_finite_with_masked_rows():
    a, b = np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)
    grad = jax.grad(lambda x: clip_loss(x, b, 10.0, np.array([True, True, False, False])))(a)
    assert np.isfinite(grad).all() and np.abs(grad[2:]).max() == 0.0


def test_child_means_average_each_shards_children_into_its_parents():
    """Two shards of two parents; parent 1 and 3 have no child, empty slots (-1) count for nothing."""
    children = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)
    parent = jnp.array([0, 0, -1, 0, -1, -1])
    np.testing.assert_allclose(child_means(children, parent, 4, 2), [[1.0, 2.0], [0, 0], [6.0, 7.0], [0, 0]])


def numpy_covered_mean(grid, box):
    """The mean of the tokens under a box, each weighted by the area of it the box covers."""
    x0, y0, x1, y1 = box
    total, area = np.zeros(grid.shape[-1]), 0.0
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            covered = max(0.0, min(x1, col + 1) - max(x0, col)) * max(0.0, min(y1, row + 1) - max(y0, row))
            total += covered * grid[row, col]
            area += covered
    return total / area


def random_boxes(rng, sides, g=16, integer=False):
    """One box per side length (in tokens), at a random place inside a g x g grid."""
    boxes = []
    for side in sides:
        w, h = (side, side) if integer else (side * rng.uniform(0.8, 1.0), side * rng.uniform(0.8, 1.0))
        x0, y0 = rng.uniform(0, g - w), rng.uniform(0, g - h)
        if integer:
            x0, y0 = float(rng.integers(0, g - w + 1)), float(rng.integers(0, g - h + 1))
        boxes.append([x0, y0, x0 + w, y0 + h])
    return np.array(boxes, np.float32)


def test_roi_pool_is_the_covered_token_mean_from_one_token_to_the_whole_grid():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(2, 16, 16, 8)).astype(np.float32)
    boxes = np.stack([random_boxes(rng, range(1, 17)), random_boxes(rng, np.linspace(0.3, 16, 16))])
    boxes[1, 0] = [3.25, 5.5, 3.75, 5.9]  # inside one token: that token
    parent = np.repeat(np.arange(2), 16)  # each grid's 16 boxes
    pooled = np.asarray(jax.jit(roi_pool)(grid, boxes.reshape(32, 4), parent)).reshape(2, 16, 8)
    for b in range(2):
        for k, box in enumerate(boxes[b]):
            np.testing.assert_allclose(pooled[b, k], numpy_covered_mean(grid[b], box), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled[1, 0], grid[1, 5, 3], rtol=1e-6)
    assert np.abs(np.asarray(roi_pool(jnp.asarray(grid), jnp.zeros((2, 4)), jnp.array([0, -1])))).max() == 0.0  # padding


def test_roi_pool_equals_torchvision_roi_align_on_token_aligned_boxes():
    """torchvision's roi_align (aligned=True, adaptive sampling: sampling_ratio=-1, one bin) samples
    the token centres of a box whose edges lie on token edges: the same mean, for 1x1 to 16x16."""
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(1, 16, 16, 8)).astype(np.float32)
    boxes = random_boxes(rng, range(1, 17), integer=True)
    ours = np.asarray(roi_pool(jnp.asarray(grid), jnp.asarray(boxes), jnp.zeros(16, jnp.int32)))
    rois = torch.from_numpy(np.concatenate([np.zeros((16, 1), np.float32), boxes], axis=1))
    theirs = torchvision.ops.roi_align(torch.from_numpy(grid).permute(0, 3, 1, 2), rois, output_size=1,
                                       spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    np.testing.assert_allclose(ours, theirs[:, :, 0, 0].numpy(), rtol=1e-5, atol=1e-5)


# level_losses as a whole, on a model NumPy can redo: an image's patch tokens are its normalised
# pixels (patch size 1), the class token their mean, the head a fixed linear map, a text's embedding
# a fixed row picked by its second token.
HEAD = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
TEXT_TABLE = np.random.default_rng(3).normal(size=(16, 5)).astype(np.float32)


class StubVisual:
    def tokens(self, pixels, frozen_blocks=0, remat="none"):
        return pixels.mean(axis=(1, 2)), pixels

    def head(self, x):
        return x @ HEAD


class StubModel:
    visual = StubVisual()

    def encode_text(self, tokens):
        return jnp.asarray(TEXT_TABLE)[tokens[:, 1]]

    def scale(self):
        return jnp.float32(SCALE)


def stub_losses(batch, level, cfg=LossConfig(), slots=None):
    """level_losses on the stub model, jitted (one compilation beats many eager ops on CPU), of the
    batch's examples with their children packed into cfg.shards runs of `slots` child slots
    (default: every example's slots: nothing dropped)."""
    if level != "region":
        per_shard = len(batch["image"]) // cfg.shards
        batch = pack(batch, level, cfg.shards, slots or per_shard * batch["region_mask" if level == "panel"
                                                                         else "panel_mask"].shape[1])
    return jax.jit(lambda batch: level_losses(StubModel(), batch, level, cfg))(batch)


def np_image(images):
    pixels = (images / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    return pixels.mean(axis=(-3, -2)) @ HEAD


def np_children(embeddings, mask):
    """Masked mean of the L2-normalised children (and whether a parent has any)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    means = np.array([unit[i][mask[i]].mean(axis=0) if mask[i].any() else np.zeros(unit.shape[-1])
                      for i in range(len(unit))])
    return means, mask.any(axis=1)


def hand_made_batch(level, rng):
    """4 parents with 3 child slots. Parents 0 and 2 have one text (text 1); parents 1 and 3 the same
    child texts in another order; parent 2 has no child."""
    tokens = np.zeros((4, 77), np.int32)
    tokens[:, 1] = [1, 2, 1, 3]
    batch = {"image": rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8), "tokens": tokens,
             "text_id": tokens[:, 1] + 100}
    if level == "region":
        return batch
    child = "panel" if level == "figure" else "region"
    mask = np.array([[True, True, False], [True, True, True], [False, False, False], [True, True, True]])
    child_tokens = np.zeros((4, 3, 77), np.int32)
    child_tokens[:, :, 1] = [[4, 5, 0], [6, 7, 8], [0, 0, 0], [8, 6, 7]]
    batch |= {f"{child}_images": rng.integers(0, 256, (4, 3, 6, 6, 3), dtype=np.uint8), f"{child}_mask": mask,
              f"{child}_tokens": child_tokens, f"{child}_text_id": child_tokens[..., 1] + 100}
    if level == "panel":
        batch["region_grid_boxes"] = np.array([[[0, 0, 6, 6], [1.5, 2, 4, 5.5], [0, 0, 0, 0]],
                                               [[0.2, 0.2, 1.1, 0.9], [2, 3, 6, 4], [5, 5, 6, 6]],
                                               [[0, 0, 0, 0]] * 3,
                                               [[1, 1, 2, 2], [0, 3.5, 2.5, 6], [3, 0, 6, 3]]], np.float32)
    return batch


def numpy_level_losses(batch, level, weights):
    """docs/design.md §5 for one level, in NumPy: its intra-level term, message passing (parents against
    the masked mean of their L2-normalised children, text side positives where parents' or
    children's texts are the same), and for panels the ROI term (a region box's covered-token mean
    through the head against the region crop, over every valid region of the batch)."""
    image, text, ids = np_image(batch["image"]), TEXT_TABLE[batch["tokens"][:, 1]], batch["text_id"]
    terms = {level: numpy_clip_loss(image, text, SCALE, same=same_ids(ids))}
    if level != "region":
        child = "panel" if level == "figure" else "region"
        mask = batch[f"{child}_mask"]
        child_images = np_image(batch[f"{child}_images"])
        means, has = np_children(child_images, mask)
        terms[f"{level}_{child}_image"] = numpy_clip_loss(image, means, SCALE, has)
        means, has = np_children(TEXT_TABLE[batch[f"{child}_tokens"][..., 1]], mask)
        child_sets = [sorted(batch[f"{child}_text_id"][i][mask[i]]) for i in range(4)]
        same = [[ids[i] == ids[j] or child_sets[i] == child_sets[j] for j in range(4)] for i in range(4)]
        terms[f"{level}_{child}_text"] = numpy_clip_loss(text, means, SCALE, has, same)
    if level == "panel":
        pixels = (batch["image"] / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
        pooled = np.array([[numpy_covered_mean(pixels[b], box) if mask[b, k] else np.ones(3)
                            for k, box in enumerate(batch["region_grid_boxes"][b])] for b in range(4)]) @ HEAD
        terms["roi"] = numpy_clip_loss(pooled.reshape(12, -1), child_images.reshape(12, -1), SCALE,
                                       mask.reshape(12))
    terms = {term: value for term, value in terms.items() if weights.get(term, 1.0)}
    return sum(weights.get(term, 1.0) * value for term, value in terms.items()), terms


@pytest.mark.parametrize("level, shards, slots", [
    ("figure", 1, None), ("panel", 1, None), ("region", 1, None),
    # Packed as tight as the batch allows: all 8 children in 8 slots, or in two shards (parents 0-1
    # hold 5 children, parents 2-3 hold 3) of 5 slots each.
    ("figure", 1, 8), ("panel", 2, 5)])
def test_level_losses_equal_numpy_on_a_hand_made_batch(level, shards, slots):
    """The numpy reference reads the children in their slots per example (the padded layout); the
    step reads them packed, with every slot of every example or as few as hold them."""
    batch = hand_made_batch(level, np.random.default_rng(4))
    weights = {"figure": 1.0, "figure_panel_image": 0.5, "figure_panel_text": 0.25, "panel": 2.0,
               "panel_region_image": 0.5, "panel_region_text": 0.3, "roi": 0.7, "region": 1.5}
    expected_total, expected = numpy_level_losses(batch, level, weights)
    total, terms = stub_losses(batch, level, LossConfig(weights=tuple(weights.items()), shards=shards), slots)
    dropped = {"figure": "panel_dropped", "panel": "region_dropped"}.get(level)
    if dropped:
        assert float(terms.pop(dropped)) == 0.0
    assert set(terms) == set(expected)
    for term, value in expected.items():
        assert np.isclose(float(terms[term]), value, rtol=1e-5), (term, float(terms[term]), value)
    assert np.isclose(float(total), expected_total, rtol=1e-5)


def test_the_text_id_pairs_are_what_the_reference_assumes():
    """The hand-made batch exercises both kinds of text-side positives, and they change the loss."""
    batch = hand_made_batch("figure", np.random.default_rng(4))
    _, with_ids = stub_losses(batch, "figure")
    _, without = stub_losses({k: v for k, v in batch.items() if "text_id" not in k}, "figure")
    for term in ("figure", "figure_panel_text"):  # caption 0 = caption 2; children of 1 = children of 3
        assert float(with_ids[term]) < float(without[term]) - 1e-3, term
    assert np.isclose(float(with_ids["figure_panel_image"]), float(without["figure_panel_image"]))


def test_a_zero_weight_term_is_neither_computed_nor_logged():
    batch = hand_made_batch("panel", np.random.default_rng(4))
    weights = (("panel_region_image", 0.0), ("roi", 0.0))
    total, terms = stub_losses(batch, "panel", LossConfig(weights=weights))
    assert set(terms) == {"panel", "panel_region_text", "region_dropped"}
    assert np.isclose(float(total), float(terms["panel"] + terms["panel_region_text"]))


def test_a_misspelt_loss_weight_is_a_clear_error():
    with pytest.raises(UserError, match=r"config.loss_weights.figure_panel_imag is not a loss term of this run; "
                                        r"valid keys: figure, figure_panel_image, .*, roi, region"):
        LossConfig(weights=(("figure", 1.0), ("figure_panel_imag", 0.5)))
    config = ml_collections.ConfigDict({"loss_weights": {"panel": 1.0, "rio": 1.0}, "data": {"max_panels": 4}})
    with pytest.raises(UserError, match="config.loss_weights.rio is not a loss term"):
        apply_variant(config, "zoomin")


def test_a_variant_keeps_the_weights_of_the_terms_it_computes():
    from configs.demo_cpu import get_config
    assert set(get_config("variant=region_only").loss_weights) == {"region"}
    assert dict(get_config("variant=panel_only").loss_weights) == {
        "panel": 1.0, "panel_region_image": 0.5, "panel_region_text": 0.5, "roi": 0.5}
    figure_only = get_config("variant=figure_only")
    assert dict(figure_only.loss_weights) == {"figure": 1.0, "figure_panel_image": 0.0, "figure_panel_text": 0.0}
    assert len(get_config("variant=joint").loss_weights) == 8
