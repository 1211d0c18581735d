import numpy as np
import open_clip
import pytest

import zoomin_jax
from conftest import real_images


@pytest.mark.parametrize("size", [224, 32])
def test_matches_open_clip_eval_transform_on_real_images(size):
    reference = open_clip.image_transform(size, is_train=False)
    images = real_images()
    images += [images[0].convert("RGBA"), images[1].convert("P"), images[2].convert("L").resize((90, 301))]
    for image in images:
        ours = zoomin_jax.preprocess(image, size=size)
        expected = reference(image).numpy().transpose(1, 2, 0)
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() <= 1e-5, (image.mode, image.size)
