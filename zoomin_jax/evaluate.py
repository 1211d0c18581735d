"""python -m zoomin_jax.evaluate --workdir RUN[/STEP] [--config configs/X.py[:arg]]
python -m zoomin_jax.evaluate --model MODEL_DIR --config configs/X.py[:arg]

Runs the evaluators of a config (zoomin_jax.evaluators; default: those of the config the run saved)
on a trained run's checkpoint or a model directory, prints each metric and writes them as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging

from zoomin_jax import run_dir, sharding
from zoomin_jax.errors import UserError
from zoomin_jax.evaluators import Embedder, run_evaluators
from zoomin_jax.train import CONFIG, WORKDIR  # its --config and --workdir flags serve here too

_MODEL = flags.DEFINE_string("model", None, "a model directory (convert import) instead of a training run")
_OUT = flags.DEFINE_string("out", None, "JSON file for the metrics (default: WORKDIR/eval-STEP.json for runs)")


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    src = WORKDIR.value or _MODEL.value
    if not src or (_MODEL.value and CONFIG.value is None):
        print("error: pass --workdir RUN[/STEP], or --model DIR with --config", file=sys.stderr)
        return 1
    try:
        model = run_dir.load(src)
        config = CONFIG.value or model.config
        if not config.get("evals"):
            raise UserError("the config declares no evaluators (config.evals); pass --config with some")
        embedder = Embedder(model.cfg, model.params, model.preprocess_cfg, sharding.make_mesh((("data", -1),)))
        metrics = run_evaluators(config.evals, embedder, progress=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for key, value in metrics.items():
        print(f"{key} {value:.4f}")
    out = _OUT.value or (run_dir.workdir_of(src) / f"eval-{model.step}.json" if WORKDIR.value else None)
    if out:
        Path(out).write_text(json.dumps({"src": str(src), "step": model.step, **metrics}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
