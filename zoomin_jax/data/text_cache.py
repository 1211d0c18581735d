"""Frozen-text embeddings computed once per distinct text (DESIGN.md §5).

With the text tower frozen every text embedding is a constant, so training looks them up instead
of running the text tower each step. The cache is two .npy files memory-mapped by every data
worker: `keys.npy` (sorted 64-bit hashes of the texts) and `embeddings.npy` (float32 [N, D], the
text tower's outputs, not L2-normalised).

The cache is built where the run's workdir is, through etils.epath, local or gs://. A bucket cannot
be memory-mapped, so `local` copies a remote cache once per host into the temporary directory
(TMPDIR) and the workers map that copy.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from etils import epath

from zoomin_jax import storage
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
    """Every text a record can put in a batch: the caption, the citing paragraphs (figure texts
    with data.context_text_prob), panel texts and LVLM descriptions, region texts (a region without
    any falls back to the caption)."""
    yield record["caption"]
    yield from (text for text in record["context"] if text)
    for panel in record["panels"]:
        yield panel["text"]
        if panel["text_lvlm"]:
            yield panel["text_lvlm"]
    for region in record["regions"]:
        yield from (text for text in (region["text_sub"], region["text_lvlm"]) if text)


def is_built(directory) -> bool:
    """keys.npy is written last, under its final name only once whole: a cache with it is complete."""
    return (epath.Path(directory) / KEYS).exists()


def _write_whole(path: epath.Path, write: Callable) -> None:
    """`write(file)` under a temporary name, then renamed: `path` never names half a file."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        write(f)
    tmp.replace(path)


def build(directory, texts: Iterable[str], encode: Callable[[list[str]], np.ndarray],
          batch_size: int = 256) -> int:
    """Embeds each distinct text once with `encode` (texts -> [n, D]) and writes the cache into
    `directory` (local or remote), embeddings first and keys last (see is_built); returns how many
    distinct texts it holds."""
    directory = epath.Path(directory)
    keyed = sorted((text_key(text), text) for text in set(texts))
    keys = np.asarray([key for key, _ in keyed], np.uint64)
    unique = [text for _, text in keyed]
    if len(np.unique(keys)) != len(keys):
        raise UserError("two distinct texts share a 64-bit hash; this cache cannot hold them")
    embeddings = np.concatenate([np.asarray(encode(unique[n:n + batch_size]), np.float32)
                                 for n in range(0, len(unique), batch_size)])
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in ((EMBEDDINGS, embeddings), (KEYS, keys)):
        _write_whole(directory / name, lambda f: np.save(f, array))
    return len(keys)


def local(directory) -> str:
    """A directory the cache can be memory-mapped from: `directory` itself when local, else this
    host's copy of it (made once, named by the remote path and sizes, so a rebuilt cache is copied anew)."""
    directory = epath.Path(directory)
    if storage.is_local(directory):
        return str(directory)
    sizes = [(directory / name).stat().length for name in (EMBEDDINGS, KEYS)]
    name = hashlib.blake2b(f"{directory} {sizes}".encode(), digest_size=8).hexdigest()
    copy = epath.Path(tempfile.gettempdir()) / "zoomin_jax-text-cache" / name
    if not is_built(copy):
        copy.mkdir(parents=True, exist_ok=True)
        for file in (EMBEDDINGS, KEYS):  # keys last, as in build
            with (directory / file).open("rb") as src:
                _write_whole(copy / file, lambda dst: shutil.copyfileobj(src, dst, 1 << 24))
    return str(copy)
