"""One training example per level, on uint8 pixels: open_clip's eval transform, or for training a
random resized crop (torchvision's, scale and ratio ranges; never a horizontal flip — captions say
left and right).

figure: the figure + caption (or a citing paragraph), and up to max_panels panel crops + texts with
        a mask (figure<->panel).
panel:  a panel crop + text, and up to max_regions region crops + texts + their boxes in the panel
        crop's patch-token grid, with a mask (panel<->region and ROI consistency).
region: a region crop (with a context margin) + text_sub or text_lvlm, one drawn per example.

Children (docs/design.md §7). A parent is paired with the children its view shows: a child takes part
when at least min_visible of its box is in the parent's view, and its crop is cut to what that view
shows, so the parent is never asked to match content its crop cut away. When more children than the
padded maximum are visible, that many are drawn at random (by the example's rng: seeded, new each
epoch), never the first ones. A region's box in the panel's token grid is its crop's exact extent
through its own view (margin included), so ROI pooling covers exactly what the region crop shows.

The arrays and their keys are zoomin_jax.batch_layout's. Texts are CLIP token ids, or, when
SampleConfig.text_cache names a frozen text tower's precomputed embeddings, those embeddings
(float32). Every text also has an id (int32): equal for identical texts, so that the loss can treat
them as positives of each other (losses.py).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from zoomin_jax import image_decode
from zoomin_jax.batch_layout import LAYOUTS, Dims, example_arrays
from zoomin_jax.records import box_side
from zoomin_jax.image_transform import crop_offset, eval_uint8, resized_shape
from zoomin_jax.data.text_cache import open_cache, text_key
from zoomin_jax.tokenizer import tokenize

Box = tuple[float, float, float, float]    # x0, y0, x1, y1 in pixels
Rect = tuple[float, float, float, float]   # x, y, width, height in pixels


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    image_size: int = 224
    patch_size: int = 14
    # Padded children per parent. 6 panels: the 90th percentile of panels per figure over the 9,642
    # real layouts of zou_train.csv (median 2; 93.5% of figures have at most 6; ImageCLEF 2016's
    # 6,782 compound figures: median 3, 88.4% at most 6). Regions: no real per-panel counts to go by.
    max_panels: int = 6
    max_regions: int = 4
    region_margin: float = 0.1      # context around a region crop, as a fraction of its size
    lvlm_text_prob: float = 0.0     # chance a panel's text is its LVLM description (when it has one)
    context_text_prob: float = 0.0  # chance a figure's text is one of its citing paragraphs (when it has any)
    drop_panel_kinds: tuple[str, ...] = ()
    min_box_side: float = 8.0
    min_visible: float = 0.5        # of a child's box its parent's view must show for the two to be paired
    train: bool = False
    # open_clip's training default. On the real layouts, a (0.9, 1) crop leaves at least half of 91% of
    # the panels in view (0.5-1: 73%), see tests/bench/crops.py.
    crop_scale: tuple[float, float] = (0.9, 1.0)   # of the crop's area, for random resized crops
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    text_cache: str | None = None   # a frozen text tower's embeddings (data.text_cache) replace tokens


def decode_image(record: dict) -> Image.Image:
    return image_decode.decode(record["image_bytes"])


def crop_box(box: Box, margin: float, size: tuple[int, int], within: Box | None = None) -> tuple[int, int, int, int]:
    """The pixel box a crop of `box` takes: grown by `margin` of its size on each side, rounded, and
    clipped to the image (`size`: width, height) and to `within` (rounded inwards, so the crop stays
    inside it)."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    lo_x, lo_y, hi_x, hi_y = 0, 0, size[0], size[1]
    if within is not None:
        lo_x, lo_y = max(lo_x, math.ceil(within[0])), max(lo_y, math.ceil(within[1]))
        hi_x, hi_y = min(hi_x, math.floor(within[2])), min(hi_y, math.floor(within[3]))
    return (max(lo_x, round(x0 - dx)), max(lo_y, round(y0 - dy)), min(hi_x, round(x1 + dx)), min(hi_y, round(y1 + dy)))


def eval_rect(width: int, height: int, size: int) -> Rect:
    """The source rectangle the eval transform shows, in the image's pixels."""
    new_w, new_h = resized_shape(width, height, size)
    off_x, off_y = crop_offset(new_w, new_h, size)
    sx, sy = new_w / width, new_h / height
    return off_x / sx, off_y / sy, size / sx, size / sy


