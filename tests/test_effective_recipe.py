"""The recipe a config trains on a slice (zoomin_jax.effective_recipe): the global batch is the
recipe, the per-device batch is derived, and any departure is a stated rule."""
import math

import numpy as np
import pytest

from configs.zoomin_vitl14 import get_config as paper_config
from configs.demo_cpu import get_config as demo_config
from zoomin_jax import effective_recipe
from zoomin_jax.errors import UserError

# The paper's data: 350k figures (1,094 figure batches of 320 an epoch).
ITEMS = {"figure": 350_000, "panel": 1_300_000, "region": 1_600_000}


def test_the_paper_recipe_is_the_same_on_8_devices_and_on_64():
    on_8, on_64 = (effective_recipe.derive(paper_config(), devices, ITEMS) for devices in (8, 64))
    assert on_8.batch == on_64.batch == {"figure": 320, "panel": 320, "region": 320}
    assert (on_8.per_device("panel"), on_64.per_device("panel")) == (40, 5)
    assert on_8.lr == on_64.lr == 1e-5 and on_8.warmup_steps == on_64.warmup_steps == 1000
    assert on_8.total_steps == on_64.total_steps == 20 * 1094 * 3
    assert on_8.steps == on_64.steps == {level: 20 * 1094 for level in ITEMS}
    assert on_8.passes("figure") == on_64.passes("figure") == pytest.approx(20 * 1094 * 320 / 350_000)
    assert on_64.passes("region") == pytest.approx(20 * 1094 * 320 / 1_600_000)
    lines = "\n".join(on_64.lines())
    assert "recipe on 64 devices: lr 1e-05, warm-up 1000 of 65640 steps (1.5%)" in lines
    assert "panel: global batch 320, 5 per device, 21880 steps, 5.39 passes over its 1300000 items" in lines


def test_a_batch_that_does_not_divide_the_devices_is_refused_or_rounded_by_the_stated_rule():
    config = paper_config()
    with pytest.raises(UserError, match=r"config.data.batch_size.figure=320 does not divide over 128 devices: "
                                        r"state a multiple \(256 or 384\) or set config.batch_rounding='nearest'"):
        effective_recipe.derive(config, 128, ITEMS)
    config.batch_rounding = "nearest"
    stated = effective_recipe.derive(config, 8, ITEMS)
    rounded = effective_recipe.derive(config, 128, ITEMS)
    assert rounded.batch == {level: 256 for level in ITEMS} and rounded.per_device("figure") == 2
    assert rounded.lr == pytest.approx(1e-5 * math.sqrt(256 / 320))  # config.lr_scaling = "sqrt"
    # Epochs are the length: more, smaller steps; the warm-up keeps its share of the run.
    assert rounded.total_steps == 20 * math.ceil(350_000 / 256) * 3
    assert rounded.warmup_steps == round(1000 * rounded.total_steps / stated.total_steps) == 1250
    assert rounded.passes("figure") == pytest.approx(stated.passes("figure"), rel=2e-3)
    assert "(stated 1e-05, batches by batch_rounding=nearest)" in rounded.lines()[0]
    config.lr_scaling = "linear"
    assert effective_recipe.derive(config, 128, ITEMS).lr == pytest.approx(1e-5 * 256 / 320)
    # Fewer devices than examples never round to zero.
    config.data.batch_size = dict(figure=3, panel=3, region=3)
    assert effective_recipe.derive(config, 8, ITEMS).batch["figure"] == 8


def test_a_run_of_stated_steps_keeps_them_and_counts_each_levels_share():
    config = demo_config()  # total_steps=450, the zoom-in cycle figure -> panel -> region
    recipe = effective_recipe.derive(config, 8)
    assert recipe.total_steps == 450 and recipe.warmup_steps == 6 and recipe.steps == dict.fromkeys(ITEMS, 150)
    assert recipe.passes("figure") is None  # the records were not read
    config.cycle = (("figure", 2), ("panel", 1))
    config.total_steps = 10  # 3 full cycles and a figure step
    assert effective_recipe.derive(config, 8).steps == {"figure": 7, "panel": 3}
    config.cycle = (("joint", 1),)
    assert effective_recipe.derive(config, 8).steps == dict.fromkeys(ITEMS, 10)
    applied = effective_recipe.apply(config, effective_recipe.derive(config, 8))
    assert applied.total_steps == 10 and applied.data.batch_size.to_dict() == dict.fromkeys(ITEMS, 16)


