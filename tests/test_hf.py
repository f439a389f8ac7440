"""transformers' from_pretrained on luq artifacts of real weights (SmolLM2 and tiny-vlm, cut to
their first two decoder layers to stay fast): the packed modules, the same logits as luq.load,
generate, and one-line refusals."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import luq
from luq.calibration import CalibrationConfig
from luq.errors import LuqError
from luq.quant import QuantLinear
from tiny_models import quick_artifact, tiny_vlm_head_dir

TEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by"
# luq.load and from_pretrained run the same modules on the same tensors: measured difference 0.0
LOGIT_TOLERANCE = 1e-4


def quantized_names(path):
    return set(json.loads((path / "config.json").read_text())["quantization_config"]["modules"])


def assert_packed(model, names):
    """Every quantized linear is a QuantLinear holding only its packed buffers (no dense weight)."""
    for name in names:
        assert isinstance(model.get_submodule(name), QuantLinear)
    assert not [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in names]


@pytest.mark.parametrize("kind", ["gptq4", "mix", "embed"])
def test_causal_lm_from_pretrained_equals_luq_load(smollm2_artifacts, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_artifacts[kind]
    reference, _, _ = luq.load(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    names = quantized_names(path)
    assert_packed(model, names)
    methods = {model.get_submodule(n).weight_config["method"] for n in names}
    assert methods == ({"gptq", "billm"} if kind == "mix" else {"gptq"})
    if kind == "embed":  # the packed embedding, and the head computing from it
        assert type(model.model.embed_tokens).__name__ == "QuantEmbedding"
        assert type(model.lm_head).__name__ == "TiedQuantHead"
        assert not [n for n, _ in model.named_parameters() if "embed_tokens" in n or "lm_head" in n]
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= LOGIT_TOLERANCE
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=8, do_sample=False))


def test_vision_language_from_pretrained_equals_luq_load(tmp_path):
    from PIL import Image
    from skimage import data
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from luq.zoo.tinyvlm import chat_prompt

    model_dir = tiny_vlm_head_dir(tmp_path / "model", layers=2)
    # a budget that packs the vision tower's linears and the tied embedding too
    path = quick_artifact(model_dir, tmp_path / "q", formats=("gptq4-g128",), budget_gb=0.05,
                          calibration=CalibrationConfig(samples=4, seq_len=128, seed=0, alpha=0.5))
    reference, _, _ = luq.load(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    names = quantized_names(path)
    assert_packed(model, names)
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert type(model.model.language_model.embed_tokens).__name__ == "QuantEmbedding"
    assert type(model.lm_head).__name__ == "TiedQuantHead"
    inputs = processor(images=[Image.fromarray(data.astronaut())], text=[chat_prompt(processor, "What is shown?")],
                       return_tensors="pt")
    with torch.no_grad():
        diff = (model(**inputs).logits - reference(**inputs).logits).abs().max().item()
    assert diff <= LOGIT_TOLERANCE
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_unreadable_artifacts_are_one_line_errors(smollm2_artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    newer = shutil.copytree(smollm2_artifacts["gptq4"], tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(LuqError, match="reads artifact formats up to 1; .* format 99 by a newer luq") as err:
        AutoModelForCausalLM.from_pretrained(newer)
    assert "\n" not in str(err.value)
    corrupt = shutil.copytree(smollm2_artifacts["gptq4"], tmp_path / "corrupt")
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(LuqError, match="does not match its checksum"):
        AutoModelForCausalLM.from_pretrained(corrupt)


def test_import_luq_stays_light_and_registers_on_demand():
    code = ("import sys, luq; assert 'transformers' not in sys.modules and 'torch' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; "
            "print(AUTO_QUANTIZER_MAPPING['luq'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "LuqHfQuantizer"
