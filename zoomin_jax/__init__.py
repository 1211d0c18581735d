"""zoomin-jax: fine-grained biomedical CLIP pretraining (figure / panel / region) in JAX.

Importing the package loads neither jax nor torch: the annotation stage imports the record schema
from here, and the public API below is resolved on first use.
"""
import importlib

_LAZY = {
    "load_clip": "zoomin_jax.encoder",
    "CLIPEncoder": "zoomin_jax.encoder",
    "tokenize": "zoomin_jax.tokenizer",
    "preprocess": "zoomin_jax.image_transform",
    "PRESETS": "zoomin_jax.models.config",
    "get_preset": "zoomin_jax.models.config",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zoomin_jax' has no attribute {name!r}")
