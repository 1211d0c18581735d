"""The granularity levels, their loss terms, the recipe's variants and config-argument parsing: what
config files import. Light on purpose (no jax, optax or flax), so loading a config starts no framework."""
from __future__ import annotations

from zoomin_jax.errors import UserError

LEVELS = ("figure", "panel", "region")
JOINT = "joint"  # all three levels' losses in one step (the joint-not-alternating ablation)

# The terms each level's step computes (docs/design.md §5), each weighted by config.loss_weights[term].
LEVEL_TERMS = {"figure": ("figure", "figure_panel_image", "figure_panel_text"),
               "panel": ("panel", "panel_region_image", "panel_region_text", "roi"),
               "region": ("region",)}
ALL_TERMS = tuple(term for terms in LEVEL_TERMS.values() for term in terms)

# The granularity schedules of the paper's recipe and its ablations, by config variant name.
VARIANT_CYCLES = {
    "zoomin": (("figure", 1), ("panel", 1), ("region", 1)),
    "figure_only": (("figure", 1),),
    "panel_only": (("panel", 1),),
    "region_only": (("region", 1),),
    "joint": ((JOINT, 1),),
}


def cycle_terms(cycle) -> tuple[str, ...]:
    """The terms the levels of a granularity cycle compute, in LEVEL_TERMS order."""
    levels = {level for level, _ in cycle}
    return tuple(term for level in LEVELS if JOINT in levels or level in levels for term in LEVEL_TERMS[level])


def check_loss_weights(weights, terms=ALL_TERMS) -> None:
    """A weight for a term nobody computes (a misspelt key) would leave the real term at its default
    weight without a word: refuse it."""
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise UserError(f"config.loss_weights.{unknown[0]} is not a loss term of this run; valid keys: "
                        f"{', '.join(terms)}")


def apply_variant(config, name: str) -> None:
    """The recipe (zoomin) or an ablation: its granularity cycle, and config.loss_weights cut to the
    terms that cycle computes (a config file weighs the terms of every variant; a key that names no
    term at all is an error). figure_only is plain figure-caption CLIP, the BMC-CLIP baseline (no
    figure<->panel terms, no panel crops loaded). Call after the config's loss_weights and data are set."""
    if name not in VARIANT_CYCLES:
        raise ValueError(f"config argument variant={name!r}: use one of {', '.join(VARIANT_CYCLES)}")
    config.cycle = VARIANT_CYCLES[name]
    check_loss_weights(config.loss_weights)
    terms = cycle_terms(config.cycle)
    for term in [term for term in config.loss_weights if term not in terms]:
        del config.loss_weights[term]
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
