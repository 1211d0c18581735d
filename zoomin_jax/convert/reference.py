"""The open_clip side of parity checks (needs torch + open_clip; used by `verify` and the tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zoomin_jax.models.config import CLIPConfig


def build_open_clip(cfg: CLIPConfig, weights: str | Path | None = None, seed: int = 0):
    """open_clip's CLIP for `cfg`, random (seeded) or strictly loaded from a file or hub folder."""
    import open_clip
    import torch
    if weights is not None and Path(weights).is_dir():
        model = open_clip.create_model(f"local-dir:{weights}")
    else:
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg.open_clip_cfg)
        if weights is not None:
            open_clip.load_checkpoint(model, str(weights), strict=True)
    return model.eval()


def eval_transform(preprocess_cfg: dict):
    import open_clip
    return open_clip.image_transform(preprocess_cfg["size"], is_train=False, mean=preprocess_cfg["mean"],
                                     std=preprocess_cfg["std"])


def encode(model, images, tokens, transform) -> tuple[np.ndarray, np.ndarray]:
    """open_clip fp32 image and text embeddings of PIL images and int token ids."""
    import torch
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images])
        image_emb = model.encode_image(pixels).numpy()
        text_emb = model.encode_text(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).numpy()
    return image_emb, text_emb


def differences(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min cosine similarity) between two embedding matrices."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    cosine = (ours * reference).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))
    return float(np.abs(ours - reference).max()), float(cosine.min())


def save_bmc_shaped_checkpoint(model, path: str | Path, epoch: int = 3) -> None:
    """Save like BMC-CLIP's BMC_CLIP_CF.pt: a DDP state_dict ('module.' keys) inside {'state_dict'}."""
    import torch
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "epoch": epoch}, path)
