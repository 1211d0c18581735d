"""The one declarative open_clip <-> Flax mapping, driving import and export alike.

Each row is (open_clip state_dict key, Flax param path, transform); `{i}` stands for a block index.
`expand` instantiates the rows against the param paths of `nnx.eval_shape` of a preset, so a row
that matches nothing or a param that no row covers is caught before any weight is touched.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        # A zero-stride view transposes without allocating, whatever the tensor's size.
        return self.to_torch(np.broadcast_to(np.float32(0), flax_shape)).shape


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# torch Linear weight [out, in] <-> Flax kernel [in, out].
LINEAR = Transform("transpose", lambda a: a.T, lambda a: a.T)
# torch Conv2d weight OIHW <-> Flax Conv kernel HWIO.
CONV = Transform("conv OIHW<->HWIO", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


def _layer_norm(torch_name, flax_name):
    return [(f"{torch_name}.weight", f"{flax_name}.scale", IDENTITY),
            (f"{torch_name}.bias", f"{flax_name}.bias", IDENTITY)]


def _linear(name):
    return [(f"{name}.weight", f"{name}.kernel", LINEAR), (f"{name}.bias", f"{name}.bias", IDENTITY)]


def _resblocks(tower):
    block = [*_layer_norm("ln_1", "ln_1"),
             ("attn.in_proj_weight", "attn.in_proj.kernel", LINEAR),
             ("attn.in_proj_bias", "attn.in_proj.bias", IDENTITY),
             *_linear("attn.out_proj"),
             *_layer_norm("ln_2", "ln_2"),
             *_linear("mlp.c_fc"),
             *_linear("mlp.c_proj")]
    prefix = f"{tower}.resblocks.{{i}}."
    return [(prefix + t, prefix + f, transform) for t, f, transform in block]


OPEN_CLIP_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("visual.conv1.weight", "visual.conv1.kernel", CONV),
    ("visual.class_embedding", "visual.class_embedding", IDENTITY),
    ("visual.positional_embedding", "visual.positional_embedding", IDENTITY),
    *_layer_norm("visual.ln_pre", "visual.ln_pre"),
    *_resblocks("visual.transformer"),
    *_layer_norm("visual.ln_post", "visual.ln_post"),
    ("visual.proj", "visual.proj", IDENTITY),  # x @ W on both sides
    ("token_embedding.weight", "token_embedding.embedding", IDENTITY),
    ("positional_embedding", "positional_embedding", IDENTITY),
    *_resblocks("transformer"),
    *_layer_norm("ln_final", "ln_final"),
    ("text_projection", "text_projection", IDENTITY),  # x @ W on both sides
    ("logit_scale", "logit_scale", IDENTITY),
)


@dataclasses.dataclass(frozen=True)
class Mapping:
    torch_key: str
    flax_path: tuple  # as in nnx.to_flat_state: strings, ints for list indices
    transform: Transform
    flax_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.transform.torch_shape(self.flax_shape)


def flax_path_str(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def expand(abstract_params: dict[tuple, object]) -> list[Mapping]:
    """Rows instantiated for every param path (-> ShapeDtypeStruct) of a preset, in table order."""
    patterns = [(re.compile(re.escape(f).replace(r"\{i\}", r"(\d+)") + "$"), t, f, tr)
                for t, f, tr in OPEN_CLIP_TABLE]
    by_row: list[list[Mapping]] = [[] for _ in patterns]
    for path, leaf in abstract_params.items():
        name = flax_path_str(path)
        hits = [(n, m) for n, (pattern, *_) in enumerate(patterns) if (m := pattern.match(name))]
        if len(hits) != 1:
            raise AssertionError(f"conversion table covers Flax param {name} {len(hits)} times, not once")
        n, match = hits[0]
        torch_key = patterns[n][1].replace("{i}", match.group(1)) if match.groups() else patterns[n][1]
        by_row[n].append(Mapping(torch_key, path, patterns[n][3], tuple(leaf.shape), np.dtype(leaf.dtype)))
    unused = [patterns[n][2] for n, rows in enumerate(by_row) if not rows]
    if unused:
        raise AssertionError(f"conversion table rows match no Flax param: {unused}")
    return [m for rows in by_row for m in sorted(rows, key=lambda m: [str(p).zfill(4) for p in m.flax_path])]
