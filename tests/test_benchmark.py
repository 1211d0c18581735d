"""python -m zoomin_jax.benchmark: two models over a suite of the real MedMNIST sets and the 10 real
MedICaT figures of ../shared/data and synthetic held-out records, against the evaluators it reuses
and against clip_benchmark (the field's harness) on the same data; its statistics on hand-made cases."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import zoomin_jax
from zoomin_jax import evaluators, zeroshot
from zoomin_jax.benchmark import stats
from zoomin_jax.benchmark.__main__ import main as benchmark_main
from zoomin_jax.convert.__main__ import main as convert_main
from zoomin_jax.encoder import CLIPEncoder, load_clip
from conftest import DATA as SHARED, run_cli

MEDICAT = SHARED / "figures" / "medicat"


# --- statistics on hand-made cases -------------------------------------------------------------

def test_metrics_on_a_hand_made_case():
    # recalls 2/3 (class 0) and 1/1 (class 1)
    assert stats.balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]).value() == pytest.approx(5 / 6, abs=1e-15)
    assert stats.mean_of([1, 0, 1, 1]).value() == 0.75
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    scores = np.array([[0.9, 0.1], [0.5, 0.2], [0.5, 0.3], [0.1, 0.4]])
    # class 0: positives 0.9, 0.5 vs negatives 0.5, 0.1 -> (1 + 1 + 0.5 + 1) / 4; class 1: perfect
    assert stats.mean_auc(labels, scores).value() == pytest.approx((0.875 + 1.0) / 2, abs=1e-15)
    # class 0 ranked 0.9 (+), 0.5 (-), 0.5 (+), 0.1 (-): precisions 1 and 2/3; class 1: 1 and 1
    assert stats.mean_average_precision(labels, scores).value() == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2, abs=1e-15)


def test_bootstrap_intervals_and_paired_differences():
    constant = stats.mean_of(np.ones(50))
    (own,), () = stats.compare([constant], 200, seed=0)
    assert (own.value, own.low, own.high) == (1.0, 1.0, 1.0)
    # Two units 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4.
    (own,), () = stats.compare([stats.mean_of([0.0, 1.0])], 4000, seed=0)
    assert (own.value, own.low, own.high) == (0.5, 0.0, 1.0)
    # The same results twice: the paired difference is exactly 0 in every resample; a model right
    # on 30 more of 100 units than another is +0.3 with an interval around it that excludes 0.
    rng = np.random.default_rng(0)
    first = rng.random(100) < 0.5
    second = first.copy()
    second[np.flatnonzero(~first)[:30]] = True
    own, diffs = stats.compare([stats.mean_of(first), stats.mean_of(first), stats.mean_of(second)], 500, seed=1)
    assert (diffs[0].value, diffs[0].low, diffs[0].high) == (0.0, 0.0, 0.0)
    assert diffs[1].value == pytest.approx(0.3) and 0.2 < diffs[1].low < 0.3 < diffs[1].high < 0.4
    assert own[2].low < own[2].value < own[2].high


# --- the command on real data --------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random test-tiny models: A an open_clip weights file, B a converted model directory (seed 37
    predicts both classes of BreastMNIST and PneumoniaMNIST, see test_zeroshot.py)."""
    tmp = tmp_path_factory.mktemp("models")
    cfg = zoomin_jax.get_preset("test-tiny").open_clip_cfg
    for name, seed in (("a", 38), ("b", 37)):
        torch.manual_seed(seed)
        torch.save(open_clip.CLIP(**cfg).eval().state_dict(), tmp / f"{name}.bin")
    assert convert_main(["import", "--src", str(tmp / "b.bin"), "--model", "test-tiny", "--out", str(tmp / "b")]) == 0
    return tmp


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    run_cli("annotate", "synth", "--out", str(out), "--num", "8", "--seed", "200", "--truth-records")
    return out / "truth" / "records-*.array_record"


