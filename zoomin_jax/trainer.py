"""The training step: trainable/frozen split by regex rules, AdamW with warmup + cosine, one jitted
step per granularity level, and a guard that skips non-finite updates (docs/design.md §5, §6, §8).

Params are nested dicts as `nnx.to_pure_dict` gives them. Frozen leaves live outside the train
state: they get no optimizer state, are never written to checkpoints, and reach the step as a
separate (donation-free) argument.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from zoomin_jax.losses import LossConfig, level_losses
from zoomin_jax.models.clip import LOGIT_SCALE_MAX, from_params, merge
from zoomin_jax.models.config import CLIPConfig
from zoomin_jax.recipes import JOINT, LEVELS
from zoomin_jax.sharding import match_rules, path_name

@dataclasses.dataclass(frozen=True)
class Partition:
    """Which leaves train (with their learning-rate multiplier) and what that implies."""
    multipliers: dict            # path tuple -> float, trainable leaves only
    frozen_blocks: int           # leading vision blocks (and the stem) with nothing trainable
    text_frozen: bool            # no text-tower leaf trains


def partition(params: dict, rules) -> Partition:
    """big_vision-style rules: (regex over "a/b/c" names, lr multiplier or None = frozen)."""
    flat = traverse_util.flatten_dict(params)
    multipliers = {}
    for path in flat:
        multiplier = match_rules(rules, path_name(path), "train")
        if multiplier is not None:
            multipliers[path] = float(multiplier)
    names = [path_name(path) for path in multipliers]
    stem = r"visual/(conv1|class_embedding|positional_embedding|ln_pre)(/.*)?"
    frozen_blocks = 0
    if not any(re.fullmatch(stem, name) for name in names):
        depth = len(params["visual"]["transformer"]["resblocks"])
        while frozen_blocks < depth and not any(
                name.startswith(f"visual/transformer/resblocks/{frozen_blocks}/") for name in names):
            frozen_blocks += 1
    text_frozen = not any(not name.startswith("visual/") and name != "logit_scale" for name in names)
    return Partition(multipliers, frozen_blocks, text_frozen)


def split(params: dict, part: Partition) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts."""
    flat = traverse_util.flatten_dict(params)
    trainable = {path: leaf for path, leaf in flat.items() if path in part.multipliers}
    frozen = {path: leaf for path, leaf in flat.items() if path not in part.multipliers}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 1000
    total_steps: int = 10000
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1),
                                              end_value=cfg.lr * cfg.end_lr_fraction)


def make_optimizer(cfg: OptimConfig, part: Partition) -> optax.GradientTransformation:
    """AdamW over the trainable leaves, one group per lr multiplier; weight decay on matrices only
    (not biases, norms, embeddings' scalars or logit_scale)."""
    schedule = lr_schedule(cfg)

    def adamw(multiplier: float):
        return optax.adamw(lambda step: schedule(step) * multiplier, cfg.b1, cfg.b2, cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda tree: jax.tree.map(lambda leaf: leaf.ndim >= 2, tree))

    labels = traverse_util.unflatten_dict({path: str(m) for path, m in part.multipliers.items()})
    groups = optax.multi_transform({str(m): adamw(m) for m in set(part.multipliers.values())}, labels)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), groups) if cfg.grad_clip_norm else groups


def clamp_logit_scale(params: dict) -> dict:
    """The trainable params with logit_scale (when it trains) put back into [0, log 100], as open_clip
    does after each optimizer step (`logit_scale.clamp_(0, math.log(100))`): the forward uses it
    unclamped, so at the cap it still has a gradient and can come back down."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX)}


def make_train_step(model_cfg: CLIPConfig, level: str, loss_cfg: LossConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, compute_dtype=None, scan_layers: bool = False,
                    attention: str = "xla"):
    """step(state, frozen, batch) -> (state, metrics); for JOINT, batch = {level: batch}. The model
    computes in `compute_dtype` (None: float32) from float32 params, whose gradients, updates and
    optimizer state stay float32; `scan_layers` and `attention`: see models.clip.CLIP.
    state = {"params", "opt_state", "step",
    "skipped"}; an update whose loss or gradient is not finite is skipped (state kept, `skipped`
    counts the run of them, reset by the next good step); logit_scale is clamped after the update
    (clamp_logit_scale)."""

    def loss_fn(trainable, frozen, batch):
        model = from_params(model_cfg, merge(trainable, frozen), compute_dtype, scan_layers, attention)
        if level != JOINT:
            return level_losses(model, batch, level, loss_cfg)
        totals, terms = zip(*(level_losses(model, batch[name], name, loss_cfg) for name in LEVELS))
        return sum(totals), {key: value for level_terms in terms for key, value in level_terms.items()}

    def step(state, frozen, batch):
        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = clamp_logit_scale(optax.apply_updates(state["params"], updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1, "skipped": jnp.where(finite, 0, state["skipped"] + 1)}
        metrics = {**terms, "loss": total, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "update_skipped": ~finite, "skipped_in_a_row": new_state["skipped"]}
        return new_state, metrics

    return step


def jit_train_step(step, state: dict):
    """The step jitted with its state donated and laid out exactly as `state` on the way out, so
    the next call sees the same input shardings (else XLA's choice for the outputs can differ
    from the initial layout and the second call recompiles)."""
    return jax.jit(step, donate_argnums=0, out_shardings=(jax.tree.map(lambda leaf: leaf.sharding, state), None))


def init_state(trainable: dict, tx: optax.GradientTransformation) -> dict:
    return {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


@dataclasses.dataclass(frozen=True)
class Cycle:
    """The granularity schedule: ((level, steps), ...) repeated, e.g. figure → panel → region."""
    levels: tuple[tuple[str, int], ...]

    def __post_init__(self):
        for level, steps in self.levels:
            if level not in (*LEVELS, JOINT) or steps < 1:
                raise ValueError(f"cycle entry {(level, steps)}: level must be one of {(*LEVELS, JOINT)}, steps >= 1")

    def level_at(self, step: int) -> str:
        position = step % sum(steps for _, steps in self.levels)
        for level, steps in self.levels:
            if position < steps:
                return level
            position -= steps
        raise AssertionError("unreachable")
