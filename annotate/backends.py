"""Annotation backends behind one interface (`pipeline.Backend`): heuristic on CPU; qwen
(transformers) and vllm, the Qwen2.5-VL request plan over either engine, each imported only when chosen."""
from __future__ import annotations

import dataclasses

from PIL import Image

from annotate.captions import split_caption
from annotate.config import AnnotateConfig
from annotate.heuristic import SplitConfig, panel_units, split_panels
from annotate.labels import LabelConfig, fill_in_order, read_labels
from annotate.markers import MarkerConfig, find_markers
from annotate.pipeline import Proposal


class HeuristicBackend:
    """XY-cut panels grouped into labelled units, labels read from the glyphs printed in them, arrows
    found in each panel (markers, which become 'marker' regions; no caption-phrase boxes)."""
    name = "heuristic"
    model_id = "xy-cut+glyph-labels+colour-arrows"

    def __init__(self, split_cfg: SplitConfig = SplitConfig(), label_cfg: LabelConfig = LabelConfig(),
                 marker_cfg: MarkerConfig = MarkerConfig()):
        self.split_cfg, self.label_cfg, self.marker_cfg = split_cfg, label_cfg, marker_cfg

    def panel_boxes(self, image: Image.Image, caption: str = "") -> list[list[float]]:
        """The labelled units; the caption's labels, where given, help read the glyphs."""
        labels = [p["label"] for p in split_caption(caption) if p["label"]]
        return split_panels(image, self.split_cfg, labels, self.label_cfg)

    def proposal(self, image: Image.Image, caption: str, boxes: list[list[float]],
                 labels: list[str] | None = None) -> Proposal:
        """Labels (read here unless given) and markers of the panels `panel_boxes` found."""
        caption_labels = [p["label"] for p in split_caption(caption)]
        if labels is None:
            labels = read_labels(image, boxes, caption_labels, self.label_cfg)
        markers = {k: found for k, box in enumerate(boxes) if (found := find_markers(image, box, self.marker_cfg))}
        return Proposal([{"box": box, "label": label, "score": 1.0} for box, label in zip(boxes, labels)],
                        markers=markers)

    def propose(self, images: list[Image.Image], captions: list[str],
                contexts: list[list[str]] | None = None) -> list[Proposal]:
        """`contexts` are not read: the heuristic reads the image and the caption only."""
        proposals = []
        for image, caption in zip(images, captions, strict=True):
            caption_labels = [p["label"] for p in split_caption(caption) if p["label"]]
            units = panel_units(image, caption_labels, self.split_cfg, self.label_cfg)
            proposals.append(self.proposal(image, caption, [box for box, _ in units],
                                           fill_in_order([label for _, label in units], caption_labels)))
        return proposals


class PrefilteredBackend:
    """The heuristic's panel split first: figures it finds to be one panel skip the (expensive) LVLM and
    keep the heuristic's proposal; the others go to the LVLM, with no label reading or marker finding
    spent on them here."""

    def __init__(self, lvlm, heuristic: HeuristicBackend | None = None):
        self.lvlm, self.heuristic = lvlm, heuristic or HeuristicBackend()
        self.name, self.model_id = f"{lvlm.name}+prefilter", lvlm.model_id

    @property
    def counts(self):
        return self.lvlm.counts

    @property
    def busy_seconds(self) -> float:
        return self.lvlm.busy_seconds

    def propose(self, images: list[Image.Image], captions: list[str],
                contexts: list[list[str]] | None = None) -> list[Proposal]:
        boxes = [self.heuristic.panel_boxes(image) for image in images]
        multi = [n for n, found in enumerate(boxes) if len(found) != 1]
        if contexts is None:
            contexts = [[] for _ in images]
        proposals = dict(zip(multi, self.lvlm.propose([images[n] for n in multi], [captions[n] for n in multi],
                                                      [contexts[n] for n in multi]), strict=True))
        for n, found in enumerate(boxes):
            if n not in proposals:
                proposals[n] = self.heuristic.proposal(images[n], captions[n], found)
                proposals[n].warnings.append("prefilter: one panel found, LVLM skipped")
        return [proposals[n] for n in range(len(images))]


@dataclasses.dataclass(frozen=True)
class LvlmOptions:
    """How an LVLM backend runs on a node (`annotate run` flags)."""
    # transformers: requests per generate call; a layer placement ("auto", "balanced") over the node's GPUs
    # with an optional per-device memory cap ("0=70GiB,1=70GiB"); the attention kernel (sdpa, eager,
    # flash_attention_2 where flash-attn is installed).
    batch_size: int = 16
    device_map: str | None = None
    max_memory: str | None = None
    attn_implementation: str | None = None
    # vLLM: GPUs to shard the model over, share of each GPU's memory it may take, context length cap,
    # sequences decoded at once.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None


def make_engine(name: str, model: str, cfg: AnnotateConfig, options: LvlmOptions):
    from annotate.engines import TransformersEngine, VllmEngine, parse_max_memory
    if name == "qwen":
        return TransformersEngine(model, cfg, device_map=options.device_map,
                                  max_memory=parse_max_memory(options.max_memory),
                                  attn_implementation=options.attn_implementation, batch_size=options.batch_size)
    return VllmEngine(model, cfg, tensor_parallel_size=options.tensor_parallel_size,
                      gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
                      max_num_seqs=options.max_num_seqs)


def make_backend(name: str, model: str | None = None, cfg: AnnotateConfig = AnnotateConfig(),
                 prefilter: bool = False, options: LvlmOptions = LvlmOptions()):
    if name == "heuristic":
        return HeuristicBackend()
    if name in ("qwen", "vllm"):
        if not model:
            raise ValueError(f"--backend {name} needs --model, a Qwen2.5-VL directory (save_pretrained layout)")
        from annotate.qwen import QwenBackend
        backend = QwenBackend(make_engine(name, model, cfg, options), cfg)
        return PrefilteredBackend(backend) if prefilter else backend
    raise ValueError(f"unknown backend {name!r}; use heuristic, qwen or vllm")
