"""The hand FLOP count (zoomin_jax.flops) against XLA's count of the compiled training step, on models
wide enough that the matmuls are nearly all of the work (norms, softmax, GELU, the loss and AdamW
are in XLA's count only)."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from zoomin_jax import flops, losses, trainer
from zoomin_jax.batch_layout import Dims
from zoomin_jax.bench_train import random_batch
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import TextConfig, VisionConfig, get_preset


def wide(vision_layers: int, text_layers: int):
    base = get_preset("test-tiny")
    return dataclasses.replace(base, embed_dim=128, vision=VisionConfig(32, 8, 256, vision_layers, 4),
                               text=TextConfig(77, base.text.vocab_size, 256, text_layers, 4))


@pytest.mark.parametrize("vision_layers, rules, level, text_cached", [
    # One block of each tower, all training but the token embedding (AdamW on its 12.6M entries is
    # optimizer work, which the count leaves out), tokens through the text tower.
    (1, (("token_embedding/.*", None), (".*", 1.0)), "region", False),
    # Two vision blocks, the first frozen (forward only), the text tower frozen and its texts cached.
    (2, (("visual/transformer/resblocks/1/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0), (".*", None)),
     "panel", True),
])
def test_the_hand_count_matches_xla_on_a_training_step(vision_layers, rules, level, text_cached):
    cfg = wide(vision_layers, 1)
    params = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    part = trainer.partition(params, rules)
    trainable, frozen = trainer.split(params, part)
    optim = trainer.OptimConfig(total_steps=10)
    tx = trainer.make_optimizer(optim, part)
    state = trainer.init_state(trainable, tx)
    loss_cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks)
    step = trainer.make_train_step(cfg, level, loss_cfg, tx, trainer.lr_schedule(optim))
    batch, children = 8, 3
    dims = Dims.of(32, children, children, cfg.embed_dim if text_cached else None)
    host = random_batch(level, np.random.default_rng(0), batch, dims)
    xla = jax.jit(step).lower(state, frozen, host).compile().cost_analysis()["flops"]
    shape = flops.step_shape(cfg, level, batch, dims, part.frozen_blocks, part.text_frozen, "none")
    assert shape.images == batch * (1 if level == "region" else 1 + children)
    assert shape.texts == (0 if text_cached else batch)
    hand = flops.step_flops(cfg, shape)
    assert hand == pytest.approx(xla, rel=0.05)
    print(f"hand {hand / 1e9:.3f} GFLOP, XLA {xla / 1e9:.3f} GFLOP ({hand / xla:.3f})")
