"""A tiny random Qwen2.5-VL built locally (no hub): BPE tokenizer trained with `tokenizers`, a locally
built processor, tiny widths; saved with save_pretrained so tests load it by path like a real model."""
from __future__ import annotations

import string
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen(path: Path, corpus: list[str], seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64),
                                    tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def side_by_side(count: int):
    """A figure answer of `count` panels A, B, … side by side and an arrow in the first one."""
    def answer(height: int, width: int) -> list[dict]:
        return [{"bbox_2d": [width * i // count, 0, width * (i + 1) // count, height], "label": chr(ord("A") + i)}
                for i in range(count)] + [{"bbox_2d": [width // 8, height // 4, width // 8 + 6, height // 4 + 6],
                                           "label": "arrow"}]
    return answer


def rule_answer(caption: str) -> list[dict]:
    """A caption split as a good model would answer it: the rules' labels and own texts, the shared
    context under "", and [] for a caption of one image."""
    from annotate.captions import shared_context, split_caption
    own = [{"label": p["label"], "text": p["text"]} for p in split_caption(caption, shared_context=False) if p["label"]]
    return ([{"label": "", "text": shared_context(caption)}] if own else []) + own


def _between(text: str, template: str, field: str) -> str | None:
    """What `template` (a prompts.py format string) was filled with at `field` in `text`, or None: the text
    between the template's words on either side of the field, after their last place in `text` (the words
    in front of the caption of a split with context, '\nCaption: "', are in front of each example's too)."""
    words, fields = [""], []  # the words between fields, "{{" and "}}" read as "{" and "}"
    for literal, name, _, _ in string.Formatter().parse(template):
        words[-1] += literal
        if name is not None:
            fields.append(name)
            words.append("")
    before, after = words[fields.index(field)], words[fields.index(field) + 1]
    start = text.rfind(before)
    if start < 0:
        return None
    start += len(before)
    return text[start:text.index(after, start)]


class GoodAnswers:
    """How a good Qwen2.5-VL answers each question of the request plan (`prompt` holds the question), in
    pixels of the (height, width) image it saw: a figure question gets `figure(height, width)` (a list of
    {"bbox_2d", "label"}; default two panels side by side and an arrow); a caption split `split(caption)`
    (default `rule_answer`), the citing paragraphs it shows (None for none) kept in `contexts`; a panel
    question a description and a box (a fifth to a half of the crop's sides) for each phrase it asks
    about, what it says the article says of the panel (None for nothing) kept in `mentions`; a region question a description and, where it names a phrase, `shows(phrase)` (default True)
    as its verdict. Returns (the question's kind, the answer)."""

    def __init__(self, figure=side_by_side(2), split=rule_answer, shows=lambda phrase: True):
        self.figure, self.split, self.shows = figure, split, shows
        self.contexts: list[str] = []
        self.mentions: list[str | None] = []

    def __call__(self, prompt: str, height: int | None, width: int | None) -> tuple[str, str]:
        import json
        import re

        from annotate import prompts
        if prompts.FIGURE in prompt:
            return "figure", "```json\n" + json.dumps(self.figure(height, width)) + "\n```"
        paragraphs = _between(prompt, prompts.SPLIT_CAPTION_WITH_CONTEXT, "paragraphs")
        split = prompts.SPLIT_CAPTION if paragraphs is None else prompts.SPLIT_CAPTION_WITH_CONTEXT
        if (caption := _between(prompt, split, "caption")) is not None:
            self.contexts.append(paragraphs)
            return "split", json.dumps(self.split(caption))
        if prompts.REGION.split(" Describe")[0] in prompt:
            phrase = _between(prompt, prompts.REGION_WITH_PHRASE, "phrase")
            verdict = {} if phrase is None else {"shows": self.shows(phrase)}
            return "region", json.dumps({"description": "A dark nucleus."} | verdict)
        self.mentions.append(_between(prompt, prompts.PANEL_MENTIONS, "mentions"))
        listed = re.search(r"phrases in it: (.*?)\. Answer only", prompt, re.DOTALL)
        phrases = re.findall(r'"([^"]*)"', listed.group(1)) if listed else []
        box = [width // 5, height // 5, width // 2, height // 2]
        return "panel", json.dumps({"description": "A stained tissue section.",
                                    "boxes": [{"bbox_2d": box, "label": phrase} for phrase in phrases]})


class Scripted:
    """Stands in for the network's `generate` only, answering as GoodAnswers(figure, split, shows) in pixels
    of the resized input it saw, read off its image grid. Like generate, it ends each answer with the
    end-of-sequence token unless `max_new_tokens` cuts it first, and pads the rows that ended. `calls`
    holds each call's question kinds and budget. Everything around it (processor, prompts, parsing,
    mapping, pooling, fusion) is real."""

    def __init__(self, engine, figure=side_by_side(2), split=rule_answer, shows=lambda phrase: True):
        self.tokenizer, self.answer, self.calls = engine.processor.tokenizer, GoodAnswers(figure, split, shows), []
        self.image_token_id = engine.processor.image_token_id
        self.patch = engine.model.config.vision_config.patch_size

    def __call__(self, input_ids, max_new_tokens, image_grid_thw=None, **_):
        import torch
        kinds, answers = [], []
        # One grid per row with an image, in row order (a call mixes image and text-only rows).
        grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
        for ids, prompt in zip(input_ids.tolist(), self.tokenizer.batch_decode(input_ids), strict=True):
            _, rows, columns = next(grids) if self.image_token_id in ids else (1, None, None)
            kind, answer = self.answer(prompt, rows and rows * self.patch, columns and columns * self.patch)
            kinds.append(kind)
            answers.append(answer)
        self.calls.append((kinds, max_new_tokens))
        ids = [(row + [self.tokenizer.eos_token_id])[:max_new_tokens]
               for row in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        longest = max(map(len, ids))
        answer_ids = torch.tensor([row + [self.tokenizer.pad_token_id] * (longest - len(row)) for row in ids])
        return torch.cat([input_ids, answer_ids], dim=1)
