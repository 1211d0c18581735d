"""The paper's recipe as open_clip and the paper have it (issue 28, item 1): logit_scale clamped after
the update rather than capped in the forward, no silent random init, each level's passes stated and
settable, held-out items kept as training keeps them."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from annotate.synth import synthesize, write_truth_records
from configs.demo_cpu import get_config as demo_config
from configs.zoomin_vitl14 import get_config as paper_config
from conftest import REPO
from zoomin_jax import effective_recipe, evaluate, evaluators, losses, model_dir, sharding, train, trainer
from zoomin_jax.batch_layout import Dims
from zoomin_jax.bench_train import random_batch
from zoomin_jax.data import pipeline
from zoomin_jax.data.source import RecordSource
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import get_preset

MODEL = get_preset("test-tiny")
DIMS = Dims.of(32, max_panels=3, max_regions=3)
CAP = np.float32(math.log(100))
# The paper's data: 350k figures, 1.3M panels, 1.6M regions.
ITEMS = {"figure": 350_000, "panel": 1_300_000, "region": 1_600_000}


def tiny_params(logit_scale) -> dict:
    params = nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param))
    params["logit_scale"] = jnp.asarray(logit_scale, jnp.float32)
    return params


def test_logit_scale_has_its_whole_gradient_at_the_cap():
    """At exactly log 100 the gradient is the loss's slope on both sides (a cap in the forward gave
    the upper side none, so a value pushed to the cap could not come back), and the forward is
    open_clip's exp(logit_scale) at any value."""
    params = tiny_params(CAP)
    part = trainer.partition(params, (("visual/(ln_post|proj)(/.*)?", 1.0), ("logit_scale", 1.0), (".*", None)))
    trainable, frozen = trainer.split(params, part)
    batch = random_batch("region", np.random.default_rng(0), 8, DIMS)
    cfg = losses.LossConfig(text_frozen=part.text_frozen, frozen_blocks=part.frozen_blocks)

    @jax.jit
    def loss(trainable, logit_scale):
        trainable = {**trainable, "logit_scale": logit_scale}
        return losses.level_losses(trainer.from_params(MODEL, trainer.merge(trainable, frozen)), batch, "region",
                                   cfg)[0]

    grad = float(jax.jit(jax.grad(loss, argnums=1))(trainable, jnp.float32(CAP)))
    h = 1e-2
    above, below = ((float(loss(trainable, jnp.float32(CAP + d))) - float(loss(trainable, jnp.float32(CAP)))) / d
                    for d in (h, -h))
    assert grad != 0.0 and above == pytest.approx(grad, rel=0.05) and below == pytest.approx(grad, rel=0.05)
    assert float(trainer.from_params(MODEL, tiny_params(5.0)).scale()) == pytest.approx(math.exp(5.0), rel=1e-6)


@pytest.mark.parametrize("start, push, stored", [(CAP - np.float32(1e-3), 1.0, CAP), (np.float32(0.5), -1.0, 0.0),
                                                 (np.float32(2.0), 0.25, 2.25)])
def test_a_step_clamps_the_stored_logit_scale_to_0_and_log_100(start, push, stored):
    """An update that moves every trainable leaf by `push` (a stand-in optimizer, so the direction is
    certain): logit_scale ends at exactly float32(log 100) or 0 where it would leave [0, log 100], at
    start + push inside; the state keeps the layout it was given (jit_train_step's pinned shardings)."""
    params = tiny_params(start)
    part = trainer.partition(params, (("visual/(ln_post|proj)(/.*)?", 1.0), ("logit_scale", 1.0), (".*", None)))
    trainable, frozen = trainer.split(params, part)
    mesh = sharding.make_mesh((("data", 8),))
    trainable = jax.device_put(trainable, sharding.tree_shardings(trainable, mesh, min_size=0))
    frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh, min_size=0))
    tx = optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      lambda grads, state, params=None: (jax.tree.map(
                                          lambda g: jnp.full_like(g, push), grads), state))
    state = jax.jit(trainer.init_state, static_argnums=1)(trainable, tx)
    step = trainer.jit_train_step(trainer.make_train_step(
        MODEL, "region", losses.LossConfig(text_frozen=True, frozen_blocks=part.frozen_blocks), tx,
        optax.constant_schedule(1.0)), state)
    before = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch = jax.device_put(random_batch("region", np.random.default_rng(0), 8, DIMS),
                           NamedSharding(mesh, PartitionSpec("data")))
    state, metrics = step(state, frozen, batch)
    assert not bool(metrics["update_skipped"])
    got = np.asarray(state["params"]["logit_scale"])
    assert got.dtype == np.float32 and got == np.float32(stored)
    np.testing.assert_array_equal(state["params"]["visual"]["proj"], np.asarray(trainable["visual"]["proj"]) + push)
    assert jax.tree.map(lambda leaf: leaf.sharding, state) == before


