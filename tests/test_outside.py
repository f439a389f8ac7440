"""The units outside the decoder (issue: the whole model in the budget): the packed embedding
and its tied head against dequantize on real SmolLM2 weights, a tied embedding stored once and
counted to the byte, the vision tower and projector of a LLaVA quantized, loaded and run, and
the options that keep any of them unquantized."""

import json

import pytest
import torch
from safetensors import safe_open

import luq
from luq.calibration import CalibrationConfig
from luq.errors import LuqError
from luq.models import find_units
from luq.models.loading import load_model
from luq.plan import KEEP
from luq.quant import get_format
from luq.quant.dense import dequantize_modules
from luq.quant.embedding import QuantEmbedding, TiedQuantHead
from luq.quant.linear import QuantLinear
from tiny_models import tiny_llama_dir, tiny_llava_dir

CALIBRATION = CalibrationConfig(samples=4, seq_len=32, seed=0)


@pytest.fixture(scope="module")
def smollm2_embedding():
    from transformers import AutoModelForCausalLM

    from luq.zoo.smollm2 import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    return model.get_input_embeddings()


def test_packed_embedding_and_tied_head_match_dequantize(smollm2_embedding):
    """Real SmolLM2 table (49152 x 576) at 4 bits: a lookup unpacks only its rows and gives
    exactly the dequantized rows; the tied head computes x W_hat^T from the same packed bytes."""
    q = get_format("rtn4-g64").quantize(smollm2_embedding.weight.detach(), None)
    embedding = QuantEmbedding.from_embedding(smollm2_embedding, q)
    table = q.dequantize()
    ids = torch.tensor([[0, 5, 49151, 5], [17, 300, 2, 0]])
    assert torch.equal(embedding(ids), table[ids])
    head = TiedQuantHead(embedding)
    x = torch.randn(3, 576)
    reference = x @ table.T
    # the head runs QuantLinear's fast kernel (bfloat16 activations): the bound of tests/test_kernels.py
    assert float((head(x) - reference).norm() / reference.norm()) <= 6e-3
    assert embedding.nbytes == q.nbytes and not list(head.buffers())  # the head holds no copy
    # dequantize_modules densifies the tied head too (evaluation speed): the exact dequantized weight
    owner = torch.nn.Module()
    owner.head = head
    assert dequantize_modules(owner) == 1 and type(owner.head) is torch.nn.Linear
    assert torch.equal(owner.head.weight, table)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny Llama whose head is tied to its 49152-row embedding, quantized under a budget that
    only fits with the embedding quantized."""
    root = tmp_path_factory.mktemp("tied")
    model_dir = tiny_llama_dir(root / "model", layers=2, hidden=64)
    fp16_bytes = 2 * sum(p.numel() for p in load_model(model_dir)[0].parameters())  # tied: counted once
    config = luq.LUQConfig(calibration=CALIBRATION, formats=("gptq4-g64", "gptq8-g64"), budget_gb=0.5 * fp16_bytes / 1e9,
                           sensitivity_samples=2, final_pass=False, kmeans_clusters=8)
    report = luq.quantize(model_dir, root / "out", config, cache_dir=root / "cache", progress=False,
                          log=lambda s: None)
    return {"model": model_dir, "out": root / "out", "report": report, "root": root}


def test_tied_embedding_is_stored_once_and_counted_to_the_byte(tied):
    report, out = tied["report"], tied["out"]
    embed = report["linears"]["model.embed_tokens"]
    assert embed["kind"] == "embed" and embed["format"] != KEEP
    names, stored = [], 0
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                names.append(key)
                t = f.get_tensor(key)
                stored += t.numel() * t.element_size()
    assert not [n for n in names if n.startswith("lm_head")]
    assert [n for n in names if n.startswith("model.embed_tokens.")] and "model.embed_tokens.weight" not in names
    assert stored == report["total_bytes"]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["tied_heads"] == {"lm_head": "model.embed_tokens"}


def test_quantized_embedding_loads_and_runs_close_to_full_precision(tied):
    model, tokenizer, _ = luq.load(tied["out"])
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedQuantHead)
    full, _, _ = load_model(tied["model"])
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        p = torch.log_softmax(full(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 0.05, kl  # a random tiny model at 4-8 bits: measured 1e-3
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    model_dir = tiny_llava_dir(root / "model", layers=2)
    return {"model": model_dir, "root": root}


def test_vision_tower_and_projector_join_the_budget_and_load(llava):
    """With everything but the vision tower kept, a budget under the fp16 size forces vision and
    projector linears into formats; their costs come from the backward through the tower."""
    net, processor, adapter = load_model(llava["model"])
    units = find_units(net, adapter, ("vision",))
    assert units and {u.kind for u in units.values()} == {"vision"}
    assert any(".multi_modal_projector." in n for n in units)
    vision_bytes = sum(2 * u.module.weight.numel() for u in units.values())
    full = luq.quantize(llava["model"], llava["root"] / "uniform", luq.LUQConfig(
        calibration=CalibrationConfig(samples=4, seq_len=48, alpha=0.5, seed=0), formats=("gptq8-g32",),
        final_pass=False, kmeans_clusters=8), cache_dir=llava["root"] / "cache", progress=False, log=lambda s: None)
    budget = full["total_bytes"] - vision_bytes // 3
    report = luq.quantize(llava["model"], llava["root"] / "out", luq.LUQConfig(
        calibration=CalibrationConfig(samples=4, seq_len=48, alpha=0.5, seed=0), formats=("gptq4-g32", "gptq8-g32"),
        budget_gb=budget / 1e9, keep=("embed", "head"), sensitivity_samples=4, final_pass=False, kmeans_clusters=8),
        cache_dir=llava["root"] / "cache", progress=False, log=lambda s: None)
    assert report["total_bytes"] <= budget
    vision = {n: i for n, i in report["linears"].items() if i["kind"] == "vision"}
    assert set(vision) == set(units)
    assert any(i["format"] != KEEP for i in vision.values())
    # LLaVA reads the features of the tower's second-to-last layer (vision_feature_layer -2): the
    # gradient reaches every linear up to it, and none of the last layer's, whose cost is exactly 0
    unused = {n for n in vision if ".encoder.layers.1." in n}
    assert unused and all(vision[n]["predicted_cost"] == 0 for n in unused)
    assert all(i["predicted_cost"] > 0 for n, i in vision.items() if i["format"] != KEEP and n not in unused)
    model, processor, _ = luq.load(llava["root"] / "out")
    quantized = [n for n, i in vision.items() if i["format"] != KEEP]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in quantized)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # kept, as asked


def test_one_format_with_every_unit_quantized_is_the_uniform_whole_model(tied):
    config = luq.LUQConfig(calibration=CALIBRATION, formats=("gptq8-g64",), keep=(), kmeans_clusters=8, final_pass=False)
    report = luq.quantize(tied["model"], tied["root"] / "uniform8", config, cache_dir=tied["root"] / "cache",
                          progress=False, log=lambda s: None)
    assert {i["format"] for i in report["linears"].values()} == {"gptq8-g64"}
    assert report["linears"]["model.embed_tokens"]["kind"] == "embed"


def test_keep_options_are_checked_and_the_paper_mode_keeps_everything():
    with pytest.raises(LuqError, match="--keep takes embed, head, vision"):
        luq.LUQConfig(budget_gb=1.0, keep="embed,tokens")
    assert luq.LUQConfig(allocate="entropy", n_low_layers=3).unit_kinds() == ()
    assert luq.LUQConfig(formats=("gptq3-g128",)).unit_kinds() == ()  # the uniform model, as peers make it
    assert luq.LUQConfig(budget_gb=1.0).unit_kinds() == ("embed", "head", "vision")
    assert luq.LUQConfig(budget_gb=1.0, keep="").unit_kinds() == ("embed", "head", "vision")
    assert luq.LUQConfig(budget_gb=1.0, keep="vision").unit_kinds() == ("embed", "head")


def test_streaming_refuses_a_vqa_threshold(tmp_path):
    """A VQA metric's evaluations run the whole model in memory: asking to stream them is one clear error."""
    with pytest.raises(LuqError, match="--metric textvqa evaluates the whole model in memory"):
        luq.quantize("smollm2", tmp_path / "o", luq.LUQConfig(max_drop=1.0, metric="textvqa"), stream=True,
                     log=lambda s: None)
