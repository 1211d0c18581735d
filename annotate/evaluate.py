"""`annotate eval`: annotation records scored against ground truth (as `annotate synth` writes it)."""
from __future__ import annotations

import json
from pathlib import Path

from annotate.metrics import caption_split_scores, match_boxes, panel_scores
from zoomin_jax import records


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
