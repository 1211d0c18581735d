"""Flax NNX CLIP whose parameter tree reads like open_clip's state_dict.

Numerics follow open_clip's `CLIP` (docs/design.md §4): exact-erf GELU unless `quick_gelu`, LayerNorm
eps 1e-5 with the two-pass variance, causal text mask, EOT (argmax) pooling, projections as x @ W,
logit_scale stored as a log, used as exp(logit_scale) and kept in [0, log 100] by the training step
after each update (trainer.clamp_logit_scale), as open_clip's training loop keeps it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from zoomin_jax.errors import UserError
from zoomin_jax.models.config import CLIPConfig, VisionConfig

LOGIT_SCALE_MAX = math.log(100.0)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
    return jax.nn.gelu(x, approximate=False)


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm; in a bf16 step recomputed in the backward pass from its input, so that only the
    bf16 input is kept, not its float32 intermediates (x - mean, x * rsqrt). In float32 XLA keeps less
    without the recompute (ViT-L-width panel step on a v5e: 7.57 GiB of temporaries, 7.89 with it)."""

    def __call__(self, x):
        if self.dtype is None:
            return super().__call__(x)
        return nnx.remat(lambda norm, y: nnx.LayerNorm.__call__(norm, y))(self, x)


def _layer_norm(width, dtype, rngs):
    # use_fast_variance=False: E[x^2]-E[x]^2 loses the 1e-5 parity with torch's two-pass LayerNorm.
    return LayerNorm(width, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs)


def _normal(std):
    return jax.nn.initializers.normal(stddev=std)


