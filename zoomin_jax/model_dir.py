"""A model directory: `model.json` (architecture in open_clip's format + preprocessing) and an orbax
checkpoint of the Flax params under `params/`. Written by `convert import`, read by `load_clip`,
training init and `convert export`.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath
from flax import nnx

from zoomin_jax import sharding, storage
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import CLIP, abstract_params, nest
from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD, CLIPConfig

FORMAT = "zoomin_jax.model/1"
MODEL_JSON = "model.json"
PARAMS = "params"


def default_preprocess_cfg(cfg: CLIPConfig) -> dict:
    return {"size": cfg.vision.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def save(directory, cfg: CLIPConfig, params: dict, preprocess_cfg: dict,
         preset: str | None = None) -> None:
    import orbax.checkpoint as ocp
    directory = storage.absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, params, force=True)
    meta = {"format": FORMAT, "preset": preset, "model_cfg": dict(cfg.open_clip_cfg),
            "preprocess_cfg": preprocess_cfg}
    (directory / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory) -> dict:
    path = epath.Path(directory) / MODEL_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; pass a directory written by `zoomin_jax.convert import` "
                        f"or by training.") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rewrite it with `convert import`.") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-run "
                        f"`convert import` with this version.")
    return meta


def config_of(meta: dict, directory) -> CLIPConfig:
    """The architecture recorded in a directory's model.json (as returned by read_meta)."""
    return CLIPConfig.from_open_clip(meta["model_cfg"], where=str(epath.Path(directory) / MODEL_JSON))


def param_shardings(cfg: CLIPConfig, mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_PARTITION_RULES) -> dict:
    """A NamedSharding per param of the architecture `cfg`, by the partition rules (no model is built)."""
    return sharding.tree_shardings(nest(abstract_params(cfg)), mesh, rules)


def restore_params(directory, cfg: CLIPConfig, shardings: dict | None = None) -> dict:
    """Nested param dict (as nnx.to_pure_dict) restored from `params/`, each leaf read straight into
    its sharding in `shardings` (a param-shaped tree, e.g. param_shardings): every process reads
    only the shards its devices hold. Without shardings, whole on this process's first device."""
    import orbax.checkpoint as ocp
    abstract = nest(abstract_params(cfg))
    if shardings is None:
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: local, abstract)
    target = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(storage.absolute(directory) / PARAMS, target)


def params_numpy(directory, cfg: CLIPConfig) -> dict:
    return jax.tree.map(np.asarray, restore_params(directory, cfg))


def initial_params(model_init: str | None, cfg: CLIPConfig, seed: int, shardings: dict | None = None) -> dict:
    """A training run's starting params: the model directory `model_init` (checked to hold the
    architecture `cfg`), else the seeded random init; placed by `shardings` (as restore_params), else
    on this process's first device. Training starts from them, and reading a run back takes its
    frozen leaves from them (they are never saved)."""
    if model_init:
        if config_of(read_meta(model_init), model_init) != cfg:
            raise UserError(f"{model_init} holds another architecture than the config's model")
        return restore_params(model_init, cfg, shardings)
    params = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    return params if shardings is None else jax.device_put(params, shardings)
