"""Frozen-text embeddings computed once per distinct text and run (docs/design.md §7).

With the text tower frozen every text embedding is a constant, so training looks them up instead
of running the text tower each step. The cache is built by all processes of a run together into one
directory (the run's workdir, local or gs://):

  embeddings-IIIII-of-PPPPP.npy  float16 [n_i, D], the text tower's outputs (not L2-normalised) of
                                 the texts process i embedded, in key order
  offsets.npy                    int64 [P + 1], where each part starts in the parts' concatenation
  rows.npy                       int64 [N], the row (in that concatenation) of each key
  keys.npy                       uint64 [N], sorted 64-bit hashes of the texts; written last, so a
                                 directory holding it holds a whole cache

Size: 2 D + 16 bytes a text, 1,552 at ViT-L's D = 768 (float32 took 3,088): ~10 texts a figure
make 5.4 GB at 350k figures and 374 GB at 24M (241M texts). Of the 2-byte floats, float16 rather
than bfloat16: the outputs of a LayerNorm and one projection lie far inside float16's range (build
refuses any beyond ±65504), and its 11 significand bits round a value by at most 2^-11 of itself,
where bfloat16's 8 give 2^-8. A ranking changes only where two scores lie closer than the rounding
moves them: on the demo's held-out figures (its initial, figure-only and zoom-in models, 54 R@k)
bfloat16 text embeddings moved scores by up to 1.1e-3 and 5 R@k by one query (pairs up to 5e-4
apart), float16 by up to 1.5e-4 and 2 R@k (pairs 3e-7 and 7e-6 apart). tests/test_text_cache.py
checks the initial model: no score moves by 2.5e-4, no hit changes but at float32's own ties.
Lookups return float32, as the batch layout wants. A cache from before float16 (float32 parts:
the npy header says which) is read as it is.

Each process reads its share of the records; their distinct texts' keys are exchanged (8 bytes a
text), one sort gives every key to one of the processes that hold its text, and each process
embeds only those, in calls of a fixed number of texts per device (the encoder's batch), writing
them out as they come, so every distinct text is embedded exactly once per run, by the devices of
all processes together, and no host holds its whole part in memory.

Every file is memory-mapped (np.load(mmap_mode="r")) wherever it is read: a data worker holds
only the pages its lookups touch, and all of a host's workers share them. A local directory, or a
bucket mounted with gcsfuse, is mapped in place. A gs:// cache cannot be mapped: `local` mirrors
its index (keys, rows, offsets: 16 bytes a text, 3.9 GB at 24M figures) into this host's TMPDIR,
and the embedding rows are read in place from the bucket, a lookup's rows in one batch of
concurrent ranged reads. Only parts that together fit MIRRORED_PARTS_BYTES are copied too, since
a local read beats a round trip to the bucket per lookup: a host's disk holds at most that much
plus the index, whatever the cache's size.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
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
INDEX = [OFFSETS, ROWS, KEYS]  # in the order a copy writes them: keys.npy last (see is_built)
REMOTE = "remote_parts.txt"    # in a host's mirror of a gs:// cache: where its parts are read in place
EMBEDDING = np.dtype(np.float16)
# A remote cache's parts are copied to a host when they total at most this (~5.5M texts at D = 768,
# ~550k figures): a TPU VM's 100 GB boot disk keeps room for everything else.
MIRRORED_PARTS_BYTES = 8 << 30
# Texts per device in one embedding call: the ViT-L text tower then computes ~3.4 TFLOP per chip a
# call (tens of ms on a v5e or an H100) against a few ms of dispatch and transfer, in well under
# 1 GB of activations; at 64 chips, 241M texts take ~15k calls.
TEXTS_PER_DEVICE = 256


def part_name(process: int, count: int) -> str:
    return f"embeddings-{process:05d}-of-{count:05d}.npy"


def text_key(text: str) -> np.uint64:
    return np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), np.uint64)[0]


class _RemotePart:
    """A part in a bucket, read in place: a ranged read per row, all of a lookup's rows concurrently."""

    def __init__(self, url: str):
        import fsspec  # gcsfs behind it, as behind etils.epath's gs:// paths
        self.fs, self.path = fsspec.core.url_to_fs(url)
        with self.fs.open(self.path, "rb") as f:
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            self.shape, _, self.dtype = header(f)
            self.start = f.tell()

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        width = self.shape[1] * self.dtype.itemsize
        starts = self.start + np.asarray(rows, np.int64) * width
        chunks = self.fs.cat_ranges([self.path] * len(starts), starts.tolist(), (starts + width).tolist())
        return np.frombuffer(b"".join(chunks), self.dtype).reshape(len(starts), self.shape[1])


