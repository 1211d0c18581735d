"""The paper's recipe: zoom-in pretraining of BMC-CLIP ViT-L-14 on Panel2Patch records.

  python -m zoomin_jax.train --config configs/zoomin_vitl14.py:init=DIR,records=GLOB[,variant=V] --workdir DIR

init: BMC-CLIP converted with `python -m zoomin_jax.convert import --model ViT-L-14` (or
--config.model_init=DIR); train refuses to start without one unless init=random (a random init, for
smoke tests only). variant: zoomin (default) or figure_only, panel_only, region_only, joint.
eval_records: held-out records for retrieval at the three levels; zeroshot_data_dir: the TFDS data
dir of the MedMNIST builders (breastmnist, pneumoniamnist) for zero-shot; both every 5000 steps.
hardware: a preset for v5e, v4, v5p or h100 (HARDWARE below), chosen with the compile check
(python -m zoomin_jax.aot; README "Before you launch"): bfloat16 compute and 40 examples per device,
so a slice trains a global batch of 40 x its devices instead of the paper's 320, with the lr scaled
by config.lr_scaling and the warm-up kept as its share of the run (effective_recipe).
Only the last 5 vision blocks, ln_post, proj and logit_scale train; the text tower is frozen, so
each text is embedded once before training (workdir/text_cache), and the frozen blocks run without
a backward pass. Text-side message passing is still computed: logit_scale trains on it (losses.py).
Length: config.epochs = 20 passes over the figures with one figure, one panel and one region step
per cycle, so every level trains the same steps and the panels and regions get fewer passes (at the
paper's 350k figures, 1.3M panels, 1.6M regions: 5.4 and 4.4); train prints each level's items,
steps, batch and passes at start-up. --config.level_passes.figure=20 --config.level_passes.panel=5
--config.level_passes.region=4 sets each level's passes instead: the cycle interleaves the levels in
the ratio of the steps those take (zoomin_jax.effective_recipe).
"""
import ml_collections
from ml_collections import config_dict

from zoomin_jax.recipes import apply_variant, parse_config_arg



# Per hardware: compute dtype, attention, remat and examples per device, each compiled for its target
# with at least 10% of HBM free (README "Before you launch" has the numbers). Matmul precision is
# JAX's default everywhere: with bf16 compute, bf16 matmuls accumulating in float32.
HARDWARE = {
    "v5e": dict(compute_dtype="bfloat16", attention="xla", remat="none", per_device_batch=40),
    "v4": dict(compute_dtype="bfloat16", attention="xla", remat="none", per_device_batch=40),
    "v5p": dict(compute_dtype="bfloat16", attention="xla", remat="none", per_device_batch=40),
    # Not cuDNN's fused attention: in jax 0.10.2 it refuses ViT-L-14's 257 tokens ("Unsupported
    # sequence length Q 257, KV 257").
    "h100": dict(compute_dtype="bfloat16", attention="xla", remat="none", per_device_batch=40),
}


