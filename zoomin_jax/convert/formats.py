"""Reading and writing open_clip weights: .pt/.bin, .safetensors, hub folders, DDP wrappers.

Formats are recognised by their bytes, not their suffix. torch is imported only for pickled
checkpoints and always with weights_only=True: a pickle that carries code is refused, never run.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from etils import epath

from zoomin_jax.errors import UserError

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
# open_clip's own preference when it loads a hub folder.
_HUB_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "torch-pickle"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < os.path.getsize(path):
            return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is a truncated or corrupt safetensors file ({err}); re-download or "
                        f"re-export it.") from None


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a torch pickle checkpoint and reading it needs torch; "
                        f"pip install torch or convert it to .safetensors first.") from None
    import pickle
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0])
        raise UserError(f"{path} was refused: its pickle carries code or objects beyond tensors "
                        f"({detail.strip()}); only plain weight files are loaded.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"{path} is a truncated or corrupt torch checkpoint "
                        f"({str(err).splitlines()[0]}); re-download or re-save it.") from None

    def to_numpy(value):
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach().cpu()
        # numpy has no bfloat16; float32 holds every bf16 value exactly.
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return _map_tensors(checkpoint, to_numpy)


def _map_tensors(obj, fn):
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return fn(obj)


def unwrap_state_dict(checkpoint: dict, source: str) -> dict[str, np.ndarray]:
    """The bare state_dict: under 'state_dict' (or 'model') wrappers, without a DDP 'module.' prefix."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{source} holds a {type(checkpoint).__name__}, not a state_dict; save the "
                        f"model's state_dict() instead.")
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    not_arrays = [k for k, v in checkpoint.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise UserError(f"{source} has entries that are not tensors: {', '.join(not_arrays[:8])}; "
                        f"pass a state_dict of tensors.")
    return checkpoint


def read_weights_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass an open_clip .pt/.bin/.safetensors file or hub folder.")
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind.startswith("torch"):
        return unwrap_state_dict(_read_torch(path), str(path))
    raise UserError(f"{path} is in an unknown format (not torch .pt/.bin, .safetensors or an open_clip "
                    f"hub folder); pass an open_clip checkpoint.")


def read_source(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state_dict, open_clip_config.json contents or None) from a file or an open_clip hub folder."""
    path = Path(src)
    if not path.is_dir():
        return read_weights_file(path), None
    config_path = path / HUB_CONFIG
    if not config_path.is_file():
        raise UserError(f"{path} is a folder without {HUB_CONFIG}; pass an open_clip hub folder or a "
                        f"weights file.")
    try:
        hub_config = json.loads(config_path.read_text())
        hub_config["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{config_path} is not an open_clip config (no JSON object with 'model_cfg'); "
                        f"fix or remove it.") from None
    weights = next((path / name for name in _HUB_WEIGHT_NAMES if (path / name).is_file()), None)
    if weights is None:
        raise UserError(f"{path} has no weights file (one of {', '.join(_HUB_WEIGHT_NAMES)}).")
    return read_weights_file(weights), hub_config


def write_state_dict(state_dict: dict[str, np.ndarray], path) -> None:
    """.safetensors via safetensors; .bin/.pt/.pth via torch.save (what open_clip loads). Local or
    remote (etils.epath), written under a temporary name and renamed when whole; a .safetensors
    file's bytes are made in memory first, since safetensors writes to a file object no other way."""
    path = epath.Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save
        def write(f):
            f.write(save(state_dict, metadata={"format": "pt"}))
    elif path.suffix in (".bin", ".pt", ".pth"):
        import torch
        def write(f):
            torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, f)
    else:
        raise UserError(f"{path}: choose .safetensors, .bin or .pt for a weights file, or a path "
                        f"without a suffix for an open_clip hub folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
    tmp.replace(path)


def write_hub_folder(state_dict: dict[str, np.ndarray], model_cfg: dict, preprocess_cfg: dict,
                     folder) -> None:
    """A folder open_clip loads with create_model_and_transforms('local-dir:FOLDER')."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_state_dict(state_dict, folder / HUB_WEIGHTS)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / HUB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
