"""`annotate eval`: annotation records scored against ground truth (as `annotate synth` writes it);
`annotate eval-captions`: a caption splitter scored on a hand-made caption dev set."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from annotate.captions import label_key
from annotate.metrics import caption_split_scores, match_boxes, panel_scores
from zoomin_jax import records
from zoomin_jax.errors import UserError


def load_predictions(pred_dir: str | Path) -> dict[str, dict]:
    shards = sorted(Path(pred_dir).glob("records-*.array_record"))
    return {record["figure_id"]: record for record in records.iter_records(shards)}


def evaluate(pred_dir: str | Path, gt_path: str | Path) -> dict:
    """Panel P/R/F1@0.5 and label accuracy, region recall@0.5, caption-split scores; a figure with
    no record (it failed) counts with no predictions."""
    predictions = load_predictions(pred_dir)
    truths = [json.loads(line) for line in Path(gt_path).read_text().splitlines() if line.strip()]
    pred_panels, true_panels, pred_splits, true_splits = [], [], [], []
    regions_found = regions_total = 0
    for truth in truths:
        record = predictions.get(truth["id"], {"panels": [], "regions": []})
        pred_panels.append(record["panels"])
        true_panels.append(truth["panels"])
        labelled = [p for p in truth["panels"] if p["label"]]
        if labelled:
            pred_splits.append([{"label": p["label"], "text": p["text"]} for p in record["panels"]])
            true_splits.append([{"label": p["label"], "text": p["text"]} for p in labelled])
        matched = match_boxes([r["box"] for r in record["regions"]], [r["box"] for r in truth["regions"]])
        regions_found += len(matched)
        regions_total += len(truth["regions"])
    return {"figures": len(truths), "figures_annotated": sum(t["id"] in predictions for t in truths),
            "panels": panel_scores(pred_panels, true_panels),
            "region_recall": regions_found / max(regions_total, 1), "regions": regions_total,
            "captions": caption_split_scores(pred_splits, true_splits)}


DEVSET_KEYS = ("id", "source", "caption", "style", "split", "panels")


def devset_split(entry_id: str) -> str:
    """The slice an entry belongs to, fixed by its id so that nobody picks it: about a third held out."""
    return "heldout" if zlib.crc32(f"caption-devset:{entry_id}".encode()) % 3 == 0 else "tune"


def _devset_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "is not a JSON object"
    if missing := [key for key in DEVSET_KEYS if key not in entry]:
        return f"lacks {', '.join(missing)}"
    if entry["split"] not in ("tune", "heldout"):
        return f"has split {entry['split']!r}, not tune or heldout"
    panels = entry["panels"]
    if not isinstance(panels, list) or not panels or not all(
            isinstance(p, dict) and isinstance(p.get("label"), str) and isinstance(p.get("text"), str) for p in panels):
        return "needs panels as a list of {label, text}"
    return None


def load_caption_devset(path: str | Path) -> list[dict]:
    """The entries of a caption dev set (format in tests/data/README.md); UserError naming a line that
    is not one."""
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not JSON ({err.msg}); write one entry per line") from None
        if problem := _devset_problem(entry):
            raise UserError(f"{path}:{number} {problem}; fix that line (the format is in tests/data/README.md)")
        entries.append(entry)
    return entries


def is_multi_panel(entry: dict) -> bool:
    return any(panel["label"] for panel in entry["panels"])


def evaluate_captions(entries: list[dict], split_captions) -> dict:
    """A caption splitter (captions -> panel lists) scored on a dev set, per slice (tune, heldout, all)
    and kind: multi-panel captions by label-set exact match and mean token-F1 per gold sub-caption
    (`caption_split_scores`); single-panel ones by the share kept whole (one panel, no label) and
    the token-F1 of the text kept. Also per style, and per caption for finding what fails."""
    predicted = split_captions([entry["caption"] for entry in entries])
    per_caption = []
    for entry, pred in zip(entries, predicted, strict=True):
        scores = caption_split_scores([pred], [entry["panels"]])
        per_caption.append({"id": entry["id"], "split": entry["split"], "style": entry["style"],
                            "kind": "multi" if is_multi_panel(entry) else "single",
                            "labels": [p["label"] for p in entry["panels"]], "predicted": [p["label"] for p in pred],
                            "label_set_exact_match": scores["label_set_exact_match"],
                            "mean_token_f1": scores["mean_token_f1"],
                            "kept_whole": len(pred) == 1 and label_key(pred[0]["label"]) == ""})

    def scores_of(picked: list[int], kind: str) -> dict:
        scores = caption_split_scores([predicted[i] for i in picked], [entries[i]["panels"] for i in picked])
        if kind == "single":
            return {"captions": len(picked), "mean_token_f1": scores["mean_token_f1"],
                    "kept_whole_rate": sum(per_caption[i]["kept_whole"] for i in picked) / max(len(picked), 1)}
        return scores

    def select(**where) -> list[int]:
        return [i for i, c in enumerate(per_caption) if all(c[key] == value for key, value in where.items())]

    slices = {name: {kind: scores_of(select(kind=kind, **({} if name == "all" else {"split": name})), kind)
                     for kind in ("multi", "single")} for name in ("tune", "heldout", "all")}
    styles = {f"{kind}/{style}": scores_of(select(kind=kind, style=style), kind)
              for kind, style in sorted({(c["kind"], c["style"]) for c in per_caption})}
    return {"entries": len(entries), "slices": slices, "styles": styles, "per_caption": per_caption}


# Real figures and composites scored with a backend's proposals directly (panels, labels, markers), for
# the CPU backend's measures: tests/data/medicat_truth.jsonl (format in tests/data/README.md) and
# real layouts paired with real captions.
MARKER_IOU = 0.3  # a marker box is small: a few pixels off halve its IoU


def load_figure_truth(path: str | Path) -> list[dict]:
    """Hand-annotated figures, one JSON object per line: id, width, height, single, panels [{box,
    label}], markers [{kind, box}], text_strips [box]."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def medicat_figures(truth_path: str | Path, figures_dir: str | Path) -> list[tuple]:
    """(image, caption, truth) per annotated MedICaT figure; a file name is the record's pdf_hash, "_"
    and its fig_uri, and the caption is its s2_caption."""
    from PIL import Image
    figures_dir = Path(figures_dir)
    captions = {f"{r['pdf_hash']}_{r['fig_uri']}": r["s2_caption"]
                for r in map(json.loads, (figures_dir / "sample.jsonl").read_text().splitlines())}
    return [(Image.open(figures_dir / t["id"]).convert("RGB"), captions[t["id"]], t)
            for t in load_figure_truth(truth_path)]