def random_rect(width: int, height: int, rng: np.random.Generator, cfg: SampleConfig) -> Rect:
    """torchvision's RandomResizedCrop rectangle: an area fraction and aspect ratio drawn from the
    config's ranges; when ten draws do not fit, its fallback, the central crop of the whole width or
    height at the nearest allowed aspect ratio."""
    area = width * height
    log_ratio = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*cfg.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return float(rng.integers(0, width - w + 1)), float(rng.integers(0, height - h + 1)), float(w), float(h)
    w, h = width, height
    if width / height < min(cfg.crop_ratio):
        h = round(width / min(cfg.crop_ratio))
    elif width / height > max(cfg.crop_ratio):
        w = round(height * max(cfg.crop_ratio))
    return float((width - w) // 2), float((height - h) // 2), float(w), float(h)


def view(image: Image.Image, cfg: SampleConfig, rng: np.random.Generator | None):
    """(uint8 [S, S, 3], source rectangle): exactly open_clip's eval transform, or a random resized crop."""
    if not cfg.train:
        return eval_uint8(image, cfg.image_size), eval_rect(*image.size, cfg.image_size)
    x, y, w, h = random_rect(*image.size, rng, cfg)
    pixels = image.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.BICUBIC, box=(x, y, x + w, y + h))
    return np.asarray(pixels), (x, y, w, h)


def shown_box(rect: Rect, crop: tuple[int, int, int, int]) -> Box:
    """What a view of a crop shows, as a box in the image's pixels: its source rectangle `rect`
    (crop pixels) moved by the crop's corner."""
    x, y, w, h = rect
    return crop[0] + x, crop[1] + y, crop[0] + x + w, crop[1] + y + h


def to_grid(box: Box, shown: Box, cfg: SampleConfig) -> np.ndarray:
    """A box -> [x0, y0, x1, y1] in patch-token units of the view that shows `shown` (both boxes in the
    image's pixels), clipped to the grid."""
    sx, sy = cfg.image_size / (shown[2] - shown[0]), cfg.image_size / (shown[3] - shown[1])
    grid = np.array([(box[0] - shown[0]) * sx, (box[1] - shown[1]) * sy,
                     (box[2] - shown[0]) * sx, (box[3] - shown[1]) * sy], np.float32) / cfg.patch_size
    return np.clip(grid, 0, cfg.image_size / cfg.patch_size)


def visible_fraction(box: Box, shown: Box) -> float:
    width = max(0.0, min(box[2], shown[2]) - max(box[0], shown[0]))
    height = max(0.0, min(box[3], shown[3]) - max(box[1], shown[1]))
    return width * height / ((box[2] - box[0]) * (box[3] - box[1]))


def _big_enough(box, cfg: SampleConfig) -> bool:
    return box_side(box) >= cfg.min_box_side


def keeps_panel(panel: dict, cfg: SampleConfig) -> bool:
    return panel["kind"] not in cfg.drop_panel_kinds and _big_enough(panel["box"], cfg)


def kept_panels(record: dict, cfg: SampleConfig) -> list[dict]:
    return [p for p in record["panels"] if keeps_panel(p, cfg)]


def kept_regions(record: dict, panel_id: int, cfg: SampleConfig) -> list[dict]:
    return [r for r in record["regions"] if r["panel_id"] == panel_id and _big_enough(r["box"], cfg)]


def sample_children(children: list, limit: int, rng: np.random.Generator | None) -> list:
    """All children when they fit, else `limit` of them drawn without replacement (kept in order);
    without an rng, the first `limit`."""
    if len(children) <= limit or rng is None:
        return children[:limit]
    return [children[n] for n in np.sort(rng.choice(len(children), limit, replace=False))]


def visible_children(children: list[dict], shown: Box, margin: float, size: tuple[int, int], limit: int,
                     cfg: SampleConfig, rng: np.random.Generator | None) -> list[tuple[dict, tuple]]:
    """(child, crop box) of the children the parent's view (`shown`) shows at least min_visible of, up
    to `limit` of them (sample_children), each crop box cut to the view."""
    if not limit:
        return []
    seen = []
    for child in children:
        if visible_fraction(child["box"], shown) >= cfg.min_visible:
            box = crop_box(child["box"], margin, size, within=shown)
            if box[2] > box[0] and box[3] > box[1]:
                seen.append((child, box))
    return sample_children(seen, limit, rng)


def panel_text(panel: dict, cfg: SampleConfig, rng: np.random.Generator | None) -> str:
    """The sub-caption, or with probability lvlm_text_prob (training only) the LVLM description."""
    if panel["text_lvlm"] and rng is not None and rng.random() < cfg.lvlm_text_prob:
        return panel["text_lvlm"]
    return panel["text"]


def figure_text(record: dict, cfg: SampleConfig, rng: np.random.Generator | None) -> str:
    """The caption, or with probability context_text_prob (training only) one of the paragraphs that
    cite the figure, drawn uniformly."""
    context = [text for text in record["context"] if text]
    if context and rng is not None and rng.random() < cfg.context_text_prob:
        return context[int(rng.integers(len(context)))]
    return record["caption"]


