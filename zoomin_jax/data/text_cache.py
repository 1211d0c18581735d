"""Frozen-text embeddings computed once per distinct text (DESIGN.md §5).

With the text tower frozen every text embedding is a constant, so training looks them up instead
of running the text tower each step. The cache is two .npy files memory-mapped by every data
worker: `keys.npy` (sorted 64-bit hashes of the texts) and `embeddings.npy` (float32 [N, D], the
text tower's outputs, not L2-normalised).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from zoomin_jax.errors import UserError

KEYS, EMBEDDINGS = "keys.npy", "embeddings.npy"


def text_key(text: str) -> np.uint64:
    return np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), np.uint64)[0]


class TextCache:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            self.keys = np.load(directory / KEYS, mmap_mode="r")
            self.embeddings = np.load(directory / EMBEDDINGS, mmap_mode="r")
        except FileNotFoundError as err:
            raise UserError(f"{err.filename} is missing: the text cache in {directory} was not built") from None
        self.directory, self.dim = directory, self.embeddings.shape[1]

    def lookup(self, texts: list[str]) -> np.ndarray:
        keys = np.asarray([text_key(text) for text in texts], np.uint64)
        rows = np.searchsorted(self.keys, keys)
        found = (rows < len(self.keys)) & (self.keys[np.minimum(rows, len(self.keys) - 1)] == keys)
        if not found.all():
            missing = texts[int(np.flatnonzero(~found)[0])]
            raise UserError(f"text {missing[:60]!r} is not in the text cache {self.directory}; rebuild it "
                            "for these records (delete the directory)")
        return np.asarray(self.embeddings[rows], np.float32)


@functools.lru_cache(maxsize=4)
def open_cache(directory: str) -> TextCache:
    """One memory map per worker process and directory."""
    return TextCache(directory)


def record_texts(record: dict) -> Iterable[str]:
    """Every text a record can put in a batch: the caption, panel texts and LVLM descriptions,
    region texts (a region without any falls back to the caption)."""
    yield record["caption"]
    for panel in record["panels"]:
        yield panel["text"]
        if panel["text_lvlm"]:
            yield panel["text_lvlm"]
    for region in record["regions"]:
        yield from (text for text in (region["text_sub"], region["text_lvlm"]) if text)


def build(directory: str | Path, texts: Iterable[str], encode: Callable[[list[str]], np.ndarray],
          batch_size: int = 256) -> TextCache:
    """Embeds each distinct text once with `encode` (texts -> [n, D]) and writes the cache
    atomically (a half-written cache is never opened)."""
    directory = Path(directory)
    keyed = sorted((text_key(text), text) for text in set(texts))
    keys = np.asarray([key for key, _ in keyed], np.uint64)
    unique = [text for _, text in keyed]
    if len(np.unique(keys)) != len(keys):
        raise UserError("two distinct texts share a 64-bit hash; this cache cannot hold them")
    embeddings = np.concatenate([np.asarray(encode(unique[n:n + batch_size]), np.float32)
                                 for n in range(0, len(unique), batch_size)])
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / KEYS, keys)
    np.save(tmp / EMBEDDINGS, embeddings)
    tmp.rename(directory)
    return TextCache(directory)
