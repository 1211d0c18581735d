"""python -m zoomin_jax.data.bench --records GLOB --level panel --workers 0,1,2 [--read-latency-ms 0,20,50]
    [--breakdown]

Samples per second of one level's pipeline (read, decode, crop, resize, tokenize, batch) for each
worker count and read latency: the median of --repeats timed runs of --batches batches, after one
warm-up batch. Examples are made as training makes them (random resized crops); --eval measures
open_clip's eval transform. --read-latency-ms N reads through a source that sleeps N ms before each
record, as an object store (GCS through gcsfuse: tens of ms) would: what the read threads must hide.
--breakdown profiles the examples of one batch size x --batches in this process, one at a time, and
prints the share of their time each stage takes."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

from zoomin_jax.data.pipeline import build_index, make_dataset
from zoomin_jax.data.samples import SampleConfig
from zoomin_jax.data.source import RecordSource

# stage -> (file suffix, function) whose cumulative time is the stage's
STAGES = {"read record": ("zoomin_jax/data/source.py", "__getitem__"),
          "decode image": ("zoomin_jax/image_decode.py", "decode"),
          "crop": ("PIL/Image.py", "crop"), "convert": ("PIL/Image.py", "convert"),
          "resize": ("PIL/Image.py", "resize"), "tokenize": ("zoomin_jax/tokenizer.py", "tokenize")}


class LatentSource(RecordSource):
    """A record source that waits `latency_ms` before each read, like a remote store's round trip
    (module level: grain's spawned workers unpickle it)."""

    def __init__(self, patterns, latency_ms: float):
        super().__init__(patterns)
        self.latency_ms = latency_ms

    def __getitem__(self, index: int):
        time.sleep(self.latency_ms / 1000)
        return super().__getitem__(index)


def measure(records: str, level: str, workers: int, batch_size: int, batches: int, repeats: int,
            cfg: SampleConfig, worker_buffer: int = 4, latency_ms: float = 0.0, read_threads: int = 16) -> list[float]:
    source = LatentSource(records, latency_ms)
    index = build_index(RecordSource(records), level, cfg)
    rates = []
    for repeat in range(repeats):
        iterator = iter(make_dataset(source, level, batch_size, seed=repeat, cfg=cfg, index=index, num_epochs=None,
                                     read_threads=read_threads, workers=workers, worker_buffer=worker_buffer))
        next(iterator)  # warm-up: worker start, first decode
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * batch_size / (time.perf_counter() - start))
        iterator.close()
    return rates


def breakdown(records: str, level: str, batch_size: int, batches: int, cfg: SampleConfig) -> dict[str, float]:
    """{stage: fraction of the time of making `batches` batches}, "other" being the rest (batching,
    boxes, masks, the grain machinery). In this thread (cProfile sees no other)."""
    iterator = iter(make_dataset(records, level, batch_size, cfg=cfg, num_epochs=None, read_threads=0))
    next(iterator)  # warm-up
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(batches):
        next(iterator)
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = sum(tottime for _, _, tottime, _, _ in stats.values())
    shares = {stage: sum(cumtime for (path, _, name), (_, _, _, cumtime, _) in stats.items()
                         if path.endswith(suffix) and name == function) / total
              for stage, (suffix, function) in STAGES.items()}
    return {**shares, "other": 1 - sum(shares.values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", required=True)
    parser.add_argument("--level", default="panel", choices=["figure", "panel", "region"])
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--read-latency-ms", default="0", help="comma-separated milliseconds each record read waits")
    parser.add_argument("--read-threads", type=int, default=16, help="threads making examples in each process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--eval", action="store_true", help="open_clip's eval transform instead of training views")
    parser.add_argument("--worker-buffer", type=int, default=4, help="batches each worker keeps ready")
    parser.add_argument("--breakdown", action="store_true", help="also print where a sample's time goes")
    args = parser.parse_args(argv)
    cfg = SampleConfig(image_size=args.image_size, train=not args.eval)
    views = "eval" if args.eval else "train"
    for latency in map(float, args.read_latency_ms.split(",")):
        for workers in map(int, args.workers.split(",")):
            rates = measure(args.records, args.level, workers, args.batch_size, args.batches, args.repeats, cfg,
                            args.worker_buffer, latency, args.read_threads)
            print(f"level={args.level} views={views} workers={workers} read_threads={args.read_threads} "
                  f"latency_ms={latency:g} samples/s median={statistics.median(rates):.1f} "
                  f"runs={[round(r, 1) for r in rates]}", flush=True)
    if args.breakdown:
        shares = breakdown(args.records, args.level, args.batch_size, args.batches, cfg)
        print(f"level={args.level} views={views} time: " + ", ".join(f"{stage} {share:.0%}"
                                                                     for stage, share in shares.items()))


if __name__ == "__main__":
    main()
