"""Streaming a model from its safetensors shards, one decoder layer at a time: the same
logits as the model in memory (LLaVA and Qwen2.5-VL checkpoints under the hub's older key
names included), the same artifact, to the byte, and a file writer that writes what
safetensors writes."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

import luq
from luq.calibration import CalibrationConfig
from luq.capture import layerwise_logits
from luq.errors import LuqError
from luq.models import adapter_for
from luq.models.loading import load_model
from luq.models.streaming import is_streamed, layer_on, load_streaming
from luq.tensorfile import TensorFiles, write_safetensors
from tiny_models import llava_inputs, qwen_inputs, tiny_llama_dir, tiny_llava, tiny_llava_dir, tiny_qwen25vl


def test_writer_writes_the_bytes_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 7, generator=g), "a.scales": torch.randn(3, generator=g).half(),
               "c.qweight": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g), "empty": torch.zeros(0),
               "d.bf": torch.randn(4, generator=g).bfloat16(), "e.idx": torch.arange(5, dtype=torch.int32),
               "f.mask": torch.tensor([True, False, True])}
    save_file(tensors, str(tmp_path / "ref.safetensors"), {"format": "pt"})
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "ours.safetensors", specs,  # values given in another order
                      lambda put: [put(k, v) for k, v in reversed(tensors.items())], {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    files = TensorFiles([tmp_path / "ours.safetensors"])
    assert all(torch.equal(files.read(k), v) for k, v in tensors.items())


def _hub_llava_dir(path, model):
    """A LLaVA checkpoint under the names the llava-hf repos use (language_model.model.*, ...)."""
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
    return _save_renamed(path, model, renames)


def _hub_qwen_dir(path, model):
    """A Qwen2.5-VL checkpoint under the Qwen repos' names (model.layers.*, visual.*)."""
    return _save_renamed(path, model, (("model.language_model.", "model."), ("model.visual.", "visual.")))


