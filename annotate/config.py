"""Every threshold of the annotation pipeline, in one place with its default (docs/design.md §3)."""
from __future__ import annotations

import dataclasses

CAPTION_BOX_POLICIES = ("verify", "keep", "drop")


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    # Qwen2.5-VL input resolution: smart_resize keeps H*W within these, in multiples of 28.
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # Refuse decoding anything larger (decompression bombs).
    max_image_pixels: int = 64_000_000
    # Longest side over shortest side beyond which a figure fails at decode: Qwen's smart_resize raises
    # a ValueError above 200, and a strip that thin holds nothing to annotate for any backend.
    max_aspect_ratio: float = 200.0
    # The LVLM's token budget per answer. A box costs ~35 tokens ('{"bbox_2d": [412, 30, 806, 388], "label":
    # "B"},': Qwen's tokenizer splits digits one by one), so 256 held ~7 boxes; 1024 holds ~29, more panels
    # and markers than figures have. Answers end at their end-of-sequence token well before it.
    max_new_tokens: int = 1024
    # An answer cut at its budget is asked again once with 4x the budget, at most this many tokens (~115
    # boxes); cut even then, its complete boxes are kept with a warning.
    max_retry_tokens: int = 4096
    # Panels: the LVLM is asked at each of these scales where the scale shows it an image of another size
    # (a figure above max_pixels is shown at the same size at every scale); proposals are pooled with NMS
    # among boxes whose labels identify the same panel.
    panel_scales: tuple[float, ...] = (1.0, 0.75)
    panel_nms_iou: float = 0.5
    # Regions: a caption-phrase box is kept when its centre lies within `marker_gate_tau` of a
    # marker centre, distances normalised by the panel diagonal.
    marker_gate_tau: float = 0.25
    # Caption-phrase boxes in panels with no markers, where there is nothing to gate them against:
    # "verify" (default) keeps a box only when the LVLM, shown that box's crop alone, says it shows the
    # phrase; "keep" keeps every box; "drop" keeps none. Verify, because a grounding model seldom leaves
    # out a phrase it cannot see, and without a marker a box's only evidence is the answer that drew it;
    # the second look rides on the region's description request (qwen.py), so it costs no request of
    # its own. The heuristic backend grounds no phrases, so the policy only concerns the LVLM backends.
    caption_boxes_without_markers: str = "verify"
    # An unmatched marker (arrow, asterisk…) becomes a region this many times its own size.
    marker_dilation: float = 3.0
    region_nms_iou: float = 0.5
    # Degenerate boxes: shortest side in pixels, longest/shortest side, area as a fraction of the panel.
    min_region_side: float = 8.0
    max_region_aspect: float = 8.0
    min_region_area_fraction: float = 0.002

    def __post_init__(self):
        if self.caption_boxes_without_markers not in CAPTION_BOX_POLICIES:
            raise ValueError(f"caption_boxes_without_markers is {self.caption_boxes_without_markers!r}; "
                             f"use one of {', '.join(CAPTION_BOX_POLICIES)}")
