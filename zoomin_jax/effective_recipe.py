"""The recipe a config trains on a given slice: global batch per level, the per-device batch derived
from it, lr, warm-up, steps, and the passes each level makes over its items (docs/design.md §6).

The global batch is the recipe (the paper: 320 per level), so a run on 8 GPUs and on a 64-chip
slice trains the same one. Where a global batch does not divide the devices, config.batch_rounding
says what to do: "none" (the default) refuses; "nearest" trains the nearest multiple of the device
count instead. config.per_device_batch (the hardware presets) trains that many per device instead.
Either way the lr is scaled by config.lr_scaling ("sqrt": lr x sqrt(new / stated), the square-root
rule for Adam-type optimisers; "linear"; "none") and, when the run's length is derived from epochs,
the warm-up is kept as the share of the run it is at the stated batch. Contrastive
negatives stay global within a step: there is no gradient accumulation (CLIP's loss over
micro-batches is not the loss over their union; GradCache would be needed), so a batch a device
cannot hold needs more devices or a smaller stated batch.

A figure (panel) step carries its panel (region) crops packed into a fixed number of child slots
per device (data.packing): config.data.child_slots states them per level, or else they are the
config.data.pack_quantile of a device's total child count in the records' shard index (train), or
else every example's max_panels (max_regions) slots (the compile check, which reads no records).

The run's length and its cycle: by default the config's cycle with config.epochs passes over the
cycle's first level. In the paper's cycle (a figure, a panel and a region step, repeated) every level
trains the same steps, so a level makes items(figure) / items(level) times the figures' passes: at
the paper's 350k figures, 1.3M panels and 1.6M regions, 20 passes over the figures are 5.4 over the
panels and 4.4 over the regions. config.level_passes ({level: passes}, every level of the cycle) sets
each level's passes instead: the cycle becomes the levels interleaved in the ratio of the steps those
passes take (level_passes_cycle), and the run their sum. config.total_steps, when set, is the run's
length either way.

Train and the compile check (zoomin_jax.aot) both derive it here; train prints it at start-up and
saves it as workdir/recipe.json. Light on purpose (no jax): the device count is an argument.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from zoomin_jax.batch_layout import LAYOUTS
from zoomin_jax.data.packing import capped, median, slots_for
from zoomin_jax.errors import UserError
from zoomin_jax.recipes import JOINT, LEVELS

ROUNDING = ("none", "nearest")
LR_SCALING = {"sqrt": math.sqrt, "linear": lambda ratio: ratio, "none": lambda ratio: 1.0}


def levels_of(cycle) -> tuple[str, ...]:
    """The levels whose data `cycle` draws from (the joint step takes a batch of each)."""
    in_cycle = {level for level, _ in cycle}
    return LEVELS if JOINT in in_cycle else tuple(sorted(in_cycle, key=LEVELS.index))


def cycle_levels(config) -> tuple[str, ...]:
    return levels_of(config.cycle)


def stated_batches(config) -> dict[str, int]:
    """{level: global batch} as config.data.batch_size states it, for the cycle's levels."""
    sizes = dict(config.data.get("batch_size") or {})
    missing = [level for level in cycle_levels(config) if level not in sizes]
    if missing:
        raise UserError(f"config.data.batch_size.{missing[0]} is not set: give the global batch of every level "
                        f"the cycle trains ({', '.join(cycle_levels(config))})")
    return {level: int(sizes[level]) for level in cycle_levels(config)}


def _round(batch: int, devices: int, rule: str, level: str) -> int:
    if batch % devices == 0:
        return batch
    if rule == "none":
        lower, upper = batch // devices * devices, -(-batch // devices) * devices
        raise UserError(f"config.data.batch_size.{level}={batch} does not divide over {devices} devices: state a "
                        f"multiple ({lower or devices} or {upper}) or set config.batch_rounding='nearest' (lr "
                        f"scaled by config.lr_scaling, warm-up kept as a share of the run)")
    return max(devices, round(batch / devices) * devices)


