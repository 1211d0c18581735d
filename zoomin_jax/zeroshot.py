"""Zero-shot classification: class names x prompt templates -> text classifier -> top-1 / balanced accuracy.

The classifier is open_clip's `build_zero_shot_classifier`: each template filled with the class name,
embedded and L2-normalised, averaged over templates, and normalised again. Images are predicted by
the largest cosine similarity to a class.

Examples come from a TFDS ArrayRecord dataset (`tfds_examples`, read through `tfds.data_source`,
no TensorFlow needed), a MedMNIST-style npz (`npz_examples`) or a folder of class folders
(`folder_examples`); each is a sequence of (image, label) with `.names` for the label names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from zoomin_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    """Prompt text per label id (`classnames[i]` names label i) and the templates, `{}` = class name.
    A multi-label task (ChestMNIST) scores each class on its own: label i present or not."""
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    multilabel: bool = False


def _templates(*subjects: str) -> tuple[str, ...]:
    return (*(f"{subject} {{}}." for subject in subjects), "a medical image of {}.", "{}")


_ORGANS = ("the bladder", "the left femur", "the right femur", "the heart", "the left kidney", "the right kidney",
           "the liver", "the left lung", "the right lung", "the pancreas", "the spleen")

# The 12 MedMNIST+ 2D sets, label i in MedMNIST's order (its INFO "label" tables). Class names are
# written for prompts, not copied from the datasets' label names (MedMNIST calls BreastMNIST's label 1
# "normal, benign", OrganAMNIST's "femur-left"); templates name each set's modality.
TASKS = {
    "pathmnist": Task(
        classnames=("adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                    "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        templates=_templates("an H&E stained histology image of", "a colorectal tissue patch showing")),
    "chestmnist": Task(
        classnames=("atelectasis", "cardiomegaly", "pleural effusion", "infiltration", "a lung mass",
                    "a lung nodule", "pneumonia", "pneumothorax", "consolidation", "pulmonary edema",
                    "emphysema", "pulmonary fibrosis", "pleural thickening", "a hernia"),
        templates=_templates("a chest x-ray showing", "a chest radiograph with"), multilabel=True),
    "dermamnist": Task(
        classnames=("actinic keratosis or intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis",
                    "dermatofibroma", "melanoma", "a melanocytic nevus", "a vascular lesion"),
        templates=_templates("a dermatoscopic image of", "a skin lesion photograph showing")),
    "octmnist": Task(
        classnames=("choroidal neovascularization", "diabetic macular edema", "drusen", "a normal retina"),
        templates=_templates("a retinal OCT scan showing", "an optical coherence tomography image of")),
    "pneumoniamnist": Task(
        classnames=("normal lungs", "pneumonia"),
        templates=("a chest x-ray showing {}.", "a chest radiograph with {}.", "an x-ray image of {}.",
                   "a medical image of {}.", "{}"),
    ),
    "retinamnist": Task(
        classnames=("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                    "severe diabetic retinopathy", "proliferative diabetic retinopathy"),
        templates=_templates("a fundus photograph showing", "a retinal image with")),
    "breastmnist": Task(
        classnames=("malignant breast tumor", "normal or benign breast tissue"),
        templates=("a breast ultrasound image of {}.", "an ultrasound scan showing {}.",
                   "breast ultrasound: {}.", "a medical image of {}.", "{}"),
    ),
    "bloodmnist": Task(
        classnames=("a basophil", "an eosinophil", "an erythroblast", "an immature granulocyte", "a lymphocyte",
                    "a monocyte", "a neutrophil", "a platelet"),
        templates=_templates("a blood smear microscopy image of", "a peripheral blood cell image showing")),
    "tissuemnist": Task(
        classnames=("collecting duct or connecting tubule cells", "distal convoluted tubule cells",
                    "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes", "podocytes",
                    "proximal tubule cells", "thick ascending limb cells"),
        templates=_templates("a kidney cortex microscopy image of", "a tissue image showing")),
    "organamnist": Task(classnames=_ORGANS, templates=_templates("an axial abdominal CT slice of", "a CT image of")),
    "organcmnist": Task(classnames=_ORGANS, templates=_templates("a coronal abdominal CT slice of", "a CT image of")),
    "organsmnist": Task(classnames=_ORGANS, templates=_templates("a sagittal abdominal CT slice of", "a CT image of")),
}


def get_task(name: str) -> Task:
    """The built-in task for a dataset name (a key of TASKS)."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"no zero-shot task {name!r}; use one of {', '.join(TASKS)} or pass class names "
                        f"and templates yourself.") from None


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def classifier(encoder, classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
               tokenize: Callable | None = None) -> np.ndarray:
    """float32 [num_classes, D]: per class, the re-normalised mean of its normalised template embeddings.

    `templates` are format strings with one `{}` or callables of the class name, as in open_clip.
    `tokenize(texts) -> int [N, context_length]` defaults to zoomin_jax's CLIP tokenizer.
    """
    if not classnames or not templates:
        raise UserError("zero-shot needs at least one class name and one prompt template.")
    if tokenize is None:
        from zoomin_jax.tokenizer import tokenize
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    embeddings = _l2_normalize(np.asarray(encoder.encode_text(tokenize(texts)), np.float32))
    means = embeddings.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return _l2_normalize(means)