class TextCache:
    """A whole cache in a local directory (or a mount), or a host's mirror of a gs:// one (`local`)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            self.keys, self.rows, self.offsets = (np.load(directory / name, mmap_mode="r")
                                                  for name in (KEYS, ROWS, OFFSETS))
            names = [part_name(i, len(self.offsets) - 1) for i in range(len(self.offsets) - 1)]
            remote = (directory / REMOTE).read_text() if (directory / REMOTE).exists() else None
            self.parts = [_RemotePart(f"{remote}/{name}") if remote
                          else np.load(directory / name, mmap_mode="r") for name in names]
        except FileNotFoundError as err:
            raise UserError(f"{err.filename or err} is missing: the text cache in {directory} was not built whole; "
                            "delete the directory to rebuild it") from None
        self.directory, self.dim = directory, self.parts[0].shape[1]

    def lookup(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), D]."""
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


def assign_owners(keys_by_process: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, owners): every distinct key of the processes' (each sorted, without repeats) once,
    sorted, and the process that embeds it. A key several processes hold goes to one of them, chosen
    by the key itself (holder number key mod holders, in process order), so common texts spread over
    the processes instead of all going to the first. One sort for all processes; every process
    computes the same from the same keys."""
    keys = np.concatenate(keys_by_process)
    holders = np.repeat(np.arange(len(keys_by_process), dtype=np.int32), [len(k) for k in keys_by_process])
    order = np.argsort(keys, kind="stable")  # stable: a key's holders stay in process order
    keys, holders = keys[order], holders[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, len(keys)]).astype(np.uint64)
    return keys[starts], holders[starts + (keys[starts] % counts).astype(np.int64)]


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
    keys, owners = assign_owners(keys_by_process)
    if not len(keys):
        raise UserError("the records hold no text to embed: check config.data.records")
    sizes = np.bincount(owners, minlength=count)
    calls = -(-int(sizes.max()) // share_size)
    owned = [by_key[key] for key in keys[owners == process]]
    directory.mkdir(parents=True, exist_ok=True)

    def write_part(f) -> None:
        """An npy header, then each call's embeddings in float16 as they come."""
        for n in range(calls):
            embeddings = np.asarray(encode_share(owned[n * share_size:(n + 1) * share_size]), np.float32)
            if n == 0:
                header = {"descr": np.lib.format.dtype_to_descr(EMBEDDING), "fortran_order": False,
                          "shape": (len(owned), embeddings.shape[1])}
                np.lib.format.write_array_header_1_0(f, header)
            if not (np.abs(embeddings) <= np.finfo(EMBEDDING).max).all():  # NaN fails it too
                raise UserError(f"the text tower gave an embedding beyond float16's range (±65504) or not finite "
                                f"(largest magnitude {np.abs(embeddings).max():g}); the text cache cannot store it")
            f.write(embeddings.astype(EMBEDDING).tobytes())
            # Process 0 shows the texts all processes embedded: the sizes say how many each had left.
            progress.update(int(np.clip(sizes - n * share_size, 0, share_size).sum()))

    with tqdm(total=len(keys), desc="text cache: embedding", unit="text", disable=process != 0,
              mininterval=10) as progress:
        _write_whole(directory / part_name(process, count), write_part)
    multihost_utils.sync_global_devices("text cache: every part written")
    if process == 0:
        order = np.argsort(owners, kind="stable")  # the parts' concatenation: each owner's keys, ascending
        rows = np.empty(len(keys), np.int64)
        rows[order] = np.arange(len(keys))
        _save(directory / OFFSETS, np.r_[0, np.cumsum(sizes)].astype(np.int64))
        _save(directory / ROWS, rows)
        _save(directory / KEYS, keys)  # last: see is_built
    multihost_utils.sync_global_devices("text cache: keys written")
    return BuildCount(texts=len(keys), embedded=len(owned))


def local(directory) -> str:
    """A directory `TextCache` opens: `directory` itself when local (a gcsfuse mount included), else
    this host's mirror of its index, with its parts when they fit MIRRORED_PARTS_BYTES (named by the
    remote path and sizes, so a rebuilt cache is mirrored anew; made once per host)."""
    directory = epath.Path(directory)
    if storage.is_local(directory):
        return str(directory)
    with (directory / OFFSETS).open("rb") as f:
        count = len(np.load(f)) - 1
    parts = [part_name(i, count) for i in range(count)]
    sizes = {name: (directory / name).stat().length for name in parts + INDEX}
    name = hashlib.blake2b(f"{directory} {sizes}".encode(), digest_size=8).hexdigest()
    mirror = Path(tempfile.gettempdir()) / "zoomin_jax-text-cache" / name
    if mirror.exists():
        return str(mirror)
    # Made aside and renamed whole: processes sharing a host may mirror at once, and one wins.
    staging = mirror.with_name(f"{name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    copied = parts if sum(sizes[part] for part in parts) <= MIRRORED_PARTS_BYTES else []
    for file in copied + INDEX:
        with (directory / file).open("rb") as src, open(staging / file, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    if not copied:
        (staging / REMOTE).write_text(str(directory))
    try:
        staging.rename(mirror)
    except OSError:  # another process of this host renamed its own first
        shutil.rmtree(staging)
    return str(mirror)
