"""Zoom-in training of the tiny preset on synthetic records, minutes on 2 CPU cores.

  python -m zoomin_jax.train --config configs/demo_cpu.py:records=GLOB[,variant=V,eval_records=GLOB,seed=N] \
      --workdir DIR

records: ArrayRecord shards from `python -m annotate run` (default demo/records/*.array_record).
variant: zoomin (figure -> panel -> region, the default) or an ablation: figure_only, panel_only,
region_only, joint (all levels in every step).
eval_records: held-out records for retrieval at the three levels, every 225 steps and at the end.
seed: model init, data order and augmentation.
"""
import ml_collections
from ml_collections import config_dict

from zoomin_jax.recipes import apply_variant, parse_config_arg


def get_config(arg=None):
    args = parse_config_arg(arg, records="demo/records/records-*.array_record", variant="zoomin", eval_records="",
                            seed="0")
    config = ml_collections.ConfigDict()
    config.model = "test-tiny"
    # A converted model directory (python -m zoomin_jax.convert import); a placeholder, not None, so
    # that --config.model_init=DIR can set it.
    config.model_init = config_dict.placeholder(str)
    config.platform = "any"  # sized for 2 CPU cores, runs anywhere
    config.seed = int(args["seed"])
    config.total_steps = 450
    config.mesh = (("data", -1),)
    config.remat = "none"  # or "dots" / "full": recompute the trainable blocks' activations in the backward pass
    config.compute_dtype = "float32"  # bf16 is slower on CPU; see configs/zoomin_vitl14.py
    config.attention = "xla"
    config.scan_layers = False
    config.partition_rules = ((".*", "fsdp"),)
    # (regex over param names, lr multiplier or None = frozen); first match wins. The tiny model
    # trains everything after its first vision block.
    config.train_rules = (("visual/transformer/resblocks/[1-9]/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
                          ("logit_scale", 1.0), ("text_projection", 1.0), ("transformer/resblocks/.*", 1.0),
                          ("ln_final/.*", 1.0), (".*", None))
    config.optim = dict(lr=1e-3, warmup_steps=6, weight_decay=0.05, b1=0.9, b2=0.95)  # cosine to total_steps
    config.loss_weights = dict(figure=1.0, figure_panel_image=0.5, figure_panel_text=0.5, panel=1.0,
                               panel_region_image=0.5, panel_region_text=0.5, roi=0.5, region=1.0)
    config.data = dict(records=args["records"], batch_size=dict(figure=16, panel=16, region=16),
                       strict=False, max_panels=6, max_regions=4, region_margin=0.1, lvlm_text_prob=0.0,
                       context_text_prob=0.0, drop_panel_kinds=(), min_box_side=8.0, min_visible=0.5,
                       crop_scale=(0.9, 1.0),  # data.samples.SampleConfig says why these
                       # Panel (region) crops packed into the 99th percentile of a device's total in the
                       # records' shard index (data.packing; overflow dropped and logged as panel_dropped),
                       # or the slots per device stated here.
                       pack_quantile=0.99, child_slots=dict(figure=config_dict.placeholder(int),
                                                            panel=config_dict.placeholder(int)),
                       cached_images=512,  # each worker keeps the demo's figures decoded (decoding: 3/4 of a sample)
                       # Items dealt to this many data shards (0: one per process; data.pipeline): global batches
                       # depend on it, not on the process count (1 x 8 devices trains on what 2 x 4 do when both
                       # set 2).
                       data_shards=0,
                       text_cache=False)  # True: embed each text once with the frozen text tower
    config.evals = {}
    if args["eval_records"]:
        config.evals.heldout = dict(type="retrieval", records=args["eval_records"],
                                    levels=("figure", "panel", "region"), every=225, batch_size=64)
    apply_variant(config, args["variant"])
    # A second worker where one level is trained alone (figure_only): its steps are short enough that
    # one worker kept it waiting (make demo, medians over 3 seeds: 0.047 s of each 0.062 s step; with
    # two, 0.016 of 0.042).
    config.data.workers = 1 if len(config.cycle) > 1 else 2
    # JAX's persistent compilation cache: "" leaves JAX's setting ("workdir": workdir/compilation_cache).
    config.compilation_cache_dir = ""
    config.log_every = 10
    # A save blocked the zoom-in run ~1.3 s (state and three levels' data positions); every 20 steps
    # that was 29-30 s of a 90-120 s run. Every 150: 4 s, and at most a third of a run redone after a kill.
    config.checkpoint_every = 150
    config.keep_checkpoints = 3
    config.max_bad_steps = 10
    return config