def test_two_models_over_real_data_and_a_missing_task(models, heldout, tmp_path, capsys):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": [
        {"name": "breastmnist"},
        {"name": "pneumoniamnist", "limit": 120},
        {"name": "medicat", "path": "figures/medicat/sample.jsonl"},
        {"name": "panel2patch_heldout", "path": str(heldout)},
        {"name": "dermamnist"},
    ]}))
    out = tmp_path / "out"
    assert benchmark_main(["--model", f"A={models / 'a.bin'}", "--model", f"B={models / 'b'}",
                           "--open-clip-model", "test-tiny", "--suite", str(suite), "--data-root", str(SHARED),
                           "--out", str(out), "--bootstrap", "200"]) == 0
    err = capsys.readouterr().err
    results = json.loads((out / "benchmark.json").read_text())
    tasks = results["tasks"]
    assert [name for name, task in tasks.items() if task["status"] == "skipped"] == ["dermamnist"]
    skip_line = next(line for line in err.splitlines() if line.startswith("skipped dermamnist:"))
    assert "medmnist/dermamnist.npz not found" in skip_line and "python -m medmnist download" in skip_line

    encoders = {"A": CLIPEncoder(*_open_clip_model(models / "a.bin")), "B": load_clip(models / "b")}
    for label, encoder in encoders.items():
        for name, limit in (("breastmnist", None), ("pneumoniamnist", 120)):
            task = zeroshot.TASKS[name]
            examples = list(zeroshot.npz_examples(SHARED / "medmnist" / f"{name}.npz", "test"))[:limit]
            expected = zeroshot.evaluate(encoder, examples, task.classnames, task.templates)
            metrics = tasks[name]["metrics"]
            assert metrics["top1"]["n"] == expected["count"]
            assert metrics["top1"]["models"][label]["value"] == pytest.approx(expected["top1"], abs=1e-12)
            assert metrics["balanced_accuracy"]["models"][label]["value"] == pytest.approx(
                expected["balanced_accuracy"], abs=1e-12)
        expected = _brute_force_recall(encoder)
        for metric, value in expected.items():
            assert tasks["medicat"]["metrics"][metric]["models"][label]["value"] == pytest.approx(value, abs=1e-12)
        for level in ("figure", "panel", "region"):
            found = evaluators.retrieval(encoder, str(heldout), level)
            for k in evaluators.KS:
                entry = tasks["panel2patch_heldout"]["metrics"][f"{level}/i2t_r{k}"]
                assert entry["n"] == found["items"]
                assert entry["models"][label]["value"] == pytest.approx(found[f"i2t_r{k}"], abs=1e-12)

    table = (out / "benchmark.md").read_text()
    assert table.splitlines()[0] == "| task | metric | n | A | B | B − A |"
    for name, task in tasks.items():
        for metric, entry in task.get("metrics", {}).items():
            a, b, diff = entry["models"]["A"], entry["models"]["B"], entry["diff"]["B"]
            assert diff["value"] == pytest.approx(b["value"] - a["value"], abs=1e-12)
            for interval in (a, b, diff):
                assert interval["ci95"][0] <= interval["value"] <= interval["ci95"][1]
            assert f"| {name} | {metric} | {entry['n']} | {a['value']:.3f} (" in table
    assert "- dermamnist: " in table


def _open_clip_model(path):
    from zoomin_jax.convert import open_clip_source
    model = open_clip_source.read(path, "test-tiny")
    return model.cfg, model.params, model.preprocess_cfg


