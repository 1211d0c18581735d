"""An open_clip checkpoint (weights file or hub folder) read into a zoomin_jax model in memory: what
`convert import` writes as a model directory and what the benchmark evaluates without writing one."""
from __future__ import annotations

import sys
from pathlib import Path

from zoomin_jax import model_dir
from zoomin_jax.convert.formats import HUB_CONFIG, read_source
from zoomin_jax.convert.mapping import state_dict_to_params
from zoomin_jax.errors import UserError
from zoomin_jax.models.config import CLIPConfig, ConfigError, architecture_differences, get_preset
from zoomin_jax.run_dir import Model


def _architecture(src, preset: str | None, hub_config: dict | None) -> CLIPConfig:
    """The preset, checked against the hub folder's config when there is one; else the hub config's."""
    cfg = get_preset(preset) if preset else None
    if hub_config is None:
        if cfg is None:
            raise UserError(f"{src} carries no architecture; pass --model (one of the presets).")
        return cfg
    where = Path(src) / HUB_CONFIG
    found = CLIPConfig.from_open_clip(hub_config["model_cfg"], where=str(where))
    if cfg is None:
        return found
    if found.quick_gelu != cfg.quick_gelu:
        raise ConfigError(f"{where} says quick_gelu={found.quick_gelu} but --model {preset} uses "
                          f"quick_gelu={cfg.quick_gelu}; pass the preset with the activation these "
                          f"weights were trained with.")
    diffs = architecture_differences(cfg, found)
    if diffs:
        raise ConfigError(f"{where} describes another architecture than --model {preset} "
                          f"({'; '.join(diffs)}); pass the matching --model.")
    return cfg


def read(src, preset: str | None = None, progress: bool = False) -> Model:
    """The model of an open_clip .pt/.bin/.safetensors file (architecture: `preset`) or hub folder
    (its open_clip_config.json; `preset`, if given, must match it), with its preprocessing."""
    state_dict, hub_config = read_source(src)
    cfg = _architecture(src, preset, hub_config)
    preprocess_cfg = model_dir.default_preprocess_cfg(cfg)
    if hub_config is not None:
        preprocess_cfg.update({k: v for k, v in hub_config.get("preprocess_cfg", {}).items()
                               if k in preprocess_cfg})
    if progress:
        activation = "QuickGELU" if cfg.quick_gelu else "exact GELU"
        print(f"converting {len(state_dict)} tensors to {preset or 'the hub config'} ({activation})",
              file=sys.stderr, flush=True)
    params = state_dict_to_params(state_dict, cfg, preset or "the hub config", str(src), progress=progress)
    return Model(cfg, params, preprocess_cfg)
