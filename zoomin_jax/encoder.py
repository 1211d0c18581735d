"""One encoder for users (`load_clip`) and for the evaluators: a CLIP's params behind jitted, pure
encode functions. Inputs of any length go through in batches padded to one fixed size (one
compilation per input kind) and split over every device of a mesh, on one or many processes;
embeddings come back as NumPy float32 [N, D]."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from zoomin_jax import losses, run_dir, sharding
from zoomin_jax.image_transform import preprocess
from zoomin_jax.models.clip import from_params
from zoomin_jax.models.config import CLIPConfig


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode_image(cfg: CLIPConfig, dtype, normalize: bool, params, pixels):
    embeddings = from_params(cfg, params, dtype).encode_image(pixels)
    return losses.l2_normalize(embeddings) if normalize else embeddings


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode_text(cfg: CLIPConfig, dtype, normalize: bool, params, tokens):
    embeddings = from_params(cfg, params, dtype).encode_text(tokens)
    return losses.l2_normalize(embeddings) if normalize else embeddings


class CLIPEncoder:
    """A loaded CLIP. `normalize=True` returns L2-normalised embeddings (what retrieval compares);
    by default they are the model's raw outputs, as open_clip's encode_image / encode_text give."""

    def __init__(self, cfg: CLIPConfig, params, preprocess_cfg: dict, mesh: jax.sharding.Mesh | None = None,
                 batch_size: int = 64, dtype=None):
        self.config, self.preprocess_cfg, self.dtype = cfg, preprocess_cfg, dtype
        self.mesh = mesh or sharding.make_mesh((("data", -1),))
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.tree.map(  # host arrays are replicated; device arrays keep their layout
            lambda leaf: leaf if isinstance(leaf, jax.Array) else jax.device_put(leaf, replicated), params)

    def _run(self, encode, rows: np.ndarray, normalize: bool) -> np.ndarray:
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), chunk.dtype)
            padded[:len(chunk)] = chunk
            batch = jax.make_array_from_callback(padded.shape, self.batch_sharding, padded.__getitem__)
            embeddings = encode(self.config, self.dtype, normalize, self.params, batch)
            gathered = multihost_utils.process_allgather(embeddings, tiled=True)
            out.append(np.asarray(gathered, np.float32)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    def encode_image(self, pixels, normalize: bool = False) -> np.ndarray:
        """float32 [N, H, W, 3], normalised as `preprocess` does -> [N, embed_dim]."""
        return self._run(_encode_image, np.asarray(pixels, np.float32), normalize)

    def encode_uint8(self, images, normalize: bool = False) -> np.ndarray:
        """uint8 [N, H, W, 3] as the data pipeline makes them -> [N, embed_dim]."""
        return self.encode_image(np.asarray(losses.pixels_to_model(np.asarray(images))), normalize)

    def encode_text(self, tokens, normalize: bool = False) -> np.ndarray:
        """int [N, context_length] from `zoomin_jax.tokenize` -> [N, embed_dim]."""
        return self._run(_encode_text, np.asarray(tokens, np.int32), normalize)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        cfg = self.preprocess_cfg
        return preprocess(image, size=cfg["size"], mean=cfg["mean"], std=cfg["std"])


def load_clip(directory: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None) -> CLIPEncoder:
    """A model directory or a training run (WORKDIR for its latest checkpoint, or WORKDIR/STEP)."""
    model = run_dir.load(directory)
    return CLIPEncoder(model.cfg, model.params, model.preprocess_cfg, mesh, dtype=dtype)
