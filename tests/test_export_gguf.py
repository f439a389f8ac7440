"""`luq export --format gguf` on real SmolLM2 weights: every tensor read back with the gguf
package matches luq's to fp16 rounding, llama.cpp's names and rotary row order, exact grids
for the symmetric types, and one-line refusals for what GGUF cannot hold."""

import json

import gguf
import numpy as np
import pytest
import torch

import luq
from luq.zoo.smollm2 import smollm2_dir, smollm2_gguf_path, smollm2_linear_problems
from luq.cli import main
from luq.errors import LuqError
from luq.export import export_gguf
from luq.export.gguf import NoGgufType, encode_weight, read_gguf, rope_permutation
from luq.quant import GPTQ, RTN, QuantLinear
from luq.quant.packing import unpack_bits


def gguf_name(hf_name, n_layers):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers).get_name(hf_name, try_suffixes=(".weight",))


def to_hf_rows(name, x, config):
    """Undo the rotary row order of q/k (llama.cpp's interleaved pairs -> transformers' halves)."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(name.split(".")[-2])
    return x if heads is None else x[torch.argsort(rope_permutation(heads, x.shape[0])).numpy()]


def half_ulp_of_scale_times_zero(weight):
    """Per weight: half an fp16 ulp of |scale * zero|, the only rounding Q4_1 adds (its m)."""
    groups = weight.column_groups()
    scale = weight.scales.float()[:, groups]
    zero = unpack_bits(weight.qzeros, weight.bits, weight.n_groups).float()[:, groups]
    sz = (scale * zero).abs().numpy().astype(np.float16)
    return np.spacing(sz).astype(np.float32) / 2


def test_gptq4_artifact_reads_back_to_fp16_rounding(smollm2_artifacts, capsys):
    path, out = smollm2_artifacts["gptq4"], smollm2_artifacts["root"] / "gptq4.gguf"
    assert main(["export", str(path), "--format", "gguf", "--out", str(out)]) == 0
    assert "14 Q4_1" in capsys.readouterr().out
    config = json.loads((path / "config.json").read_text())
    model, tokenizer, _ = luq.load(path, dtype=torch.float32)
    back = read_gguf(out)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            expected[gguf_name(name + ".weight", 2)] = (module.quantized_weight, None)
    for name, p in model.named_parameters():
        expected[gguf_name(name, 2)] = (None, p.detach())
    assert set(back) == set(expected)  # every tensor, llama.cpp's names, nothing else (the head is tied)
    worst_ratio = 0.0
    for name, (weight, dense) in expected.items():
        got = to_hf_rows(name, back[name], config)
        if dense is not None:  # stored fp16, written as f16 or f32: exact
            assert np.array_equal(got, dense.numpy()), name
            continue
        diff = np.abs(got - weight.dequantize(torch.float32).numpy())
        bound = half_ulp_of_scale_times_zero(weight) + 1e-6 * np.abs(got)  # + float32 rounding of d*q + m
        assert (diff <= bound).all(), name
        worst_ratio = max(worst_ratio, float((diff / bound).max()))
    assert worst_ratio > 0.1  # the bound is the rounding that happens, not a loose tolerance
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(config["vocab_size"])))
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith("_norm.weight")} \
        == {"F32"}


def test_q_and_k_rows_take_llama_cpp_rotary_order():
    """The reference GGUF of SmolLM2 (llama.cpp's own converter) against luq's SmolLM2, which
    transformers de-permuted from it: the permutation must give back its rows exactly."""
    from safetensors import safe_open

    reader = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf_path())).tensors}
    with safe_open(str(smollm2_dir() / "model.safetensors"), "pt") as f:
        for hf_name, name, heads in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 9),
                                     ("model.layers.7.self_attn.k_proj.weight", "blk.7.attn_k.weight", 3)):
            w = f.get_tensor(hf_name)
            t = reader[name]
            ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(w[rope_permutation(heads, w.shape[0])], ref)
            assert not torch.equal(w, ref)


def dequantize_blocks(qtype, data, shape):
    return gguf.quants.dequantize(data, qtype).reshape(shape)


@pytest.fixture(scope="module")
def problem():
    p = smollm2_linear_problems(layers=(1,), n_seq=2, seq_len=64, seed=3)[-1]  # mlp.down_proj, 576 x 1536
    return p.weight, p.hessian


def test_symmetric_grids_are_exact(problem):
    W, H = problem
    for solver, expected in ((GPTQ(bits=4, group_size=64, sym=True), "Q4_0"),
                             (RTN(bits=8, group_size=128, sym=True), "Q8_0")):
        weight = solver.quantize(W, H)
        qtype, data = encode_weight(weight)
        assert qtype.name == expected
        assert np.array_equal(dequantize_blocks(qtype, data, W.shape), weight.dequantize(torch.float32).numpy())


def test_what_gguf_cannot_hold_is_refused_with_the_reason(problem, smollm2_artifacts, capsys):
    W, H = problem
    cases = ((GPTQ(bits=4, group_size=128, static_groups=False), "act-order groups"),
             (GPTQ(bits=4, group_size=48), "groups of 48 columns"),
             (GPTQ(bits=3, group_size=128), "3-bit GPTQ with free fp16 group scales"),
             (RTN(bits=8, group_size=128), "asymmetric and its codes minus zeros leave int8"))
    for solver, reason in cases:
        with pytest.raises(NoGgufType, match=reason):
            encode_weight(solver.quantize(W, H))
    with pytest.raises(LuqError, match=r"refused: model\.layers\.\d\.\w+\.\w+_proj: it is binarized \(billm\).*"
                                       r"\(6 more linears cannot be exported\)"):
        export_gguf(smollm2_artifacts["mix"], smollm2_artifacts["root"] / "mix.gguf")
    refused = smollm2_artifacts["root"] / "m.gguf"
    assert main(["export", str(smollm2_artifacts["mix"]), "--format", "gguf", "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("luq: error: GGUF export refused")
    assert not refused.exists()


def test_packed_embedding_exports_as_the_tied_output(smollm2_artifacts):
    """A budget artifact packs the tied embedding at GPTQ-4: token_embd is Q4_1, read back to fp16
    rounding, and no output tensor is written (llama.cpp then uses token_embd, as the tie says)."""
    out = smollm2_artifacts["root"] / "embed.gguf"
    export_gguf(smollm2_artifacts["embed"], out)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q4_1" and "output.weight" not in types
    model, _, _ = luq.load(smollm2_artifacts["embed"], dtype=torch.float32)
    weight = model.model.embed_tokens.quantized_weight
    diff = np.abs(read_gguf(out)["token_embd.weight"] - weight.dequantize(torch.float32).numpy())
    assert (diff <= half_ulp_of_scale_times_zero(weight) + 1e-6).all()