def epoch_level(cycle) -> str:
    first = cycle[0][0]
    return LEVELS[0] if first == JOINT else first


def epoch_steps(config, batches: dict[str, int], items: dict[str, int]) -> int:
    """config.epochs passes over the items of the cycle's first level (figures in the paper's cycle),
    as steps of the whole cycle: an epoch is as long on 1 GPU as on a pod."""
    level, first_steps = epoch_level(config.cycle), config.cycle[0][1]
    per_epoch = -(-items[level] // batches[level])
    cycle_steps = sum(int(steps) for _, steps in config.cycle)
    return max(1, round(config.epochs * per_epoch * cycle_steps / int(first_steps)))


# How near each level's passes a cycle derived from config.level_passes must come, and the most
# steps its least-trained level may take in one cycle to get there.
PASSES_TOLERANCE = 0.002
MAX_CYCLE_COUNT = 500


def asked_passes(config) -> dict[str, float]:
    """config.level_passes of the cycle's levels ({} when unset), checked to name each of them."""
    asked = {level: float(passes) for level, passes in dict(config.get("level_passes") or {}).items()
             if passes is not None}
    if not asked:
        return {}
    if any(level == JOINT for level, _ in config.cycle):
        raise UserError("config.level_passes needs a cycle of separate levels (the joint step draws a batch of "
                        "every level at once): unset it or choose another variant")
    levels = cycle_levels(config)
    for level, passes in asked.items():
        if level not in levels or passes <= 0:
            raise UserError(f"config.level_passes.{level}={passes:g}: give positive passes of the cycle's levels "
                            f"only ({', '.join(levels)})")
    missing = [level for level in levels if level not in asked]
    if missing:
        raise UserError(f"config.level_passes.{missing[0]} is not set: give the passes of every level the cycle "
                        f"trains ({', '.join(levels)}), or none to train them the same steps")
    return asked


def passes_steps(asked: dict[str, float], batches: dict[str, int], items: dict[str, int]) -> dict[str, float]:
    """{level: steps its asked passes over its items take at its global batch}."""
    return {level: passes * items[level] / batches[level] for level, passes in asked.items()}


def level_passes_cycle(wanted: dict[str, float]) -> tuple[tuple[str, int], ...]:
    """A cycle whose levels take steps in the ratio of `wanted` ({level: steps}, in cycle order): the
    fewest steps per cycle that bring every level within PASSES_TOLERANCE of its share, the levels
    interleaved as evenly as those counts allow (a smooth weighted round-robin) rather than in blocks,
    so that no level waits long for its turn, as in the one-step-each cycle."""
    least = min(wanted.values())

    def counts_for(unit: int) -> dict[str, int]:
        return {level: max(1, round(steps / least * unit)) for level, steps in wanted.items()}

    def error(counts: dict[str, int]) -> float:
        total = sum(counts.values())
        return max(abs(counts[level] / total * sum(wanted.values()) / steps - 1) for level, steps in wanted.items())

    candidates = [counts_for(unit) for unit in range(1, MAX_CYCLE_COUNT + 1)]
    counts = next((c for c in candidates if error(c) <= PASSES_TOLERANCE), min(candidates, key=error))
    length, credit, order = sum(counts.values()), dict.fromkeys(counts, 0), []
    for _ in range(length):
        for level in credit:
            credit[level] += counts[level]
        chosen = max(credit, key=credit.get)  # the first of the cycle's order among equals
        credit[chosen] -= length
        if order and order[-1][0] == chosen:
            order[-1][1] += 1
        else:
            order.append([chosen, 1])
    return tuple((level, steps) for level, steps in order)


def run_cycle(config, asked: dict[str, float], batches: dict[str, int], items: dict[str, int] | None) -> tuple:
    """The cycle the run trains: the one `asked` (asked_passes) derives when set and the records were
    read (see the module docstring), else config.cycle."""
    if items is None or not asked:
        return tuple((level, int(steps)) for level, steps in config.cycle)
    return level_passes_cycle(passes_steps(asked, batches, items))


def run_length(config, asked: dict[str, float], batches: dict[str, int], items: dict[str, int]) -> int:
    """The run's steps from the records: the sum of the steps `asked` passes take, else config.epochs'."""
    if not asked:
        return epoch_steps(config, batches, items)
    return max(1, round(sum(passes_steps(asked, batches, items).values())))


def level_steps(cycle, total_steps: int) -> dict[str, int]:
    """{level: steps that draw a batch of it} in a run of total_steps (the joint step draws all)."""
    cycle = [(level, int(steps)) for level, steps in cycle]
    length = sum(steps for _, steps in cycle)
    full, rest = divmod(total_steps, length)
    counts = dict.fromkeys(levels_of(cycle), 0)
    for level, steps in cycle:
        taken = full * steps + min(steps, rest)
        rest = max(0, rest - steps)
        for drawn in (LEVELS if level == JOINT else (level,)):
            counts[drawn] += taken
    return counts


@dataclasses.dataclass(frozen=True)
class Recipe:
    devices: int
    batch: dict           # level -> global batch trained
    stated_batch: dict    # level -> global batch the config states
    rounding: str
    lr: float
    stated_lr: float
    warmup_steps: int
    total_steps: int
    steps: dict           # level -> steps drawing a batch of it
    items: dict | None    # level -> items in the records (None: not read)
    child_slots: dict = dataclasses.field(default_factory=dict)   # level -> packed child slots per device
    child_slots_from: dict = dataclasses.field(default_factory=dict)   # level -> how they were sized
    cycle: tuple = ()     # ((level, steps), ...) repeated
    length_from: str = ""   # what set total_steps and the cycle
    asked_passes: dict = dataclasses.field(default_factory=dict)   # level -> config.level_passes

    def per_device(self, level: str) -> int:
        return self.batch[level] // self.devices

    def passes(self, level: str) -> float | None:
        return None if not self.items else self.steps[level] * self.batch[level] / max(1, self.items[level])

    def lines(self, steps: bool = True) -> list[str]:
        """What train prints at start-up; without `steps` (the compile check, which reads no records)
        the batches and lr only."""
        changed = self.batch != self.stated_batch
        head = (f"recipe on {self.devices} devices: lr {self.lr:.4g}"
                + (f" (stated {self.stated_lr:.4g}, batches by {self.rounding})" if changed else "")
                + (f", warm-up {self.warmup_steps} of {self.total_steps} steps "
                   f"({self.warmup_steps / max(1, self.total_steps):.1%})" if steps else "")
                + ", no gradient accumulation")
        shown = self.cycle if len(self.cycle) <= len(LEVELS) else tuple(
            (level, sum(steps for name, steps in self.cycle if name == level)) for level in self.batch)
        cycle = (f"  cycle: {', '.join(f'{level} {steps}' for level, steps in shown)} steps"
                 + (" interleaved" if len(self.cycle) > len(LEVELS) else "") + f", repeated; {self.length_from}")
        rows = [cycle] if steps else []
        for level, batch in self.batch.items():
            passes = self.passes(level)
            rows.append(f"  {level}: global batch {batch}" + (f" (stated {self.stated_batch[level]})" if changed else "")
                        + f", {self.per_device(level)} per device"
                        + (f", {self.steps[level]} steps" if steps else "")
                        + ("" if passes is None else f", {passes:.2f} passes over its {self.items[level]} items")
                        + (f" (config.level_passes.{level}={self.asked_passes[level]:g})"
                           if passes is not None and level in self.asked_passes else "")
                        + (f", {self.child_slots[level]} {LAYOUTS[level].child} slots per device "
                           f"({self.child_slots_from[level]})" if level in self.child_slots else ""))
        return [head, *rows]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"per_device": {level: self.per_device(level) for level in self.batch}}


