"""Region fusion rules (docs/design.md §3): marker-proximity gate, dilation, NMS, clipping, degenerate filter.

Path A gives marker boxes (arrows, asterisks, circles…), path B caption-phrase boxes. A phrase box
near a marker is the region that marker points at ('fused'); a marker that no phrase box claims
becomes a region ('marker': what an arrow with a known tip points at, else the marker dilated).
A panel without markers has nothing to gate its phrase boxes against: they become 'caption' regions
as `AnnotateConfig.caption_boxes_without_markers` says (by default only those a second look at the
box's own crop confirmed, `verified` on the phrase). A region's text_lvlm is the description its
phrase or marker carries. Boxes are [x0, y0, x1, y1] in original pixels.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms, nms

from annotate.config import AnnotateConfig
from zoomin_jax.records import clip_box


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def within_gate(box, marker_box, panel_box, tau: float) -> bool:
    """Centre distance, normalised by the panel diagonal, at most tau."""
    (x, y), (mx, my) = centre(box), centre(marker_box)
    diagonal = math.hypot(panel_box[2] - panel_box[0], panel_box[3] - panel_box[1])
    return math.hypot(x - mx, y - my) <= tau * diagonal


def dilate(box, factor: float) -> list[float]:
    """The box scaled by `factor` about its centre (callers clip it)."""
    (x, y), half_w, half_h = centre(box), (box[2] - box[0]) * factor / 2, (box[3] - box[1]) * factor / 2
    return [x - half_w, y - half_h, x + half_w, y + half_h]


def pointed_at(marker: dict, dilation: float) -> list[float]:
    """The region a marker shows: for an arrow with a known tip, a square as long as the arrow centred
    on its tip (what it points at, not the arrow itself); else the marker box dilated."""
    box = marker["box"]
    if marker.get("tip") is None:
        return dilate(box, dilation)
    (x, y), half = marker["tip"], max(box[2] - box[0], box[3] - box[1]) / 2
    return [x - half, y - half, x + half, y + half]


def is_degenerate(box, panel_box, cfg: AnnotateConfig) -> bool:
    width, height = box[2] - box[0], box[3] - box[1]
    panel_area = (panel_box[2] - panel_box[0]) * (panel_box[3] - panel_box[1])
    return (min(width, height) < cfg.min_region_side
            or max(width, height) > cfg.max_region_aspect * min(width, height)
            or width * height < cfg.min_region_area_fraction * panel_area)


def non_max_suppression(items: list[dict], iou: float, group_by: str | None = None) -> list[dict]:
    """Highest-score boxes first; drop any overlapping a kept one by more than `iou` — only within
    the same `group_by` value when given (panel proposals sharing an identifier)."""
    if not items:
        return []
    boxes = torch.tensor([r["box"] for r in items], dtype=torch.float64)
    scores = torch.tensor([r["score"] for r in items], dtype=torch.float64)
    if group_by is None:
        return [items[i] for i in nms(boxes, scores, iou).tolist()]
    names = {name: n for n, name in enumerate(sorted({r[group_by] for r in items}))}
    groups = torch.tensor([names[r[group_by]] for r in items])
    return [items[i] for i in batched_nms(boxes, scores, groups, iou).tolist()]


def _keeps_caption_box(phrase: dict, cfg: AnnotateConfig) -> bool:
    """Whether a phrase box in a panel without markers becomes a 'caption' region."""
    policy = cfg.caption_boxes_without_markers
    return policy == "keep" or (policy == "verify" and phrase.get("verified") is True)


def fuse_regions(panel_box, markers: list[dict], phrases: list[dict], cfg: AnnotateConfig) -> list[dict]:
    """Regions of one panel.

    markers: {"box", "kind", "score"}; phrases: {"box", "text", "score"} (caption clauses grounded);
    either may carry a "description" (of the region it makes), a phrase a "verified" verdict.
    Returns {"box", "marker_box", "marker_kind", "text_sub", "text_lvlm", "source", "score"}, clipped
    to the panel.
    """
    regions, claimed = [], set()
    for phrase in phrases:
        gated = [n for n, m in enumerate(markers)
                 if within_gate(phrase["box"], m["box"], panel_box, cfg.marker_gate_tau)]
        if gated:
            nearest = min(gated, key=lambda n: math.dist(centre(phrase["box"]), centre(markers[n]["box"])))
            claimed.add(nearest)
            marker = markers[nearest]
            regions.append({"box": phrase["box"], "marker_box": marker["box"], "marker_kind": marker["kind"],
                            "text_sub": phrase["text"], "text_lvlm": phrase.get("description", ""), "source": "fused",
                            "score": phrase["score"] * marker["score"]})
        elif not markers and _keeps_caption_box(phrase, cfg):
            regions.append({"box": phrase["box"], "marker_box": None, "marker_kind": "none",
                            "text_sub": phrase["text"], "text_lvlm": phrase.get("description", ""),
                            "source": "caption", "score": phrase["score"]})
    for n, marker in enumerate(markers):
        if n not in claimed:
            regions.append({"box": pointed_at(marker, cfg.marker_dilation), "marker_box": marker["box"],
                            "marker_kind": marker["kind"], "text_sub": "", "text_lvlm": marker.get("description", ""),
                            "source": "marker", "score": marker["score"]})
    kept = []
    for region in regions:
        # Clipped to the panel: a region never spills into the neighbouring panel.
        region["box"] = clip_box(region["box"], panel_box[2], panel_box[3], panel_box[0], panel_box[1])
        if region["box"] is None:
            continue
        if not is_degenerate(region["box"], panel_box, cfg):
            kept.append(region)
    return non_max_suppression(kept, cfg.region_nms_iou)
