"""The jitted level steps: same numbers on any mesh, frozen leaves untouched and stateless, no
recompilation after the first cycle."""
import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from zoomin_jax import losses, sharding, trainer
from zoomin_jax.batch_layout import Dims
from zoomin_jax.bench_train import random_batch
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset

TINY_DIMS = Dims.of(32, max_panels=3, max_regions=3)  # 32-pixel crops, 3 child slots, token ids

MODEL = get_preset("test-tiny")
# Last vision block + head + logit_scale (the paper's recipe, scaled down) and, for the text-side
# terms, the text projection.
RULES = (("visual/transformer/resblocks/1/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
         ("text_projection", 0.5), ("logit_scale", 1.0), (".*", None))


def with_text_ids(batch: dict, rng: np.random.Generator) -> dict:
    """Text ids drawn from few values, so that some rows on different devices are positives."""
    ids = {"text_id": rng.integers(0, 3, len(batch["image"]), dtype=np.int32)}
    for child in ("panel", "region"):
        if f"{child}_mask" in batch:
            ids[f"{child}_text_id"] = rng.integers(0, 2, batch[f"{child}_mask"].shape, dtype=np.int32)
    return batch | ids


def run(mesh, num_steps=5, rules=RULES, min_size=0):
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, rules)
    trainable, frozen = trainer.split(params, part)
    # min_size 0: even the tiny model's tensors are split over fsdp, so the test exercises it.
    trainable = jax.device_put(trainable, sharding.tree_shardings(trainable, mesh, min_size=min_size))
    frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh, min_size=min_size))
    optim = trainer.OptimConfig(lr=1e-3, warmup_steps=2, total_steps=num_steps)
    tx = trainer.make_optimizer(optim, part)
    state = jax.jit(trainer.init_state, static_argnums=1)(trainable, tx)
    loss_cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks)
    steps = {level: trainer.jit_train_step(trainer.make_train_step(MODEL, level, loss_cfg, tx,
                                                                   trainer.lr_schedule(optim)), state)
             for level in trainer.LEVELS}
    cycle = trainer.Cycle((("figure", 2), ("panel", 2), ("region", 1)))
    rng = np.random.default_rng(0)
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    logged = []
    for step in range(num_steps):
        level = cycle.level_at(step)
        batch = jax.device_put(with_text_ids(random_batch(level, rng, 8, TINY_DIMS), rng), batch_sharding)
        state, metrics = steps[level](state, frozen, batch)
        logged.append({k: float(v) for k, v in metrics.items()})
    return params, part, jax.device_get(state), logged, steps


@pytest.fixture(scope="module")
def one_device():
    return run(sharding.make_mesh((("data", 1),), jax.devices()[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("axes", [(("data", 2), ("fsdp", 4)), (("data", 8),)])
def test_same_losses_and_params_on_any_mesh(one_device, axes):
    _, _, reference, reference_logs, _ = one_device
    _, _, state, logs, _ = run(sharding.make_mesh(axes))
    for ref, got in zip(reference_logs, logs, strict=True):
        assert ref.keys() == got.keys()
        for key in ref:
            assert np.isclose(got[key], ref[key], rtol=1e-5, atol=1e-7), (key, got[key], ref[key])
    reference, state = traverse_util.flatten_dict(reference["params"]), traverse_util.flatten_dict(state["params"])
    for path, ref in reference.items():
        got = state[path]
        if path[-2:] == ("in_proj", "bias"):
            # The attention key bias cannot change any output (softmax ignores a shift shared by all
            # keys): its true gradient is 0, so Adam moves it by normalised rounding noise that
            # differs per layout. Compare the query and value biases; the key bias must stay noise.
            width = ref.shape[0] // 3
            assert np.abs(got[width:2 * width]).max() < 1e-3  # lr 1e-3 × 5 steps bounds it
            ref, got = np.delete(ref, np.s_[width:2 * width]), np.delete(got, np.s_[width:2 * width])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_frozen_leaves_are_untouched_and_have_no_optimizer_state(one_device):
    params, part, state, logs, _ = one_device
    assert part.frozen_blocks == 1 and not part.text_frozen
    trained = traverse_util.flatten_dict(state["params"])
    assert set(trained) == set(part.multipliers)
    assert ("visual", "transformer", "resblocks", 0, "attn", "in_proj_weight") not in trained
    # Every optimizer-state array is shaped like a trainable leaf (or is a scalar count).
    trainable_shapes = {np.shape(leaf) for leaf in trained.values()}
    assert {np.shape(leaf) for leaf in jax.tree.leaves(state["opt_state"])} <= trainable_shapes | {()}
    moved = [path for path, leaf in trained.items()
             if not np.array_equal(leaf, traverse_util.flatten_dict(params)[path])]
    assert len(moved) == len(trained)  # every trainable leaf learned something
    assert all(not log["update_skipped"] for log in logs)
    assert {"figure", "figure_panel_image", "figure_panel_text", "panel", "panel_region_image",
            "panel_region_text", "roi", "region"} <= set().union(*logs)


@pytest.mark.slow
def test_text_terms_train_logit_scale_when_the_text_tower_is_frozen():
    """The paper's case: text tower frozen, logit_scale trained. The text-side message-passing term
    is computed and logged, and it is part of logit_scale's gradient (the vision blocks', whose
    embeddings it never sees, are the same with or without it)."""
    rules = (("visual/transformer/resblocks/1/.*", 1.0), ("logit_scale", 1.0), (".*", None))
    _, part, _, logs, _ = run(sharding.make_mesh((("data", 1),), jax.devices()[:1]), num_steps=3, rules=rules)
    assert part.text_frozen
    assert {"figure_panel_text", "panel_region_text"} <= set().union(*logs)
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    trainable, frozen = trainer.split(params, part)
    batch = random_batch("figure", np.random.default_rng(1), 4, TINY_DIMS)

    def grads(text_weight):
        cfg = losses.LossConfig(weights=(("figure_panel_text", text_weight),), text_frozen=True,
                                frozen_blocks=part.frozen_blocks)
        loss = lambda trainable: losses.level_losses(  # noqa: E731
            trainer.from_params(MODEL, trainer.merge(trainable, frozen)), batch, "figure", cfg)[0]
        return traverse_util.flatten_dict(jax.jit(jax.grad(loss))(trainable))

    with_text, without = grads(1.0), grads(0.0)
    assert abs(float(with_text[("logit_scale",)]) - float(without[("logit_scale",)])) > 1e-4
    for path, grad in without.items():
        if path != ("logit_scale",):
            np.testing.assert_allclose(with_text[path], grad, rtol=1e-6, atol=1e-8, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("axes,min_size", [((("data", 8),), 0), ((("data", 1), ("fsdp", 8)), 2 ** 14)])
def test_no_recompilation_after_the_first_cycle(axes, min_size):
    """Also with small leaves replicated beside fsdp-split ones, where XLA's own choice of output
    layout used to differ from the initial one and the second figure step recompiled."""
    *_, steps = run(sharding.make_mesh(axes), num_steps=10, min_size=min_size)
    assert {level: step._cache_size() for level, step in steps.items()} == {"figure": 1, "panel": 1, "region": 1}


def test_an_unknown_remat_policy_is_a_clear_error():
    from zoomin_jax.errors import UserError
    from zoomin_jax.models.clip import remat_policy
    with pytest.raises(UserError, match="config.remat='some' is not one of none, full, dots"):
        remat_policy("some")