@jax.custom_vjp
def softmax(logits):
    """softmax over the last axis, computed in float32 and returned in the logits' dtype, keeping only
    that result for the backward pass. With jax.nn.softmax a bf16 step kept every block's [heads,
    tokens, tokens] probabilities twice (float32 for softmax's gradient, bf16 for the value matmul's).
    The gradient is computed in float32 from the kept probabilities (for float32 logits: exactly
    jax.nn.softmax's)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _softmax_forward(logits):
    probs = softmax(logits)
    return probs, probs


def _softmax_backward(probs, grad):
    kept, grad = probs.astype(jnp.float32), grad.astype(jnp.float32)
    return (((grad - jnp.sum(grad * kept, axis=-1, keepdims=True)) * kept).astype(probs.dtype),)


softmax.defvjp(_softmax_forward, _softmax_backward)


def xla_attention(query, key, value, causal: bool, head_groups: int = 2):
    """Scaled dot-product attention over [batch, tokens, heads, head width], every [heads, tokens,
    tokens] array in the inputs' dtype and the softmax in float32: what a bf16 step runs. Its logits
    are the matmul's bf16 output, as under torch's autocast: float32 logits, and their float32
    gradient, were a bf16 step's largest arrays. (In float32 it computes jax.nn.dot_product_attention's
    numbers, but XLA keeps more of it: 8.04 vs 7.57 GiB of temporaries for the panel step measured in
    LayerNorm's docstring, so float32 runs jax's.)

    The backward pass keeps only query, key and value and recomputes the probabilities, one group of
    heads at a time, so that at most one group's [batch, heads / head_groups, tokens, tokens] logits,
    probabilities and their gradients exist at once: what flash attention does per tile. Measured on
    that panel step in bf16: 5.02 GiB of temporaries keeping the probabilities, 4.88 recomputing all
    heads at once, 3.72 in two groups (float32: 7.57). More groups saved little more and cost more
    bytes moved (each group's q/k/v slice is a copy). The recompute is one more pair of [tokens, tokens]
    matmuls per trained block."""
    heads = query.shape[2]
    if heads % head_groups:
        head_groups = 1
    step = heads // head_groups
    groups = [_attention_recomputed(query[:, :, h:h + step], key[:, :, h:h + step], value[:, :, h:h + step], causal)
              for h in range(0, heads, step)]
    return jnp.concatenate(groups, axis=2) if head_groups > 1 else groups[0]


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _attention_recomputed(query, key, value, causal: bool):
    logits = jnp.einsum("btnh,bsnh->bnts", query, key) * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    if causal:
        length = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -0.7 * jnp.finfo(logits.dtype).max)
    return jnp.einsum("bnts,bsnh->btnh", softmax(logits), value)


class Attention(nnx.Module):
    """torch.nn.MultiheadAttention: fused q|k|v `in_proj`, then `out_proj`."""

    def __init__(self, width: int, heads: int, layers: int, dtype, rngs: nnx.Rngs, implementation: str = "xla"):
        self.heads, self.implementation = heads, implementation
        self.in_proj = nnx.Linear(width, 3 * width, kernel_init=_normal(width ** -0.5), dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(width, width, kernel_init=_normal(width ** -0.5 * (2 * layers) ** -0.5),
                                   dtype=dtype, rngs=rngs)

    def __call__(self, x, causal: bool):
        batch, length, width = x.shape
        qkv = self.in_proj(x).reshape(batch, length, 3, self.heads, width // self.heads)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.implementation == "xla" and query.dtype != jnp.float32:
            out = xla_attention(query, key, value, causal)
        else:
            out = jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation=self.implementation)
        return self.out_proj(out.reshape(batch, length, width))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, layers: int, activation, dtype, rngs: nnx.Rngs):
        self.activation = activation
        self.c_fc = nnx.Linear(width, hidden, kernel_init=_normal((2 * width) ** -0.5), dtype=dtype, rngs=rngs)
        self.c_proj = nnx.Linear(hidden, width, kernel_init=_normal(width ** -0.5 * (2 * layers) ** -0.5),
                                 dtype=dtype, rngs=rngs)

    def __call__(self, x):
        hidden = self.c_fc(x)
        # In bf16, recomputed in the backward pass from c_fc's output: autodiff of GELU keeps erfc and
        # exp of the [tokens, 4 x width] input besides it (float32: see LayerNorm).
        activation = self.activation if hidden.dtype == jnp.float32 else jax.checkpoint(self.activation)
        return self.c_proj(activation(hidden))


class ResidualAttentionBlock(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, layers: int, activation, dtype,
                 rngs: nnx.Rngs, attention: str = "xla"):
        self.ln_1 = _layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, layers, dtype, rngs, attention)
        self.ln_2 = _layer_norm(width, dtype, rngs)
        self.mlp = MLP(width, int(width * mlp_ratio), layers, activation, dtype, rngs)

    def __call__(self, x, causal: bool):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


# What a rematerialised block keeps for its backward pass: "full" nothing (all recomputed), "dots"
# its matmul outputs without batch dimensions (the usual trade: the cheap elementwise work is redone).
REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise UserError(f"config.remat={name!r} is not one of {', '.join(REMAT_POLICIES)}")
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if name == "dots" else None


class Transformer(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation, dtype,
                 rngs: nnx.Rngs, scan: bool = False, attention: str = "xla"):
        self.scan = scan
        self.resblocks = nnx.List([
            ResidualAttentionBlock(width, heads, mlp_ratio, layers, activation, dtype, rngs, attention)
            for _ in range(layers)])

    def __call__(self, x, causal: bool, frozen_blocks: int = 0, remat: str = "none"):
        """`frozen_blocks` leading blocks run under stop_gradient: no activations are kept for them.
        The blocks after them (the ones a backward pass goes through) are rematerialised by `remat`
        (REMAT_POLICIES): their activations are recomputed in the backward pass instead of kept.
        With `scan`, each of the two runs of blocks is one lax.scan over its blocks' stacked params:
        XLA compiles one block per run instead of all 24 of ViT-L (the params keep open_clip's
        per-block names; the stack is a copy made in the step)."""
        frozen, trained = self.resblocks[:frozen_blocks], self.resblocks[frozen_blocks:]
        if frozen:
            x = jax.lax.stop_gradient(self._run(frozen, x, causal, "none"))
        return self._run(trained, x, causal, remat) if trained else x

    def _run(self, blocks, x, causal: bool, remat: str):
        def apply(block, y):
            return block(y, causal)

        if remat != "none":
            apply = nnx.remat(apply, policy=remat_policy(remat))
        if not self.scan or len(blocks) == 1:
            for block in blocks:
                x = apply(block, x)
            return x
        graphdef = nnx.graphdef(blocks[0])
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(block) for block in blocks))

        def body(y, state):
            return apply(nnx.merge(graphdef, state), y), None

        return jax.lax.scan(body, x, stacked)[0]


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, activation, dtype, rngs: nnx.Rngs, scan: bool = False,
                 attention: str = "xla"):
        scale = cfg.width ** -0.5
        self.conv1 = nnx.Conv(3, cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                              padding="VALID", use_bias=False, dtype=dtype, rngs=rngs)
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (cfg.width,)))
        self.positional_embedding = nnx.Param(
            scale * jax.random.normal(rngs.params(), (cfg.grid ** 2 + 1, cfg.width)))
        self.ln_pre = _layer_norm(cfg.width, dtype, rngs)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, dtype, rngs,
                                       scan, attention)
        self.ln_post = _layer_norm(cfg.width, dtype, rngs)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (cfg.width, embed_dim)))

    def tokens(self, pixels, frozen_blocks: int = 0, remat: str = "none"):
        """Transformer output before ln_post: class token [N, W] and patch grid [N, g, g, W]. With
        frozen_blocks > 0 nothing before the end of that block gets a gradient (the stem too)."""
        x = self.conv1(pixels)
        n, gh, gw, width = x.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, width))
        x = jnp.concatenate([cls, x.reshape(n, gh * gw, width)], axis=1)
        x = self.ln_pre(x + self.positional_embedding[...].astype(x.dtype))
        x = self.transformer(x, causal=False, frozen_blocks=frozen_blocks, remat=remat)
        return x[:, 0], x[:, 1:].reshape(n, gh, gw, width)

    def head(self, x):
        """ln_post + proj: the pooling head, shared by class tokens and ROI-pooled patch tokens."""
        return self.ln_post(x) @ self.proj[...].astype(x.dtype)

    def __call__(self, pixels):
        return self.head(self.tokens(pixels)[0])


class CLIP(nnx.Module):
    """`dtype`: the compute dtype (None: the params' float32); `scan`: each tower's blocks as lax.scan
    loops (see Transformer); `attention`: jax.nn.dot_product_attention's implementation ("xla", or
    "cudnn": cuDNN's fused attention, GPU and bf16 only). None changes the params."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs, dtype=None, scan: bool = False, attention: str = "xla"):
        self.config = cfg
        activation = quick_gelu if cfg.quick_gelu else exact_gelu
        text = cfg.text
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, activation, dtype, rngs, scan, attention)
        self.token_embedding = nnx.Embed(text.vocab_size, text.width, embedding_init=_normal(0.02),
                                         dtype=dtype, rngs=rngs)
        self.positional_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(),
                                                                       (text.context_length, text.width)))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_ratio, activation,
                                       dtype, rngs, scan, attention)
        self.ln_final = _layer_norm(text.width, dtype, rngs)
        self.text_projection = nnx.Param(
            text.width ** -0.5 * jax.random.normal(rngs.params(), (text.width, cfg.embed_dim)))
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

    def encode_image(self, pixels):
        """pixels: float [N, H, W, 3], normalised. Returns [N, embed_dim], not L2-normalised."""
        return self.visual(pixels)

    def encode_text(self, tokens):
        """tokens: int [N, context_length] from `zoomin_jax.tokenize`. Returns [N, embed_dim]."""
        x = self.token_embedding(tokens)
        x = self.transformer(x + self.positional_embedding[...].astype(x.dtype), causal=True)
        x = self.ln_final(x)
        x = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        return x @ self.text_projection[...].astype(x.dtype)

    def scale(self):
        """exp(logit_scale), as open_clip's forward: not clamped here, where a cap would give the
        stored value no gradient above it (the training step clamps the stored value instead)."""
        return jnp.exp(self.logit_scale[...])

    def __call__(self, pixels, tokens):
        return self.encode_image(pixels), self.encode_text(tokens), self.scale()