def _brute_force_recall(encoder) -> dict[str, float]:
    """R@1 and R@5 both ways over the 10 MedICaT figures, one query at a time (distinct captions)."""
    rows = [json.loads(line) for line in (MEDICAT / "sample.jsonl").read_text().splitlines()]
    images = np.stack([encoder.preprocess(Image.open(MEDICAT / f"{row['pdf_hash']}_{row['fig_uri']}"))
                       for row in rows])
    image_emb = encoder.encode_image(images, normalize=True)
    text_emb = encoder.encode_text(zoomin_jax.tokenize([row["s2_caption"] for row in rows]), normalize=True)
    assert len({row["s2_caption"] for row in rows}) == len(rows)
    scores = image_emb @ text_emb.T
    found = {}
    for k in (1, 5):
        found[f"i2t_r{k}"] = np.mean([(scores[q] > scores[q, q]).sum() < k for q in range(len(rows))])
        found[f"t2i_r{k}"] = np.mean([(scores[:, q] > scores[q, q]).sum() < k for q in range(len(rows))])
    return found


def test_clip_benchmark_gives_the_same_zero_shot_accuracy(models, tmp_path):
    """The field's harness on the exported open_clip model: clip_benchmark (PyPI) on BreastMNIST's
    test split written as a folder dataset, with our templates, gives our top-1 and balanced accuracy."""
    from clip_benchmark.metrics import zeroshot_classification
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    task = zeroshot.TASKS["breastmnist"]
    images, labels = zeroshot.read_npz_split(SHARED / "medmnist" / "breastmnist.npz", "test")
    folder = tmp_path / "breast"
    for n, (image, label) in enumerate(zip(images, labels)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"class{label}" / f"{n:04d}.png")

    assert convert_main(["export", "--src", str(models / "b"), "--out", str(tmp_path / "hub")]) == 0
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=transform), batch_size=64)
    # clip_benchmark's evaluate() does these steps; its top-k helper fails under numpy 2.4 (float() of
    # a 1-element array), so top-1 is taken from its logits here, as that helper would.
    classifier = zeroshot_classification.zero_shot_classifier(
        model.eval(), open_clip.get_tokenizer(f"local-dir:{tmp_path / 'hub'}"), list(task.classnames),
        [template.replace("{}", "{c}") for template in task.templates], "cpu", amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    predicted = logits.argmax(axis=1)
    theirs = {"acc1": float((predicted == target).double().mean()),
              "mean_per_class_recall": balanced_accuracy_score(target, predicted)}

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": [{"name": "breast_folder", "kind": "zeroshot", "format": "folder",
                                            "path": str(folder), "classnames": list(task.classnames),
                                            "templates": list(task.templates)}]}))
    assert benchmark_main(["--model", f"B={models / 'b'}", "--suite", str(suite), "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--bootstrap", "10"]) == 0
    ours = json.loads((tmp_path / "out" / "benchmark.json").read_text())["tasks"]["breast_folder"]["metrics"]
    assert ours["top1"]["n"] == len(labels) == 156
    assert ours["top1"]["models"]["B"]["value"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["balanced_accuracy"]["models"]["B"]["value"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert len(set(predicted.tolist())) == 2  # a model that predicts both classes: a real comparison


def test_csv_and_webdataset_layouts_give_the_numbers_of_folders_and_jsonl(models, tmp_path):
    """The same images laid out four ways: class folders and a CSV of path,label (labels as names and
    as indexes); MedICaT's JSONL and WebDataset shards of its pairs."""
    import tarfile

    task = zeroshot.TASKS["breastmnist"]
    images, labels = zeroshot.read_npz_split(SHARED / "medmnist" / "breastmnist.npz", "test")
    rows = ["path,label"]
    for n, (image, label) in enumerate(zip(images[:40], labels[:40])):
        path = tmp_path / "breast" / f"class{label}" / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        rows.append(f"breast/class{label}/{n:04d}.png,{task.classnames[label] if n % 2 else label}")
    (tmp_path / "breast.csv").write_text("\n".join(rows) + "\n")
    lines = [json.loads(line) for line in (MEDICAT / "sample.jsonl").read_text().splitlines()]
    for shard, part in enumerate((lines[:6], lines[6:])):
        with tarfile.open(tmp_path / f"medicat-{shard}.tar", "w") as tar:
            for n, row in enumerate(part):
                tar.add(MEDICAT / f"{row['pdf_hash']}_{row['fig_uri']}", arcname=f"{shard}{n:03d}.png")
                caption = tmp_path / f"{shard}{n:03d}.txt"
                caption.write_text(row["s2_caption"])
                tar.add(caption, arcname=caption.name)
    prompts = {"classnames": list(task.classnames), "templates": list(task.templates)}
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": [
        {"name": "folder", "kind": "zeroshot", "format": "folder", "path": "breast", **prompts},
        {"name": "csv", "kind": "zeroshot", "format": "csv", "path": "breast.csv", **prompts},
        {"name": "medicat", "path": str(MEDICAT / "sample.jsonl")},
        {"name": "wds", "kind": "retrieval", "format": "wds", "path": "medicat-*.tar"}]}))
    assert benchmark_main(["--model", f"B={models / 'b'}", "--suite", str(suite), "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--bootstrap", "10"]) == 0
    tasks = json.loads((tmp_path / "out" / "benchmark.json").read_text())["tasks"]

    def values(name):  # intervals differ: each task draws its own resamples
        return {metric: (entry["n"], entry["models"]["B"]["value"]) for metric, entry in tasks[name]["metrics"].items()}

    assert values("csv") == values("folder") and values("csv")["top1"][0] == 40
    assert values("wds") == values("medicat") and values("wds")["i2t_r1"][0] == 10


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "kind": "zeroshot", "format": "npz", "path": "a.npz", "colour": 1}, "unknown key 'colour'"),
    ({"name": "x", "kind": "retrieval", "format": "npz", "path": "a"}, "has kind 'retrieval' and format 'npz'"),
    ({"name": "x", "kind": "zeroshot", "format": "npz", "path": "a.npz"}, "needs classnames and templates"),
    ({"name": "x"}, "is missing a field"),
])
def test_a_bad_suite_is_one_line_naming_the_task(tmp_path, capsys, entry, message):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": [entry]}))
    assert benchmark_main(["--model", "m", "--suite", str(suite), "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {suite}: ") and message in err and "\n" not in err


def test_a_multi_label_task_scores_as_sklearn_and_clip_benchmark_do(models, tmp_path):
    """ChestMNIST's layout (labels [N, 14]) made of PneumoniaMNIST's real test images, pneumonia in its
    column and the other findings absent: mean AUC over the one class with both outcomes is sklearn's
    AUC of it; mean AP is clip_benchmark's (a class without positives counts 0)."""
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
    from sklearn.metrics import roc_auc_score

    task = zeroshot.TASKS["chestmnist"]
    images, labels = zeroshot.read_npz_split(SHARED / "medmnist" / "pneumoniamnist.npz", "test")
    images, labels = images[:200], labels[:200]
    multi = np.zeros((len(labels), len(task.classnames)), np.int64)
    multi[:, task.classnames.index("pneumonia")] = labels
    np.savez(tmp_path / "chest.npz", test_images=images, test_labels=multi)
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"tasks": [{"name": "chestmnist", "path": "chest.npz"}]}))
    assert benchmark_main(["--model", f"B={models / 'b'}", "--suite", str(suite), "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--bootstrap", "10"]) == 0
    metrics = json.loads((tmp_path / "out" / "benchmark.json").read_text())["tasks"]["chestmnist"]["metrics"]

    encoder = load_clip(models / "b")
    pixels = np.stack([encoder.preprocess(zeroshot.to_pil(image)) for image in images])
    scores = encoder.encode_image(pixels, normalize=True) @ zeroshot.classifier(encoder, task.classnames, task.templates).T
    column = task.classnames.index("pneumonia")
    assert metrics["mean_auc"]["n"] == 200
    assert metrics["mean_auc"]["models"]["B"]["value"] == pytest.approx(roc_auc_score(labels, scores[:, column]), abs=1e-9)
    expected_ap = float(average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(multi)).mean())
    assert metrics["mean_ap"]["models"]["B"]["value"] == pytest.approx(expected_ap, abs=1e-6)