def max_children(config, level: str) -> int:
    return {"figure": config.data.max_panels, "panel": config.data.max_regions}[level]


def child_slots(config, level: str, per_device: int, histogram: np.ndarray | None) -> tuple[int, str]:
    """(packed child slots per device, how they were sized) of one level: see the module docstring."""
    stated = {name: slots for name, slots in dict(config.data.get("child_slots") or {}).items() if slots}
    padded = per_device * max_children(config, level)
    if level in stated:
        return int(stated[level]), f"config.data.child_slots; padded: {padded}"
    quantile = config.data.get("pack_quantile")
    if histogram is None or not quantile:
        return padded, f"padded: {max_children(config, level)} per example, no child counts to pack to"
    slots = slots_for(histogram, max_children(config, level), per_device, quantile)
    return slots, (f"p{quantile * 100:g} of {per_device} examples' total in the records, median "
                   f"{median(capped(histogram, max_children(config, level))):g} each; padded: {padded}")


def derive(config, devices: int, items: dict[str, int] | None = None,
           child_histograms: dict | None = None) -> Recipe:
    """The recipe `config` trains on `devices` devices; `items` ({level: items in the records}) when
    the records have been indexed: the run's length comes from config.epochs, or config.level_passes
    (which also sets the cycle), unless config.total_steps is set; `child_histograms` ({level: [c]
    items whose example can hold c children}) for sizing the packed child slots."""
    stated = stated_batches(config)
    rounding = config.get("batch_rounding", "none")
    if rounding not in ROUNDING:
        raise UserError(f"config.batch_rounding={rounding!r} is not one of {', '.join(ROUNDING)}")
    scaling = config.get("lr_scaling", "sqrt")
    if scaling not in LR_SCALING:
        raise UserError(f"config.lr_scaling={scaling!r} is not one of {', '.join(LR_SCALING)}")
    per_device = config.get("per_device_batch")
    if per_device:
        batch, rounding = {level: int(per_device) * devices for level in stated}, f"per_device_batch={per_device}"
    else:
        batch = {level: _round(size, devices, rounding, level) for level, size in stated.items()}
        rounding = f"batch_rounding={rounding}"
    ratio = sum(batch.values()) / sum(stated.values())
    stated_lr, warmup = float(config.optim["lr"]), int(config.optim.get("warmup_steps", 0))
    total = config.get("total_steps")
    asked = asked_passes(config)
    cycle = run_cycle(config, asked, batch, items)
    if total is None:
        if items is None:
            raise UserError("config.total_steps is not set and the records were not read: set --config.total_steps")
        total = run_length(config, asked, batch, items)
        warmup = round(warmup * total / run_length(config, asked, stated, items))
        length_from = ("config.level_passes: each level's steps make its passes" if asked else
                       f"config.epochs={config.epochs:g} passes over the {epoch_level(cycle)}s, the other levels' "
                       "passes as the cycle's steps give them (config.level_passes sets each level's instead)")
    else:
        length_from = (f"config.total_steps={total}"
                       + (", in the ratio of config.level_passes" if asked and items else ""))
    slots = {level: child_slots(config, level, batch[level] // devices, (child_histograms or {}).get(level))
             for level in batch if LAYOUTS[level].child is not None}
    return Recipe(devices, batch, stated, rounding, stated_lr * LR_SCALING[scaling](ratio), stated_lr, warmup,
                  int(total), level_steps(cycle, int(total)), items, {level: n for level, (n, _) in slots.items()},
                  {level: source for level, (_, source) in slots.items()}, cycle, length_from, asked)


def apply(config, recipe: Recipe):
    """A copy of `config` that trains `recipe`: its batches, lr, warm-up, total steps and cycle."""
    config = config.copy_and_resolve_references()
    config.data.batch_size = dict(recipe.batch)
    config.cycle = recipe.cycle
    with config.unlocked():
        config.data.child_slots = dict(recipe.child_slots)
    config.optim["lr"], config.optim["warmup_steps"] = recipe.lr, recipe.warmup_steps
    config.total_steps = recipe.total_steps
    return config
