"""Figure records from ArrayRecord shards as a grain random-access source.

A record that fails to decode stops the run naming its file and index (strict), or is returned as
None for the pipeline to skip and count (default). Each shard is opened once at start, for its
footer's record count (no record is read), in threads as grain would: grain is then given the
counts and opens no shard again until a record is read."""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import itertools
import re
from typing import Sequence

import grain
from etils import epath

from zoomin_jax import records, storage
from zoomin_jax.errors import UserError


def _matches(pattern: str) -> list[str]:
    """Paths matching a glob, or a directory's shards (annotate's --out), local or remote (gs://…
    through etils.epath)."""
    parts = pattern.split("/")
    first = next((n for n, part in enumerate(parts) if re.search(r"[*?\[]", part)), None)
    if first is None:
        path = epath.Path(pattern)
        if path.is_dir():
            return [str(shard) for shard in path.glob("*.array_record")]
        return [pattern] if path.exists() else []
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    return [str(path) for path in epath.Path(root).glob("/".join(parts[first:]))]


def expand(patterns: str | Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = set()
    for pattern in patterns:
        found = _matches(pattern)
        if not found:
            raise UserError(f"no record shards match {pattern}; pass a directory, path or glob of "
                            "*.array_record files.")
        paths.update(found)
    return sorted(paths)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """array_record's FileInstruction protocol: a whole shard whose record count is known."""
    filename: str
    skip: int
    take: int
    examples_in_shard: int


class RecordSource:
    """`source[i]` -> decoded figure record (dict) or None; `len(source)` records over all shards."""

    def __init__(self, patterns: str | Sequence[str], strict: bool = False, threads: int = 64):
        self.paths, self.strict = expand(patterns), strict
        if remote := next((path for path in self.paths if not storage.is_local(path)), None):
            # array_record's reader opens local files only (it hangs on a gs:// name).
            raise UserError(f"{remote} is in a bucket, and ArrayRecord shards are read from local files only: "
                            "mount the bucket with gcsfuse and pass the shards' paths under the mount")
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(self.paths))) as pool:
            counts = list(pool.map(records.count_records, self.paths))
        self._raw = grain.sources.ArrayRecordDataSource([_Shard(path, 0, count, count)
                                                         for path, count in zip(self.paths, counts)])
        self._starts = [0, *itertools.accumulate(counts)]

    def __len__(self) -> int:
        return self._starts[-1]

    def shard_records(self, shard: int) -> range:
        """The indices of the shard's records in this source."""
        return range(self._starts[shard], self._starts[shard + 1])

    def where(self, index: int) -> str:
        shard = bisect.bisect_right(self._starts, index) - 1
        return f"{self.paths[shard]} record {index - self._starts[shard]}"

    def __getitem__(self, index: int) -> dict | None:
        try:
            return records.decode(self._raw[index], where=self.where(index))
        except records.RecordError as err:
            if self.strict:
                raise UserError(f"{err}; rerun without strict mode to skip it.") from None
            return None
