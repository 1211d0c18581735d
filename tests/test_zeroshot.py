"""Zero-shot classification on real MedMNIST data: TFDS ArrayRecord (no TensorFlow), npz and folder
sources, and a converted tiny open_clip model predicting exactly what open_clip's own zero-shot does."""
import sys

import jax
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import zoomin_jax
from conftest import DATA, _require
from zoomin_jax import encoder, zeroshot
from zoomin_jax.convert import reference
from zoomin_jax.convert.__main__ import main as convert_main
from zoomin_jax.data import medmnist_tfds
from zoomin_jax.errors import UserError

NAMES = ("breastmnist", "pneumoniamnist")
BATCH = 64  # 156 and 624 test images: both end on a padded batch


def npz_path(name):
    return _require(DATA / "medmnist" / f"{name}.npz")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    assert medmnist_tfds.main(["--npz", str(npz_path("breastmnist")), "--data-dir", str(data_dir)]) == 0
    medmnist_tfds.build(npz_path("pneumoniamnist"), data_dir)
    return data_dir


@pytest.mark.parametrize("name", NAMES)
def test_tfds_data_source_reads_back_the_npz(tfds_dir, name):
    arrays = np.load(npz_path(name))
    for split in medmnist_tfds.SPLITS:
        examples = zeroshot.tfds_examples(name, split, tfds_dir)
        assert len(examples) == len(arrays[f"{split}_labels"])
    images = np.stack([image for image, _ in examples])
    labels = np.array([label for _, label in examples])
    assert images.dtype == np.uint8 and images.shape[-1] == 1
    np.testing.assert_array_equal(images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(labels, arrays["test_labels"].reshape(-1))
    assert examples.names == medmnist_tfds.LABELS[name]
    assert "tensorflow" not in sys.modules


def test_npz_and_folder_sources_match_tfds(tfds_dir, tmp_path):
    from_tfds = zeroshot.tfds_examples("breastmnist", "test", tfds_dir)
    from_npz = zeroshot.npz_examples(npz_path("breastmnist"), "test")
    assert len(from_npz) == len(from_tfds) and from_npz.names is None
    for (npz_image, npz_label), (tfds_image, tfds_label) in zip(from_npz, from_tfds):
        np.testing.assert_array_equal(npz_image, tfds_image[..., 0])
        assert npz_label == tfds_label

    for index, (image, label) in enumerate(from_tfds):
        folder = tmp_path / from_tfds.names[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{index:04d}.png")
    from_folder = zeroshot.folder_examples(tmp_path)
    assert from_folder.names == from_tfds.names  # MedMNIST's names sort in label order
    expected = sorted(((label, index) for index, (_, label) in enumerate(from_tfds)))
    assert [label for _, label in from_folder] == [label for label, _ in expected]
    for (image, _), (_, index) in zip(from_folder, expected):
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), from_tfds[index][0][..., 0])


def test_user_errors_name_the_input(tfds_dir, tmp_path):
    with pytest.raises(UserError, match="no TFDS dataset 'nosuch'"):
        zeroshot.tfds_examples("nosuch", "test", tfds_dir)
    with pytest.raises(UserError, match="cannot give split 'tst'"):
        zeroshot.tfds_examples("breastmnist", "tst", tfds_dir)
    with pytest.raises(UserError, match="has no dev_images / dev_labels"):
        zeroshot.npz_examples(npz_path("breastmnist"), "dev")
    with pytest.raises(UserError, match="no class folders"):
        zeroshot.folder_examples(tmp_path)
    with pytest.raises(UserError, match="no label names known for 'mystery'"):
        medmnist_tfds.build(npz_path("breastmnist"), tmp_path, name="mystery")
    with pytest.raises(UserError, match="already holds breastmnist"):
        medmnist_tfds.build(npz_path("breastmnist"), tfds_dir)
    with pytest.raises(UserError, match="no zero-shot task 'mystery'"):
        zeroshot.get_task("mystery")
    examples = [(np.zeros((4, 4), np.uint8), 2)]
    with pytest.raises(UserError, match="labels run from 2 to 2 but 2 class names"):
        zeroshot.evaluate(DarkBrightEncoder(), examples, ["dark", "bright"], ["{}"], tokenize=dark_bright_tokens)


