"""open_clip's eval image transform, with PIL and numpy only (no torch).

open_clip (resize_mode 'shortest', square size) runs torchvision's Resize(size, BICUBIC) on the PIL
image, CenterCrop(size), convert('RGB'), ToTensor, Normalize. The same PIL calls in the same order
give the same pixels: resizing happens in the image's own mode, before the RGB conversion.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(size): the short side becomes `size`."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # torchvision truncates
    return (size, new_long) if width <= height else (new_long, size)


def crop_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's CenterCrop(size) in an image of that size."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def eval_uint8(image: Image.Image, size: int = 224) -> np.ndarray:
    """uint8 [size, size, 3]: open_clip's eval resize + center crop + RGB, before normalisation."""
    new_size = resized_shape(*image.size, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    left, top = crop_offset(*new_size, size)
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


def normalize(pixels: np.ndarray, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    pixels = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess(image: Image.Image, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """float32 [size, size, 3], normalised, equal to open_clip's eval preprocess (HWC, not CHW)."""
    return normalize(eval_uint8(image, size), mean, std)
