"""One figure in, one validated figure record out (or a FigureError saying which stage failed and why).

Stages: read the bytes and decode the image (decode.py, size-capped), propose panels (backend), split the caption
per panel label, classify panels, mine regions (backend markers + caption phrases, fused), build the
record. The record keeps the original encoded bytes untouched; decoding is only for analysis.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Protocol

from PIL import Image

from annotate.captions import label_key, split_caption
from annotate.config import AnnotateConfig
from annotate.decode import Decoded, FigureError, read_and_decode
from annotate.faults import engine_fault, free_accelerator_memory, is_out_of_memory
from annotate.heuristic import panel_kind
from annotate.inputs import Figure
from annotate.prompts import VERSION as PROMPT_VERSION
from annotate.regions import fuse_regions
from zoomin_jax import records


# Words a caption uses for each marker kind, the kind's own word first.
_MARKER_WORDS = {"arrow": (r"arrows?", r"arrowheads?"), "arrowhead": (r"arrowheads?", r"arrows?"),
                 "asterisk": (r"asterisks?", r"stars?", r"\*+"), "circle": (r"circles?|circled", r"ovals?|rings?"),
                 "inset": (r"insets?", r"box(?:es|ed)?")}


def marker_clause(panel_text: str, kind: str) -> str:
    """The clause of a panel's text that names its marker ("a red arrow marks the lesion"), so a region
    found from the marker alone still has a text; the whole panel text when no clause names it."""
    clauses = [c.strip() for c in re.split(r"(?<=[.;:])\s+", panel_text) if c.strip()]
    for word in _MARKER_WORDS.get(kind, ()):
        pattern = re.compile(rf"(?<!\w){word}(?!\w)", re.IGNORECASE)
        for clause in clauses:
            if pattern.search(clause):
                return clause.rstrip(".;: ")
    return panel_text.strip()


@dataclasses.dataclass
class Proposal:
    """What a backend sees in one figure. Boxes in original pixels."""
    panels: list[dict]                                         # {"box", "label", "score"}
    markers: dict[int, list[dict]] = dataclasses.field(default_factory=dict)   # panel index -> markers
    phrases: dict[int, list[dict]] = dataclasses.field(default_factory=dict)   # panel index -> phrase boxes
    panel_descriptions: dict[int, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # [{"label", "text"}] per caption label, where the backend split the caption; else the rules split it.
    caption_split: list[dict] | None = None


class Backend(Protocol):
    name: str
    model_id: str

    def propose(self, images: list[Image.Image], captions: list[str],
                contexts: list[list[str]] | None = None) -> list[Proposal]:
        """One proposal per image, in order; `contexts`: each figure's citing paragraphs (what a backend
        reading only the image and caption ignores). Raising is allowed (out of memory, one figure it
        cannot handle): `propose_bisecting` retries the batch in halves."""


def build_record(figure: Figure, data: bytes, image: Image.Image, proposal: Proposal, backend: Backend,
                 cfg: AnnotateConfig, seconds: float) -> dict:
    width, height = image.size
    # (proposal index, clipped box): markers, phrases and descriptions stay keyed by the proposal index.
    kept = [(k, box) for k, p in enumerate(proposal.panels) if (box := records.clip_box(p["box"], width, height))]
    if not kept:  # a figure with no detectable panels is one panel
        proposal.panels = [{"box": [0.0, 0.0, float(width), float(height)], "label": "", "score": 0.0}]
        kept = [(0, proposal.panels[0]["box"])]
        proposal.warnings.append("no panels proposed; the whole figure is one panel")
    # Each panel gets its sub-caption, however its label is spelt ("(A)" for the caption's "a"); a panel
    # the caption does not name gets the whole caption.
    split = proposal.caption_split if proposal.caption_split is not None else split_caption(figure.caption)
    labels = [p["label"] for p in split if p["label"]]
    by_label = {label_key(p["label"], labels): p["text"] for p in split if p["label"]}
    panels, regions = [], []
    for panel_id, (k, box) in enumerate(kept):
        label = proposal.panels[k]["label"]
        text = by_label.get(label_key(label, labels), figure.caption.strip())
        panels.append(records.new_panel(
            panel_id=panel_id, label=label, box=box, text=text, text_lvlm=proposal.panel_descriptions.get(k, ""),
            kind=panel_kind(image, box), score=float(proposal.panels[k]["score"])))
        for region in fuse_regions(box, proposal.markers.get(k, []), proposal.phrases.get(k, []), cfg):
            if not region["text_sub"]:
                region["text_sub"] = marker_clause(text, region["marker_kind"])
            regions.append(records.new_region(panel_id=panel_id, **region))
    return records.new_figure(
        figure_id=figure.figure_id, source=figure.source, license=figure.license, image_bytes=data,
        width=width, height=height, caption=figure.caption, context=figure.context, panels=panels,
        regions=regions, annotation={"backend": backend.name, "model": backend.model_id,
                                     "prompt_version": PROMPT_VERSION, "seconds": round(seconds, 4),
                                     "warnings": proposal.warnings})


def annotate_batch(figures: list[Figure], backend: Backend, cfg: AnnotateConfig,
                   decoded: list[Decoded] | None = None) -> list[dict | FigureError]:
    """Records (or the error of each figure that failed), in input order; `decoded` is what
    `decode.decoded_batches` made of `figures` (decoded here when not given)."""
    start = time.perf_counter()
    if decoded is None:
        decoded = [read_and_decode(figure, cfg) for figure in figures]
    good = [(figure, item) for figure, item in zip(figures, decoded, strict=True) if not isinstance(item, FigureError)]
    proposals = iter(propose_bisecting(backend, [image for _, (_, image) in good], [f.caption for f, _ in good],
                                       [f.context for f, _ in good]))
    seconds = (time.perf_counter() - start) / max(len(figures), 1)
    results: list[dict | FigureError] = []
    for figure, item in zip(figures, decoded, strict=True):
        if isinstance(item, FigureError):
            results.append(item)
            continue
        data, image = item
        proposal = next(proposals)
        if isinstance(proposal, FigureError):
            results.append(proposal)
            continue
        try:
            results.append(build_record(figure, data, image, proposal, backend, cfg, seconds))
        except records.RecordError as err:
            results.append(FigureError("record", str(err)))
        except Exception as err:  # a bug or an odd value in one figure fails that figure, not its batch
            reason = " ".join(f"building it raised {type(err).__name__}: {err}".split())[:_MAX_REASON_CHARS]
            results.append(FigureError("record", reason))
    return results


# A failure line stays one readable line even when an exception carries a whole tensor dump.
_MAX_REASON_CHARS = 300


def propose_bisecting(backend: Backend, images: list[Image.Image], captions: list[str],
                      contexts: list[list[str]]) -> list[Proposal | FigureError]:
    """The backend's proposals; when it raises on a batch, each half is retried on its own, so a batch too
    big for GPU memory shrinks until it fits and only a figure that fails alone becomes a FigureError.
    An error of the engine or its device (faults.engine_fault) is raised as an EngineFault instead."""
    if not images:
        return []
    try:
        return list(backend.propose(images, captions, contexts))
    except Exception as err:  # not BaseException: Ctrl-C, SystemExit and faults.* stop the run
        if (fault := engine_fault(err)) is not None:
            raise fault from err  # the engine or its device broke: no figure of the batch is to blame
        reason = " ".join(f"backend raised {type(err).__name__}: {err}".split())[:_MAX_REASON_CHARS]
        out_of_memory = is_out_of_memory(err)
    # Outside the except block, so the traceback's frames (and the tensors they hold) are gone by now.
    if out_of_memory:
        free_accelerator_memory()
    if len(images) == 1:
        return [FigureError("propose", reason)]
    half = len(images) // 2
    return (propose_bisecting(backend, images[:half], captions[:half], contexts[:half])
            + propose_bisecting(backend, images[half:], captions[half:], contexts[half:]))
