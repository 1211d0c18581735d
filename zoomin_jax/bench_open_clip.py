"""The reference for `bench_train --reference open_clip`: the same step shape trained with open_clip in
PyTorch, on the same machine, as a careful PyTorch user would write it — the same architecture,
the same trainable leaves (config.train_rules applied to the state_dict names), the frozen stem and
leading blocks under no_grad (no activations kept), the text tower skipped when the config caches
its embeddings, fused AdamW. It encodes exactly the images and texts our step encodes
(flops.step_shape: parents and every child slot); its loss is the plain CLIP loss of each image
against one text, since our step's extra terms (child means, ROI pooling) are a negligible share
of the work (compare XLA's count with the hand count in bench_train's table).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from zoomin_jax import flops
from zoomin_jax.recipes import JOINT, LEVELS
from zoomin_jax.sharding import match_rules


class Reference:
    def __init__(self, config, run, level: str):
        cfg = run.model_cfg
        self.model = open_clip.CLIP(**cfg.open_clip_cfg)
        rules = tuple(tuple(rule) for rule in config.train_rules)
        trainable = []
        for name, param in self.model.named_parameters():
            param.requires_grad_(match_rules(rules, name.replace(".", "/"), "train") is not None)
            if param.requires_grad:
                trainable.append(param)
        optim = dict(config.optim)
        self.optimizer = torch.optim.AdamW(trainable, lr=optim["lr"], betas=(optim["b1"], optim["b2"]),
                                           weight_decay=optim["weight_decay"], fused=True)
        self.frozen_blocks = run.part.frozen_blocks
        self.text_cached = bool(config.data.get("text_cache"))
        batch = config.data.batch_size[LEVELS[0] if level == JOINT else level]
        self.shape = flops.step_shape(cfg, level, batch, run.dims, run.part.frozen_blocks,
                                      run.part.text_frozen, config.get("remat", "none"))
        self.size, self.embed_dim, self.context = cfg.vision.image_size, cfg.embed_dim, cfg.text.context_length
        self.text_frozen = run.part.text_frozen

    def encode_image(self, pixels):
        visual = self.model.visual
        with torch.no_grad() if self.frozen_blocks else torch.enable_grad():
            x = visual._embeds(pixels)
        blocks = visual.transformer.resblocks
        with torch.no_grad():
            for block in blocks[:self.frozen_blocks]:
                x = block(x)
        for block in blocks[self.frozen_blocks:]:
            x = block(x)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj

    def step(self, pixels, texts) -> float:
        images = F.normalize(self.encode_image(pixels), dim=-1)
        if self.text_cached:
            text = texts
        else:
            with torch.no_grad() if self.text_frozen else torch.enable_grad():
                text = self.model.encode_text(texts)
        text = F.normalize(text, dim=-1)
        # Every image against one text: the texts repeat when only the parents' are encoded.
        text = text.repeat(-(-len(images) // len(text)), 1)[:len(images)]
        logits = self.model.logit_scale.exp() * images @ text.T
        labels = torch.arange(len(images))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    def inputs(self, rng: np.random.Generator):
        pixels = torch.from_numpy(rng.standard_normal((self.shape.images, 3, self.size, self.size), np.float32))
        if self.text_cached:
            texts = torch.from_numpy(rng.standard_normal((self.shape.images, self.embed_dim), np.float32))
        else:
            tokens = rng.integers(300, 40000, (max(self.shape.texts, 1), self.context))
            tokens[:, 0], tokens[:, -1] = 49406, 49407  # SOT ... EOT (argmax pooling takes the last)
            texts = torch.from_numpy(tokens)
        return pixels, texts


def step_seconds(config, run, level: str, timed_steps: int) -> float:
    """Median seconds of `timed_steps` open_clip steps after a warm-up step."""
    reference = Reference(config, run, level)
    rng = np.random.default_rng(0)
    times = []
    for n in range(timed_steps + 1):
        pixels, texts = reference.inputs(rng)
        tick = time.perf_counter()
        reference.step(pixels, texts)
        times.append(time.perf_counter() - tick)
    return statistics.median(times[1:])
