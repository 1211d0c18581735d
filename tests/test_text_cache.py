"""The frozen-text cache: one per run, every distinct text embedded exactly once over all processes,
stored in float16 and memory-mapped, a gs:// cache read in place, and retrieval on the demo the same
with the stored text embeddings as with float32 wherever float32 does not tie."""
import json
import re

import numpy as np
import pytest
from etils import epath

from annotate.synth import synthesize, write_truth_records
from conftest import DATA, two_processes
from test_gcs import BUCKET, emulator  # noqa: F401 (a fixture)
from zoomin_jax.data import text_cache
from zoomin_jax.data.source import RecordSource
from zoomin_jax.encoder import CLIPEncoder
from zoomin_jax.errors import UserError
from zoomin_jax.evaluators import KS, recall_at_k
from zoomin_jax.recipes import LEVELS

TEXTS = ["a chest CT", "an MRI", "a western blot", "an MRI", "arrowheads mark apoptotic nuclei"]


def fake_embeddings(chunk: list[str]) -> np.ndarray:
    """Values float16 cannot hold exactly (1/3 and the like), a row per text."""
    return np.asarray([[len(text) / 3, -1 / 7, 1e4 / 9] for text in chunk], np.float32).reshape(-1, 3)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return str(write_truth_records(synthesize(tmp_path_factory.mktemp("synth"), num=24, seed=5)))


def test_each_shared_key_goes_to_exactly_one_of_its_holders():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 400, dtype=np.uint64)
    held = [np.unique(rng.choice(pool, 250)) for _ in range(3)]
    keys, owners = text_cache.assign_owners(held)
    assert keys.tolist() == sorted(set(np.concatenate(held).tolist()))  # each once, sorted
    for key, owner in zip(keys, owners):  # holder number key % holders, the holders in process order
        holders = [p for p, h in enumerate(held) if key in h]
        assert owner == holders[int(key % np.uint64(len(holders)))]
    sizes = np.bincount(owners)
    assert sizes.min() > 0.6 * sizes.max()  # shared keys spread, not all to process 0


def test_parts_hold_float16_every_file_is_mapped_and_an_old_float32_cache_still_reads(tmp_path, capsys):
    built = text_cache.build(tmp_path, TEXTS, fake_embeddings, 2)
    assert built == text_cache.BuildCount(texts=4, embedded=4)
    assert re.search(r"text cache: embedding: 100%.* 4/4 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().err)  # total, ETA
    part = tmp_path / text_cache.part_name(0, 1)
    assert np.load(part).dtype == np.float16 and part.stat().st_size == 128 + 4 * 3 * 2
    cache = text_cache.TextCache(tmp_path)
    assert all(isinstance(array, np.memmap) for array in (cache.keys, cache.rows, cache.offsets, *cache.parts))
    exact = fake_embeddings(TEXTS)
    got = cache.lookup(TEXTS)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, exact.astype(text_cache.EMBEDDING).astype(np.float32))
    assert (np.abs(got - exact) <= 2**-11 * np.abs(exact)).all() and (got != exact).any()

    # A cache written before float16: its float32 parts read as they are.
    stored = np.load(part)
    rows = cache.rows[np.searchsorted(cache.keys, [text_cache.text_key(t) for t in TEXTS])]
    old = np.empty(stored.shape, np.float32)
    old[rows] = exact
    np.save(part, old)
    np.testing.assert_array_equal(text_cache.TextCache(tmp_path).lookup(TEXTS), exact)


def test_an_embedding_float16_cannot_hold_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"beyond float16's range .* \(largest magnitude 100000\)"):
        text_cache.build(tmp_path, TEXTS, lambda chunk: fake_embeddings(chunk) * 90, 2)


