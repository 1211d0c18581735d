"""Run as a script by test_data: take N batches and save the iterator state and the next batch
('save'), or restore the state in this fresh process and save the batch it yields ('restore')."""
import json
import sys

import numpy as np

from zoomin_jax.data.pipeline import make_dataset
from zoomin_jax.data.samples import SampleConfig


def main(phase: str, pattern: str, workdir: str, num_workers: int) -> None:
    iterator = iter(make_dataset(pattern, "panel", 2, seed=9, num_epochs=3, workers=num_workers,
                                 cfg=SampleConfig(image_size=64, patch_size=8, max_regions=2)))
    if phase == "save":
        for _ in range(5):
            next(iterator)
        with open(f"{workdir}/state.json", "w") as f:
            json.dump(iterator.get_state(), f)
        np.savez(f"{workdir}/expected.npz", **next(iterator))
    else:
        with open(f"{workdir}/state.json") as f:
            iterator.set_state(json.load(f))
        np.savez(f"{workdir}/restored.npz", **next(iterator))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
