"""What a training run is made of before its first batch: the mesh, params split by the rules and
placed by their shardings, optimizer state, and one jitted step per level of the cycle. train,
bench_train and the compile check (zoomin_jax.aot) all build it here, so the step the compile check
measures is the step training runs; for the compile check it is built abstract (shapes and
shardings only, nothing allocated) over a target's devices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from zoomin_jax import effective_recipe, losses, model_dir, sharding, trainer
from zoomin_jax.batch_layout import Dims
from zoomin_jax.errors import UserError
from zoomin_jax.models.clip import abstract_params, nest
from zoomin_jax.models.config import CLIPConfig, get_preset


def run_dims(config, model_cfg, shards: int = 1) -> Dims:
    """The batch_layout sizes of the run's batches (what sample_config's examples have), split over
    `shards` devices with config.data.child_slots (effective_recipe) packed child slots per device."""
    data = config.data
    dims = Dims.of(model_cfg.vision.image_size, data.max_panels, data.max_regions,
                   model_cfg.embed_dim if data.get("text_cache") else None)
    return dataclasses.replace(dims, shards=shards, packed=tuple((data.get("child_slots") or {}).items()))


@dataclasses.dataclass
class Setup:
    mesh: jax.sharding.Mesh
    model_cfg: CLIPConfig
    part: trainer.Partition
    state: dict          # trainable params, optimizer state, step counters (sharded)
    frozen: dict         # frozen params (sharded, never updated or saved)
    cycle: trainer.Cycle
    steps: dict          # level -> jitted step(state, frozen, batch)
    dims: Dims           # the steps' batch sizes (run_dims over the mesh)


COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype_of(config):
    """config.compute_dtype: "float32" (the default: open_clip's numbers) or "bfloat16"
    (GPU/TPU: bf16 matmuls from float32 params, whose optimizer state stays float32)."""
    name = config.get("compute_dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise UserError(f"config.compute_dtype={name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


ATTENTION = ("xla", "cudnn")


def attention_of(config, compute_dtype, platform: str | None = None) -> str:
    """config.attention: "xla" (the default, every platform) or "cudnn" (cuDNN's fused attention:
    GPU with bfloat16 compute only, where it is what makes attention fast). `platform`: the
    devices' (default: JAX's backend)."""
    name = config.get("attention", "xla")
    platform = platform or jax.default_backend()
    if name not in ATTENTION:
        raise UserError(f"config.attention={name!r} is not one of {', '.join(ATTENTION)}")
    if name == "cudnn" and (platform not in ("gpu", "cuda") or compute_dtype is None):
        raise UserError(f"config.attention='cudnn' needs a GPU and config.compute_dtype='bfloat16' (found "
                        f"{platform}, {config.get('compute_dtype', 'float32')}): use config.attention='xla'")
    return name


def effective(config, devices=None, items: dict | None = None,
              child_histograms: dict | None = None) -> tuple[object, effective_recipe.Recipe]:
    """The recipe `config` trains over the mesh it makes of `devices` (default all: every batch is split
    over the whole mesh), and the copy of `config` that trains it; `items` and `child_histograms` as
    effective_recipe.derive."""
    recipe = effective_recipe.derive(config, sharding.config_mesh(config, devices).devices.size, items, child_histograms)
    return effective_recipe.apply(config, recipe), recipe


def setup(config, devices=None, abstract: bool = False) -> Setup:
    """Mesh (over `devices`, default all), params split and placed by the rules, optimizer state, and
    one jitted step per level. `abstract`: params and state as ShapeDtypeStructs carrying their
    shardings (nothing allocated, no model_init read), for lowering the steps for absent devices."""
    mesh = sharding.config_mesh(config, devices)
    model_cfg = get_preset(config.model)
    rules = tuple(tuple(rule) for rule in config.partition_rules)
    shardings = model_dir.param_shardings(model_cfg, mesh, rules)
    if abstract:
        params = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                              nest(abstract_params(model_cfg)), shardings)
    else:  # restored (or initialised) straight into their shardings: no detour through one device or the host
        params = model_dir.initial_params(config.get("model_init"), model_cfg, config.seed, shardings)
    part = trainer.partition(params, tuple(tuple(rule) for rule in config.train_rules))
    trainable, frozen = trainer.split(params, part)
    optim = trainer.OptimConfig(total_steps=config.total_steps, **config.optim)
    tx = trainer.make_optimizer(optim, part)
    init = jax.jit(trainer.init_state, static_argnums=1)
    if abstract:  # the optimizer state's shardings are what XLA gives init_state's outputs
        compiled = init.lower(trainable, tx).compile()
        state = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                             jax.eval_shape(lambda tree: trainer.init_state(tree, tx), trainable),
                             compiled.output_shardings)
    else:
        state = init(trainable, tx)
    loss_cfg = losses.LossConfig(weights=tuple(config.loss_weights.items()), text_frozen=part.text_frozen,
                                 frozen_blocks=part.frozen_blocks, remat=config.get("remat", "none"),
                                 shards=mesh.devices.size)
    schedule = trainer.lr_schedule(optim)
    cycle = trainer.Cycle(tuple((level, int(steps)) for level, steps in config.cycle))
    compute_dtype = compute_dtype_of(config)
    attention = attention_of(config, compute_dtype, mesh.devices.flat[0].platform)
    steps = {level: trainer.jit_train_step(trainer.make_train_step(model_cfg, level, loss_cfg, tx, schedule,
                                                                   compute_dtype, config.get("scan_layers", False),
                                                                   attention),
                                           state)
             for level, _ in cycle.levels}
    return Setup(mesh, model_cfg, part, state, frozen, cycle, steps, run_dims(config, model_cfg, mesh.devices.size))
