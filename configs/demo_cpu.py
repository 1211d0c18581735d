"""Zoom-in training of the tiny preset on synthetic records, minutes on 2 CPU cores.

  python -m zoomin_jax.train --config configs/demo_cpu.py:RECORDS_GLOB --workdir DIR

RECORDS_GLOB: ArrayRecord shards from `python -m annotate run` (default demo/records/*.array_record).
"""
import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.model = "test-tiny"
    config.model_init = None          # a converted model directory (python -m zoomin_jax.convert import)
    config.seed = 0
    config.total_steps = 60
    # The granularity cycle: (level, steps) repeated.
    config.cycle = (("figure", 1), ("panel", 1), ("region", 1))
    config.mesh = (("data", -1),)
    config.partition_rules = ((".*", "fsdp"),)
    # (regex over param names, lr multiplier or None = frozen); first match wins.
    config.train_rules = (("visual/transformer/resblocks/[1-9]/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
                          ("logit_scale", 1.0), ("text_projection", 1.0), ("transformer/resblocks/.*", 1.0),
                          ("ln_final/.*", 1.0), (".*", None))
    config.optim = dict(lr=1e-3, warmup_steps=6, weight_decay=0.05, b1=0.9, b2=0.95)  # cosine to total_steps
    config.loss_weights = dict(figure=1.0, figure_panel_image=0.5, figure_panel_text=0.5, panel=1.0,
                               panel_region_image=0.5, panel_region_text=0.5, roi=0.5, region=1.0)
    config.data = dict(records=arg or "demo/records/records-*.array_record",
                       batch_size=dict(figure=16, panel=16, region=16), workers=0, strict=False,
                       max_panels=4, max_regions=4, region_margin=0.1, lvlm_text_prob=0.0,
                       drop_panel_kinds=(), min_box_side=8.0)
    config.log_every = 10
    config.checkpoint_every = 20
    config.keep_checkpoints = 3
    config.max_bad_steps = 10
    return config
