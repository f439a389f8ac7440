"""tiny-vlm: the small real vision-language model loads offline, answers, and runs through the pipeline."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from luq.zoo import tinyvlm
from luq.calibration import CalibrationConfig, calibration_batches
from luq.errors import LuqError
from luq.models import adapter_for
from luq.models.loading import BUILTIN, resolve
from luq.pipeline import measure_entropy


@pytest.fixture(scope="module")
def vlm():
    tinyvlm.trained_dir()  # builds the cache on a cold machine (~30 s), so the load below is timed warm
    started = time.perf_counter()
    model, processor = tinyvlm.load_tiny_vlm()
    return model, processor, time.perf_counter() - started


def test_loads_offline_in_seconds_as_a_stock_llava(vlm):
    model, processor, seconds = vlm
    assert seconds < 20
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert adapter_for(model).family == "llava"
    assert model.config.vision_config.model_type == "dinov2"
    assert [type(m).__name__ for m in model.model.multi_modal_projector.children()] == ["Linear", "GELUActivation", "Linear"]
    assert model.model.multi_modal_projector.linear_1.weight.shape == (576, 384)
    assert "tiny-vlm" in BUILTIN and json.loads((tinyvlm.trained_dir() / "luq_tiny_vlm.json").read_text())
    assert resolve("tiny-vlm") == str(tinyvlm.trained_dir())


def test_processor_expands_the_image_to_64_tokens(vlm):
    model, processor, _ = vlm
    image = tinyvlm.make_samples(1, seed=5)[0].image
    prompt = tinyvlm.chat_prompt(processor, "What colour is the shape?")
    assert prompt.count(tinyvlm.IMAGE_TOKEN) == 1 and prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 112, 112)


def test_answers_a_fixed_generated_question(vlm):
    model, processor, _ = vlm
    samples = tinyvlm.make_samples(1, seed=123)  # one of each kind, a stream the training never drew
    sample = next(s for s in samples if s.kind == "shape")
    answer = tinyvlm.answer_questions(model, processor, [sample.image], [sample.question])[0]
    assert tinyvlm.is_correct(answer, sample.answer), (sample.question, sample.answer, answer)


def test_entropy_pipeline_on_real_photos(vlm, tmp_path):
    from skimage import data

    model, processor, _ = vlm
    lines = []
    for name, question in (("astronaut", "What colour is the shape?"), ("chelsea", "Is there a circle?")):
        Image.fromarray(np.asarray(getattr(data, name)())).save(tmp_path / f"{name}.png")
        lines.append(json.dumps({"image": f"{name}.png", "question": question}))
    (tmp_path / "photos.jsonl").write_text("\n".join(lines) + "\n")
    config = CalibrationConfig(images=str(tmp_path / "photos.jsonl"), alpha=2 / 3, samples=3, seq_len=96, seed=0)
    batches = calibration_batches(processor, adapter_for(model), config, batch_size=2)

    result = measure_entropy(model, adapter_for(model), batches, k_grid=(4, 8), progress=False)
    n_layers = model.config.text_config.num_hidden_layers
    assert result.tokens["image"] == 2 * 64 and result.tokens["text"] > 96
    assert len(result.image_entropy) == len(result.text_entropy) == n_layers
    assert all(e is not None and e > 0 for e in result.image_entropy + result.text_entropy)
    assert sorted(result.ranking) == list(range(n_layers))


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(LuqError, match="unknown question kind"):
        tinyvlm.make_sample("smell", np.random.default_rng(0))
    with pytest.raises(LuqError, match="images for"):
        tinyvlm.answer_questions(None, None, [], ["a question"])
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(LuqError, match="not found"):
        tinyvlm.trained_dir(missing)
