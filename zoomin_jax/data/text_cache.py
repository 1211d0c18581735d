"""Frozen-text embeddings computed once per distinct text and run (DESIGN.md §5).

With the text tower frozen every text embedding is a constant, so training looks them up instead
of running the text tower each step. The cache is built by all processes of a run together into one
directory (the run's workdir, local or gs://) and memory-mapped by every data worker:

  embeddings-IIIII-of-PPPPP.npy  float32 [n_i, D], the text tower's outputs (not L2-normalised) of
                                 the texts process i embedded
  offsets.npy                    int64 [P + 1], where each part starts in the parts' concatenation
  rows.npy                       int64 [N], the row (in that concatenation) of each key
  keys.npy                       uint64 [N], sorted 64-bit hashes of the texts; written last, so a
                                 directory holding it holds a whole cache

Each process reads its share of the records; their distinct texts' keys are exchanged (8 bytes a
text), each key is given to one of the processes that hold its text, and each process embeds only
those, so every distinct text is embedded exactly once per run, by the devices of all processes
together. A bucket cannot be memory-mapped, so `local` copies a remote cache once per host into the
temporary directory (TMPDIR) and the workers map that copy.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from etils import epath
from tqdm import tqdm

from zoomin_jax import storage
from zoomin_jax.errors import UserError

KEYS, ROWS, OFFSETS = "keys.npy", "rows.npy", "offsets.npy"


def part_name(process: int, count: int) -> str:
    return f"embeddings-{process:05d}-of-{count:05d}.npy"


def text_key(text: str) -> np.uint64:
    return np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), np.uint64)[0]


class TextCache:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            self.keys = np.load(directory / KEYS, mmap_mode="r")
            self.rows = np.load(directory / ROWS)
            self.offsets = np.load(directory / OFFSETS)
            self.parts = [np.load(directory / part_name(i, len(self.offsets) - 1), mmap_mode="r")
                          for i in range(len(self.offsets) - 1)]
        except FileNotFoundError as err:
            raise UserError(f"{err.filename} is missing: the text cache in {directory} was not built whole; "
                            "delete the directory to rebuild it") from None
        self.directory, self.dim = directory, self.parts[0].shape[1]

    def lookup(self, texts: list[str]) -> np.ndarray:
        keys = np.asarray([text_key(text) for text in texts], np.uint64)
        index = np.searchsorted(self.keys, keys)
        found = (index < len(self.keys)) & (self.keys[np.minimum(index, len(self.keys) - 1)] == keys)
        if not found.all():
            missing = texts[int(np.flatnonzero(~found)[0])]
            raise UserError(f"text {missing[:60]!r} is not in the text cache {self.directory}; rebuild it "
                            "for these records (delete the directory)")
        rows = self.rows[index]
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(texts), self.dim), np.float32)
        for p in np.unique(part):
            chosen = part == p
            out[chosen] = self.parts[p][rows[chosen] - self.offsets[p]]
        return out


@functools.lru_cache(maxsize=4)
def open_cache(directory: str) -> TextCache:
    """One memory map per worker process and directory."""
    return TextCache(directory)


def record_texts(record: dict, context: bool = False) -> Iterable[str]:
    """Every text a record can put in a batch: the caption, with `context` the citing paragraphs
    (figure texts when data.context_text_prob > 0; long, so embedded only then), panel texts and
    LVLM descriptions, region texts (a region without any falls back to the caption)."""
    yield record["caption"]
    if context:
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


def _save(path: epath.Path, array: np.ndarray) -> None:
    _write_whole(path, lambda f: np.save(f, array))


def owned_keys(keys_by_process: list[np.ndarray], process: int) -> np.ndarray:
    """The sorted keys `process` embeds. A key several processes hold goes to one of them, chosen by
    the key itself (key mod holders), so common texts spread over the processes instead of all going
    to the first; every process computes the same split from the same keys."""
    keys = np.concatenate(keys_by_process)
    holders = np.concatenate([np.full(len(k), p) for p, k in enumerate(keys_by_process)])
    order = np.lexsort((holders, keys))
    keys, holders = keys[order], holders[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)]).astype(np.uint64)
    chosen = starts + (keys[starts] % counts).astype(np.int64)
    return keys[chosen][holders[chosen] == process]


@dataclasses.dataclass(frozen=True)
class BuildCount:
    texts: int     # distinct texts in the cache
    embedded: int  # of them, embedded by this process


def build(directory, texts: Iterable[str], encode_share: Callable[[list[str]], np.ndarray],
          share_size: int) -> BuildCount:
    """Every process of the run calls this together with the texts of its share of the records.
    `encode_share(texts)` embeds this process's (at most `share_size`) texts on the devices of all
    processes: a collective, so every process calls it equally often (with [] once it has no more)."""
    import jax  # only here: data workers import this module for the lookup alone
    from jax.experimental import multihost_utils
    from zoomin_jax.encoder import gather_shares

    directory = epath.Path(directory)
    by_key = {}
    for text in texts:
        key = text_key(text)
        if by_key.setdefault(key, text) != text:
            raise UserError(f"the distinct texts {text[:40]!r} and {by_key[key][:40]!r} share a 64-bit hash; "
                            "this cache cannot hold them")
    mine = np.asarray(sorted(by_key), np.uint64)
    # jax arrays carry no 64-bit integers by default: the keys travel as uint32 pairs.
    keys_by_process = [pairs.view(np.uint64).reshape(-1)
                       for pairs in gather_shares(mine.view(np.uint32).reshape(-1, 2))]
    process, count = jax.process_index(), jax.process_count()
    owned = [owned_keys(keys_by_process, p) for p in range(count)]
    calls = max(-(-len(keys) // share_size) for keys in owned)
    if not calls:
        raise UserError("the records hold no text to embed: check config.data.records")
    mine = [by_key[key] for key in owned[process]]
    embeddings = [np.asarray(encode_share(mine[n * share_size:(n + 1) * share_size]), np.float32)
                  for n in tqdm(range(calls), desc="text cache", unit="batch", disable=process != 0,
                                mininterval=10)]
    directory.mkdir(parents=True, exist_ok=True)
    _save(directory / part_name(process, count), np.concatenate(embeddings))
    multihost_utils.sync_global_devices("text cache: every part written")
    if process == 0:
        keys = np.concatenate(owned)
        order = np.argsort(keys, kind="stable")
        _save(directory / OFFSETS, np.r_[0, np.cumsum([len(k) for k in owned])].astype(np.int64))
        _save(directory / ROWS, order.astype(np.int64))
        _save(directory / KEYS, keys[order])  # last: see is_built
    multihost_utils.sync_global_devices("text cache: keys written")
    return BuildCount(texts=sum(len(k) for k in owned), embedded=len(mine))


def _files(directory: epath.Path) -> list[str]:
    """The cache's file names, keys.npy last (the order a copy must be written in)."""
    with (directory / OFFSETS).open("rb") as f:
        parts = len(np.load(f)) - 1
    return [part_name(i, parts) for i in range(parts)] + [OFFSETS, ROWS, KEYS]


def local(directory) -> str:
    """A directory the cache can be memory-mapped from: `directory` itself when local, else this
    host's copy of it (made once, named by the remote path and sizes, so a rebuilt cache is copied anew)."""
    directory = epath.Path(directory)
    if storage.is_local(directory):
        return str(directory)
    files = _files(directory)
    sizes = [(directory / name).stat().length for name in files]
    name = hashlib.blake2b(f"{directory} {sizes}".encode(), digest_size=8).hexdigest()
    copy = epath.Path(tempfile.gettempdir()) / "zoomin_jax-text-cache" / name
    if not is_built(copy):
        copy.mkdir(parents=True, exist_ok=True)
        for file in files:
            with (directory / file).open("rb") as src:
                _write_whole(copy / file, lambda dst: shutil.copyfileobj(src, dst, 1 << 24))
    return str(copy)
