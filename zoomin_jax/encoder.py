"""One encoder for users (`load_clip`) and for the evaluators: a CLIP's params behind jitted, pure
encode functions. Inputs of any length go through in batches padded to one fixed size (one
compilation per input kind) and split over every device of a mesh, on one or many processes;
embeddings come back as NumPy float32 [N, D]. Given the same inputs on every process, each gets every
embedding; `encode_uint8_share` instead takes each process's own share of the inputs, and
`gather_rows` puts the shares together."""
from __future__ import annotations

import copy
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
def _encode_uint8(cfg: CLIPConfig, dtype, normalize: bool, params, images):
    return _encode_image(cfg, dtype, normalize, params, losses.pixels_to_model(images))


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

    def with_batch_size(self, batch_size: int) -> CLIPEncoder:
        """The same model and params, batching `batch_size` rows at a time (rounded up to the mesh)."""
        other = copy.copy(self)
        other.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        return other

    @property
    def process_batch_size(self) -> int:
        """Rows each process gives `encode_uint8_share` at a time."""
        return self.batch_size // jax.process_count()

    def _encode_share(self, encode, rows: np.ndarray, normalize: bool) -> np.ndarray:
        """This process's own rows (at most `process_batch_size`; every process calls this together,
        with an empty batch once it has no more) -> this process's embeddings, computed by the
        devices of all processes."""
        padded = np.zeros((self.process_batch_size, *rows.shape[1:]), rows.dtype)
        padded[:len(rows)] = rows
        batch = jax.make_array_from_process_local_data(self.batch_sharding, padded)
        embeddings = encode(self.config, self.dtype, normalize, self.params, batch)
        local = multihost_utils.global_array_to_host_local_array(embeddings, self.mesh, self.batch_sharding.spec)
        return np.asarray(local, np.float32)[:len(rows)]

    def encode_uint8_share(self, images, normalize: bool = False) -> np.ndarray:
        """Each process reads and preprocesses only its share of an evaluation set (uint8 images, as
        the data pipeline makes them), and the devices of all of them embed it (see _encode_share)."""
        return self._encode_share(_encode_uint8, np.asarray(images, np.uint8), normalize)

    def encode_image_share(self, pixels, normalize: bool = False) -> np.ndarray:
        """This process's share of images, preprocessed as `preprocess` makes them (see _encode_share)."""
        return self._encode_share(_encode_image, np.asarray(pixels, np.float32), normalize)

    def encode_text_share(self, tokens, normalize: bool = False) -> np.ndarray:
        """This process's share of texts (token ids), embedded by all processes' devices (see _encode_share)."""
        return self._encode_share(_encode_text, np.asarray(tokens, np.int32).reshape(-1, self.config.text.context_length),
                                  normalize)

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


def gather_shares(local: np.ndarray) -> list[np.ndarray]:
    """Every process's `local` (shares of any number of rows), in process order, on every process."""
    if jax.process_count() == 1:
        return [local]
    counts = multihost_utils.process_allgather(np.asarray([len(local)]))
    padded = np.zeros((int(counts.max()), *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [processes, rows, ...]
    return [rows[:int(count)] for rows, count in zip(stacked, counts.reshape(-1), strict=True)]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of `local`, concatenated in process order, on every process."""
    return np.concatenate(gather_shares(local))


def load_clip(directory: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None) -> CLIPEncoder:
    """A model directory or a training run (WORKDIR for its latest checkpoint, or WORKDIR/STEP)."""
    model = run_dir.load(directory)
    return CLIPEncoder(model.cfg, model.params, model.preprocess_cfg, mesh, dtype=dtype)
