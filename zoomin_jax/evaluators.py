"""Evaluators, declared in the config big_vision style — `config.evals = {name: {type, every, ...}}` —
run during training every `every` steps and standalone (`python -m zoomin_jax.evaluate`):
  retrieval  image->text and text->image R@1/5/10 at figure, panel and region level on held-out
             records (keys: records, levels, batch_size), whose items are those training keeps: the
             run's config.data item settings (ITEM_SETTINGS), each one overridable by a key of the spec
  zeroshot   class names x prompt templates, top-1 and balanced accuracy (zoomin_jax.zeroshot;
             keys: task, source = tfds:NAME | npz:PATH | folder:PATH, split, data_dir, limit, batch_size)
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from tqdm import tqdm

from zoomin_jax.data import pipeline, samples
from zoomin_jax.data.source import RecordSource
from zoomin_jax.encoder import CLIPEncoder, gather_rows
from zoomin_jax.errors import UserError
from zoomin_jax.recipes import LEVELS

KS = (1, 5, 10)

# What decides a level's items (panel kinds dropped, boxes too small) and what a region item shows
# (its context margin). Held-out retrieval takes them from the run's config.data, so that it scores
# the kind of items the run trains on, not some the run never sees. The other sample settings shape
# children or training views, which retrieval has none of.
ITEM_SETTINGS = ("drop_panel_kinds", "min_box_side", "region_margin")


def item_settings(data=None, spec=None) -> dict:
    """{setting: value} of ITEM_SETTINGS: the evaluator spec's, else the run's `data` (config.data)'s,
    else samples.SampleConfig's defaults."""
    defaults = samples.SampleConfig()
    settings = {}
    for key in ITEM_SETTINGS:
        value = next((where[key] for where in (spec, data) if where is not None and where.get(key) is not None),
                     getattr(defaults, key))
        settings[key] = tuple(value) if key == "drop_panel_kinds" else float(value)
    return settings


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks=KS) -> np.ndarray:
    """Per query, whether a relevant item is among the top k, for each k: [Q, len(ks)] bool.

    A query's rank is the number of irrelevant items scoring at least as high as its best relevant
    one: ties count against the model, so embeddings that cannot tell items apart score 0, not 1."""
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    rank = ((scores >= best) & ~relevant).sum(axis=1)
    return rank[:, None] < np.asarray(ks)[None, :]


def retrieval_hits(image_emb: np.ndarray, text_emb: np.ndarray, text_of_image: np.ndarray, ks=KS,
                   chunk: int = 1024) -> dict[str, np.ndarray]:
    """{"i2t": [N, len(ks)] bool, "t2i": [T, len(ks)] bool}: per query, a hit at each k. image_emb
    [N, D] and text_emb [T, D], L2-normalised; text_of_image [N] indexes the (distinct) texts.
    image->text: a hit when the image's text is in the top k; text->image: when any image with that
    text is. Queries go in chunks, so memory stays at chunk x gallery scores."""
    hits = {}
    for name, queries, gallery, relevant_to in (
            ("i2t", image_emb, text_emb, lambda rows: text_of_image[rows, None] == np.arange(len(text_emb))),
            ("t2i", text_emb, image_emb, lambda rows: rows[:, None] == text_of_image[None, :])):
        hits[name] = np.concatenate([
            recall_at_k(queries[start:start + chunk] @ gallery.T,
                        relevant_to(np.arange(start, min(start + chunk, len(queries)))), ks)
            for start in range(0, len(queries), chunk)] or [np.zeros((0, len(ks)), bool)])
    return hits


@dataclasses.dataclass(frozen=True)
class LevelRetrieval:
    hits: dict[str, np.ndarray]   # retrieval_hits: per image query (i2t) and per distinct text (t2i)
    items: int
    texts: int


def retrieval_level(encoder: CLIPEncoder, records: str, level: str, *, batch_size: int = 64, strict: bool = False,
                    progress: bool = False, items: dict | None = None) -> LevelRetrieval:
    """Per-query hits both ways over every `level` item of the records that `items` (item_settings;
    default SampleConfig's) keeps, through the eval transform (exactly open_clip's); identical texts
    (same tokens) are one gallery entry, relevant to all their images. On many processes each reads
    and embeds its share of the items (the encoder's batch, split over the processes); every process
    gets the same hits. `batch_size` is the global batch."""
    cfg = samples.SampleConfig(image_size=encoder.config.vision.image_size,
                               patch_size=encoder.config.vision.patch_size, max_panels=0, max_regions=0,
                               **(items or {}))
    encoder = encoder if batch_size == encoder.batch_size else encoder.with_batch_size(batch_size)
    share, processes = encoder.process_batch_size, jax.process_count()
    source = RecordSource(records, strict=strict)
    index = pipeline.build_index(source, level, cfg, jax.process_index(), processes)
    dataset = pipeline.make_dataset(source, level, share, cfg=cfg, shuffle=False, drop_remainder=False, index=index)
    # Every process embeds together, so each makes as many calls as the largest share needs.
    calls = -(-len(range(0, index.total, processes)) // share)
    image_emb, tokens = [], []
    for batch in tqdm(dataset, desc=f"retrieval {level}", disable=not progress, leave=False):
        image_emb.append(encoder.encode_uint8_share(batch["image"], normalize=True))
        tokens.append(batch["tokens"])
    for _ in range(calls - len(image_emb)):
        encoder.encode_uint8_share(np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8))
    image_emb = gather_rows(np.concatenate(image_emb or [np.zeros((0, encoder.config.embed_dim), np.float32)]))
    tokens = gather_rows(np.concatenate(tokens or [np.zeros((0, 77), np.int32)]))
    texts, text_of_image = np.unique(tokens, axis=0, return_inverse=True)
    hits = retrieval_hits(image_emb, encoder.encode_text(texts, normalize=True), text_of_image.reshape(-1))
    return LevelRetrieval(hits, len(text_of_image), len(texts))


