"""The zoom-in objectives against plain NumPy, and on any device layout."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zoomin_jax.losses import clip_loss, masked_mean, roi_align


def numpy_clip_loss(a, b, scale, mask=None):
    keep = np.ones(len(a), bool) if mask is None else np.asarray(mask, bool)
    a, b = a[keep], b[keep]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = scale * a @ b.T

    def cross_entropy(x):
        x = x - x.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x))

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def test_clip_loss_equals_numpy_on_a_hand_made_batch():
    a = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    b = np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.0, 1.0], [0.5, 0.5, 0.5]])
    for scale in (1.0, 14.3):
        assert np.isclose(float(clip_loss(a, b, scale)), numpy_clip_loss(a, b, scale), rtol=1e-5)
    mask = np.array([True, False, True, True])
    assert np.isclose(float(clip_loss(a, b, 10.0, mask)), numpy_clip_loss(a, b, 10.0, mask), rtol=1e-5)
    assert float(clip_loss(a, b, 10.0, np.zeros(4, bool))) == 0.0


def test_clip_loss_is_the_same_on_a_sharded_global_batch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    mask = rng.random(16) > 0.3
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(clip_loss)(jax.device_put(a, shard), jax.device_put(b, shard), 20.0, jax.device_put(mask, shard))
    assert np.isclose(float(sharded), numpy_clip_loss(a, b, 20.0, mask), rtol=1e-5)


def test_clip_loss_gradients_stay_finite_with_masked_rows():
    a, b = np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)
    grad = jax.grad(lambda x: clip_loss(x, b, 10.0, np.array([True, True, False, False])))(a)
    assert np.isfinite(grad).all() and np.abs(grad[2:]).max() == 0.0


def test_masked_mean_ignores_padding():
    children = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[True, False, True], [False, False, False]])
    np.testing.assert_allclose(masked_mean(children, mask), [[2.0, 3.0], [0.0, 0.0]])


def test_roi_align_reads_the_tokens_under_the_box():
    g = 4
    grid = np.zeros((1, g, g, 2), np.float32)
    grid[0, :, :, 0] = np.arange(g)[None, :]   # channel 0: column index
    grid[0, :, :, 1] = np.arange(g)[:, None]   # channel 1: row index
    boxes = np.array([[[2, 1, 3, 2],           # exactly token (row 1, col 2)
                       [0, 0, 4, 4],           # the whole grid: mean of the sample points
                       [1, 2, 3, 4]]], np.float32)  # columns 1-2, rows 2-3
    pooled = np.asarray(roi_align(jnp.asarray(grid), jnp.asarray(boxes), samples=2))
    np.testing.assert_allclose(pooled[0, 0], [2.0, 1.0], atol=1e-6)
    # samples at 1 and 3 token units -> centres-relative 0.5 and 2.5 -> mean 1.5
    np.testing.assert_allclose(pooled[0, 1], [1.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(pooled[0, 2], [1.5, 2.5], atol=1e-6)
