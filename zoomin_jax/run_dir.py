"""The model a source path holds: a model directory (`convert import`), or a training run's workdir
(latest step, or WORKDIR/STEP): its trainable leaves from the orbax checkpoint merged with the
frozen ones, rebuilt from the config the run saved (model_init, or the seeded random init);
WORKDIR/0 is the model the run started from (what a benchmark compares a run against). Reading
a run rebuilds neither its optimizer nor its data pipeline (see zoomin_jax.checkpoint)."""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from etils import epath

from zoomin_jax import checkpoint, model_dir
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import merge
from zoomin_jax.models.config import CLIPConfig, get_preset

CHECKPOINTS = "checkpoints"


def is_run(path) -> bool:
    path = epath.Path(path)
    return (path / CHECKPOINTS).is_dir() or (path.name.isdigit() and (path.parent / CHECKPOINTS).is_dir())


def _workdir_and_step(path: epath.Path) -> tuple[epath.Path, int | None]:
    return (path.parent, int(path.name)) if not (path / CHECKPOINTS).is_dir() else (path, None)


def workdir_of(src) -> epath.Path:
    return _workdir_and_step(epath.Path(src))[0]


def run_config(src) -> tuple[ml_collections.ConfigDict, int]:
    """(the config a run saved with its checkpoint, that checkpoint's step)."""
    workdir, step = _workdir_and_step(epath.Path(src))
    steps = checkpoint.complete_steps(workdir / CHECKPOINTS)
    if not steps:
        raise UserError(f"{workdir / CHECKPOINTS} holds no complete checkpoint; train first.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"{workdir / CHECKPOINTS} has no step {step}; it has {steps}.")
    return ml_collections.ConfigDict(checkpoint.read_config(workdir / CHECKPOINTS, step)), step


def preprocess_cfg(config, cfg: CLIPConfig) -> dict:
    """A training config's image preprocessing: its init model's, else open_clip's default."""
    init = config.get("model_init")
    return model_dir.read_meta(init)["preprocess_cfg"] if init else model_dir.default_preprocess_cfg(cfg)


@dataclasses.dataclass
class Model:
    cfg: CLIPConfig
    params: dict                    # nested, NumPy
    preprocess_cfg: dict
    config: ml_collections.ConfigDict | None = None   # a run's training config
    step: int | None = None                           # a run's checkpoint step


def _run_model(src) -> Model:
    workdir, asked = _workdir_and_step(epath.Path(src))
    config, step = run_config(workdir if asked == 0 else src)  # step 0 has no checkpoint: the latest's config
    cfg = get_preset(config.model)
    initial = model_dir.initial_params(config.get("model_init"), cfg, config.seed)
    if asked == 0:
        return Model(cfg, jax.tree.map(np.asarray, initial), preprocess_cfg(config, cfg), config, 0)
    # This process's own device: jax.devices()[0] belongs to process 0 alone.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    trained = checkpoint.read_params(workdir / CHECKPOINTS, step, initial, device)
    return Model(cfg, jax.tree.map(np.asarray, merge(trained, initial)), preprocess_cfg(config, cfg), config, step)


def load(src) -> Model:
    """The model of a model directory, or of a training run's checkpoint (WORKDIR or WORKDIR/STEP;
    WORKDIR/0: the run's initial model)."""
    if is_run(src):
        return _run_model(src)
    meta = model_dir.read_meta(src)
    cfg = model_dir.config_of(meta, src)
    return Model(cfg, model_dir.params_numpy(src, cfg), meta["preprocess_cfg"])
