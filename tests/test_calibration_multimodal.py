"""The image+question side of calibration on a tiny random LLaVA with a real LlavaProcessor,
the bundled real photos and the real SmolLM2 tokenizer."""

import json

import pytest
import torch

from luq import LuqError
from luq.calibration import (CalibrationConfig, calibration_batches, load_image_questions, multimodal_fraction)
from luq.capture import IMAGE, PAD, TEXT
from luq.cli import main
from luq.models import adapter_for
from luq.models.loading import load_model
from luq.pipeline import measure_entropy
from tiny_models import tiny_llava_dir

IMAGE_TOKENS = 16  # a 56px image in 14px patches, CLS dropped


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tiny_llava_dir(tmp_path_factory.mktemp("llava") / "model")
    model, processor, adapter = load_model(path)
    return path, model, processor, adapter


def counts(batches):
    kinds = torch.cat([k.reshape(-1) for _, k in batches])
    return {name: int((kinds == kind).sum()) for name, kind in (("text", TEXT), ("image", IMAGE), ("pad", PAD))}


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_alpha_is_honoured_by_token_counts(llava, alpha):
    _, _, processor, adapter = llava
    config = CalibrationConfig(alpha=alpha, samples=8, seq_len=160, seed=1)
    batches = calibration_batches(processor, adapter, config, batch_size=4)
    mm = [(inputs, kinds) for inputs, kinds in batches if "pixel_values" in inputs]
    assert sum(k.shape[0] for _, k in mm) == config.n_multimodal
    assert all(k.shape[1] == 160 for _, k in batches)
    c = counts(batches)
    n_images = sum(inputs["pixel_values"].shape[0] for inputs, _ in mm)
    assert c["image"] == IMAGE_TOKENS * n_images  # every image token is a vision-tower output
    assert c["pad"] == sum(int((k == PAD).sum()) for _, k in mm)  # text windows are never padded
    fraction = multimodal_fraction(batches)
    # alpha counts sequences; packing whole samples leaves at most one sample's worth of padding each
    longest = 80
    assert alpha - longest / 160 <= fraction <= alpha + 1e-9
    for inputs, kinds in mm:
        assert torch.equal(inputs["input_ids"] == processor.image_token_id, kinds == IMAGE)
        assert torch.equal(inputs["attention_mask"] == 0, kinds == PAD)


def test_seeded_and_shuffled(llava):
    _, _, processor, adapter = llava
    a = calibration_batches(processor, adapter, CalibrationConfig(alpha=1.0, samples=2, seq_len=160, seed=0))
    b = calibration_batches(processor, adapter, CalibrationConfig(alpha=1.0, samples=2, seq_len=160, seed=0))
    c = calibration_batches(processor, adapter, CalibrationConfig(alpha=1.0, samples=2, seq_len=160, seed=5))
    assert torch.equal(a[0][0]["input_ids"], b[0][0]["input_ids"])
    assert not torch.equal(a[0][0]["input_ids"], c[0][0]["input_ids"])


def test_entropy_per_token_kind_on_real_photos(llava):
    _, model, processor, adapter = llava
    batches = calibration_batches(processor, adapter, CalibrationConfig(alpha=0.5, samples=4, seq_len=160))
    result = measure_entropy(model, adapter, batches, k=8, k_grid=(8,), progress=False)
    assert all(e is not None for e in result.image_entropy + result.text_entropy)
    assert result.tokens["image"] > 0 and result.tokens["text"] > 0


def test_cli_entropy_with_images(llava, tmp_path):
    path = llava[0]
    assert main(["entropy", path, "--out", str(tmp_path), "--alpha", "0.5", "--samples", "4", "--seq-len", "160",
                 "--k", "8"]) == 0
    result = json.loads((tmp_path / "entropy.json").read_text())
    assert None not in result["image_entropy"] and 0.25 < result["tokens"]["multimodal_fraction"] <= 0.5
    assert main(["entropy", path, "--out", str(tmp_path / "disk"), "--alpha", "0.5", "--samples", "4",
                 "--seq-len", "160", "--k", "8", "--offload-dir", str(tmp_path / "activations")]) == 0
    on_disk = json.loads((tmp_path / "disk" / "entropy.json").read_text())
    assert on_disk["entropy"] == result["entropy"] and on_disk["image_entropy"] == result["image_entropy"]


def test_bundled_photos_are_real_and_answered():
    samples = load_image_questions(None)
    assert len(samples) >= 25 and len({s.image for s in samples}) >= 14
    assert all(s.image.is_file() for s in samples)
    assert sum(s.answer is not None for s in samples) >= 20


def test_bad_image_sources_are_one_line_errors(llava, tmp_path):
    _, _, processor, adapter = llava
    config = lambda src: CalibrationConfig(images=str(src), alpha=1.0, samples=1, seq_len=160)  # noqa: E731
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"image": "missing.jpg", "question": "What?"}\n')
    with pytest.raises(LuqError, match=r"q.jsonl:1: image not found"):
        calibration_batches(processor, adapter, config(jsonl))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    jsonl.write_text('{"image": "broken.jpg", "question": "What?"}\n')
    with pytest.raises(LuqError, match=r"q.jsonl:1: cannot read image"):
        calibration_batches(processor, adapter, config(jsonl))
    jsonl.write_text('{"image": "broken.jpg", "question": "What?"}\n{oops\n')
    with pytest.raises(LuqError, match=r"q.jsonl:2: malformed JSON"):
        load_image_questions(str(jsonl))
    jsonl.write_text('{"question": "What?"}\n')
    with pytest.raises(LuqError, match=r"q.jsonl:1: each line needs"):
        load_image_questions(str(jsonl))
    with pytest.raises(LuqError, match="calibration images not found"):
        load_image_questions(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(LuqError, match="more than --seq-len"):
        calibration_batches(processor, adapter, CalibrationConfig(alpha=1.0, samples=1, seq_len=20))
    with pytest.raises(LuqError, match="take no images"):
        calibration_batches(processor, adapter_for("llama"), CalibrationConfig(alpha=0.5, samples=2, seq_len=64))
    with pytest.raises(LuqError, match="--alpha is 0"):
        calibration_batches(processor, adapter, CalibrationConfig(images=str(jsonl), samples=2, seq_len=64))