def _save_renamed(path, model, renames):
    path.mkdir()
    state = {}
    for name, t in model.state_dict().items():
        for new, old in renames:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        state[name] = t.contiguous()
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:  # tied: stored once
        state = {k: v for k, v in state.items() if "lm_head" not in k}
    half = len(state) // 2  # two shards and an index, as the 7B repos are
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / file), {"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_hub_named_checkpoint_streams_to_the_same_logits(tmp_path, family):
    model, inputs_of, write = ((tiny_llava(), llava_inputs, _hub_llava_dir) if family == "llava"
                               else (tiny_qwen25vl(), qwen_inputs, _hub_qwen_dir))
    folder = write(tmp_path / "hub", model)
    assert not any(k.startswith("model.language_model.") for k in TensorFiles.in_dir(folder).keys())
    adapter = adapter_for(model)
    streamed = load_streaming(str(folder), model.config, AutoModelForImageTextToText, adapter)
    assert is_streamed(streamed)
    layers = adapter.decoder_layers(streamed)
    assert all(p.device.type == "meta" for p in layers.parameters())  # nothing of the decoder in memory
    assert all(p.device.type == "meta" for p in streamed.get_input_embeddings().parameters())
    vision = streamed.model.vision_tower if family == "llava" else streamed.model.visual
    assert all(p.device.type == "meta" for p in vision.parameters())  # read while the inputs are captured
    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()  # transformers' own renaming
    for i, layer in enumerate(layers):
        with layer_on(layer, "cpu"):
            expected = adapter.decoder_layers(reference)[i].state_dict()
            assert all(torch.equal(t, expected[k]) for k, t in layer.state_dict().items())
    batches = [inputs_of(model, with_image=True, seed=1), inputs_of(model, with_image=False, seed=2)]
    with torch.no_grad():
        for (inputs, _), logits in zip(batches, layerwise_logits(streamed, adapter, batches)):
            # the same operations in the same order, only grouped by layer: equal to the bit
            assert torch.equal(logits, reference(**inputs, use_cache=False).logits)
    assert all(p.device.type == "meta" for p in layers.parameters())  # every layer freed after use


def test_missing_layer_tensor_is_one_clear_error(tmp_path):
    model = tiny_llava()
    folder = _hub_llava_dir(tmp_path / "hub", model)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = folder / index["weight_map"].pop(victim)
    files = TensorFiles([shard])
    save_file({k: files.read(k) for k in files.keys() if k != victim}, str(shard), {"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(LuqError, match="layers.1.mlp.up_proj.weight"):
        load_streaming(str(folder), model.config, LlavaForConditionalGeneration, adapter_for(model))


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_streaming_quantize_writes_the_in_memory_artifact(tmp_path, family):
    """The measured allocation over two formats with every unit outside the decoder in the budget
    (their Hessians, formats and costs; sensitivity, knapsack, final pass, measured KL), streamed
    and in memory: the same plan and the same files. Llama: tied embeddings; LLaVA: saved by
    transformers under the hub's names, calibrated on images and text, its vision tower in the plan."""
    if family == "llama":
        model_dir, calibration = tiny_llama_dir(tmp_path / "model", layers=3), CalibrationConfig(samples=2, seq_len=32)
    else:
        model_dir, calibration = tiny_llava_dir(tmp_path / "model", layers=2), CalibrationConfig(alpha=0.5, samples=2,
                                                                                                seq_len=160)
    # a budget below the float16 embedding (and head): the knapsack must quantize units outside the decoder
    budget = 0.004 if family == "llama" else 0.008
    config = luq.LUQConfig(calibration=calibration, formats=("gptq4-g128", "gptq3-g64"), budget_gb=budget)
    reports = {}
    for stream in (False, True):
        reports[stream] = luq.quantize(model_dir, tmp_path / f"q{stream}", config, cache_dir=tmp_path / f"c{stream}",
                                       progress=False, log=lambda s: None, stream=stream)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "qTrue" / name).read_bytes() == (tmp_path / "qFalse" / name).read_bytes()
    assert reports[True]["total_bytes"] == reports[False]["total_bytes"]
    plans = [json.loads((tmp_path / f"q{stream}" / "config.json").read_text())["quantization_config"]["plan"]
             for stream in (False, True)]
    assert plans[0] == plans[1]
    outside = [name for name in plans[0] if ".layers." not in name]
    assert outside and any(plans[0][n] != "keep" for n in outside)  # the units are in the plan, some quantized
    assert reports[True]["measured_cost"] == reports[False]["measured_cost"]
    ids = torch.tensor([[1, 50, 700, 3000, 12, 9]])
    logits = [luq.load(tmp_path / f"q{stream}")[0](input_ids=ids).logits for stream in (False, True)]
    assert torch.equal(logits[0], logits[1])


def test_load_model_streams_only_when_asked(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "model", layers=2)
    in_memory, _, adapter = load_model(model_dir)
    streamed, _, _ = load_model(model_dir, stream=True)
    assert not is_streamed(in_memory) and is_streamed(streamed)
    embed = streamed.model.embed_tokens
    assert embed.weight.device.type == "meta"  # read only while a stage uses it
    with layer_on(embed, "cpu"):
        assert torch.equal(embed.weight, in_memory.model.embed_tokens.weight)
    assert streamed.lm_head.weight is embed.weight  # still tied as from_pretrained ties, after release


# --- memory: what a streamed pass holds ----------------------------------------------------


def test_converting_read_equals_to_dtype(tmp_path, monkeypatch):
    """A tensor converted chunk by chunk as it is read is `.to(dtype)` of the stored one."""
    import luq.tensorfile as tensorfile

    monkeypatch.setattr(tensorfile, "_CHUNK", 64)  # many chunks, the last one short
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 11, generator=g).half(), "b": torch.randn(5, generator=g).bfloat16(),
               "i": torch.arange(7, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    files = TensorFiles([tmp_path / "t.safetensors"])
    for name, t in tensors.items():
        got = files.read(name, torch.float32)
        expected = t.float() if t.is_floating_point() else t  # integers are never converted
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_a_streamed_layer_used_twice_at_once_is_freed_once_after(tmp_path):
    """A stage that reads a layer while a pass holds it (the layer's digest, taken when the pass
    reaches the layer) must not leave it in memory: every decoder weight is back on the meta
    device after a quantizing pass."""
    from luq.pipeline import layer_pass
    from luq.quant.formats import get_format
    from luq.variants import VariantCache

    model_dir = tiny_llama_dir(tmp_path / "model", layers=2)
    streamed, tokenizer, adapter = load_model(model_dir, stream=True)
    layer = adapter.decoder_layers(streamed)[0]
    with layer_on(layer, "cpu"):
        with layer_on(layer, "cpu"):
            assert all(p.device.type == "cpu" for p in layer.parameters())
        assert all(p.device.type == "cpu" for p in layer.parameters())  # the outer use still holds it
    assert all(p.device.type == "meta" for p in layer.parameters())
    from luq.calibration import calibration_batches

    batches = calibration_batches(tokenizer, adapter, CalibrationConfig(samples=2, seq_len=16))
    layer_pass(streamed, adapter, batches, formats=[get_format("gptq4-g128")], cache=VariantCache(tmp_path / "c", {}),
               progress=False)
    assert all(p.device.type == "meta" for p in adapter.decoder_layers(streamed).parameters())


def test_linears_fed_one_input_share_its_hessian(tmp_path):
    """q/k/v (and gate/up) read the same input tensor: one accumulator serves them, and each
    linear's Hessian is the one its own accumulator would give, to the bit."""
    from luq.calibration import calibration_batches
    from luq.capture import PAD, capture_first_layer_inputs, layer_forward
    from luq.models import quantizable_linears
    from luq.pipeline import _LayerHooks
    from luq.quant import HessianAccumulator

    model_dir = tiny_llama_dir(tmp_path / "model", layers=1)
    model, tokenizer, adapter = load_model(model_dir)
    batches = calibration_batches(tokenizer, adapter, CalibrationConfig(samples=3, seq_len=16))
    first = capture_first_layer_inputs(model, adapter, batches)
    layer = adapter.decoder_layers(model)[0]
    masks = [inp.token_kind != PAD for inp in first]
    hooks = _LayerHooks(masks)
    hooks.attach(layer)
    own = {name: HessianAccumulator(m.in_features) for name, m in quantizable_linears(layer).items()}
    calls = {name: 0 for name in own}

    def separate(name):
        def add(module, args):
            keep = masks[calls[name]]
            calls[name] += 1
            own[name].add_batch(args[0][keep])
        return add

    handles = [m.register_forward_pre_hook(separate(n)) for n, m in quantizable_linears(layer).items()]
    with torch.no_grad():
        for inp in first:
            layer_forward(layer, inp, "cpu")
    hooks.remove()
    for h in handles:
        h.remove()
    assert hooks.owner["self_attn.k_proj"] == hooks.owner["self_attn.v_proj"] == "self_attn.q_proj"
    assert hooks.owner["mlp.up_proj"] == "mlp.gate_proj"
    assert len(hooks.accumulators) == 4  # q/k/v, o, gate/up, down
    for name, acc in own.items():
        assert torch.equal(hooks[name], acc.hessian)
    assert not hooks.accumulators  # every float64 sum given up once its linears took their Hessians


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_packing_rows_at_a_time_writes_the_same_bytes(bits, monkeypatch):
    import luq.quant.packing as packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (2, 37, 21), generator=g)
    whole = packing.pack_bits(codes, bits)
    monkeypatch.setattr(packing, "_PACK_CHUNK", 50)  # two rows of 21 codes per piece, the last piece short
    assert torch.equal(packing.pack_bits(codes, bits), whole)
    assert torch.equal(packing.unpack_bits(whole, bits, 21), codes)


def test_threshold_rule_streams_to_the_in_memory_plan(tmp_path):
    """--max-drop on perplexity (a random model: perplexity near its vocabulary, so drops of ~100): every step of the search scores the assembled model layer by layer
    (the same logits as a whole forward), so streamed and in memory pick the same plan and write
    the same bytes."""
    model_dir = tiny_llama_dir(tmp_path / "model", layers=2)
    config = luq.LUQConfig(calibration=CalibrationConfig(samples=2, seq_len=32), formats=("gptq4-g128", "gptq3-g64"),
                           max_drop=200.0, metric="perplexity", validation_samples=4, sensitivity_samples=2)
    reports = {}
    for stream in (False, True):
        reports[stream] = luq.quantize(model_dir, tmp_path / f"q{stream}", config, cache_dir=tmp_path / f"c{stream}",
                                       progress=False, log=lambda s: None, stream=stream)
    assert reports[True]["search"] == reports[False]["search"] and len(reports[True]["search"]) > 1
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "qTrue" / name).read_bytes() == (tmp_path / "qFalse" / name).read_bytes()


