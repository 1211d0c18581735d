"""One training example per level, on uint8 pixels: open_clip's eval transform, or for training a
random resized crop (scale and ratio ranges; never a horizontal flip — captions say left and right).

figure: the figure + caption, and up to max_panels panel crops + texts with a mask (figure<->panel).
panel:  a panel crop + text, and up to max_regions region crops + texts + their boxes in the panel
        crop's patch-token grid, with a mask (panel<->region and ROI consistency).
region: a region crop (with a context margin) + text_sub or text_lvlm, one drawn per example.

Texts ("tokens", "<child>_tokens") are CLIP token ids, or, when SampleConfig.text_cache names a
frozen text tower's precomputed embeddings, those embeddings (float32).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from zoomin_jax import image_decode
from zoomin_jax.records import box_side
from zoomin_jax.image_transform import crop_offset, eval_uint8, resized_shape
from zoomin_jax.data.text_cache import open_cache
from zoomin_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    image_size: int = 224
    patch_size: int = 14
    max_panels: int = 4
    max_regions: int = 4
    region_margin: float = 0.1      # context around a region crop, as a fraction of its size
    lvlm_text_prob: float = 0.0     # chance a panel's text is its LVLM description (when it has one)
    drop_panel_kinds: tuple[str, ...] = ()
    min_box_side: float = 8.0
    train: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)   # of the crop's area, for random resized crops
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    text_cache: str | None = None   # a frozen text tower's embeddings (data.text_cache) replace tokens


def decode_image(record: dict) -> Image.Image:
    return image_decode.decode(record["image_bytes"])


def crop(image: Image.Image, box, margin: float = 0.0) -> Image.Image:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    box = (max(0, round(x0 - dx)), max(0, round(y0 - dy)),
           min(image.width, round(x1 + dx)), min(image.height, round(y1 + dy)))
    return image.crop(box)


def eval_rect(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the source rectangle the eval transform shows, in the image's pixels."""
    new_w, new_h = resized_shape(width, height, size)
    off_x, off_y = crop_offset(new_w, new_h, size)
    sx, sy = new_w / width, new_h / height
    return off_x / sx, off_y / sy, size / sx, size / sy


def random_rect(width: int, height: int, rng: np.random.Generator, cfg: SampleConfig):
    """torchvision's RandomResizedCrop rectangle: an area fraction and aspect ratio drawn from the
    config's ranges; the eval rectangle when ten draws do not fit."""
    area = width * height
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1)), float(w), float(h)
    return eval_rect(width, height, cfg.image_size)


def view(image: Image.Image, cfg: SampleConfig, rng: np.random.Generator | None):
    """(uint8 [S, S, 3], source rectangle): exactly open_clip's eval transform, or a random resized crop."""
    if not cfg.train:
        return eval_uint8(image, cfg.image_size), eval_rect(*image.size, cfg.image_size)
    x, y, w, h = random_rect(*image.size, rng, cfg)
    pixels = image.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.BICUBIC, box=(x, y, x + w, y + h))
    return np.asarray(pixels), (x, y, w, h)


def box_in_grid(box, crop_box, cfg: SampleConfig, rect=None) -> np.ndarray:
    """A box in original pixels -> [x0, y0, x1, y1] in patch-token units of the crop's view, whose
    source rectangle (crop pixels) is `rect` (default: the eval transform's)."""
    left, top = round(crop_box[0]), round(crop_box[1])
    x, y, w, h = rect or eval_rect(round(crop_box[2]) - left, round(crop_box[3]) - top, cfg.image_size)
    sx, sy = cfg.image_size / w, cfg.image_size / h
    grid = np.array([(box[0] - left - x) * sx, (box[1] - top - y) * sy,
                     (box[2] - left - x) * sx, (box[3] - top - y) * sy], np.float32) / cfg.patch_size
    return np.clip(grid, 0, cfg.image_size / cfg.patch_size)


def _big_enough(box, cfg: SampleConfig) -> bool:
    return box_side(box) >= cfg.min_box_side


def keeps_panel(panel: dict, cfg: SampleConfig) -> bool:
    return panel["kind"] not in cfg.drop_panel_kinds and _big_enough(panel["box"], cfg)


