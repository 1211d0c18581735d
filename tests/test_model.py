"""The Flax model and the conversion table, checked against every preset's eval_shape."""
import jax
import numpy as np
import pytest
from flax import nnx

import zoomin_jax
from zoomin_jax.convert.mapping import mappings
from zoomin_jax.models.clip import abstract_params
from zoomin_jax.models import CLIP, ConfigError, get_preset
from zoomin_jax.models.config import CLIPConfig


@pytest.mark.parametrize("preset", sorted(zoomin_jax.PRESETS))
def test_table_covers_every_param_once(preset):
    cfg = get_preset(preset)
    rows = mappings(cfg)
    params = abstract_params(cfg)
    assert len(rows) == len(params) == len({r.torch_key for r in rows})
    vision, text = cfg.vision, cfg.text
    assert len(rows) == 12 * (vision.layers + text.layers) + 14


def test_vit_l_14_matches_open_clip_sizes():
    cfg = get_preset("ViT-L-14")
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size) == (1024, 24, 16, 14)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.embed_dim, cfg.quick_gelu) == (768, 12, 12, 768, False)
    n_params = sum(int(np.prod(v.shape)) for v in abstract_params(cfg).values())
    assert n_params == 427_616_513  # open_clip ViT-L-14: sum(p.numel() for p in model.parameters())


def test_patch_grid_tokens_feed_the_same_head():
    model = CLIP(get_preset("test-tiny"), rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    cls, grid = model.visual.tokens(pixels)
    assert grid.shape == (2, 4, 4, 64)
    np.testing.assert_allclose(model.visual.head(cls), model.encode_image(pixels), rtol=1e-6)


def test_unsupported_open_clip_options_are_refused():
    cfg = dict(zoomin_jax.PRESETS["ViT-B-16"])
    with pytest.raises(ConfigError, match="vision_cfg.attentional_pool"):
        CLIPConfig.from_open_clip(cfg | {"vision_cfg": cfg["vision_cfg"] | {"attentional_pool": True}})
    # Options open_clip writes with their "off" value are accepted.
    CLIPConfig.from_open_clip(cfg | {"vision_cfg": cfg["vision_cfg"] | {"no_ln_pre": False, "patch_dropout": 0.0}})