def test_the_paper_config_refuses_to_train_from_a_random_init_unless_asked(tmp_path, capsys):
    config = paper_config("records=nothing/*.array_record")
    with pytest.raises(UserError, match=r"^config.model_init is not set: give the converted model's directory "
                                        r"\(config argument init=DIR or --config.model_init=DIR\), or the config "
                                        r"argument init=random to train from a random init$"):
        train.check_init(config)
    assert train.main(config, str(tmp_path / "run")) == 1
    assert not (tmp_path / "run").exists()  # refused before the workdir, any device or record is touched
    assert capsys.readouterr().err.startswith("error: config.model_init is not set")
    train.check_init(paper_config("init=random"))
    assert paper_config("init=random").model_init is None
    train.check_init(paper_config("init=/ckpt/bmc_clip"))
    config.model_init = "/ckpt/bmc_clip"  # --config.model_init=DIR
    train.check_init(config)
    train.check_init(demo_config())  # the tiny demo model has no pretrained init to forget


def test_start_up_lines_state_each_levels_items_steps_batch_and_passes():
    """The default: 20 passes over the figures, one step of each level a cycle: the panels and regions
    get 21,880 x 320 / 1.3M = 5.39 and / 1.6M = 4.38 passes."""
    lines = effective_recipe.derive(paper_config(), 8, ITEMS).lines()
    assert lines[1] == ("  cycle: figure 1, panel 1, region 1 steps, repeated; config.epochs=20 passes over the "
                        "figures, the other levels' passes as the cycle's steps give them (config.level_passes sets "
                        "each level's instead)")
    for line, (level, passes) in zip(lines[2:], (("figure", "20.00"), ("panel", "5.39"), ("region", "4.38"))):
        assert line.startswith(f"  {level}: global batch 320, 40 per device, 21880 steps, {passes} passes over its "
                               f"{ITEMS[level]} items")
    # A stated length (the demo's) needs no config.epochs.
    demo = effective_recipe.derive(demo_config(), 8, ITEMS)
    assert demo.total_steps == 450 and demo.lines()[1] == "  cycle: figure 1, panel 1, region 1 steps, repeated; " \
        "config.total_steps=450"
    assert demo.lines()[3].startswith(f"  panel: global batch 16, 2 per device, 150 steps, "
                                      f"{150 * 16 / 1_300_000:.2f} passes over its 1300000 items")


def config_from_flags(*args):
    argv = ["train", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize("hardware, devices", [("", 8), ("v5e", 64)])
def test_level_passes_derive_an_interleaved_cycle_that_makes_each_levels_passes(hardware, devices):
    config = config_from_flags(f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}:hardware={hardware}",
                               "--config.level_passes.figure=20", "--config.level_passes.panel=5",
                               "--config.level_passes.region=4")
    recipe = effective_recipe.derive(config, devices, ITEMS)
    batch = recipe.batch["figure"]
    wanted = {"figure": 20 * 350_000 / batch, "panel": 5 * 1_300_000 / batch, "region": 4 * 1_600_000 / batch}
    assert recipe.total_steps == round(sum(wanted.values()))
    for level, passes in (("figure", 20), ("panel", 5), ("region", 4)):
        assert recipe.passes(level) == pytest.approx(passes, rel=effective_recipe.PASSES_TOLERANCE + 1e-3)
    # Interleaved, not in blocks: a level never takes more than two steps in a row.
    assert {level for level, _ in recipe.cycle} == set(ITEMS) and max(steps for _, steps in recipe.cycle) <= 2
    # The steps the trainer's cycle gives each level are the recipe's.
    applied = effective_recipe.apply(config, recipe)
    cycle = trainer.Cycle(tuple(applied.cycle))
    drawn = {level: 0 for level in ITEMS}
    for step in range(recipe.total_steps):
        drawn[cycle.level_at(step)] += 1
    assert drawn == recipe.steps
    # The warm-up keeps its share of the run at the stated batch.
    stated = effective_recipe.derive(config_from_flags(
        f"--config={REPO / 'configs' / 'zoomin_vitl14.py'}", "--config.level_passes.figure=20",
        "--config.level_passes.panel=5", "--config.level_passes.region=4"), 8, ITEMS)
    assert recipe.warmup_steps == round(1000 * recipe.total_steps / stated.total_steps)
    lines = recipe.lines()
    assert lines[1].startswith("  cycle: figure ") and "steps interleaved, repeated; config.level_passes" in lines[1]
    assert f"{recipe.passes('panel'):.2f} passes over its 1300000 items (config.level_passes.panel=5)" in lines[3]