def region_text(region: dict, record: dict, rng: np.random.Generator | None) -> str:
    """text_sub or text_lvlm, one drawn (without an rng: text_sub first); the caption when it has neither."""
    texts = [t for t in (region["text_sub"], region["text_lvlm"]) if t]
    if not texts:
        return record["caption"]
    return texts[int(rng.integers(len(texts)))] if rng is not None else texts[0]


def text_arrays(texts: list[str], cfg: SampleConfig) -> np.ndarray:
    """CLIP token ids [n, 77] int32, or with cfg.text_cache the cached embeddings [n, D] float32."""
    return open_cache(cfg.text_cache).lookup(texts) if cfg.text_cache else tokenize(texts)


def text_ids(texts: list[str]) -> np.ndarray:
    """[n] int32, equal for identical texts: the low 32 bits of the text cache's 64-bit key (two
    distinct texts share an id with probability 2^-32, so a batch of B texts holds a false pair
    with probability about B² / 2^33: 1e-5 at B = 320)."""
    keys = np.asarray([text_key(text) for text in texts], np.uint64)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def dims(cfg: SampleConfig) -> Dims:
    """The batch_layout sizes of examples made with `cfg`."""
    width = open_cache(cfg.text_cache).dim if cfg.text_cache else None
    return Dims.of(cfg.image_size, cfg.max_panels, cfg.max_regions, width)


def _example(level: str, pixels: np.ndarray, text: str, cfg: SampleConfig, views: list[np.ndarray] = (),
             child_texts: list[str] = ()) -> dict:
    """An example's arrays, laid out as batch_layout says: its view, its text's array and id, and the
    first len(views) child slots filled (the rest zero, masked out)."""
    layout = LAYOUTS[level]
    out = {key: np.zeros(array.shape, array.dtype) for key, array in example_arrays(level, dims(cfg)).items()}
    out[layout.image], out[layout.tokens], out[layout.text_id] = pixels, text_arrays([text], cfg)[0], text_ids([text])[0]
    if views:
        count = len(views)
        out[layout.child_images][:count], out[layout.child_mask][:count] = views, True
        out[layout.child_tokens][:count] = text_arrays(child_texts, cfg)  # one call for all the children
        out[layout.child_text_id][:count] = text_ids(child_texts)
    return out


def figure_example(record: dict, cfg: SampleConfig, rng: np.random.Generator | None = None,
                   image: Image.Image | None = None) -> dict:
    """`image`: the record's image when the caller already decoded it."""
    image = decode_image(record) if image is None else image
    pixels, rect = view(image, cfg, rng)
    panels = visible_children(kept_panels(record, cfg), shown_box(rect, (0, 0, *image.size)), 0.0, image.size, cfg.max_panels,
                              cfg, rng)
    views = [view(image.crop(box), cfg, rng)[0] for _, box in panels]
    return _example("figure", pixels, figure_text(record, cfg, rng), cfg, views,
                    [panel_text(p, cfg, rng) for p, _ in panels])


def panel_example(record: dict, panel_index: int, cfg: SampleConfig, rng: np.random.Generator | None = None,
                  image: Image.Image | None = None) -> dict:
    image = decode_image(record) if image is None else image
    panel = record["panels"][panel_index]
    panel_box = crop_box(panel["box"], 0.0, image.size)
    pixels, rect = view(image.crop(panel_box), cfg, rng)
    shown = shown_box(rect, panel_box)
    regions = visible_children(kept_regions(record, panel["panel_id"], cfg), shown, cfg.region_margin, image.size,
                               cfg.max_regions, cfg, rng)
    views = [view(image.crop(box), cfg, rng) for _, box in regions]
    region_texts = [region_text(r, record, rng) for r, _ in regions]  # drawn before the panel's text
    out = _example("panel", pixels, panel_text(panel, cfg, rng), cfg, [crop for crop, _ in views], region_texts)
    for n, ((_, box), (_, region_rect)) in enumerate(zip(regions, views)):
        out[LAYOUTS["panel"].child_grid_boxes][n] = to_grid(shown_box(region_rect, box), shown, cfg)
    return out


def region_example(record: dict, region_index: int, cfg: SampleConfig, rng: np.random.Generator | None = None,
                   image: Image.Image | None = None) -> dict:
    image = decode_image(record) if image is None else image
    region = record["regions"][region_index]
    pixels, _ = view(image.crop(crop_box(region["box"], cfg.region_margin, image.size)), cfg, rng)
    return _example("region", pixels, region_text(region, record, rng), cfg)
