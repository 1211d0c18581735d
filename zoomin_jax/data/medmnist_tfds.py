"""A MedMNIST npz file as a TFDS ArrayRecord dataset, built and read without TensorFlow.

  python -m zoomin_jax.data.medmnist_tfds --npz ../shared/data/medmnist/breastmnist.npz --data-dir DIR

writes DIR/breastmnist/1.0.0/ (splits train/val/test; features `image` uint8 [H, W, C] stored as
PNG and `label` ClassLabel with MedMNIST's names), which `tfds.data_source('breastmnist',
data_dir=DIR, split='test')` reads with random access.

tfds' own `store_as_tfds_dataset` asks TensorFlow whether each split is a tf.data.Dataset, so it
fails where TensorFlow is not installed; the builder below is the same thing without that check.
Images go to the Image feature as PIL images, which tfds encodes with PIL (numpy arrays would go
through TensorFlow's PNG encoder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from zoomin_jax.errors import UserError
from zoomin_jax.zeroshot import read_npz_split

VERSION = "1.0.0"
SPLITS = ("train", "val", "test")
# Label names as in MedMNIST v2's INFO (medmnist/info.py), index = label id.
LABELS = {
    "breastmnist": ("malignant", "normal, benign"),
    "pneumoniamnist": ("normal", "pneumonia"),
}


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


class _NpzBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One MedMNIST npz as a TFDS dataset; `name` is given per instance (no registered class)."""

    def __init__(self, *, name: str, npz: Path, labels: tuple[str, ...], **kwargs):
        self.name = name
        self.VERSION = tfds.core.Version(VERSION)
        self._npz, self._labels = npz, labels
        super().__init__(**kwargs)

    def _info(self):
        images, _ = read_npz_split(self._npz, "test")
        height, width = images.shape[1:3]
        channels = images.shape[3] if images.ndim == 4 else 1
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.name} from {self._npz.name} (MedMNIST v2, CC BY 4.0).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(height, width, channels), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(self._labels)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://medmnist.com/",
            # Keeps the npz order, so index i of a split is row i of the npz arrays.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        images, labels = read_npz_split(self._npz, split)
        for index, (image, label) in enumerate(zip(images, labels)):
            if not 0 <= label < len(self._labels):
                raise UserError(f"{self._npz}: {split}_labels[{index}] = {label} is outside the "
                                f"{len(self._labels)} label names; pass the dataset's names with --labels.")
            yield index, {"image": _pil(image), "label": int(label)}


def build(npz: str | Path, data_dir: str | Path, name: str | None = None,
          labels: tuple[str, ...] | None = None) -> Path:
    """Write `npz` as TFDS dataset `name` (default: the file's stem) under `data_dir`; returns its folder.

    `labels` are the class names by label id; MedMNIST's own are used for the datasets in LABELS.
    """
    npz = Path(npz)
    name = name or npz.stem
    labels = tuple(labels) if labels else LABELS.get(name)
    if labels is None:
        raise UserError(f"no label names known for {name!r}; pass them with --labels in label-id order "
                        f"(known: {', '.join(LABELS)}).")
    builder = _NpzBuilder(name=name, npz=npz, labels=labels, data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        raise UserError(f"{builder.data_dir} already holds {name} {VERSION}; remove it or pick another --data-dir.")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoomin_jax.data.medmnist_tfds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", required=True, type=Path, help="MedMNIST .npz ({split}_images, {split}_labels)")
    parser.add_argument("--data-dir", required=True, type=Path, help="TFDS data dir to write into")
    parser.add_argument("--name", help="dataset name (default: the npz file's stem)")
    parser.add_argument("--labels", nargs="+", help="class names in label-id order (default: MedMNIST's)")
    args = parser.parse_args(argv)
    try:
        out = build(args.npz, args.data_dir, args.name, tuple(args.labels) if args.labels else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
