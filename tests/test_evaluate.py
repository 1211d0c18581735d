"""Retrieval metrics against a plain reference (ties, repeated texts), the same numbers on 1 and 8
devices, evaluators during training and standalone, and a trained run exported to open_clip."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from annotate.synth import synthesize, write_truth_records
from conftest import DATA, REPO, run_cli, two_processes
from zoomin_jax import run_dir, sharding
from zoomin_jax.convert.__main__ import main as convert_main
from zoomin_jax.encoder import CLIPEncoder
from zoomin_jax.evaluators import recall_at_k, retrieval, retrieval_hits, run_evaluators, zeroshot_eval
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset
from zoomin_jax.model_dir import default_preprocess_cfg


def reference_hits(scores, relevant, k):
    """Loop version: the best relevant item's position when ties are ranked worst-case."""
    hits = []
    for row, rel in zip(scores, relevant):
        best = max(s for s, r in zip(row, rel) if r)
        ahead = sum(1 for s, r in zip(row, rel) if not r and s >= best)
        hits.append(ahead < k)
    return np.array(hits)


def test_recall_at_k_hand_made_with_ties():
    scores = np.array([[0.9, 0.5, 0.1],    # relevant item 0 is first
                       [0.5, 0.5, 0.2],    # relevant item 1 tied with item 0: counts as second
                       [0.3, 0.3, 0.3],    # all tied: third
                       [0.8, 0.1, 0.9]])   # relevant items 0 and 1: the better (0) is second
    relevant = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], bool)
    hits = recall_at_k(scores, relevant, ks=(1, 2, 3))
    assert hits.tolist() == [[True, True, True], [False, True, True], [False, False, True], [False, True, True]]


def test_retrieval_hits_equal_a_loop_reference():
    rng = np.random.default_rng(0)
    images, texts = 40, 12
    text_of_image = rng.integers(0, texts, images)  # texts repeat across images
    text_of_image[:texts] = np.arange(texts)        # every text has an image
    # Rounded scores make ties common.
    image_emb = np.round(rng.normal(size=(images, 8)), 1).astype(np.float32)
    text_emb = np.round(rng.normal(size=(texts, 8)), 1).astype(np.float32)
    text_emb[3] = text_emb[4]                       # two texts with the same embedding
    got = retrieval_hits(image_emb, text_emb, text_of_image, chunk=7)
    i2t_relevant = text_of_image[:, None] == np.arange(texts)[None]
    for n, k in enumerate((1, 5, 10)):
        assert np.array_equal(got["i2t"][:, n], reference_hits(image_emb @ text_emb.T, i2t_relevant, k))
        assert np.array_equal(got["t2i"][:, n], reference_hits(text_emb @ image_emb.T, i2t_relevant.T, k))
    # Embeddings that cannot tell anything apart retrieve nothing.
    flat = retrieval_hits(np.ones((images, 8), np.float32), np.ones((texts, 8), np.float32), text_of_image)
    assert not flat["i2t"].any() and not flat["t2i"].any()


@pytest.fixture(scope="module")
def truth_records(tmp_path_factory):
    return str(write_truth_records(synthesize(tmp_path_factory.mktemp("synth"), num=24, seed=3)))


@pytest.mark.parametrize("level", ["figure", "panel", "region"])
def test_retrieval_is_the_same_on_1_and_8_devices(truth_records, level):
    cfg = get_preset("test-tiny")
    params = nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    params = jax.tree.map(np.asarray, params)
    found = {}
    for devices in (1, 8):
        mesh = sharding.make_mesh((("data", devices),), devices=jax.devices()[:devices])
        encoder = CLIPEncoder(cfg, params, default_preprocess_cfg(cfg), mesh, batch_size=16)
        found[devices] = retrieval(encoder, truth_records, level, batch_size=10)
    assert found[1] == found[8]
    assert found[1]["items"] > 16  # more than one batch, with a partial last one
    assert 0 <= found[1]["i2t_r1"] <= found[1]["i2t_r5"] <= found[1]["i2t_r10"] <= 1