def get_config(arg=None):
    args = parse_config_arg(arg, init="", records="", variant="zoomin", eval_records="", zeroshot_data_dir="",
                            hardware="")
    config = ml_collections.ConfigDict()
    config.model = "ViT-L-14"
    # A placeholder, not None, so that --config.model_init=DIR can set it.
    config.model_init = config_dict.placeholder(str) if args["init"] in ("", "random") else args["init"]
    # The paper starts from BMC-CLIP: a forgotten init must not train ViT-L-14 from scratch unnoticed.
    config.allow_random_init = args["init"] == "random"
    config.seed = 0
    config.platform = "accelerator"  # stop on CPU (JAX's fallback without its GPU/TPU plugin); "any" allows it
    config.mesh = (("data", -1), ("fsdp", 1))  # over one TPU slice's devices when dcn_mesh is set
    # Multi-slice TPU (e.g. 2 x v5e-256 joined by the data-centre network): the data axis across the
    # slices, mesh above within each: --config.dcn_mesh="(('data', -1),)".
    config.dcn_mesh = ()
    # Rematerialise the trainable vision blocks in the backward pass: "none", "dots" (keep matmul outputs,
    # redo the rest) or "full" (keep nothing) where memory is short. Measured, not estimated
    # (python -m zoomin_jax.aot, README "Before you launch"): at 40 per v5e chip with "none", float32
    # and padded children needed 14.5 GiB of 16 (figure) and 14.9 (panel); the v5e preset (bfloat16,
    # packed panels) 9.05 and 10.5.
    config.remat = "none"
    # "bfloat16" on GPU/TPU: bf16 matmuls and activations from float32 params and optimizer state.
    # "float32" gives open_clip's numbers on CPU only: at JAX's default matmul precision TPUs run float32
    # matmuls as bf16 passes and GPUs as TF32. "cudnn" attention is cuDNN's fused kernel (GPU with bf16
    # only; jax 0.10.2's refuses ViT-L-14's 257 tokens); scan_layers compiles one block per run of
    # blocks instead of 24 (see README, Performance).
    config.compute_dtype = "float32"
    config.attention = "xla"
    config.scan_layers = False
    config.partition_rules = ((".*", "fsdp"),)
    config.train_rules = (("visual/transformer/resblocks/(19|2[0-3])/.*", 1.0), ("visual/(ln_post|proj)(/.*)?", 1.0),
                          ("logit_scale", 1.0), (".*", None))
    config.optim = dict(lr=1e-5, warmup_steps=1000, weight_decay=0.05, b1=0.9, b2=0.95)
    config.loss_weights = dict(figure=1.0, figure_panel_image=1.0, figure_panel_text=1.0, panel=1.0,
                               panel_region_image=1.0, panel_region_text=1.0, roi=1.0, region=1.0)
    # The paper's global batch (40 on each of 8 GPUs); the per-device batch is derived from it
    # (zoomin_jax.effective_recipe): 40 on 8 devices, 5 on 64. A slice it does not divide needs
    # batch_rounding="nearest", which scales the lr by lr_scaling's rule.
    config.batch_rounding = "none"
    config.per_device_batch = config_dict.placeholder(int)  # set: that many per device, the global batch follows
    config.lr_scaling = "sqrt"
    config.data = dict(records=args["records"], batch_size=dict(figure=320, panel=320, region=320),
                       workers=-1,  # grain workers per level from the host's cores (see train.data_workers)
                       strict=False, max_panels=6, max_regions=4, region_margin=0.1, lvlm_text_prob=0.5,
                       # Figures pair with their captions only. The paper mines the surrounding text for
                       # the LVLM annotation (the records' citing paragraphs reach the panel and region
                       # texts that way), not as figure texts to train on; drawing them here would be a
                       # departure from its figure-caption objective, and would put every paragraph in
                       # the text cache besides.
                       context_text_prob=0.0,
                       # No panel kind dropped: the paper drops none, and the annotator's "chart" kind
                       # (mostly flat light background, few colours) also takes Western blots, schematics
                       # and sparse histology.
                       drop_panel_kinds=(), min_box_side=16.0, min_visible=0.5,
                       crop_scale=(0.9, 1.0),  # data.samples.SampleConfig says why these
                       # Panel (region) crops packed into the 95th percentile of a device's total in the
                       # records' shard index (data.packing; overflow dropped and logged as panel_dropped),
                       # or the slots per device stated here. On the panel counts of 9,642 real figures
                       # (Zou et al. layouts, ../shared/data; median 2, mean 2.53 capped at 6), 40 figures
                       # per device get 120 panel slots of the padded 240, dropping 0.22% of panels.
                       pack_quantile=0.95, child_slots=dict(figure=config_dict.placeholder(int),
                                                            panel=config_dict.placeholder(int)),
                       # Items dealt to this many data shards (0: one per process; data.pipeline): global batches
                       # depend on it, not on the process count (1 x 8 devices trains on what 2 x 4 do when both
                       # set 2).
                       data_shards=0,
                       text_cache=True)  # the text tower is frozen: each text is embedded once, up front
    # Held-out retrieval at the three levels (each process embeds its share) and zero-shot
    # classification on MedMNIST built as TFDS datasets (python -m zoomin_jax.data.medmnist_tfds).
    config.evals = {}
    if args["eval_records"]:
        config.evals.heldout = dict(type="retrieval", records=args["eval_records"],
                                    levels=("figure", "panel", "region"), every=5000, batch_size=1024)
    if args["zeroshot_data_dir"]:
        for task in ("breastmnist", "pneumoniamnist"):
            config.evals[task] = dict(type="zeroshot", task=task, source=f"tfds:{task}", split="test",
                                      data_dir=args["zeroshot_data_dir"], every=5000, batch_size=1024)
    apply_variant(config, args["variant"])
    # 20 passes over the figures (350k figures are 1,094 figure steps of 320 an epoch; with the
    # M -> P -> R cycle each level takes a third of the steps): total_steps is derived from the records
    # and the global batch at start-up; --config.total_steps=N sets it instead.
    config.epochs = 20
    # Passes per level instead of equal steps (see the docstring); unset, config.epochs decides.
    config.level_passes = dict(figure=config_dict.placeholder(float), panel=config_dict.placeholder(float),
                               region=config_dict.placeholder(float))
    config.total_steps = config_dict.placeholder(int)
    # JAX's persistent compilation cache in the workdir: a restart (Spot preemption, SLURM requeue)
    # loads the compiled ViT-L-14 steps instead of compiling them again (minutes each on 8 host cores).
    config.compilation_cache_dir = "workdir"
    if args["hardware"]:
        if args["hardware"] not in HARDWARE:
            raise ValueError(f"config argument hardware={args['hardware']!r}: expected one of {', '.join(HARDWARE)}")
        config.update(HARDWARE[args["hardware"]])
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.max_bad_steps = 20
    return config
