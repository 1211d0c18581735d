"""Packed children (data.packing): slots sized exactly from the child counts, overflow dropped evenly
and counted, and the training step's losses and gradients on packed children equal to those on every
example's slots (today's padded layout) where nothing overflows."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from zoomin_jax import losses, trainer
from zoomin_jax.batch_layout import LAYOUTS, Dims, batch_arrays, example_arrays
from zoomin_jax.bench_train import random_examples
from zoomin_jax.data.packing import capped, median, pack, slots_for
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset


def test_slots_are_the_quantile_of_the_total_child_count():
    """Counts 0, 1, 2, 5 with 2 slots per example (5 capped to 2): one example has 0 / 1 / 2 children
    with probability 1/4, 1/4, 1/2 (cumulative 1/4, 1/2, 1); two examples' total 0..4 with 1/16,
    2/16, 5/16, 4/16, 4/16, so a cumulative 1/16, 3/16, 8/16, 12/16, 1."""
    histogram = np.bincount([0, 1, 2, 5])
    assert [slots_for(histogram, 2, 2, q) for q in (0.1, 0.5, 0.51, 0.75, 0.99, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert [slots_for(histogram, 2, 1, q) for q in (0.5, 0.51)] == [1, 2] and slots_for([2], 6, 40, 0.99) == 1
    assert capped(histogram, 2).tolist() == [1, 1, 2] and median(capped(histogram, 2)) == 1.5
    assert median([0, 3, 0, 1]) == 1 and median([1, 0, 0, 0, 0, 1]) == 2.5


def padded_examples(level, masks, dims):
    """Examples of `level` whose child slots are filled as `masks` says, each child's pixels its
    number (parent * 10 + slot), laid out as data.samples makes them."""
    layout = LAYOUTS[level]
    batch = {key: np.zeros((len(masks), *array.shape), array.dtype)
             for key, array in example_arrays(level, dims).items()}
    batch[layout.child_mask] = np.asarray(masks, bool)
    for parent, slot in zip(*np.nonzero(batch[layout.child_mask])):
        batch[layout.child_images][parent, slot] = parent * 10 + slot
        batch[layout.child_text_id][parent, slot] = parent * 10 + slot
    return batch


def test_overflow_is_dropped_evenly_and_counted():
    """One shard of 4 slots over children 3, 1, 2, 0: every parent's first child, then parent 0's
    second; parent 0's third and parent 2's second are dropped and counted."""
    dims = Dims.of(8, max_panels=3, max_regions=3)
    masks = [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    packed = pack(padded_examples("figure", masks, dims), "figure", 1, 4)
    assert packed["panel_parent"].tolist() == [0, 0, 1, 2]
    assert packed["panel_images"][:, 0, 0, 0].tolist() == [0, 1, 10, 20]
    assert packed["panel_dropped"].tolist() == [1, 0, 1, 0]
    assert packed["panel_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert packed["panel_text_id"][2].tolist() == [20, 0, 0]
    want = batch_arrays("figure", 4, dataclasses.replace(dims, packed=(("figure", 4),)))
    assert {key: (value.shape, value.dtype) for key, value in packed.items()} == {
        key: (array.shape, array.dtype) for key, array in want.items()}


def test_two_shards_pack_their_own_parents_with_room_to_spare():
    dims = Dims.of(8, max_panels=3, max_regions=2)
    masks = [[1, 1], [0, 0], [1, 0], [1, 1]]
    packed = pack(padded_examples("panel", masks, dims), "panel", 2, 3)
    assert packed["region_parent"].tolist() == [0, 0, -1, 0, 1, 1]  # positions within each shard's two parents
    assert packed["region_images"][:, 0, 0, 0].tolist() == [0, 1, 0, 20, 30, 31]
    assert packed["region_dropped"].tolist() == [0, 0, 0, 0]


MODEL = get_preset("test-tiny")
RULES = (("visual/transformer/resblocks/1/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0), ("logit_scale", 1.0),
         (".*", None))


@pytest.mark.parametrize("level", ["figure", "panel"])
def test_packed_children_give_the_padded_losses_and_gradients(level):
    """8 examples in 2 shards with 3 child slots each (random_examples' children: one childless
    parent, the rest ~70% filled), packed into every slot (24 per shard: today's padded compute) and
    into the fewest slots that hold them: the same terms and gradients to 1e-5."""
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, RULES)
    trainable, frozen = trainer.split(params, part)
    # Cached text embeddings, as the paper's recipe trains: no text tower to compile.
    dims = Dims.of(32, max_panels=3, max_regions=3, text_embedding=MODEL.embed_dim)
    examples = random_examples(level, np.random.default_rng(3), 8, dims)
    child = LAYOUTS[level].child
    tight = int(examples[f"{child}_mask"].reshape(2, -1).sum(axis=1).max())  # the fuller shard's children
    assert tight < 12
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks, shards=2)

    def loss_and_grads(batch):
        def loss(trainable):
            model = trainer.from_params(MODEL, trainer.merge(trainable, frozen))
            return losses.level_losses(model, batch, level, cfg)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    (_, terms), grads = loss_and_grads(pack(examples, level, 2, 12))
    (_, tight_terms), tight_grads = loss_and_grads(pack(examples, level, 2, tight))
    assert float(terms[f"{child}_dropped"]) == float(tight_terms[f"{child}_dropped"]) == 0.0
    for term in terms:
        np.testing.assert_allclose(tight_terms[term], terms[term], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(tight_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
