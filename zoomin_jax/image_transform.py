"""open_clip's eval image transform, with PIL and numpy only (no torch).

open_clip (resize_mode 'shortest', square size) runs torchvision's Resize(size, BICUBIC) on the PIL
image, CenterCrop(size), convert('RGB'), ToTensor, Normalize. The same PIL calls in the same order
give the same pixels: resizing happens in the image's own mode, before the RGB conversion.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from zoomin_jax.models.config import OPENAI_MEAN, OPENAI_STD


def resize_shortest(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # torchvision truncates
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """float32 [size, size, 3], normalised, equal to open_clip's eval preprocess (HWC, not CHW)."""
    image = center_crop(resize_shortest(image, size), size).convert("RGB")
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
