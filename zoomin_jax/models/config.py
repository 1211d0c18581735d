"""CLIP architecture configs, spelled in open_clip's own `model_cfg` format.

Presets are open_clip config dicts (the JSON that open_clip ships and writes into
open_clip_config.json), so a hub folder's config can be compared key by key with the preset a user
asked for, and an export can write the preset back verbatim.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

from zoomin_jax.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(UserError):
    """An architecture config that zoomin_jax cannot build or that contradicts another one."""


def _vit(embed_dim, image_size, patch_size, vision_width, vision_layers, text_width, text_heads,
         text_layers, head_width=64):
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }
    if head_width != 64:  # open_clip's default, left out like open_clip's own JSON does
        cfg["vision_cfg"]["head_width"] = head_width
    return cfg


_BASE_PRESETS = {
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768, 12, 12),
    # Tiny presets for tests: the same code path with small widths; vocab and context stay CLIP's
    # so the real tokenizer feeds them.
    "test-tiny": _vit(32, 32, 8, 64, 2, 64, 2, 2, head_width=32),
    "test-tiny-deep": _vit(32, 32, 8, 64, 3, 64, 2, 3, head_width=32),
}
PRESETS: dict[str, dict[str, Any]] = {}
for _name, _cfg in _BASE_PRESETS.items():
    PRESETS[_name] = _cfg
    PRESETS[f"{_name}-quickgelu"] = _cfg | {"quick_gelu": True}

# open_clip options this implementation does not build, with the value that means "off".
_VISION_OFF = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "timm_model_name": None, "act_kwargs": None, "norm_kwargs": None,
}
_TEXT_OFF = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
    "hf_model_name": None, "act_kwargs": None, "norm_kwargs": None,
}
_TOP_OFF = {"custom_text": False, "init_logit_bias": None, "nonscalar_logit_scale": False}
# Options that do not change the inference graph or the weights.
_VISION_IGNORED = {"patch_dropout", "output_tokens", "input_patchnorm"}
_TEXT_IGNORED = {"hf_tokenizer_name", "tokenizer_kwargs", "pad_id", "output_tokens"}
_TOP_IGNORED = {"cast_dtype", "output_dict", "init_logit_scale"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False
    # Keeps the exact open_clip dict so exports write back what was read.
    open_clip_cfg: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_open_clip(cls, model_cfg: Mapping[str, Any], where: str = "model_cfg") -> "CLIPConfig":
        vision = dict(model_cfg.get("vision_cfg") or {})
        text = dict(model_cfg.get("text_cfg") or {})
        for section, values, off, ignored in (
                ("", model_cfg, _TOP_OFF, _TOP_IGNORED | {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}),
                ("vision_cfg.", vision, _VISION_OFF, _VISION_IGNORED | {
                    "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}),
                ("text_cfg.", text, _TEXT_OFF, _TEXT_IGNORED | {
                    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"})):
            for key, value in values.items():
                if key in ignored or (key in off and value == off[key]):
                    continue
                raise ConfigError(f"{where} sets {section}{key}={value!r}, an open_clip option zoomin_jax "
                                  f"does not implement; use a plain ViT CLIP config.")
        try:
            image_size, patch_size = vision["image_size"], vision["patch_size"]
            if not isinstance(image_size, int) or not isinstance(patch_size, int):
                raise ConfigError(f"{where} has non-square vision_cfg.image_size/patch_size "
                                  f"({image_size}, {patch_size}); only square ViTs are supported.")
            width = vision["width"]
            vision_cfg = VisionConfig(image_size=image_size, patch_size=patch_size, width=width,
                                      layers=vision["layers"], heads=width // vision.get("head_width", 64),
                                      mlp_ratio=vision.get("mlp_ratio", 4.0))
            text_cfg = TextConfig(context_length=text.get("context_length", 77),
                                  vocab_size=text.get("vocab_size", 49408), width=text["width"],
                                  layers=text["layers"], heads=text["heads"],
                                  mlp_ratio=text.get("mlp_ratio", 4.0))
            return cls(embed_dim=model_cfg["embed_dim"], vision=vision_cfg, text=text_cfg,
                       quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                       open_clip_cfg=copy.deepcopy(dict(model_cfg)))
        except KeyError as err:
            raise ConfigError(f"{where} lacks the key {err.args[0]!r}; it is not an open_clip CLIP config.") from None


def get_preset(name: str) -> CLIPConfig:
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return CLIPConfig.from_open_clip(PRESETS[name], where=f"preset {name}")


def architecture_differences(expected: CLIPConfig, found: CLIPConfig) -> list[str]:
    """Field-by-field differences between two configs, as 'field: expected vs found'."""
    diffs = []
    for field in ("embed_dim", "quick_gelu"):
        if getattr(expected, field) != getattr(found, field):
            diffs.append(f"{field}: {getattr(expected, field)} vs {getattr(found, field)}")
    for tower in ("vision", "text"):
        a, b = dataclasses.asdict(getattr(expected, tower)), dataclasses.asdict(getattr(found, tower))
        diffs += [f"{tower}.{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k]]
    return diffs
