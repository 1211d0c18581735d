"""Flax NNX CLIP and its open_clip-format presets."""
from zoomin_jax.models.clip import CLIP
from zoomin_jax.models.config import PRESETS, CLIPConfig, ConfigError, get_preset

__all__ = ["CLIP", "CLIPConfig", "ConfigError", "PRESETS", "get_preset"]
