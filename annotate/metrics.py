"""Annotation quality scores shared by `annotate eval` and the tests."""
from __future__ import annotations

import collections
import re


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(predicted: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between two texts."""
    pred, ref = tokens(predicted), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_split_scores(predicted: list[list[dict]], reference: list[list[dict]]) -> dict:
    """Label-set exact match per caption; token-F1 per reference panel (0 when its label is missing)."""
    exact, f1s = 0, []
    for pred, ref in zip(predicted, reference, strict=True):
        pred_by_label = {p["label"]: p["text"] for p in pred}
        exact += set(pred_by_label) == {r["label"] for r in ref}
        f1s += [token_f1(pred_by_label[r["label"]], r["text"]) if r["label"] in pred_by_label else 0.0
                for r in ref]
    return {"captions": len(reference), "label_set_exact_match": exact / max(len(reference), 1),
            "mean_token_f1": sum(f1s) / max(len(f1s), 1), "panels": len(f1s)}