def kept_panels(record: dict, cfg: SampleConfig) -> list[dict]:
    return [p for p in record["panels"] if keeps_panel(p, cfg)]


def kept_regions(record: dict, panel_id: int, cfg: SampleConfig) -> list[dict]:
    return [r for r in record["regions"] if r["panel_id"] == panel_id and _big_enough(r["box"], cfg)]


def panel_text(panel: dict, cfg: SampleConfig, rng: np.random.Generator | None) -> str:
    """The sub-caption, or with probability lvlm_text_prob (training only) the LVLM description."""
    if panel["text_lvlm"] and rng is not None and rng.random() < cfg.lvlm_text_prob:
        return panel["text_lvlm"]
    return panel["text"]


def text_arrays(texts: list[str], cfg: SampleConfig) -> np.ndarray:
    """CLIP token ids [n, 77] int32, or with cfg.text_cache the cached embeddings [n, D] float32."""
    return open_cache(cfg.text_cache).lookup(texts) if cfg.text_cache else tokenize(texts)


def _stack(views: list[np.ndarray], texts: list[str], limit: int, cfg: SampleConfig):
    size = cfg.image_size
    images = np.zeros((limit, size, size, 3), np.uint8)
    row = (open_cache(cfg.text_cache).dim, np.float32) if cfg.text_cache else (77, np.int32)
    text = np.zeros((limit, row[0]), row[1])
    mask = np.zeros((limit,), bool)
    count = min(len(views), limit)
    if count:
        images[:count], mask[:count] = views[:count], True
        text[:count] = text_arrays(texts[:count], cfg)  # one call for all children
    return images, text, mask


def figure_example(record: dict, cfg: SampleConfig, rng: np.random.Generator | None = None,
                   image: Image.Image | None = None) -> dict:
    """`image`: the record's image when the caller already decoded it."""
    image = decode_image(record) if image is None else image
    panels = kept_panels(record, cfg)[:cfg.max_panels]
    views = [view(crop(image, p["box"]), cfg, rng)[0] for p in panels]
    panel_images, panel_tokens, panel_mask = _stack(views, [panel_text(p, cfg, rng) for p in panels],
                                                    cfg.max_panels, cfg)
    return {"image": view(image, cfg, rng)[0], "tokens": text_arrays([record["caption"]], cfg)[0],
            "panel_images": panel_images, "panel_tokens": panel_tokens, "panel_mask": panel_mask}


def panel_example(record: dict, panel_index: int, cfg: SampleConfig, rng: np.random.Generator | None = None,
                  image: Image.Image | None = None) -> dict:
    image = decode_image(record) if image is None else image
    panel = record["panels"][panel_index]
    pixels, rect = view(crop(image, panel["box"]), cfg, rng)
    regions = []
    for region in kept_regions(record, panel["panel_id"], cfg):
        grid = box_in_grid(region["box"], panel["box"], cfg, rect)
        if grid[2] > grid[0] and grid[3] > grid[1]:  # a random crop may cut a region out of view
            regions.append((region, grid))
    regions = regions[:cfg.max_regions]
    views = [view(crop(image, r["box"], cfg.region_margin), cfg, rng)[0] for r, _ in regions]
    region_images, region_tokens, region_mask = _stack(
        views, [r["text_sub"] or r["text_lvlm"] for r, _ in regions], cfg.max_regions, cfg)
    grid_boxes = np.zeros((cfg.max_regions, 4), np.float32)
    for n, (_, grid) in enumerate(regions):
        grid_boxes[n] = grid
    return {"image": pixels, "tokens": text_arrays([panel_text(panel, cfg, rng)], cfg)[0],
            "region_images": region_images, "region_tokens": region_tokens, "region_mask": region_mask,
            "region_grid_boxes": grid_boxes}


def region_example(record: dict, region_index: int, cfg: SampleConfig, rng: np.random.Generator,
                   image: Image.Image | None = None) -> dict:
    region = record["regions"][region_index]
    texts = [t for t in (region["text_sub"], region["text_lvlm"]) if t]
    text = texts[int(rng.integers(len(texts)))] if texts else record["caption"]
    image = decode_image(record) if image is None else image
    pixels, _ = view(crop(image, region["box"], cfg.region_margin), cfg, rng)
    return {"image": pixels, "tokens": text_arrays([text], cfg)[0]}
