"""How a step is computed — layers as scan loops, rematerialised blocks, bf16 matmuls — does not change
what it computes: the plain model's loss and gradients (fp32: 1e-5), or within bf16's precision."""
import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from zoomin_jax import losses, trainer
from zoomin_jax.bench_train import random_batch
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset

# Three vision blocks, the first frozen: the scanned run of trained blocks has two. The text tower's
# three blocks run too (its projection trains), as one scanned run.
MODEL = get_preset("test-tiny-deep")
RULES = (("visual/transformer/resblocks/[12]/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
         ("text_projection", 0.5), ("logit_scale", 1.0), (".*", None))


def loss_and_grads(level: str, remat: str = "none", scan: bool = False, dtype=None):
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, RULES)
    trainable, frozen = trainer.split(params, part)
    batch = random_batch(level, np.random.default_rng(0), batch=4, size=32)
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks, remat=remat)

    def loss(trainable, frozen, batch):  # all arguments: constants would be folded at compile time
        model = trainer.from_params(MODEL, trainer.merge(trainable, frozen), dtype, scan)
        return losses.level_losses(model, batch, level, cfg)[0]

    jaxpr = str(jax.make_jaxpr(loss)(trainable, frozen, batch))
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, frozen, batch)
    return float(value), traverse_util.flatten_dict(grads), jaxpr


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads("region")


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots", False), ("none", True), ("dots", True)])
def test_scan_and_remat_give_the_plain_loss_and_gradients(plain, remat, scan):
    plain, plain_grads, plain_jaxpr = plain
    value, grads, jaxpr = loss_and_grads("region", remat, scan)
    assert ("remat" in jaxpr) == (remat != "none") and ("scan" in jaxpr) == scan
    assert "scan" not in plain_jaxpr and "remat" not in plain_jaxpr
    assert value == pytest.approx(plain, rel=1e-5)
    for path, grad in plain_grads.items():
        np.testing.assert_allclose(grads[path], grad, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_bf16_compute_keeps_float32_state_and_stays_near_the_float32_loss(plain):
    import jax.numpy as jnp
    value, grads, _ = loss_and_grads("region", dtype=jnp.bfloat16)
    assert value == pytest.approx(plain[0], rel=2e-2)  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert all(grad.dtype == jnp.float32 for grad in grads.values())

    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, RULES)
    trainable, frozen = trainer.split(params, part)
    optim = trainer.OptimConfig(total_steps=2)
    tx = trainer.make_optimizer(optim, part)
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks)
    step = trainer.make_train_step(MODEL, "region", cfg, tx, trainer.lr_schedule(optim), jnp.bfloat16)
    state, metrics = jax.jit(step)(trainer.init_state(trainable, tx), frozen,
                                   random_batch("region", np.random.default_rng(0), batch=4, size=32))
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(leaf.dtype, jnp.floating)} \
        == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_attention_implementation_is_checked_against_the_platform():
    """cuDNN's fused attention exists only on GPU in bf16: asked for anywhere else, the run stops at
    start-up naming the key, rather than in the middle of compiling a step."""
    import ml_collections
    import jax.numpy as jnp
    from zoomin_jax.errors import UserError
    from zoomin_jax.train import attention_of
    config = ml_collections.ConfigDict({"attention": "xla"})
    assert attention_of(config, None) == "xla" and attention_of(ml_collections.ConfigDict(), jnp.bfloat16) == "xla"
    config.attention = "cudnn"
    if jax.default_backend() != "gpu":
        with pytest.raises(UserError, match="config.attention='cudnn' needs a GPU"):
            attention_of(config, jnp.bfloat16)
    with pytest.raises(UserError, match="config.compute_dtype='bfloat16'"):
        attention_of(config, None)
    config.attention = "flash"
    with pytest.raises(UserError, match="is not one of xla, cudnn"):
        attention_of(config, None)
