"""The granularity levels, the recipe's variants and config-argument parsing: what config files
import. Light on purpose (no jax, optax or flax), so loading a config starts no framework."""
from __future__ import annotations

LEVELS = ("figure", "panel", "region")
JOINT = "joint"  # all three levels' losses in one step (the joint-not-alternating ablation)

# The granularity schedules of the paper's recipe and its ablations, by config variant name.
VARIANT_CYCLES = {
    "zoomin": (("figure", 1), ("panel", 1), ("region", 1)),
    "figure_only": (("figure", 1),),
    "panel_only": (("panel", 1),),
    "region_only": (("region", 1),),
    "joint": ((JOINT, 1),),
}


def apply_variant(config, name: str) -> None:
    """The recipe (zoomin) or an ablation: its granularity cycle; figure_only is plain figure-caption
    CLIP, the BMC-CLIP baseline (no figure<->panel terms, no panel crops loaded). Call after the
    config's loss_weights and data are set."""
    if name not in VARIANT_CYCLES:
        raise ValueError(f"config argument variant={name!r}: use one of {', '.join(VARIANT_CYCLES)}")
    config.cycle = VARIANT_CYCLES[name]
    if name == "figure_only":
        config.loss_weights.update(figure_panel_image=0.0, figure_panel_text=0.0)
        config.data.max_panels = 0


def parse_config_arg(arg: str | None, **defaults) -> dict:
    """big_vision-style config argument "key=value,key=value" over `defaults` (strings)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(values)}")
        values[key] = value
    return values
