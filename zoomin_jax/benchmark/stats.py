"""Metrics as functions of a task's units (examples or queries), and 95% bootstrap intervals: each
model's own, and each model's difference from the first, paired (the same resamples of the same
units for every model, so the shared difficulty of the units cancels in the difference)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy.stats import rankdata

from zoomin_jax import zeroshot

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Measure:
    """A metric over n units: reduce(*(array[idx] for array in arrays)) for any resample idx of them."""
    arrays: tuple[np.ndarray, ...]
    reduce: Callable[..., float]

    @property
    def n(self) -> int:
        return len(self.arrays[0])

    def value(self, idx: np.ndarray | None = None) -> float:
        return float(self.reduce(*(array if idx is None else array[idx] for array in self.arrays)))


def mean_of(values: np.ndarray) -> Measure:
    """A share (hits, correct predictions): the mean of per-unit values."""
    return Measure((np.asarray(values, np.float64),), np.mean)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> Measure:
    return Measure((np.asarray(labels, np.int64), np.asarray(predictions)), zeroshot.balanced_accuracy)


def _auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one class (Mann-Whitney U, ties counted half); nan without both outcomes."""
    count = int(positive.sum())
    if count in (0, len(positive)):
        return np.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * (len(positive) - count)))


def _mean_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.nanmean([_auc(labels[:, c] > 0, scores[:, c]) for c in range(labels.shape[1])]))


def mean_auc(labels: np.ndarray, scores: np.ndarray) -> Measure:
    """Multi-label: the mean over classes (those with both outcomes) of each class's ROC AUC."""
    return Measure((np.asarray(labels), np.asarray(scores, np.float64)), _mean_auc)


def _mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """clip_benchmark's: per class, precision at each positive down the ranking, averaged over the
    positives (0 for a class without any), then the mean over classes."""
    precisions = []
    for c in range(labels.shape[1]):
        truth = labels[np.argsort(-scores[:, c], kind="stable"), c] > 0
        precision = np.cumsum(truth) / np.arange(1, len(truth) + 1)
        precisions.append(precision[truth].sum() / max(truth.sum(), 1))
    return float(np.mean(precisions))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> Measure:
    """Multi-label: the metric clip_benchmark reports for multi-label sets."""
    return Measure((np.asarray(labels), np.asarray(scores, np.float64)), _mean_average_precision)


@dataclasses.dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high]}


def compare(measures: list[Measure], samples: int, seed: int) -> tuple[list[Interval], list[Interval]]:
    """(each model's value with its interval, each later model's difference from the first with its
    interval): percentile intervals of `samples` resamples of the units, the same for every model."""
    n = measures[0].n
    if any(measure.n != n for measure in measures):
        raise ValueError("paired bootstrap needs every model measured on the same units")
    rng = np.random.default_rng(seed)
    draws = np.empty((samples, len(measures)))
    for b in range(samples):
        idx = rng.integers(0, n, n)
        draws[b] = [measure.value(idx) for measure in measures]
    values = np.array([measure.value() for measure in measures])
    tail = (1 - LEVEL) / 2 * 100

    def interval(value, column):
        low, high = np.nanpercentile(column, [tail, 100 - tail])
        return Interval(float(value), float(low), float(high))

    own = [interval(values[m], draws[:, m]) for m in range(len(measures))]
    diffs = [interval(values[m] - values[0], draws[:, m] - draws[:, 0]) for m in range(1, len(measures))]
    return own, diffs