def confusion_balanced_accuracy(labels, predictions, num_classes):
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predictions), 1)
    present = confusion.sum(1) > 0
    return float(np.mean(np.diag(confusion)[present] / confusion.sum(1)[present]))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random test-tiny open_clip model and the same weights converted by the CLI and loaded."""
    tmp = tmp_path_factory.mktemp("tiny")
    # A seed whose random weights predict both classes on both test sets, with logit margins >= 1e-4.
    torch.manual_seed(37)
    model = open_clip.CLIP(**zoomin_jax.get_preset("test-tiny").open_clip_cfg).eval()
    torch.save(model.state_dict(), tmp / "tiny.bin")
    assert convert_main(["import", "--src", str(tmp / "tiny.bin"), "--model", "test-tiny",
                         "--out", str(tmp / "flax")]) == 0
    return model, zoomin_jax.load_clip(tmp / "flax")


def open_clip_zero_shot(model, images, task, preprocess_cfg):
    """open_clip's own zero-shot: its classifier builder, tokenizer and eval transform."""
    transform = reference.eval_transform(preprocess_cfg)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer("ViT-L-14"),
                                                       task.classnames, task.templates)
        features = model.encode_image(torch.stack([transform(image) for image in images]), normalize=True)
        return weights.T.numpy(), (features @ weights).argmax(-1).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_zero_shot_matches_open_clip(tfds_dir, tiny_models, name):
    model, clip = tiny_models
    task = zeroshot.TASKS[name]
    examples = zeroshot.tfds_examples(name, "test", tfds_dir)
    labels = np.array([label for _, label in examples])
    pil_images = [zeroshot.to_pil(image) for image, _ in examples]
    ref_weights, ref_predictions = open_clip_zero_shot(model, pil_images, task, clip.preprocess_cfg)

    compiled_before = encoder._encode_image._cache_size()
    with jax.default_matmul_precision("float32"):
        weights = zeroshot.classifier(clip, task.classnames, task.templates)
        predictions = zeroshot.predict(clip, (image for image, _ in examples), weights, batch_size=BATCH)
        result = zeroshot.evaluate(clip, examples, task.classnames, task.templates, batch_size=BATCH)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-5)
    np.testing.assert_array_equal(predictions, ref_predictions)
    assert len(set(ref_predictions)) == 2
    assert result == {"top1": float(np.mean(ref_predictions == labels)),
                      "balanced_accuracy": confusion_balanced_accuracy(labels, ref_predictions, 2),
                      "count": len(labels)}
    # At most one new compilation for all batches (none when an earlier case compiled the shape):
    # the padded last batch did not compile another one.
    assert encoder._encode_image._cache_size() - compiled_before <= 1


class DarkBrightEncoder:
    """Duck-typed encoder: 'dark' images and prompts embed to [1, 0], 'bright' ones to [0, 1]."""

    def __init__(self):
        self.batch_sizes = []

    def preprocess(self, image):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0

    def encode_image(self, pixels):
        self.batch_sizes.append(len(pixels))
        bright = pixels.mean(axis=(1, 2, 3)) > 0.5
        return np.stack([~bright, bright], -1).astype(np.float32) * 3.0

    def encode_text(self, tokens):
        return np.asarray(tokens, np.float32)


def dark_bright_tokens(texts):
    return [["dark" in t, "bright" in t] for t in texts]


def test_balanced_accuracy_differs_from_top1_on_imbalanced_classes():
    assert zeroshot.balanced_accuracy([0] * 8 + [1] * 2, [0] * 10) == 0.5
    assert zeroshot.balanced_accuracy([0, 0, 1, 1], [0, 2, 1, 1]) == 0.75  # a predicted class with no example

    # 8 dark images (label 0) and 2 bright ones (label 1); one dark image is bright enough to be misread.
    values = [10] * 7 + [200] + [240] * 2
    examples = [(np.full((4, 4), v, np.uint8), int(v == 240)) for v in values]
    encoder = DarkBrightEncoder()
    result = zeroshot.evaluate(encoder, examples, ["dark", "bright"], ["a {} image", "{}"], batch_size=4,
                               tokenize=dark_bright_tokens)
    assert result == {"top1": 0.9, "balanced_accuracy": (7 / 8 + 1) / 2, "count": 10}
    assert encoder.batch_sizes == [4, 4, 2]
