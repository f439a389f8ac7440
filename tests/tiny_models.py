"""Tiny random LLaVA and Qwen2.5-VL built from configs, with hand-made inputs (no processor)."""

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)

from luq.capture import IMAGE, PAD, TEXT

VOCAB = 512


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=56, patch_size=14, projection_dim=32),
        image_token_index=VOCAB - 1)
    return LlavaForConditionalGeneration(config).eval()


def llava_inputs(model, with_image=True, batch=2, text_len=12, seed=0):
    """input_ids with 16 image tokens (a 56px image in 14px patches) after a BOS, padded on the left."""
    g = torch.Generator().manual_seed(seed)
    n_image = 16 if with_image else 0
    ids = torch.randint(1, VOCAB - 2, (batch, 1 + n_image + text_len), generator=g)
    kind = torch.full(ids.shape, TEXT, dtype=torch.int8)
    if with_image:
        ids[:, 1:1 + n_image] = model.config.image_token_index
        kind[:, 1:1 + n_image] = IMAGE
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    kind[0, :3] = PAD
    inputs = {"input_ids": ids, "attention_mask": mask}
    if with_image:
        inputs["pixel_values"] = torch.randn(batch, 3, 56, 56, generator=g)
    return inputs, kind


def tiny_qwen25vl(seed=0):
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),  # sums to head_dim/2 = 8
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_inputs(model, with_image=True, batch=2, text_len=12, seed=0):
    """A 56x56 image = 4x4 patches of 14px, merged 2x2 -> 4 image tokens between vision start/end."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_image = 4 if with_image else 0
    ids = torch.randint(3, VOCAB - 5, (batch, 2 + n_image + 2 + text_len), generator=g)
    kind = torch.full(ids.shape, TEXT, dtype=torch.int8)
    inputs = {}
    if with_image:
        ids[:, 2] = cfg.vision_start_token_id
        ids[:, 3:3 + n_image] = cfg.image_token_id
        ids[:, 3 + n_image] = cfg.vision_end_token_id
        kind[:, 3:3 + n_image] = IMAGE
        patch_dim = 3 * 2 * 14 * 14
        inputs["pixel_values"] = torch.randn(batch * 16, patch_dim, generator=g)
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kind[0, :2] = PAD
    inputs.update(input_ids=ids, attention_mask=mask)
    return inputs, kind


def tiny_llama_dir(path, seed=0, layers=4, hidden=64):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a local model directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from luq.zoo.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LLAVA_TEMPLATE = ("{% for message in messages %}{{ message['role'] | upper }}: "
                  "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                  "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
                  "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
                  "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tiny_llava_dir(path, seed=0, layers=3):
    """A tiny random LLaVA with a real LlavaProcessor (SmolLM2's tokenizer plus an <image>
    token, a 56px CLIP image processor: 16 image tokens per image), saved as a model dir."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from luq.zoo.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE, image_token="<image>")
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                                pad_token_id=tokenizer.pad_token_id),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=56, patch_size=14, projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def smollm2_head_dir(path, layers=4):
    """Real SmolLM2-135M weights cut to their first `layers` decoder layers (embeddings, final
    norm and tied head kept): a small model with real weight and activation statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from luq.zoo.smollm2 import smollm2_dir

    source = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    _keep_first_layers(model.model, model.config, layers)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


def tiny_vlm_head_dir(path, layers=2):
    """The real tiny-vlm (DINOv2-small, trained projector, SmolLM2) with its language model
    cut to the first `layers` decoder layers, saved with its processor."""
    from luq.zoo.tinyvlm import load_tiny_vlm

    model, processor = load_tiny_vlm()
    _keep_first_layers(model.model.language_model, model.config.text_config, layers)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _keep_first_layers(decoder, config, layers):
    decoder.layers = decoder.layers[:layers]
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]


def quick_artifact(model_dir, out, **kw):
    """A luq artifact of `model_dir` made cheaply: 4 x 64 calibration tokens, no final pass."""
    import luq
    from luq.calibration import CalibrationConfig

    config = luq.LUQConfig(**{"calibration": CalibrationConfig(samples=4, seq_len=64, seed=0), "final_pass": False,
                              "sensitivity_samples": 2, "kmeans_clusters": 8, **kw})
    luq.quantize(model_dir, out, config, cache_dir=out.parent / "cache", progress=False, log=lambda s: None)
    return out