@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: CLIPConfig, dtype, scan: bool = False, attention: str = "xla") -> tuple[nnx.GraphDef, nnx.State]:
    # Cached: tracing the initialisers of ViT-L-14 takes seconds.
    return nnx.split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0), dtype=dtype, scan=scan, attention=attention)))


def abstract_params(cfg: CLIPConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Param path (as in nnx.to_flat_state) -> ShapeDtypeStruct, without allocating the model."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(_abstract_split(cfg, None)[1])}


def nest(flat: dict[tuple, object]) -> dict:
    """Flat {path tuple: leaf} -> the nested dict layout of nnx.to_pure_dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def merge(trainable: dict, frozen: dict) -> dict:
    """One nested param dict from two disjoint (or overriding: `trainable` wins) ones."""
    flat = traverse_util.flatten_dict(frozen) | traverse_util.flatten_dict(trainable)
    return traverse_util.unflatten_dict(flat)


def from_params(cfg: CLIPConfig, params: dict, dtype=None, scan: bool = False, attention: str = "xla") -> CLIP:
    """A CLIP holding `params` (nested dict as nnx.to_pure_dict), never initialising weights."""
    graphdef, abstract = _abstract_split(cfg, dtype, scan, attention)
    state = jax.tree.map(lambda leaf: leaf, abstract)  # a fresh State: the cached one stays abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
