"""A tiny random LLaVA with a real processor, saved as a model directory, for the eval tests.

Built from SmolLM2's real tokenizer plus an added ``<image>`` token, a CLIP image processor
at 56 px (4x4 patches of 14 px = 16 image tokens) and a one-turn chat template of the
LLaVA-1.5 kind. The weights are random: answers are noise, but every code path (chat
template, image tokens, left padding, batched greedy generation) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

CACHE_NAME = "test-tiny-llava-smollm2-tokenizer-v1"  # bump when the builder below changes

TINY_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tiny_llava_dir(path: Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA (2 decoder layers) with a working LlavaProcessor in ``path``."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from luq.zoo.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=TINY_VLM_CHAT_TEMPLATE)

    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_llava_dir() -> Path:
    """The tiny LLaVA directory, built once into luq's cache (deterministic: seed 0)."""
    from luq.store import cache_root

    from luq.store import build_dir_once

    target = cache_root() / CACHE_NAME
    build_dir_once(target, build_tiny_llava_dir)
    return target