@pytest.mark.slow
def test_two_processes_each_embed_their_share_and_get_the_metrics_of_one(tmp_path, truth_records):
    """Retrieval and zero-shot on 2 processes x 4 devices: each reads and embeds about half of the
    items, and both get the metrics one process over 8 devices gets."""
    cfg = get_preset("test-tiny")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    encoder = CLIPEncoder(cfg, params, default_preprocess_cfg(cfg), sharding.make_mesh((("data", 8),)), batch_size=16)
    one = retrieval(encoder, truth_records, "panel", batch_size=10)
    spec = dict(type="zeroshot", task="pneumoniamnist", source=f"npz:{DATA / 'medmnist' / 'pneumoniamnist.npz'}",
                split="test", limit=30, batch_size=8)
    one_zeroshot = zeroshot_eval(encoder, ml_collections.ConfigDict(spec))
    results = two_processes("eval_multiprocess.py", truth_records, "panel", json.dumps(spec), out=tmp_path)
    items = int(one["items"])
    assert [r["embedded"] for r in results] == [-(-items // 2), items // 2]
    assert results[0]["calls"] == results[1]["calls"]  # embedding is collective: equal calls, even when empty
    for result in results:
        assert result["metrics"] == pytest.approx(one, abs=1e-6)
        assert result["zeroshot"] == pytest.approx(one_zeroshot, abs=1e-6) and one_zeroshot["count"] == 30
    assert [r["classified"] for r in results] == [15, 15]  # 4 per process per call (8 over 2), 4 calls each
    assert [r["zeroshot_calls"] for r in results] == [4, 4]


def test_zeroshot_evaluator_from_the_config():
    cfg = get_preset("test-tiny")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(CLIP(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    encoder = CLIPEncoder(cfg, params, default_preprocess_cfg(cfg), batch_size=16)
    evals = ml_collections.ConfigDict({"pneumonia": dict(
        type="zeroshot", task="pneumoniamnist", source=f"npz:{DATA / 'medmnist' / 'pneumoniamnist.npz'}",
        split="test", limit=40)})
    metrics = run_evaluators(evals, encoder)
    assert metrics["pneumonia/count"] == 40
    assert 0 <= metrics["pneumonia/balanced_accuracy"] <= 1 and 0 <= metrics["pneumonia/top1"] <= 1


@pytest.mark.slow
def test_trained_run_evaluate_and_export(tmp_path, truth_records, capsys):
    workdir = tmp_path / "run"
    run_cli("-m", "zoomin_jax.train", f"--config=configs/demo_cpu.py:records={truth_records},"
            f"eval_records={truth_records}", f"--workdir={workdir}", "--config.total_steps=6",
            "--config.evals.heldout.every=3", "--config.evals.heldout.levels=('panel',)")
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    during = {entry["step"]: entry for entry in logged if entry["level"] == "eval"}
    assert sorted(during) == [3, 6]
    result = run_cli("-m", "zoomin_jax.evaluate", f"--workdir={workdir}")
    written = json.loads((workdir / "eval-6.json").read_text())
    assert written["step"] == 6 and "heldout/panel/i2t_r1" in result.stdout
    # Held-out items are kept as the run's training kept its own (config.data), and both files say so.
    kept = {"heldout": {"drop_panel_kinds": [], "min_box_side": 8.0, "region_margin": 0.1}}
    assert written["heldout_items"] == kept
    assert json.loads((workdir / "recipe.json").read_text())["heldout_items"] == kept
    # Standalone on the final checkpoint gives what training logged at that step.
    for key in ("heldout/panel/i2t_r1", "heldout/panel/t2i_r5", "heldout/panel/items"):
        assert written[key] == during[6][key]

    # Export: trained leaves from the checkpoint, frozen ones from the init; open_clip loads it
    # strictly and its embeddings match the Flax model's.
    # (The conversion command's main() in this process: tests/test_convert_parity.py starts the commands.)
    exported = tmp_path / "exported.safetensors"
    assert convert_main(["export", "--src", str(workdir / "6"), "--out", str(exported)]) == 0
    capsys.readouterr()
    assert convert_main(["verify", "--flax", str(workdir), "--open-clip", str(exported), "--model", "test-tiny"]) == 0
    verified = capsys.readouterr().out
    assert verified.count(" ok") == 2, verified
    trained = traverse_util.flatten_dict(run_dir.load(workdir).params)
    init = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(CLIP(get_preset("test-tiny"), rngs=nnx.Rngs(0)),
                                                                   nnx.Param)))
    frozen_block, trained_block = ("visual", "transformer", "resblocks", 0), ("visual", "transformer", "resblocks", 1)
    for path, leaf in trained.items():
        if path[:4] == frozen_block:
            assert np.array_equal(leaf, np.asarray(init[path])), path
        if path[:4] == trained_block and path[-1] == "kernel":
            assert not np.allclose(leaf, np.asarray(init[path])), path


def test_the_paper_config_declares_its_evaluators():
    import importlib.util
    spec = importlib.util.spec_from_file_location("paper", REPO / "configs" / "zoomin_vitl14.py")
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    assert dict(paper.get_config("records=r").evals) == {}
    evals = paper.get_config("records=r,eval_records=held/*.array_record,zeroshot_data_dir=tfds").evals
    assert evals.heldout.type == "retrieval" and tuple(evals.heldout.levels) == ("figure", "panel", "region")
    assert {name: (e.type, e.source) for name, e in evals.items() if name != "heldout"} == {
        "breastmnist": ("zeroshot", "tfds:breastmnist"), "pneumoniamnist": ("zeroshot", "tfds:pneumoniamnist")}