def test_a_gs_cache_is_read_in_place_past_the_mirror_budget(emulator, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR once, and again after this
    remote = epath.Path(f"gs://{BUCKET}/in-place/text_cache")
    text_cache.build(remote, TEXTS, fake_embeddings, 2)
    monkeypatch.setattr(text_cache, "MIRRORED_PARTS_BYTES", 0)
    directory = text_cache.local(remote)
    mirror = sorted(path.name for path in tmp_path.rglob("*") if path.is_file())
    assert mirror == sorted(text_cache.INDEX + [text_cache.REMOTE]) and text_cache.local(remote) == directory
    expected = fake_embeddings(TEXTS).astype(text_cache.EMBEDDING).astype(np.float32)
    np.testing.assert_array_equal(text_cache.TextCache(directory).lookup(TEXTS[::-1]), expected[::-1])


def test_two_processes_build_one_cache_embedding_every_distinct_text_once(tmp_path, records):
    source = RecordSource(records)
    texts = {text for n in range(len(source)) for text in text_cache.record_texts(source[n])}
    (tmp_path / "texts.json").write_text(json.dumps(sorted(texts)))
    results = two_processes("text_cache_multiprocess.py", records, out=tmp_path)
    embedded = [r["embedded"] for r in results]
    assert all(embedded) and sum(map(len, embedded)) == len(texts) == len(set().union(*embedded))
    cache = tmp_path / "workdir" / "text_cache"
    assert sorted(p.name for p in cache.iterdir()) == [
        "embeddings-00000-of-00002.npy", "embeddings-00001-of-00002.npy", "keys.npy", "offsets.npy", "rows.npy"]
    for result in results:
        assert result["part_dtype"] == "<f2"
        # What the text tower gives, for every text, to float16's precision (2^-11 relative) beside
        # float32's differences between two batchings.
        assert result["max_excess"] <= 1e-5 * result["scale"]
        assert result["calls"] == [text_cache.TEXTS_PER_DEVICE * 2]  # one call, 2 devices a process


class StoredTexts(CLIPEncoder):
    """The encoder with its text embeddings as the cache hands them to training: the text tower's
    outputs rounded to the cache's float16, then L2-normalised."""

    def encode_text(self, tokens, normalize: bool = False) -> np.ndarray:
        stored = super().encode_text(tokens).astype(text_cache.EMBEDDING).astype(np.float32)
        return stored / np.linalg.norm(stored, axis=-1, keepdims=True) if normalize else stored


# Scores (float32 dot products of unit vectors) this close are tied: float32's own rounding, not the
# model, orders them, and any change to an embedding may swap them.
TIED = 1e-6


def hits_and_ties(scores: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query and k: a hit (the evaluator's recall_at_k), and whether the query's best relevant
    item and its k-th irrelevant one are tied, so that rounding alone decides the hit."""
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    ranked = -np.sort(-np.where(relevant, -np.inf, scores), axis=1)
    kth = ranked[:, np.minimum(KS, ranked.shape[1]) - 1]
    return recall_at_k(scores, relevant), np.abs(best - kth) < TIED


def test_demo_retrieval_with_the_stored_text_embeddings_is_float32s_wherever_float32_does_not_tie(tmp_path, monkeypatch):
    """The demo's held-out figures (`python -m zoomin_jax.demo`: 100 figures on real layouts, seed 200)
    through the demo's evaluator and model (configs/demo_cpu.py, its initial parameters): every query
    that float32 does not tie (all but one here: two figures its text scores 3e-7 apart) is a hit or a
    miss at each k with the cache's text embeddings as with float32's, so each R@k over them is the
    same. The rounding moves no score by 2.5e-4, where bfloat16's moves them by 8.5e-4 here (and
    changed R@k of the trained demo models: text_cache's docstring)."""
    from configs.demo_cpu import get_config
    from zoomin_jax import evaluators, run_dir, run_setup
    from zoomin_jax.models.clip import merge

    heldout = write_truth_records(synthesize(tmp_path, 100, 200, str(DATA / "layouts" / "zou_train.csv"),
                                             str(DATA / "medmnist" / "pneumoniamnist.npz")))
    config = get_config(f"records={heldout}")
    run = run_setup.setup(config)
    args = (run.model_cfg, merge(run.state["params"], run.frozen), run_dir.preprocess_cfg(config, run.model_cfg),
            run.mesh)
    embedded = []  # what the evaluator compares: image and text embeddings, each image's text
    retrieval_hits = evaluators.retrieval_hits
    monkeypatch.setattr(evaluators, "retrieval_hits",
                        lambda *arrays: embedded.append(arrays) or retrieval_hits(*arrays))
    for level in LEVELS:
        embedded.clear()
        exact, stored = (evaluators.retrieval(encoder, str(heldout), level, batch_size=64)
                         for encoder in (CLIPEncoder(*args), StoredTexts(*args)))
        (images, texts, text_of_image), (same_images, stored_texts, _) = embedded
        assert exact["items"] > 90 and np.array_equal(images, same_images)
        scores, stored_scores = images @ texts.T, images @ stored_texts.T
        assert np.abs(stored_scores - scores).max() < 2.5e-4
        relevant = text_of_image[:, None] == np.arange(len(texts))
        for way, a, b, rel in (("i2t", scores, stored_scores, relevant), ("t2i", scores.T, stored_scores.T, relevant.T)):
            (hits, tied), stored_hits = hits_and_ties(a, rel), recall_at_k(b, rel)
            assert [exact[f"{way}_r{k}"] for k in KS] == hits.mean(axis=0).tolist()  # the evaluator's numbers
            assert [stored[f"{way}_r{k}"] for k in KS] == stored_hits.mean(axis=0).tolist()
            assert (stored_hits == hits)[~tied].all() and tied.any(axis=1).mean() < 0.02, (level, way)
