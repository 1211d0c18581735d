"""A benchmark's --model: a model directory (`convert import`), a training run (WORKDIR or
WORKDIR/STEP), or an open_clip checkpoint (a hub folder, or a .pt/.bin/.safetensors file whose
architecture --open-clip-model names), under a label (LABEL=PATH; else the path's name)."""
from __future__ import annotations

from pathlib import Path

from zoomin_jax import model_dir, run_dir
from zoomin_jax.convert import open_clip_source
from zoomin_jax.encoder import CLIPEncoder
from zoomin_jax.errors import UserError


def label_and_path(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep:
        path = spec
        label = Path(spec.rstrip("/")).name
    if not label or not path:
        raise UserError(f"--model {spec!r}: give PATH or LABEL=PATH")
    return label, path


def load(path: str, open_clip_model: str | None, batch_size: int) -> CLIPEncoder:
    if run_dir.is_run(path) or (Path(path) / model_dir.MODEL_JSON).is_file():
        model = run_dir.load(path)
    elif Path(path).exists():
        model = open_clip_source.read(path, open_clip_model)
    else:
        raise UserError(f"--model {path} does not exist; pass a model directory, a training run or an "
                        f"open_clip checkpoint")
    return CLIPEncoder(model.cfg, model.params, model.preprocess_cfg, batch_size=batch_size)
