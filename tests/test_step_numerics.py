"""How a step is computed — layers as scan loops, rematerialised blocks, bf16 matmuls — does not change
what it computes: the plain model's loss and gradients (fp32: 1e-5), or within bf16's precision."""
import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from zoomin_jax import losses, trainer
from zoomin_jax.batch_layout import Dims
from zoomin_jax.bench_train import random_batch
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset

TINY_DIMS = Dims.of(32, max_panels=3, max_regions=3)  # 32-pixel crops, 3 child slots, token ids

# Three vision blocks, the first frozen: the scanned run of trained blocks has two. The text tower's
# three blocks run too (its projection trains), as one scanned run.
MODEL = get_preset("test-tiny-deep")
RULES = (("visual/transformer/resblocks/[12]/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
         ("text_projection", 0.5), ("logit_scale", 1.0), (".*", None))


def loss_and_grads(level: str, remat: str = "none", scan: bool = False, dtype=None):
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, RULES)
    trainable, frozen = trainer.split(params, part)
    batch = random_batch(level, np.random.default_rng(0), 4, TINY_DIMS)
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks, remat=remat)

    def loss(trainable, frozen, batch):  # all arguments: constants would be folded at compile time
        model = trainer.from_params(MODEL, trainer.merge(trainable, frozen), dtype, scan)
        return losses.level_losses(model, batch, level, cfg)[0]

    jaxpr = jax.make_jaxpr(loss)(trainable, frozen, batch).jaxpr
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, frozen, batch)
    return float(value), traverse_util.flatten_dict(grads), jaxpr


def _inner(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                yield inner


def recomputed_matmuls(jaxpr, inside_remat: bool = False) -> bool:
    """Whether a rematerialised region holds a matmul: whole blocks recomputed (every LayerNorm and
    GELU is recomputed in any case, models.clip)."""
    for eqn in jaxpr.eqns:
        if inside_remat and eqn.primitive.name == "dot_general":
            return True
        if any(recomputed_matmuls(inner, inside_remat or "remat" in eqn.primitive.name) for inner in _inner(eqn)):
            return True
    return False


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads("region")


@pytest.mark.parametrize("remat, scan", [("full", False), ("dots", False), ("none", True), ("dots", True)])
def test_scan_and_remat_give_the_plain_loss_and_gradients(plain, remat, scan):
    plain, plain_grads, plain_jaxpr = plain
    value, grads, jaxpr = loss_and_grads("region", remat, scan)
    assert recomputed_matmuls(jaxpr) == (remat != "none") and ("scan" in str(jaxpr)) == scan
    assert "scan" not in str(plain_jaxpr) and not recomputed_matmuls(plain_jaxpr)
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
                                   random_batch("region", np.random.default_rng(0), 4, TINY_DIMS))
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
    from zoomin_jax.run_setup import attention_of
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


def test_bf16_compute_keeps_its_activations_in_bf16():
    """What the backward pass keeps of a bf16 step's vision blocks (tokens x width, the MLP's 4 x width,
    heads x tokens x tokens) is bf16: LayerNorm, GELU and softmax compute in float32 but keep none
    of it (models.clip): at most half of what float32 keeps."""
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, RULES)
    trainable, frozen = trainer.split(params, part)
    batch = random_batch("panel", np.random.default_rng(0), 4, TINY_DIMS)
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks)

    def kept(dtype):
        def loss(trainable):
            model = trainer.from_params(MODEL, trainer.merge(trainable, frozen), dtype)
            return losses.level_losses(model, batch, "panel", cfg)[0]
        tokens = MODEL.vision.grid ** 2 + 1  # the per-token ones (not the embeddings the loss keeps)
        return [aval for aval, _ in saved_residuals(loss, trainable) if tokens in aval.shape]

    in_bf16, in_float32 = kept(jnp.bfloat16), kept(None)
    assert {aval.dtype for aval in in_bf16} == {jnp.dtype(jnp.bfloat16)}
    size = lambda avals: sum(aval.size * aval.dtype.itemsize for aval in avals)  # noqa: E731
    assert size(in_bf16) <= size(in_float32) // 2


def test_attention_is_jax_dot_product_attention_in_float32_and_keeps_no_probabilities():
    """Two head groups (4 heads), each recomputed in the backward pass: the same numbers as jax's, and
    nothing [tokens, tokens] kept for the backward pass (models.clip.xla_attention)."""
    from jax._src.ad_checkpoint import saved_residuals
    from zoomin_jax.models.clip import xla_attention
    rng = np.random.default_rng(0)
    query, key, value = (jax.numpy.asarray(rng.standard_normal((2, 9, 4, 8)), np.float32) for _ in range(3))
    kept = [aval.shape for aval, _ in saved_residuals(lambda *qkv: xla_attention(*qkv, False).sum(), query, key, value)]
    assert kept and not [shape for shape in kept if shape.count(9) > 1]
    for causal in (False, True):
        def loss(attention):
            return lambda *qkv: jax.numpy.sum(jax.numpy.sin(attention(*qkv)))
        ours = loss(lambda q, k, v: xla_attention(q, k, v, causal))
        reference = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))
        np.testing.assert_allclose(ours(query, key, value), reference(query, key, value), rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.grad(ours, (0, 1, 2))(query, key, value),
                             jax.grad(reference, (0, 1, 2))(query, key, value)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
