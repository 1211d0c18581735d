import numpy as np
import open_clip
import pytest

import zoomin_jax
from conftest import prostate_captions, roco_captions


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-L-14")


@pytest.mark.parametrize("corpus", [roco_captions, prostate_captions])
def test_ids_identical_to_open_clip_on_real_captions(reference, corpus):
    texts = corpus()
    ours = zoomin_jax.tokenize(texts)
    expected = reference(texts).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    mismatched = [texts[i] for i in np.nonzero((ours != expected).any(axis=1))[0][:3]]
    assert not mismatched, mismatched
    # Both corpora exercise truncation (544 ROCO and 424 prostate texts exceed 77 tokens).
    assert (ours[:, -1] == 49407).sum() > 100


def test_edge_cases_match_open_clip(reference):
    texts = ["", "   \n\t ", "A&amp;B &lt;5 µm — naïve ΣΑΣ Ünïcödé", "x" * 2000, "don't I'LL we've",
             "CD4+/CD8+ T-cells (n=12); p<0.001***", "<start_of_text> arrow <end_of_text>", "1234567890"]
    np.testing.assert_array_equal(zoomin_jax.tokenize(texts), reference(texts).numpy())


def test_truncation_keeps_eot_last():
    tokens = zoomin_jax.tokenize(["cell " * 200])[0]
    assert tokens[0] == 49406 and tokens[-1] == 49407 and (tokens != 0).all()