def test_level_passes_in_an_exact_ratio_and_their_mistakes():
    assert effective_recipe.level_passes_cycle({"figure": 300.0, "panel": 200.0, "region": 100.0}) == (
        ("figure", 1), ("panel", 1), ("figure", 1), ("region", 1), ("panel", 1), ("figure", 1))
    config = paper_config()
    config.level_passes.panel = 5.0
    with pytest.raises(UserError, match=r"config.level_passes.figure is not set: give the passes of every level"):
        effective_recipe.derive(config, 8, ITEMS)
    config = paper_config("variant=figure_only")
    config.level_passes.figure, config.level_passes.panel = 20.0, 5.0
    with pytest.raises(UserError, match=r"config.level_passes.panel=5: give positive passes of the cycle's levels "
                                        r"only \(figure\)"):
        effective_recipe.derive(config, 8, ITEMS)
    config = paper_config("variant=joint")
    config.level_passes.figure, config.level_passes.panel, config.level_passes.region = 20.0, 5.0, 4.0
    with pytest.raises(UserError, match="config.level_passes needs a cycle of separate levels"):
        effective_recipe.derive(config, 8, ITEMS)
    # A stated length wins; the cycle keeps the passes' ratio. Without the records (the compile check)
    # the config's cycle stands.
    config = paper_config()
    config.level_passes.figure, config.level_passes.panel, config.level_passes.region = 20.0, 5.0, 4.0
    config.total_steps = 1000
    recipe = effective_recipe.derive(config, 8, ITEMS)
    assert recipe.total_steps == 1000 and recipe.steps["figure"] > recipe.steps["panel"] > recipe.steps["region"]
    assert effective_recipe.derive(config, 8).cycle == (("figure", 1), ("panel", 1), ("region", 1))


def test_the_paper_configs_heldout_items_are_its_training_items():
    config = paper_config("records=r,eval_records=held/*.array_record")
    assert tuple(config.data.drop_panel_kinds) == () and config.data.context_text_prob == 0.0
    training = train.sample_config(config, get_preset(config.model))
    heldout = evaluators.retrieval_items(config.evals, config.data)["heldout"]
    assert heldout == {key: getattr(training, key) for key in evaluators.ITEM_SETTINGS}
    assert heldout == {"drop_panel_kinds": (), "min_box_side": 16.0, "region_margin": 0.1}


def test_retrieval_scores_the_items_training_keeps_and_says_which(tmp_path):
    """A run that drops chart panels and boxes under 40 px: standalone retrieval of its model keeps
    the panels and regions its training index holds (fewer than SampleConfig's defaults keep), and its
    JSON states the settings."""
    records = str(write_truth_records(synthesize(tmp_path / "synth", num=12, seed=3)))
    config = demo_config(f"records={records},eval_records={records}")
    config.data.drop_panel_kinds, config.data.min_box_side = ("chart",), 40.0
    config.evals.heldout.levels = ("panel", "region")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(CLIP(MODEL, rngs=nnx.Rngs(0)), nnx.Param)))
    model_dir.save(tmp_path / "model", MODEL, params, model_dir.default_preprocess_cfg(MODEL), "test-tiny")
    out = tmp_path / "eval.json"
    assert evaluate.main(None, str(tmp_path / "model"), config, str(out)) == 0
    written = json.loads(out.read_text())
    assert written["heldout_items"] == {"heldout": {"drop_panel_kinds": ["chart"], "min_box_side": 40.0,
                                                    "region_margin": 0.1}}
    source = RecordSource(records)
    for level in ("panel", "region"):
        trained = pipeline.build_index(source, level, train.sample_config(config, MODEL)).total
        default = pipeline.build_index(source, level, evaluators.samples.SampleConfig()).total
        assert written[f"heldout/{level}/items"] == trained < default
