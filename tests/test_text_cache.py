"""The frozen-text cache: one per run, every distinct text embedded exactly once over all processes."""
import json

import numpy as np
import pytest

from annotate.synth import synthesize, write_truth_records
from conftest import two_processes
from zoomin_jax.data import text_cache
from zoomin_jax.data.source import RecordSource


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return str(write_truth_records(synthesize(tmp_path_factory.mktemp("synth"), num=24, seed=5)))


def test_each_shared_key_goes_to_exactly_one_of_its_holders():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 400, dtype=np.uint64)
    held = [np.unique(rng.choice(pool, 250)) for _ in range(3)]
    owned = [text_cache.owned_keys(held, p) for p in range(3)]
    everything = np.concatenate(owned)
    assert sorted(everything.tolist()) == sorted(set(np.concatenate(held).tolist()))  # each once
    for keys, holder in zip(owned, held):
        assert np.isin(keys, holder).all() and (np.diff(keys.astype(np.float64)) > 0).all()
    assert min(map(len, owned)) > 0.6 * max(map(len, owned))  # shared keys spread, not all to process 0


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
    for result in results:  # the cache holds what the text tower gives, for every text
        assert result["max_abs_diff"] <= 1e-5 * result["scale"]
