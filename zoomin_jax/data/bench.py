"""python -m zoomin_jax.data.bench --records GLOB --level panel --workers 0,1,2

Samples per second of one level's pipeline (decode, crop, resize, tokenize, batch) for each worker
count: the median of --repeats timed runs of --batches batches, after one warm-up batch."""
from __future__ import annotations

import argparse
import statistics
import time

from zoomin_jax.data.pipeline import batch_iterator, build_index, make_dataset
from zoomin_jax.data.samples import SampleConfig
from zoomin_jax.data.source import RecordSource


def measure(records: str, level: str, workers: int, batch_size: int, batches: int, repeats: int,
            cfg: SampleConfig, worker_buffer: int = 4) -> list[float]:
    index = build_index(RecordSource(records), level, cfg)
    rates = []
    for repeat in range(repeats):
        dataset = make_dataset(records, level, batch_size, seed=repeat, cfg=cfg, index=index, num_epochs=1000)
        iterator = batch_iterator(dataset, num_workers=workers, worker_buffer=worker_buffer)
        next(iterator)  # warm-up: worker start, first decode
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * batch_size / (time.perf_counter() - start))
        iterator.close()
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", required=True)
    parser.add_argument("--level", default="panel", choices=["figure", "panel", "region"])
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--worker-buffer", type=int, default=4, help="batches each worker keeps ready")
    args = parser.parse_args(argv)
    cfg = SampleConfig(image_size=args.image_size)
    for workers in map(int, args.workers.split(",")):
        rates = measure(args.records, args.level, workers, args.batch_size, args.batches, args.repeats, cfg,
                        args.worker_buffer)
        print(f"level={args.level} workers={workers} samples/s median={statistics.median(rates):.1f} "
              f"runs={[round(r, 1) for r in rates]}", flush=True)


if __name__ == "__main__":
    main()