def _layout_keys(labels: list[str]) -> frozenset[str] | None:
    keys = [label_key(label, labels) for label in labels]
    return frozenset(keys) if all(keys) and len(set(keys)) == len(keys) else None


def layout_composites(layouts: list, entries: list[dict], seed: int = 0, per_caption: int = 1,
                      medmnist=None, real_features: bool = True) -> list[tuple]:
    """(image, caption, truth) for real multi-panel captions drawn on real layouts whose panel labels are
    the caption's (every panel labelled, each label once, compared as `label_key` does), the letters
    drawn as the caption spells them; `per_caption` layouts each, picked by a seeded draw. The truth
    has the caption dev set entry's id, split and caption; `real_features` as `synth.render` takes it."""
    import numpy as np
    from annotate.synth import Layout, render
    by_keys: dict[frozenset, list] = {}
    for layout in layouts:
        if keys := _layout_keys([label for _, _, label in layout.panels]):
            by_keys.setdefault(keys, []).append(layout)
    composites = []
    for entry in entries:
        labels = [p["label"] for p in entry["panels"] if p["label"]]
        fitting = by_keys.get(_layout_keys(labels) or frozenset(), [])
        rng = np.random.default_rng([seed, zlib.crc32(entry["id"].encode())])
        spelling = {label_key(label, labels): label for label in labels}
        for pick in rng.choice(len(fitting), size=min(per_caption, len(fitting)), replace=False):
            layout = fitting[int(pick)]
            own = [label for _, _, label in layout.panels]
            drawn = Layout(layout.name, layout.width, layout.height,
                           [(box, label_box, spelling[label_key(label, own)]) for box, label_box, label in layout.panels])
            image, truth = render(drawn, rng, medmnist, real_features)
            markers = [{"kind": r["marker_kind"], "box": r["marker_box"]} for r in truth["regions"]]
            composites.append((image, entry["caption"], {
                "id": f"{entry['id']}@{layout.name}", "split": entry["split"], "width": truth["width"],
                "height": truth["height"], "single": False, "panels": truth["panels"], "markers": markers,
                "text_strips": truth["text_strips"]}))
    return composites


def score_proposals(proposals: list, truths: list[dict]) -> dict:
    """Panel P/R/F1@0.5 and label accuracy (`panel_scores`), marker recall and precision (one-to-one at
    IoU >= MARKER_IOU, whatever panel found them), and how many single-panel figures stayed one panel."""
    pred_panels = [[{"box": p["box"], "label": p["label"]} for p in proposal.panels] for proposal in proposals]
    found = n_pred = n_true = 0
    per_figure = []
    for proposal, truth, panels in zip(proposals, truths, pred_panels, strict=True):
        markers = [m["box"] for ms in proposal.markers.values() for m in ms]
        true = [m["box"] for m in truth["markers"]]
        hits = len(match_boxes(markers, true, MARKER_IOU))
        found, n_pred, n_true = found + hits, n_pred + len(markers), n_true + len(true)
        per_figure.append({**panel_scores([panels], [truth["panels"]]), "id": truth["id"], "predicted": len(panels),
                           "labels": [p["label"] for p in panels], "markers_found": hits, "markers": len(true)})
    singles = [f for f, t in zip(per_figure, truths) if t["single"]]
    return {"panels": panel_scores(pred_panels, [t["panels"] for t in truths]),
            "markers": {"markers": n_true, "recall": found / max(n_true, 1), "precision": found / max(n_pred, 1)},
            "single": {"figures": len(singles), "kept_single": sum(f["predicted"] == 1 and f["f1"] == 1 for f in singles)},
            "per_figure": per_figure}


def evaluate_backend(backend, figures: list[tuple]) -> dict:
    """`score_proposals` of a backend's proposals for (image, caption, truth) figures."""
    proposals = backend.propose([image for image, _, _ in figures], [caption for _, caption, _ in figures])
    return score_proposals(proposals, [truth for _, _, truth in figures])
