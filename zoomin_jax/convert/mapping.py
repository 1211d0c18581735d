"""Apply the conversion table: open_clip state_dict <-> nested Flax param dict, with every check."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from zoomin_jax.convert.table import Mapping, expand
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import abstract_params, nest
from zoomin_jax.models.config import CLIPConfig


def mappings(cfg: CLIPConfig) -> list[Mapping]:
    return expand(abstract_params(cfg))


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _leaf(tree: dict, path: tuple):
    for part in path:
        tree = tree[part]
    return tree


def state_dict_to_params(state_dict: dict[str, np.ndarray], cfg: CLIPConfig, model_name: str,
                         source: str, progress: bool = False) -> dict:
    """Nested Flax params (pure dict, as `nnx.to_pure_dict`) from an unwrapped open_clip state_dict."""
    rows = mappings(cfg)
    for row in rows:
        if row.torch_key in state_dict and tuple(np.shape(state_dict[row.torch_key])) != row.torch_shape:
            raise UserError(
                f"{source}: {row.torch_key} has shape {tuple(np.shape(state_dict[row.torch_key]))} but "
                f"{model_name} expects {row.torch_shape}; these are weights of another architecture, "
                f"pass the matching --model.")
    expected = {row.torch_key for row in rows}
    missing = [row.torch_key for row in rows if row.torch_key not in state_dict]
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        parts = ([f"missing keys {_listing(missing)}"] if missing else []) + \
                ([f"unexpected keys {_listing(unexpected)}"] if unexpected else [])
        raise UserError(f"{source} does not match {model_name}: {'; '.join(parts)}; "
                        f"check --model or the checkpoint.")
    flat = {}
    for row in tqdm(rows, desc="import", unit="tensor", disable=not progress):
        value = np.asarray(state_dict[row.torch_key])
        flat[row.flax_path] = np.asarray(row.transform.to_flax(value), dtype=row.dtype, order="C")
    return nest(flat)


def params_to_state_dict(params: dict, cfg: CLIPConfig, progress: bool = False) -> dict[str, np.ndarray]:
    """open_clip state_dict (contiguous numpy arrays) from nested Flax params."""
    return {row.torch_key: np.asarray(row.transform.to_torch(np.asarray(_leaf(params, row.flax_path))), order="C")
            for row in tqdm(mappings(cfg), desc="export", unit="tensor", disable=not progress)}
