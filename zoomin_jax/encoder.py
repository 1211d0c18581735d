"""`load_clip`: a model directory behind jitted, pure encode functions (the users' entry point)."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from zoomin_jax import run_dir
from zoomin_jax.image_transform import preprocess
from zoomin_jax.models.clip import from_params


def _encode_image(graphdef, params, pixels):
    return nnx.merge(graphdef, params).encode_image(pixels)


def _encode_text(graphdef, params, tokens):
    return nnx.merge(graphdef, params).encode_text(tokens)


class CLIPEncoder:
    """A loaded CLIP. Embeddings are returned as jax Arrays, not L2-normalised."""

    def __init__(self, model, preprocess_cfg: dict):
        self.config = model.config
        self.preprocess_cfg = preprocess_cfg
        self.graphdef, self.params = nnx.split(model)
        self._image = jax.jit(functools.partial(_encode_image, self.graphdef))
        self._text = jax.jit(functools.partial(_encode_text, self.graphdef))

    def encode_image(self, pixels) -> jax.Array:
        """pixels float32 [N, H, W, 3], normalised (see `preprocess`) -> [N, embed_dim]."""
        return self._image(self.params, jnp.asarray(pixels, jnp.float32))

    def encode_text(self, tokens) -> jax.Array:
        """tokens int [N, context_length] from `zoomin_jax.tokenize` -> [N, embed_dim]."""
        return self._text(self.params, jnp.asarray(tokens, jnp.int32))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        cfg = self.preprocess_cfg
        return preprocess(image, size=cfg["size"], mean=cfg["mean"], std=cfg["std"])


def load_clip(directory: str | Path, dtype=None) -> CLIPEncoder:
    """A model directory or a training run (WORKDIR for its latest checkpoint, or WORKDIR/STEP)."""
    model = run_dir.load(directory)
    return CLIPEncoder(from_params(model.cfg, model.params, dtype), model.preprocess_cfg)
