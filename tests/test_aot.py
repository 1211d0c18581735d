"""The compile check (python -m zoomin_jax.aot): the training step compiled for absent TPU slices and
H100s (libtpu and the CUDA plugin of the aot extra, on JAX's CPU backend), read against them."""
import jax
import numpy as np
import pytest

from configs.demo_cpu import get_config as demo_config
from zoomin_jax import aot, effective_recipe, run_setup, targets
from zoomin_jax.bench_train import random_batch
from zoomin_jax.data.device import to_global

GiB = 2 ** 30


def small_demo(**data):
    """The demo config with fewer child slots (what the checks read does not need six; compiles faster)."""
    config = demo_config()
    config.data.update(max_panels=2, max_regions=2, **data)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("target", ["v5e-8", "h100x2"])
def test_the_tiny_config_compiles_for_a_tpu_slice_and_two_h100s_and_prints_every_level(target, capsys, tmp_path):
    assert aot.main(small_demo(), target, str(tmp_path / "report.json"), 0.10) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["figure"], ["panel"], ["region"])}
    devices = {"v5e-8": 8, "h100x2": 2}[target]
    for level in ("figure", "panel", "region"):
        assert rows[level][1:3] == ["16", str(16 // devices)], out  # global batch, per device
    report = __import__("json").loads((tmp_path / "report.json").read_text())
    assert [level["level"] for level in report["levels"]] == ["figure", "panel", "region"]
    for level in report["levels"]:
        assert level["fits"] and 0 < level["total_bytes"] < 0.01 * level["hbm_bytes"]
        assert level["collectives"], "a data-parallel step gathers and reduces across devices"
        if target == "v5e-8":  # XLA's TPU FLOP count is close to the hand count of the matmul work
            assert level["xla_flops"] == pytest.approx(level["hand_flops"], rel=0.5)
            assert level["estimate_s"] > 0 and 0 < level["mfu"] < 1
        else:  # no cost analysis from the GPU compiler without a GPU
            assert level["xla_flops"] is None and level["estimate_s"] is None


def huge_region_batch():
    """Region steps alone, 64k regions of 32 x 32 pixels on each of 8 devices: 278 GiB of temporaries."""
    config = small_demo()
    config.cycle = (("region", 1),)
    config.loss_weights = {"region": 1.0}
    config.data.batch_size = {"region": 8 * 2 ** 16}
    return config


@pytest.mark.parametrize("target", ["v5e-8", "h100x2"])
def test_a_step_too_big_for_the_target_exits_non_zero_naming_the_level(target, capsys):
    config = huge_region_batch()
    if target == "h100x2":
        config.data.batch_size = {"region": 2 * 2 ** 16}  # the same per device
    assert aot.main(config, target, None, 0.10) == 1
    err = capsys.readouterr().err
    if target == "v5e-8":  # XLA:TPU refuses to plan it
        assert "error: the region step does not fit the v5e-8's 16.00 GiB HBM per device (XLA: RESOURCE_EXHAUSTED" in err
    else:  # XLA:GPU plans it; the check reads the plan
        assert "error: the region step needs " in err and "of the h100x2's 79.10 GiB HBM free" in err, err
        assert float(err.split("needs ")[1].split(" GiB")[0]) > 0.9 * 79.1


def test_the_compiled_step_is_the_training_step():
    """The check lowers what training lowers: the same text for the same config (over the targets'
    devices and over this machine's 8 CPU devices: the program is the same), and a changed loss weight
    changes both."""
    target = targets.get("v5e-8")

    def lowered_texts(weight: float) -> tuple[str, str]:
        config = small_demo()
        config.loss_weights["panel_region_image"] = weight
        checked = aot.check(config, target, compile_steps=False).lowered["panel"].as_text()
        config = effective_recipe.apply(config, effective_recipe.derive(config, jax.device_count()))
        run = run_setup.setup(config)
        host = random_batch("panel", np.random.default_rng(0), 16, run.dims)
        trained = run.steps["panel"].lower(run.state, run.frozen, to_global(host, run.mesh, run.mesh.axis_names))
        return checked, trained.as_text()

    checked, trained = lowered_texts(0.5)
    checked_changed, trained_changed = lowered_texts(0.25)
    assert checked_changed != checked and trained_changed != trained
    assert strip_locations(checked) == strip_locations(trained)
    assert strip_locations(checked_changed) == strip_locations(trained_changed)


def strip_locations(text: str) -> str:
    return "\n".join(line.split(" loc(")[0] for line in text.splitlines() if not line.startswith("#loc"))


def test_collectives_are_counted_from_hand_written_hlo():
    hlo = """
  %all-gather.1 = f32[1024,256]{1,0} all-gather(f32[128,256]{1,0} %p0), channel_id=1, dimensions={0}
  %all-reduce.2 = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce(f32[10]{0} %a, bf16[4,4]{1,0} %b), to_apply=%add
  %all-gather-start.3 = (f32[8,2]{1,0}, f32[64,2]{1,0}) all-gather-start(f32[8,2]{1,0} %p1), dimensions={0}
  %all-gather-done.3 = f32[64,2]{1,0} all-gather-done((f32[8,2]{1,0}, f32[64,2]{1,0}) %all-gather-start.3)
  %fusion.4 = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%all-reduce-like
  %reduce-scatter.5 = pred[16]{0} reduce-scatter(pred[128]{0} %m), dimensions={0}, to_apply=%or
"""
    assert aot.collectives(hlo) == {"all-gather": (2, 1024 * 256 * 4 + 64 * 2 * 4),
                                    "all-reduce": (1, 10 * 4 + 16 * 2), "reduce-scatter": (1, 16)}


def test_the_step_time_estimate_says_its_source():
    v5e = targets.get("v5e-8")
    assert aot.estimate({"flops": 1.97e14, "bytes accessed": 1e9, "optimal_seconds": 0.5}, v5e) == (
        0.5, "XLA TPU cost model")
    # A negative cost-model time (today's ViT-L step) falls back to the roofline: 1 s of compute at
    # 197 TFLOP/s against 819 GB / 819 GB/s = 1 s of memory traffic, x2.
    assert aot.estimate({"flops": 1.97e14, "bytes accessed": 2 * 819e9, "optimal_seconds": -178.0}, v5e) == (
        pytest.approx(2.0), "roofline (memory-bound)")
    assert aot.estimate({"flops": 2 * 1.97e14, "bytes accessed": 819e9}, v5e) == (
        pytest.approx(2.0), "roofline (compute-bound)")
    assert aot.estimate(None, targets.get("h100x8"))[0] is None


def test_an_unknown_target_is_refused_naming_the_known_ones(capsys):
    assert aot.main(small_demo(), "v9-1", None, 0.10) == 1
    assert "unknown target 'v9-1'; known: v5e-8, v5e-16, v5e-64" in capsys.readouterr().err


def test_v4_and_v5p_targets_are_one_device_per_chip_as_jax_runs_them():
    """libtpu lists a v4's TensorCores by default, which jax.make_mesh refuses ("requires one device
    per chip"); described as megacore, a v4-8 is 4 devices of 32 GiB and a v5p-128 64 of 95 GiB."""
    from zoomin_jax import sharding
    for name, count, hbm_gib in (("v4-8", 4, 32), ("v5p-128", 64, 95)):
        target = targets.get(name)
        devices = target.devices()
        assert len(devices) == count and target.hbm_bytes == hbm_gib * 2 ** 30
        assert sharding.make_mesh((("data", -1), ("fsdp", 1)), devices).devices.size == count