def to_pil(image) -> Image.Image:
    """PIL image of an example image: PIL as is, uint8 [H, W] or [H, W, 1] as grayscale, [H, W, 3] as RGB.

    Grayscale stays grayscale here: the model's preprocess resizes in the image's own mode and then
    converts to RGB, as open_clip does with the same PIL image.
    """
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise UserError(f"example images must be PIL images or uint8 [H, W], [H, W, 1] or [H, W, 3] "
                        f"arrays; got {array.dtype} {array.shape}.")
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _batches(examples: Iterable, batch_size: int):
    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_images(encoder, images: Iterable, batch_size: int = 64) -> np.ndarray:
    """float32 [N, D] L2-normalised embeddings of images (PIL or uint8 arrays), preprocessed and
    encoded `batch_size` at a time."""
    out = [_l2_normalize(np.asarray(encoder.encode_image(np.stack([encoder.preprocess(to_pil(image))
                                                                     for image in batch])), np.float32))
           for batch in _batches(images, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict(encoder, images: Iterable, class_weights: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """int64 [N] predicted class of each image (PIL or uint8 array) against `classifier(...)` weights."""
    embeddings = embed_images(encoder, images, batch_size)
    return np.argmax(embeddings @ class_weights.T, axis=-1) if len(embeddings) else np.zeros((0,), np.int64)


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the recall of that class (sklearn's definition)."""
    labels = np.asarray(labels, np.int64)
    totals = np.bincount(labels)
    correct = np.bincount(labels, weights=np.asarray(predictions) == labels, minlength=len(totals))
    present = totals > 0
    return float(np.mean(correct[present] / totals[present]))


def evaluate(encoder, examples: Iterable, classnames: Sequence[str],
             templates: Sequence[str | Callable[[str], str]], batch_size: int = 64,
             tokenize: Callable | None = None) -> dict:
    """Zero-shot metrics {"top1", "balanced_accuracy", "count"} of `encoder` on (image, label) examples.

    `encoder` is anything with `encode_image(pixels [N, H, W, 3])`, `encode_text(tokens)` and
    `preprocess(PIL image) -> [H, W, 3]` (e.g. `zoomin_jax.load_clip(dir)`); label i is
    `classnames[i]`. Images are PIL images or uint8 [H, W(, C)] arrays (see `to_pil`).
    """
    if batch_size < 1:
        raise UserError(f"zero-shot batch_size must be at least 1; got {batch_size}.")
    labels = []

    def images():
        for image, label in examples:
            labels.append(int(label))
            yield image

    predictions = predict(encoder, images(), classifier(encoder, classnames, templates, tokenize), batch_size)
    return scores(np.asarray(labels, np.int64), predictions, classnames)


def scores(labels: np.ndarray, predictions: np.ndarray, classnames: Sequence[str]) -> dict:
    """{"top1", "balanced_accuracy", "count"} of predictions against labels (label i is classnames[i])."""
    if not len(labels):
        raise UserError("zero-shot got no examples; check the dataset split or folder.")
    if labels.min() < 0 or labels.max() >= len(classnames):
        raise UserError(f"example labels run from {labels.min()} to {labels.max()} but {len(classnames)} "
                        f"class names were given; pass one class name per label.")
    return {"top1": float(np.mean(predictions == labels)),
            "balanced_accuracy": balanced_accuracy(labels, predictions), "count": int(len(labels))}


class Examples:
    """A random-access sequence of (image, label int) examples; `names[i]` is label i's name when known."""

    def __init__(self, length: int, get: Callable[[int], tuple], names: tuple[str, ...] | None):
        self._length, self._get, self.names = length, get, names

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple:
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._get(index % self._length)

    def __iter__(self):
        return (self._get(i) for i in range(self._length))


def tfds_examples(name: str, split: str, data_dir: str | Path) -> Examples:
    """(image uint8 [H, W, C], label) of a TFDS ArrayRecord dataset, read through `tfds.data_source`.

    `name` may carry a version ("breastmnist:1.0.0"); `split` is any TFDS split ("test", "train[:10%]").
    Datasets written by `python -m zoomin_jax.data.medmnist_tfds` have the features `image` and
    `label` (ClassLabel, whose names become `.names`). Nothing is downloaded.
    """
    import tensorflow_datasets as tfds
    try:
        source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"no TFDS dataset {name!r} in {data_dir}; build it with `python -m "
                        f"zoomin_jax.data.medmnist_tfds` or pass the right data dir.") from None
    except ValueError as err:
        raise UserError(f"TFDS dataset {name!r} in {data_dir} cannot give split {split!r}: {err}") from None
    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
        raise UserError(f"TFDS dataset {name!r} in {data_dir} has features {', '.join(features)}; "
                        f"zero-shot needs 'image' and 'label'.")
    names = tuple(features["label"].names) if hasattr(features["label"], "names") else None

    def get(index):
        example = source[index]
        return example["image"], int(example["label"])

    return Examples(len(source), get, names)


def read_npz_split(path: str | Path, split: str, multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W] or [N, H, W, C], labels int64 [N], or [N, classes] of 0/1 when
    `multilabel`) of one split of a MedMNIST npz."""
    path = Path(path)
    try:
        arrays = np.load(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a MedMNIST .npz file.") from None
    with arrays:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in arrays.files]
        if missing:
            raise UserError(f"{path} has no {' / '.join(missing)}; pass a MedMNIST-style npz with "
                            f"{split}_images and {split}_labels.")
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise UserError(f"{path}: {split}_images must be uint8 [N, H, W(, C)] with one row of "
                        f"{split}_labels per image; got {images.dtype} {images.shape} and {labels.shape}.")
    if multilabel:
        if labels.ndim != 2:
            raise UserError(f"{path}: {split}_labels has shape {labels.shape}; a multi-label task needs "
                            f"[N, classes] of 0/1.")
        return images, labels.astype(np.int64)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise UserError(f"{path}: {split}_labels has shape {labels.shape}; only single-label tasks "
                        f"((N,) or (N, 1)) are supported.")
    return images, labels.reshape(-1).astype(np.int64)


def npz_examples(path: str | Path, split: str, multilabel: bool = False) -> Examples:
    """(image uint8 [H, W(, C)], label) from a MedMNIST-style npz: `{split}_images`, `{split}_labels`.

    Labels may be [N] or [N, 1]; with `multilabel` [N, classes], each label an int64 [classes] of 0/1.
    The npz carries no label names, so `.names` is None.
    """
    images, labels = read_npz_split(path, split, multilabel)
    if multilabel:
        return Examples(len(images), lambda i: (images[i], labels[i]), None)
    return Examples(len(images), lambda i: (images[i], int(labels[i])), None)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def folder_examples(root: str | Path) -> Examples:
    """(PIL image, label) from root/CLASSNAME/*.png|jpg|jpeg; label i is the i-th class folder, sorted.

    `.names` are the folder names, usable as class names (or mapped to better prompt text).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass a folder with one sub-folder of images per class.")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    files = [(path, label) for label, cls in enumerate(names) for path in sorted((root / cls).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{root} has no class folders with .png/.jpg images; lay it out as root/CLASSNAME/*.png.")

    def get(index):
        path, label = files[index]
        with Image.open(path) as image:
            image.load()
        return image, label

    return Examples(len(files), get, names)