def test_a_released_streamed_layer_keeps_no_kernel(tmp_path):
    """A forward through a streamed layer with a plan in it builds each QuantLinear's fast kernel
    from the bytes read for that use; putting the layer back on disk frees the kernel too (it is
    not a buffer, so swapping the buffers alone kept every layer's kernel resident)."""
    from luq.assembly import Assembly, linear_names
    from luq.calibration import calibration_batches
    from luq.pipeline import layer_pass
    from luq.quant.formats import get_format
    from luq.quant.linear import QuantLinear
    from luq.variants import VariantCache

    model_dir = tiny_llama_dir(tmp_path / "model", layers=2)
    streamed, tokenizer, adapter = load_model(model_dir, stream=True)
    batches = calibration_batches(tokenizer, adapter, CalibrationConfig(samples=2, seq_len=16))
    cache = VariantCache(tmp_path / "c", {})
    layer_pass(streamed, adapter, batches, formats=[get_format("gptq4-g128")], cache=cache, progress=False)
    Assembly(streamed, adapter, [cache], "cpu").apply(
        {name: "gptq4-g128" for names in linear_names(streamed, adapter) for name in names})
    layers = adapter.decoder_layers(streamed)
    built = []
    with layer_on(layers[0], "cpu"):
        quantized = [m for m in layers[0].modules() if isinstance(m, QuantLinear)]
        assert quantized
        for m in quantized:
            m.kernel
            built.append(m.__dict__.get("_kernel") is not None)
    assert all(built)
    assert not any("_kernel" in m.__dict__ for m in layers.modules() if isinstance(m, QuantLinear))
    layerwise_logits(streamed, adapter, batches)
    assert not any("_kernel" in m.__dict__ for m in layers.modules() if isinstance(m, QuantLinear))