def hits_by_metric(hits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"i2t_r1": [N] bool, …, "t2i_r10": [T] bool}: `retrieval_hits`' columns under the metrics' names."""
    return {f"{name}_r{k}": found[:, n] for name, found in hits.items() for n, k in enumerate(KS)}


def retrieval(encoder: CLIPEncoder, records: str, level: str, **kwargs) -> dict[str, float]:
    """R@k both ways (the means of `retrieval_level`'s hits) and the item and text counts."""
    found = retrieval_level(encoder, records, level, **kwargs)
    return ({metric: float(hits.mean()) for metric, hits in hits_by_metric(found.hits).items()}
            | {"items": float(found.items), "texts": float(found.texts)})


def zeroshot_eval(encoder: CLIPEncoder, spec) -> dict[str, float]:
    from zoomin_jax import zeroshot
    kind, _, where = spec.source.partition(":")
    if kind == "tfds":
        examples = zeroshot.tfds_examples(where, spec.get("split", "test"), spec.get("data_dir"))
    elif kind == "npz":
        examples = zeroshot.npz_examples(where, spec.get("split", "test"))
    elif kind == "folder":
        examples = zeroshot.folder_examples(where)
    else:
        raise UserError(f"zeroshot source {spec.source!r}: use tfds:NAME, npz:PATH or folder:PATH")
    if spec.get("limit"):
        examples = list(examples)[:spec.limit]
    task = zeroshot.get_task(spec.task)
    if task.multilabel:
        raise UserError(f"zeroshot task {spec.task!r} is multi-label, which the training evaluator does not "
                        f"score; run `python -m zoomin_jax.benchmark` on it")
    encoder = encoder.with_batch_size(spec.get("batch_size", encoder.batch_size))
    weights = zeroshot.classifier(encoder, task.classnames, task.templates)
    # Each process reads, preprocesses and predicts its share of the examples; all embed together.
    shares = np.array_split(np.arange(len(examples)), jax.process_count())  # the first is the largest
    mine, calls = shares[jax.process_index()], -(-len(shares[0]) // encoder.process_batch_size)
    labels = []

    def images():
        for n in mine:
            image, label = examples[int(n)]
            labels.append(int(label))
            yield image

    sharing = _ShareEncoder(encoder)
    predictions = zeroshot.predict(sharing, images(), weights, encoder.process_batch_size)
    for _ in range(calls - sharing.calls):
        size = encoder.config.vision.image_size
        sharing.encode_image(np.zeros((0, size, size, 3), np.float32))
    return zeroshot.scores(gather_rows(np.asarray(labels, np.int64)), gather_rows(predictions), task.classnames)


class _ShareEncoder:
    """`encoder` as zeroshot.predict uses it, but each process embedding only its own images."""

    def __init__(self, encoder: CLIPEncoder):
        self.encoder, self.preprocess, self.calls = encoder, encoder.preprocess, 0

    def encode_image(self, pixels) -> np.ndarray:
        self.calls += 1
        return self.encoder.encode_image_share(pixels)


def due(evals, step: int, last_step: int) -> dict:
    """The evaluators to run after training step `step`: those whose `every` divides it, all at the end."""
    return {name: spec for name, spec in evals.items()
            if spec.get("every") and (step % spec.every == 0 or step == last_step)}


def retrieval_items(evals, data=None) -> dict[str, dict]:
    """{name: item_settings} of each retrieval evaluator in `evals`, for a run whose config.data is
    `data`: what its items are built with, for the start-up line and the metrics' JSON to state."""
    return {name: item_settings(data, spec) for name, spec in sorted(evals.items()) if spec.type == "retrieval"}


def run_evaluators(evals, encoder: CLIPEncoder, progress: bool = False, data=None) -> dict[str, float]:
    """{"name/metric": value} of every evaluator in `evals`; `data`: the run's config.data, whose item
    settings retrieval keeps its items by (retrieval_items)."""
    metrics = {}
    items = retrieval_items(evals, data)
    for name, spec in sorted(evals.items()):
        if spec.type == "retrieval":
            for level in spec.get("levels", LEVELS):
                found = retrieval(encoder, spec.records, level, batch_size=spec.get("batch_size", 64),
                                  progress=progress, items=items[name])
                metrics |= {f"{name}/{level}/{key}": value for key, value in found.items()}
        elif spec.type == "zeroshot":
            metrics |= {f"{name}/{key}": value for key, value in zeroshot_eval(encoder, spec).items()}
        else:
            raise UserError(f"config.evals.{name}.type={spec.type!r}: use retrieval or zeroshot")
    return metrics
