"""Annotation backends behind one interface (`pipeline.Backend`): heuristic on CPU; qwen
(transformers) and vllm, each imported only when chosen."""
from __future__ import annotations

from PIL import Image

from annotate.captions import split_caption
from annotate.config import AnnotateConfig
from annotate.heuristic import SplitConfig, split_panels
from annotate.labels import LabelConfig, read_labels
from annotate.markers import MarkerConfig, find_markers
from annotate.pipeline import Proposal


class HeuristicBackend:
    """XY-cut panels, labels read from the glyphs printed in them, solid-colour arrows found in each
    panel (markers, which become 'marker' regions; no caption-phrase boxes)."""
    name = "heuristic"
    model_id = "xy-cut+glyph-labels+colour-arrows"

    def __init__(self, split_cfg: SplitConfig = SplitConfig(), label_cfg: LabelConfig = LabelConfig(),
                 marker_cfg: MarkerConfig = MarkerConfig()):
        self.split_cfg, self.label_cfg, self.marker_cfg = split_cfg, label_cfg, marker_cfg

    def propose(self, images: list[Image.Image], captions: list[str]) -> list[Proposal]:
        proposals = []
        for image, caption in zip(images, captions, strict=True):
            boxes = split_panels(image, self.split_cfg)
            labels = read_labels(image, boxes, [p["label"] for p in split_caption(caption)], self.label_cfg)
            markers = {k: found for k, box in enumerate(boxes) if (found := find_markers(image, box, self.marker_cfg))}
            proposals.append(Proposal([{"box": box, "label": label, "score": 1.0}
                                       for box, label in zip(boxes, labels)], markers=markers))
        return proposals


class PrefilteredBackend:
    """The heuristic first: figures it finds to be one panel skip the (expensive) LVLM."""

    def __init__(self, lvlm, heuristic: HeuristicBackend | None = None):
        self.lvlm, self.heuristic = lvlm, heuristic or HeuristicBackend()
        self.name, self.model_id = f"{lvlm.name}+prefilter", lvlm.model_id

    def propose(self, images: list[Image.Image], captions: list[str]) -> list[Proposal]:
        quick = self.heuristic.propose(images, captions)
        multi = [n for n, proposal in enumerate(quick) if len(proposal.panels) != 1]
        for n, proposal in enumerate(quick):
            if n not in multi:
                proposal.warnings.append("prefilter: one panel found, LVLM skipped")
        for n, proposal in zip(multi, self.lvlm.propose([images[n] for n in multi], [captions[n] for n in multi]),
                               strict=True):
            quick[n] = proposal
        return quick


def make_backend(name: str, model: str | None = None, cfg: AnnotateConfig = AnnotateConfig(),
                 prefilter: bool = False):
    if name == "heuristic":
        return HeuristicBackend()
    if name in ("qwen", "vllm"):
        if not model:
            raise ValueError(f"--backend {name} needs --model, a Qwen2.5-VL directory (save_pretrained layout)")
        from annotate.qwen import QwenBackend, VllmBackend
        backend = (QwenBackend if name == "qwen" else VllmBackend)(model, cfg)
        return PrefilteredBackend(backend) if prefilter else backend
    raise ValueError(f"unknown backend {name!r}; use heuristic, qwen or vllm")
