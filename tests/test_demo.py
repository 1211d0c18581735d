"""The README's main command at a small size: every stage runs, the table and the files it names exist."""
import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("-m", "zoomin_jax.demo", "--out", str(out), "--seeds", "0", "--figures", "40",
                     "--heldout", "12", "--steps", "6")
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.strip().startswith("figure R@1"))):]
    assert [line.split()[0] for line in table[1:5]] == ["figure-only", "figure-only", "zoom-in", "zoom-in"]
    results = json.loads((out / "results.json").read_text())
    for variant in ("figure_only", "zoomin"):
        metrics = results[variant]["0"]
        assert metrics["step"] == 6
        assert all(0 <= metrics[f"heldout/{level}/i2t_r1"] <= 1 for level in ("figure", "panel", "region"))
    assert (out / "gallery" / "index.html").exists() and (out / "open_clip" / "open_clip_config.json").exists()
    assert list((out / "records").glob("records-*.array_record"))
    assert list((out / "runs" / "zoomin-seed0" / "tensorboard").iterdir())
    verify = (out / "demo.log").read_text()
    assert verify.count(" ok\n") >= 2  # convert verify: image and text embeddings match open_clip's
    header = "| task | metric | n | initial | figure-only | zoom-in | figure-only − initial | zoom-in − initial |"
    assert header in lines
    benchmark = json.loads((out / "benchmark" / "benchmark.json").read_text())
    assert {name: task["status"] for name, task in benchmark["tasks"].items()} == {
        "panel2patch_heldout": "ok", "breastmnist": "ok", "pneumoniamnist": "ok"}
    # The benchmark reads the runs back from their checkpoints: the zoom-in run's held-out retrieval is
    # the one its last evaluation during training logged (same items: the demo config's are the defaults).
    heldout = benchmark["tasks"]["panel2patch_heldout"]["metrics"]
    for level in ("figure", "panel", "region"):
        assert heldout[f"{level}/i2t_r1"]["n"] == results["zoomin"]["0"][f"heldout/{level}/items"]
        for key in ("i2t_r1", "t2i_r5"):
            assert heldout[f"{level}/{key}"]["models"]["zoom-in"]["value"] == pytest.approx(
                results["zoomin"]["0"][f"heldout/{level}/{key}"], abs=1e-9)
    assert benchmark["tasks"]["pneumoniamnist"]["metrics"]["top1"]["n"] == 624
