"""python -m zoomin_jax.evaluate --workdir RUN[/STEP] [--config configs/X.py[:arg]]
python -m zoomin_jax.evaluate --model MODEL_DIR --config configs/X.py[:arg]

Runs the evaluators of a config (zoomin_jax.evaluators; default: those of the config the run saved)
on a trained run's checkpoint or a model directory, prints each metric and writes them as JSON, with
the item settings each retrieval kept its items by: a run's own config.data's (training's), else
those of --config's data.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

import jax

from zoomin_jax import run_dir, sharding
from zoomin_jax.encoder import CLIPEncoder
from zoomin_jax.errors import UserError
from zoomin_jax.evaluators import retrieval_items, run_evaluators


def main(workdir: str | None, model_src: str | None, config, out: str | None) -> int:
    logging.set_verbosity(logging.WARNING)
    src = workdir or model_src
    if not src or (model_src and config is None):
        print("error: pass --workdir RUN[/STEP], or --model DIR with --config", file=sys.stderr)
        return 1
    try:
        sharding.initialize_distributed()  # on a pod every process runs this command and embeds its share
        model = run_dir.load(src)
        config = config or model.config
        if not config.get("evals"):
            raise UserError("the config declares no evaluators (config.evals); pass --config with some")
        data = (model.config or config).get("data")
        encoder = CLIPEncoder(model.cfg, model.params, model.preprocess_cfg)
        metrics = run_evaluators(config.evals, encoder, progress=True, data=data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if jax.process_index():  # every process has the metrics; one prints and writes them
        return 0
    for key, value in metrics.items():
        print(f"{key} {value:.4f}")
    out = out or (run_dir.workdir_of(src) / f"eval-{model.step}.json" if workdir else None)
    if out:
        items = retrieval_items(config.evals, data)
        epath.Path(out).write_text(json.dumps({"src": str(src), "step": model.step, **metrics,
                                               "heldout_items": items}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    _WORKDIR = flags.DEFINE_string("workdir", None, "the training run to read: WORKDIR (latest step) or WORKDIR/STEP")
    _MODEL = flags.DEFINE_string("model", None, "a model directory (convert import) instead of a training run")
    _CONFIG = config_flags.DEFINE_config_file("config", None, "a config whose evaluators to run (default: the run's)")
    _OUT = flags.DEFINE_string("out", None, "JSON file for the metrics (default: WORKDIR/eval-STEP.json for runs)")
    app.run(lambda argv: sys.exit(main(_WORKDIR.value, _MODEL.value, _CONFIG.value, _OUT.value)))
