"""What a run writes, on local disk or in a bucket (docs/design.md §9: every path goes through etils.epath,
so gs://BUCKET/run works as a workdir).

Object stores have no append, which metrics.jsonl and TensorBoard event files rely on locally.
`GrowingFile` keeps their contents in memory and uploads the whole object at each flush: an upload
replaces an object atomically, so a kill loses at most the lines since the last flush and never
leaves half a line. Both files hold a few scalars per log interval, so the upload stays small."""
from __future__ import annotations

import io
import re

from etils import epath

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_local(path) -> bool:
    return not _URI.match(str(path))


def absolute(path) -> epath.Path:
    """Orbax wants absolute paths; epath's absolute() would make gs://b/x local (CWD/gs:/b/x)."""
    path = epath.Path(path)
    return path.absolute() if is_local(path) else path


class GrowingFile:
    """A binary file written at its end: appended to in place on local disk, rewritten whole at each
    flush in a bucket (after the contents it already had, so a resumed run keeps the old lines)."""

    def __init__(self, path):
        self.path = epath.Path(path)
        if is_local(self.path):
            self._file, self._buffer = self.path.open("ab"), None
        else:
            self._file, self._buffer = None, io.BytesIO(self.path.read_bytes() if self.path.exists() else b"")
            self._buffer.seek(0, io.SEEK_END)

    def write(self, data: bytes) -> None:
        (self._file or self._buffer).write(data)

    def flush(self) -> None:
        if self._file:
            self._file.flush()
        else:
            self.path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()
        if self._file:
            self._file.close()


class _TensorBoardFiles:
    """tensorboardX's writer factory protocol: its own gs:// writer talks to GCS through a second
    client (google-cloud-storage, with its own credentials); this one writes through epath."""

    def open(self, path: str) -> GrowingFile:
        return GrowingFile(path)

    def directory_check(self, path: str) -> None:
        """Buckets have no directories to create."""


def summary_writer(logdir):
    """A tensorboardX SummaryWriter for a local or gs:// directory."""
    from tensorboardX import SummaryWriter, record_writer
    record_writer.register_writer_factory("gs", _TensorBoardFiles())
    return SummaryWriter(str(logdir))
