"""Annotation quality scores shared by `annotate eval` and the tests."""
from __future__ import annotations

import collections
import re

from annotate.captions import label_key


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
    """Label-set exact match per caption; token-F1 per reference panel between the predicted text of
    its label and its text (0 when the label is missing), averaged over reference panels. Labels
    compare as `label_key` does: "(A)", "a." and "A" are one panel."""
    exact, f1s = 0, []
    for pred, ref in zip(predicted, reference, strict=True):
        texts = collections.defaultdict(list)  # a label predicted twice keeps both texts
        for p in pred:
            texts[label_key(p["label"])].append(p["text"])
        pred_by_label = {key: " ".join(parts) for key, parts in texts.items()}
        ref_keys = [label_key(r["label"]) for r in ref]
        exact += set(pred_by_label) == set(ref_keys)
        f1s += [token_f1(pred_by_label[key], r["text"]) if key in pred_by_label else 0.0
                for key, r in zip(ref_keys, ref)]
    return {"captions": len(reference), "label_set_exact_match": exact / max(len(reference), 1),
            "mean_token_f1": sum(f1s) / max(len(f1s), 1), "panels": len(f1s)}


def match_boxes(predicted: list, reference: list, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """One-to-one (predicted, reference) index pairs maximising total IoU, each pair >= threshold."""
    if not predicted or not reference:
        return []
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou
    iou = box_iou(torch.tensor(predicted, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)).numpy()
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]


def panel_scores(predicted: list[list[dict]], reference: list[list[dict]]) -> dict:
    """Micro precision / recall / F1 of panel boxes at IoU 0.5, and label accuracy over matched
    reference panels that carry a label (compared as `label_key` does: "(a)" reads as "A")."""
    true_pos = n_pred = n_ref = labelled = labels_right = 0
    for pred, ref in zip(predicted, reference, strict=True):
        pairs = match_boxes([p["box"] for p in pred], [r["box"] for r in ref])
        among = [r["label"] for r in ref]
        true_pos, n_pred, n_ref = true_pos + len(pairs), n_pred + len(pred), n_ref + len(ref)
        for p, r in pairs:
            if ref[r]["label"]:
                labelled += 1
                labels_right += label_key(pred[p]["label"], among) == label_key(ref[r]["label"], among)
    precision, recall = true_pos / max(n_pred, 1), true_pos / max(n_ref, 1)
    return {"figures": len(reference), "panels": n_ref, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "label_accuracy": labels_right / max(labelled, 1), "labelled_panels": labelled}
