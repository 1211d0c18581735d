"""A benchmark task's data read, and a model measured on it: per-unit results (a prediction per
example, a hit per query) kept as stats.Measure, so intervals and paired differences come after."""
from __future__ import annotations

import csv
import glob
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from zoomin_jax import evaluators, zeroshot
from zoomin_jax.benchmark import stats
from zoomin_jax.benchmark.suites import Task
from zoomin_jax.errors import UserError
from zoomin_jax.recipes import LEVELS
from zoomin_jax.tokenizer import tokenize

WDS_IMAGES = (".jpg", ".jpeg", ".png", ".webp")


def missing(task: Task, data_root: Path) -> str | None:
    """Why the task cannot run here (its data is absent, with where to get it), or None."""
    location = task.location(data_root)
    present = glob.glob(str(location)) if task.format in ("records", "wds") else location.exists()
    return None if present else f"{location} not found; {task.get or 'lay out its data there'}"


def _limited(examples, limit: int):
    return [examples[i] for i in range(min(limit, len(examples)))] if limit else examples


def _zeroshot_examples(task: Task, location: Path):
    if task.format == "npz":
        return zeroshot.npz_examples(location, task.split, task.multilabel)
    if task.format == "folder":
        return zeroshot.folder_examples(location)
    if task.format == "tfds":
        return zeroshot.tfds_examples(task.dataset, task.split, location)
    return _csv_examples(task, location)


def _csv_examples(task: Task, location: Path) -> zeroshot.Examples:
    """Rows path,label (a header line naming them): label a class index or one of the class names;
    paths relative to the CSV's folder."""
    with open(location, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise UserError(f"{location} needs a header 'path,label' and one row per image")
    labels = []
    for line, row in enumerate(rows, start=2):
        label = row["label"].strip()
        if label.isdigit() and int(label) < len(task.classnames):
            labels.append(int(label))
        elif label in task.classnames:
            labels.append(task.classnames.index(label))
        else:
            raise UserError(f"{location}:{line}: label {label!r} is neither a class index below "
                            f"{len(task.classnames)} nor one of the task's class names")

    def get(index):
        with Image.open(location.parent / rows[index]["path"]) as image:
            image.load()
        return image, labels[index]

    return zeroshot.Examples(len(rows), get, task.classnames)


def _measure_zeroshot(task: Task, examples, encoder, batch_size: int) -> dict[str, stats.Measure]:
    weights = zeroshot.classifier(encoder, task.classnames, task.templates)
    scores = zeroshot.embed_images(encoder, (image for image, _ in examples), batch_size) @ weights.T
    labels = np.array([label for _, label in examples])
    if task.multilabel:
        if labels.ndim != 2 or labels.shape[1] != len(task.classnames):
            raise UserError(f"task {task.name}: labels have shape {labels.shape}; a multi-label task needs "
                            f"[N, {len(task.classnames)}] (one column per class name)")
        return {"mean_auc": stats.mean_auc(labels, scores), "mean_ap": stats.mean_average_precision(labels, scores)}
    if labels.min() < 0 or labels.max() >= len(task.classnames):
        raise UserError(f"task {task.name}: labels run from {labels.min()} to {labels.max()} but it has "
                        f"{len(task.classnames)} class names; give one per label")
    predictions = scores.argmax(-1)
    return {"top1": stats.mean_of(predictions == labels), "balanced_accuracy": stats.balanced_accuracy(labels, predictions)}


def _jsonl_pairs(task: Task, location: Path) -> list[tuple[Path, str]]:
    pairs = []
    for line, text in enumerate(location.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            image, caption = location.parent / task.image.format(**row), task.caption.format(**row)
        except json.JSONDecodeError as err:
            raise UserError(f"{location}:{line} is not JSON ({err}); fix or remove the line") from None
        except KeyError as err:
            raise UserError(f"{location}:{line} has no field {err}; set the task's image/caption "
                            f"({task.image!r}, {task.caption!r}) to its fields") from None
        if not image.is_file():
            raise UserError(f"{location}:{line}: image {image} does not exist; complete the download")
        pairs.append((image, caption))
    return pairs


def _wds_pairs(task: Task, location: Path) -> list[tuple[bytes, str]]:
    """WebDataset shards: members KEY.jpg|png|... and KEY.txt grouped by key, in shard order."""
    pairs = []
    for shard in sorted(glob.glob(str(location))):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, _, extension = member.name.partition(".")
                    samples.setdefault(key, {})["." + extension.lower()] = tar.extractfile(member).read()
        for key, parts in samples.items():
            image = next((parts[ext] for ext in WDS_IMAGES if ext in parts), None)
            if image is None or ".txt" not in parts:
                raise UserError(f"{shard}: sample {key} lacks an image ({'/'.join(WDS_IMAGES)}) or a .txt caption")
            pairs.append((image, parts[".txt"].decode("utf-8")))
    return pairs


def _open(image) -> Image.Image:
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        opened.load()
    return opened


def _hit_measures(hits: dict[str, np.ndarray]) -> dict[str, stats.Measure]:
    return {metric: stats.mean_of(found) for metric, found in evaluators.hits_by_metric(hits).items()}


def _measure_retrieval(pairs, encoder, batch_size: int) -> dict[str, stats.Measure]:
    """Identical captions (same tokens) are one gallery entry, relevant to all their images, as in
    the held-out retrieval evaluator."""
    images = zeroshot.embed_images(encoder, (_open(image) for image, _ in pairs), batch_size)
    texts, text_of_image = np.unique(tokenize([caption for _, caption in pairs]), axis=0, return_inverse=True)
    return _hit_measures(evaluators.retrieval_hits(images, encoder.encode_text(texts, normalize=True),
                                                   text_of_image.reshape(-1)))


def _measure_panel2patch(location: Path, encoder, batch_size: int) -> dict[str, stats.Measure]:
    """Items as SampleConfig's defaults keep them, the same for every model compared (not a run's own
    filters, which may differ between the models)."""
    measures = {}
    for level in LEVELS:
        found = evaluators.retrieval_level(encoder, str(location), level, batch_size=batch_size)
        measures |= {f"{level}/{name}": measure for name, measure in _hit_measures(found.hits).items()}
    return measures


def measure(task: Task, data_root: Path, encoder, batch_size: int) -> dict[str, stats.Measure]:
    """Each metric of `task` for the model behind `encoder`, per unit."""
    location = task.location(data_root)
    if task.kind == "panel2patch":
        return _measure_panel2patch(location, encoder, batch_size)
    if task.kind == "zeroshot":
        examples = _limited(_zeroshot_examples(task, location), task.limit)
    else:
        examples = _limited(_jsonl_pairs(task, location) if task.format == "jsonl" else _wds_pairs(task, location),
                            task.limit)
    if not len(examples):
        raise UserError(f"task {task.name}: {location} holds no examples; check its layout ({task.get or task.format})")
    if task.kind == "zeroshot":
        return _measure_zeroshot(task, examples, encoder, batch_size)
    return _measure_retrieval(examples, encoder, batch_size)