def test_a_level_without_a_batch_size_and_unknown_rules_are_refused():
    config = demo_config()
    del config.data.batch_size["panel"]
    with pytest.raises(UserError, match=r"config.data.batch_size.panel is not set: give the global batch of every "
                                        r"level the cycle trains \(figure, panel, region\)"):
        effective_recipe.derive(config, 8)
    config = demo_config()
    config.batch_rounding = "up"
    with pytest.raises(UserError, match="config.batch_rounding='up' is not one of none, nearest"):
        effective_recipe.derive(config, 8)
    config = paper_config()
    with pytest.raises(UserError, match="config.total_steps is not set and the records were not read"):
        effective_recipe.derive(config, 8)


def test_child_slots_are_stated_or_sized_from_the_child_counts_or_padded():
    """Figures holding 1 or 2 kept panels, half each: 40 per device have a total of 40-80, median
    60; its 95th percentile is 65 (binomial(40, 1/2): P(<= 64) = 0.919, P(<= 65) = 0.960)."""
    counts = {"figure": np.bincount([1, 2] * 50), "panel": np.bincount([0] * 100)}
    on_8 = effective_recipe.derive(paper_config(), 8, ITEMS, counts)
    assert on_8.child_slots == {"figure": 65, "panel": 1}
    assert "figure: global batch 320, 40 per device, 21880 steps" in "\n".join(on_8.lines())
    assert ("40 per device, 21880 steps, 20.00 passes over its 350000 items, 65 panel slots per device "
            "(p95 of 40 examples' total in the records, median 1.5 each; padded: 240)") in "\n".join(on_8.lines())
    config = paper_config()
    config.data.child_slots.figure = 70
    assert effective_recipe.derive(config, 8, ITEMS, counts).child_slots["figure"] == 70
    assert effective_recipe.derive(paper_config(), 64, ITEMS).child_slots == {"figure": 30, "panel": 20}
    assert dict(effective_recipe.apply(paper_config(), on_8).data.child_slots) == {"figure": 65, "panel": 1}


def test_a_hardware_preset_trains_40_per_device_with_the_lr_scaled_from_the_papers_batch():
    v5e = effective_recipe.derive(paper_config("hardware=v5e"), 64, ITEMS)
    assert v5e.batch == {level: 2560 for level in ITEMS} and v5e.per_device("panel") == 40
    assert v5e.lr == pytest.approx(1e-5 * math.sqrt(8)) and v5e.warmup_steps == 125  # 1,000 x 8,220 / 65,640
    assert v5e.total_steps == 20 * 137 * 3  # 350k figures are 137 batches of 2,560
    assert "lr 2.828e-05 (stated 1e-05, batches by per_device_batch=40)" in v5e.lines()[0]
    assert "figure: global batch 2560 (stated 320), 40 per device" in v5e.lines()[2]
    assert effective_recipe.derive(paper_config("hardware=v4"), 32, ITEMS).batch["figure"] == 1280  # a v4-64
    h100 = paper_config("hardware=h100")
    assert (h100.compute_dtype, h100.attention, h100.per_device_batch) == ("bfloat16", "xla", 40)
    on_8 = effective_recipe.derive(h100, 8, ITEMS)
    assert on_8.batch["figure"] == 320 and on_8.lr == 1e-5 and on_8.warmup_steps == 1000  # the paper's
    with pytest.raises(ValueError, match="expected one of v5e, v4, v5p, h100"):
        paper_config("hardware=a100")
