"""Reading and decoding figures, in worker processes ahead of the backend.

`decoded_batches` reads and decodes the batches after the current one in spawned worker processes
while the backend (a GPU, or the CPU heuristic) works on the current one, so the engine does not wait
for PNG and JPEG decoding. The workers import this module only (Pillow and NumPy, not torch), and
ignore SIGTERM and SIGINT: SLURM signals every process of a task, and the main process decides when
the shard stops.
"""
from __future__ import annotations

import collections
import io
import multiprocessing
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from annotate.config import AnnotateConfig
from annotate.inputs import Figure


class FigureError(Exception):
    """A figure's failure at `stage`. `final`: a property of the figure (corrupt, too big, refused);
    else transient (an I/O error reading it), and the next run of its shard tries it again."""

    def __init__(self, stage: str, reason: str, final: bool = True):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.final = stage, reason, final

    def __reduce__(self):  # results cross from the decode workers by pickle
        return FigureError, (self.stage, self.reason, self.final)


def decode(data: bytes, cfg: AnnotateConfig) -> Image.Image:
    """An RGB image for analysis; FigureError for empty, corrupt, truncated or oversized files."""
    if not data:
        raise FigureError("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > cfg.max_image_pixels:
                raise FigureError("decode", f"{width}x{height} exceeds max_image_pixels={cfg.max_image_pixels} "
                                            f"(decompression bomb guard)")
            if max(width, height) > cfg.max_aspect_ratio * min(width, height):
                ratio = max(width, height) / max(min(width, height), 1)
                raise FigureError("decode", f"extreme aspect ratio ({width}x{height}, {ratio:.0f}:1) exceeds "
                                            f"max_aspect_ratio={cfg.max_aspect_ratio:g}")
            image.load()
    except FigureError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise FigureError("decode", f"decompression bomb refused: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise FigureError("decode", f"unreadable or truncated image: {err}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: stretch to 8 bits rather than clip to white.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        image = Image.fromarray(((pixels - low) / max(high - low, 1e-9) * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


Decoded = tuple[bytes, Image.Image] | FigureError


def read_and_decode(figure: Figure, cfg: AnnotateConfig) -> Decoded:
    """The figure's original bytes and its RGB image, or the FigureError of the stage that failed."""
    try:
        data = figure.read_image_bytes()
    except OSError as err:
        # A missing or forbidden file stays so; another OSError (EIO, a timeout on a network file
        # system) may not.
        final = isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))
        return FigureError("read", f"image unreadable: {err}", final)
    try:
        return data, decode(data, cfg)
    except FigureError as err:
        return err


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decoded(future) -> Decoded:
    try:
        return future.result()
    except BrokenProcessPool:  # a dead worker pool stops the run; the rerun resumes
        raise
    except Exception as err:  # a bug on one figure fails that figure
        return FigureError("decode", f"decode worker raised {type(err).__name__}: {err}")


def _ready(batch: list[Figure], futures: list) -> tuple[list[Figure], list[Decoded]]:
    return batch, [_decoded(future) for future in futures]


def decoded_batches(batches: Iterable[list[Figure]], cfg: AnnotateConfig, workers: int = 0,
                    lookahead: int = 2) -> Iterator[tuple[list[Figure], list[Decoded]]]:
    """Each batch with its decoded figures, in order. With `workers` > 0 up to `lookahead` batches
    after the one being consumed are decoded in that many worker processes; 0 decodes in this process,
    when each batch is asked for."""
    if workers <= 0:
        for batch in batches:
            yield batch, [read_and_decode(figure, cfg) for figure in batch]
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_stop_signals)
    try:
        pending = collections.deque()
        for batch in batches:
            pending.append((batch, [pool.submit(read_and_decode, figure, cfg) for figure in batch]))
            if len(pending) > lookahead:
                yield _ready(*pending.popleft())
        while pending:
            yield _ready(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
