"""The fast PNG decoder gives PIL's mode and pixels, on real figures and on every PNG kind."""
import glob
import io

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, _require
from zoomin_jax import image_decode


def _pil(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _assert_same_as_pil(data: bytes) -> None:
    ours, reference = image_decode.decode(data), _pil(data)
    assert ours.mode == reference.mode and ours.size == reference.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def test_real_figures_take_the_fast_path_and_equal_pil():
    paths = sorted(glob.glob(str(_require(DATA / "figures" / "medicat") / "*.png")))
    assert len(paths) == 10
    for path in paths:
        data = open(path, "rb").read()
        assert image_decode._spng_mode(data) == "RGB", path  # real figures carry ICC profiles: ignored by both
        _assert_same_as_pil(data)


rng = np.random.default_rng(0)
RGBA = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
FAST = {"L": Image.fromarray(RGBA[..., 0]), "RGB": Image.fromarray(RGBA[..., :3]), "RGBA": Image.fromarray(RGBA)}


@pytest.mark.parametrize("mode", sorted(FAST))
def test_8bit_kinds_take_the_fast_path(mode):
    for params in ({}, {"compress_level": 0}, {"optimize": True}):
        data = _png(FAST[mode], **params)
        assert image_decode._spng_mode(data) == mode
        _assert_same_as_pil(data)


def test_transparency_chunk_is_ignored_as_pil_does():
    data = _png(FAST["RGB"], transparency=(1, 2, 3))
    assert image_decode._spng_mode(data) == "RGB" and b"tRNS" in data
    _assert_same_as_pil(data)


@pytest.mark.parametrize("image", [
    FAST["RGB"].convert("P", palette=Image.Palette.ADAPTIVE),
    FAST["L"].convert("1"),
    Image.fromarray(RGBA[..., :2], "LA"),
    Image.fromarray(RGBA[..., 0].astype(np.uint16) * 257),
], ids=["palette", "1-bit", "grey+alpha", "16-bit"])
def test_other_pngs_go_through_pil(image):
    data = _png(image)
    assert image_decode._spng_mode(data) is None
    _assert_same_as_pil(data)


def test_jpeg_and_truncated_png_go_through_pil():
    buffer = io.BytesIO()
    FAST["RGB"].save(buffer, format="JPEG", quality=90)
    _assert_same_as_pil(buffer.getvalue())
    assert image_decode._spng_mode(_png(FAST["RGB"])[:20]) is None
