"""luq.plan.presets: llama.cpp's presets as llama-quantize types them, and `--speed-of auto` (the plan held to
the decode speed of the largest preset that fits the budget). The per-tensor check against llama-quantize
itself is in tests/test_llamacpp.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from luq.plan import LinearSizes, SizeTable
from luq.plan.presets import BASE_TYPE, preset_plans, role, use_more_bits
from luq.plan.speed import decode_limits, knapsack_within, ns_per_weight, plan_decode_ns
from luq.quant import get_format
from luq.quant.formats import GGML_MENU
from luq.quant.ggml import ggml_nbytes

ROOT = Path(__file__).resolve().parent.parent
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}


def decoder_table(layers=30, hidden=576, kv=192, ffn=1536, vocab=49152, tied=True, base_bytes=0) -> SizeTable:
    """The sizes luq measures for a Llama-shaped decoder (default: SmolLM2-135M), every ggml format its rows
    allow (module names as Hugging Face writes them)."""
    shapes = {"model.embed_tokens": (vocab, hidden)}
    if not tied:
        shapes["lm_head"] = (vocab, hidden)
    for i in range(layers):
        for kind, (rows, cols) in {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                                   "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden),
                                   "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}.items():
            shapes[f"model.layers.{i}.{HF[kind]}"] = (rows, cols)
    return SizeTable(base_bytes, {
        name: LinearSizes(int(name.split(".")[2]) if ".layers." in name else None, r * c,
                          {f: ggml_nbytes((r, c), f) for f in GGML_MENU if get_format(f).supports((r, c))},
                          {f: 0.0 for f in GGML_MENU})
        for name, (r, c) in shapes.items()})


def test_roles_from_module_names():
    assert role("model.layers.3.self_attn.v_proj").kind == "attn_v"
    assert role("model.layers.3.self_attn.v_proj").layer == 3
    assert role("model.language_model.layers.11.mlp.down_proj").layer == 11
    assert role("model.embed_tokens").layer is None and role("lm_head").kind == "output"
    assert role("model.layers.0.mlp.experts.0.w1") is None


def test_use_more_bits_is_llama_cpps_layer_choice():
    # 30 layers: the first and last eighth (0-2, 26-29) and every third between, from 5 (14 layers, the 14
    # Q6_K ffn_down llama-quantize writes into SmolLM2's Q4_K_M)
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_presets_reproduce_llama_quantize_on_smollm2():
    """Every preset whose types are luq's: the same types and tensor bytes as the files llama-quantize wrote
    for the off-grid control in bench.gguf (SmolLM2's shapes: 576-wide rows take no K-quant)."""
    sizes = decoder_table(base_bytes=140_544)   # 61 float32 norms
    plans = preset_plans(sizes)
    recorded = json.loads((ROOT / "bench/results/gguf-smollm2-offgrid.json").read_text())["rows"]
    checked = 0
    for row in (r for r in recorded if r["tool"] == "llama.cpp"):
        want = {t.lower(): n for t, n in row["types"].items() if t != "F32"}
        if not set(want) <= set(GGML_MENU):
            assert row["name"] not in plans   # IQ types luq does not write
            continue
        plan = plans[row["name"]]
        assert {f: list(plan.values()).count(f) for f in set(plan.values())} == want, row["name"]
        assert sizes.total_bytes(plan) == row["tensor_bytes"], row["name"]
        checked += 1
    assert checked == 10   # Q8_0 ... Q2_K without the IQ3/IQ2/IQ4_XS presets


def test_presets_of_a_wide_untied_model():
    # 2048-wide rows take K-quants: the head at Q6_K, an untied embedding at the base type; 4 query heads a
    # kv head: Q2_K's attn_v at Q4_K
    sizes = decoder_table(layers=16, hidden=2048, kv=512, ffn=5632, vocab=4096, tied=False)
    plans = preset_plans(sizes)
    assert set(plans) == set(BASE_TYPE)
    q4km, q2k = plans["Q4_K_M"], plans["Q2_K"]
    assert q4km["lm_head"] == "q6_k" and q4km["model.embed_tokens"] == "q4_k"
    assert q4km["model.layers.0.mlp.down_proj"] == "q6_k" and q4km["model.layers.3.mlp.down_proj"] == "q4_k"
    assert q4km["model.layers.5.self_attn.q_proj"] == "q4_k"
    assert q2k["model.layers.5.self_attn.v_proj"] == "q4_k" and q2k["model.layers.5.mlp.down_proj"] == "q3_k"
    assert q2k["model.layers.5.mlp.up_proj"] == "q2_k" and q2k["model.layers.5.self_attn.o_proj"] == "q3_k"
    # a menu without q3_k: the presets that need it are left out (the head is Q6_K in all but Q8_0's)
    small = SizeTable(0, {n: LinearSizes(s.layer, s.n_weights, {f: b for f, b in s.bytes.items() if f != "q3_k"},
                                         s.nominal_bits) for n, s in sizes.linears.items()})
    assert set(preset_plans(small)) == set(BASE_TYPE) - {"Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L"}
    # a linear of no known role: no presets
    odd = SizeTable(0, {**sizes.linears, "model.layers.0.mlp.experts.0.w1": sizes.linears["lm_head"]})
    assert preset_plans(odd) is None


def test_auto_holds_to_the_largest_preset_that_fits():
    sizes = decoder_table(base_bytes=140_544)
    plans = preset_plans(sizes)
    nbytes = {name: sizes.total_bytes(p) for name, p in plans.items()}
    limit = decode_limits("auto", sizes)
    ns, what, _ = limit(nbytes["Q4_K_M"])
    assert ns == plan_decode_ns(sizes, plans["Q4_K_M"]) and "Q4_K_M" in what
    ns, what, _ = limit(nbytes["Q4_0"] + 1_000)   # Q4_0 fits, Q3_K_M (1.6 MB more) does not
    assert "Q4_0" in what
    # Q2_K and Q3_K_S are the same file here: either names it
    assert limit(nbytes["Q2_K"])[0] == plan_decode_ns(sizes, plans["Q2_K"])
    assert limit(nbytes["Q2_K"] - 1) is None   # below every preset nothing holds the plan
    assert decode_limits("none", sizes)(nbytes["Q8_0"]) is None
    ns, what, _ = decode_limits("q4_0", sizes)(nbytes["Q8_0"])
    assert what == "q4_0" and ns == pytest.approx(ns_per_weight()["q4_0"] * sizes.n_weights)


def test_a_plan_held_to_auto_is_as_fast_as_the_preset_and_no_worse():
    """At each preset's bytes the plan held by `auto` is predicted no slower than the preset, and (the
    preset itself being one such plan) costs no more than it."""
    sizes = decoder_table(base_bytes=140_544)
    rng = np.random.default_rng(0)
    bits = {"q8_0": 8.5, "q6_k": 6.56, "q5_k": 5.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_k": 4.5,
            "q4_0": 4.5, "iq4_nl": 4.5, "q3_k": 3.44, "q2_k": 2.63}
    costs = {name: {f: float(rng.uniform(0.5, 1.5)) * s.n_weights * 2.0 ** -bits[f] / 1e6 for f in s.bytes}
             for name, s in sizes.linears.items()}
    limit = decode_limits("auto", sizes)
    for name, plan in preset_plans(sizes).items():
        b = sizes.total_bytes(plan)
        ns = limit(b).ns
        held = knapsack_within(sizes, costs, list(GGML_MENU), b, ns, known=limit(b).plan)
        assert plan_decode_ns(sizes, held.plan) <= ns * (1 + 1e-9), name
        assert sizes.total_bytes(held.plan) <= b
        preset_cost = sum(costs[n][f] for n, f in plan.items())
        assert held.cost <= preset_cost * (1 + 1e-9), name
