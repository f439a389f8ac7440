"""The fast kernels (luq.quant.kernels) against F.linear(x, qweight.dequantize()), on real
SmolLM2 linears (layers.15.self_attn.k_proj: 576 columns, so g128 is served by kernel groups
of 64; layers.29.mlp.down_proj: 1536 columns) with their real input activations.

Tolerance, from measurement: every kernel rounds the activations, its scales and its output
to bfloat16 (8 significant bits). Rounding only the activations already costs a relative
output error (||y - y_ref|| / ||y_ref||, float32 reference) of 1.3e-3 to 1.8e-3 on these layers;
the kernels measured 2.2e-3 to 2.9e-3 (GPTQ 2/3/4/8 bits, g32/64/128, with and without g_idx;
BiLLM and compact BiLLM) over 16 and 64 tokens, and up to 4.7e-3 on single tokens (the worst
of 64 real tokens per layer and format). The bound is 6e-3. The transcoded terms
themselves (before any bfloat16 rounding) reproduce the dequantized weight to float32 rounding.
From `dense_from` tokens on, the kernel expands its packed terms to a bfloat16 weight tile
(compiled, or with torch ops) and calls one bfloat16 GEMM: that also rounds each weight to
bfloat16 once (twice with torch ops where a group has a zero); over these layers and formats at
`dense_from` and 64 tokens it measured 1.6e-3 to 3.9e-3 (compiled) and up to 4.6e-3 (torch ops),
within the same bound. The compiled expansion itself equals the kernel's weight (its
bfloat16 scales and zeros, terms summed) rounded once to bfloat16 (relative 2^-8 per value).
"""

from functools import lru_cache

import pytest
import torch

from luq.quant import GPTQ, QuantLinear, get_format, native
from luq.quant import kernels as K
from luq.quant.kernels import Int4Kernel, TiledKernel, int4_terms, kernel_for
from test_solvers_real import problems  # the real layers, their Hessians and inputs (cached)

TOL = 6e-3
LAYERS = ("layers.15.self_attn.k_proj", "layers.29.mlp.down_proj")
CPU = torch.device("cpu")


@lru_cache(maxsize=None)
def quantized(layer, fmt):
    p = problems()[layer]
    if fmt.startswith("gptq") and fmt.endswith("-gidx"):   # reference act-order: g_idx stored
        bits, group = fmt[4:].split("-g")[0], fmt.split("-g")[1].split("-")[0]
        return GPTQ(bits=int(bits), group_size=int(group), static_groups=False).quantize(p.weight, p.hessian)
    return get_format(fmt).quantize(p.weight, p.hessian)


def rel_error(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


GPTQ_FORMATS = [f"gptq{b}-g{g}{o}" for b in (2, 3, 4, 8) for g in (32, 64, 128) for o in ("", "-gidx")]
BINARY_FORMATS = ["billm", "billm-k16g64", "billm-k4g64", "billm-k5g64r"]


@pytest.mark.parametrize("fmt", GPTQ_FORMATS + BINARY_FORMATS)
@pytest.mark.parametrize("layer", LAYERS)
def test_int4_kernel_matches_dequantize(layer, fmt):
    q = quantized(layer, fmt)
    if fmt.endswith("-gidx"):
        assert q.g_idx is not None
    W = q.dequantize()
    terms = int4_terms(q)
    torch.testing.assert_close(terms.dense(W.shape[1]), W, rtol=1e-6, atol=1e-6 * W.abs().max().item())
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and kernel.dense_ok
    x = problems()[layer].inputs
    # one token (decode), the last count of the int4 kernel, the first of the dense path, a prompt
    for n in (1, kernel.dense_from - 1, kernel.dense_from, 64):
        ref = torch.nn.functional.linear(x[:n], W)
        assert rel_error(kernel(x[:n], torch.float32), ref) < TOL


@pytest.mark.parametrize("fmt", ["gptq4-g128", "gptq3-g64-gidx", "gptq8-g32", "billm", "billm-k4g64"])
@pytest.mark.parametrize("expansion", ["compiled", "torch"])
def test_dense_prompt_path_on_real_weights(fmt, expansion, monkeypatch):
    layer = LAYERS[1]   # 576 x 1536: several row tiles below
    q = quantized(layer, fmt)
    kernel = kernel_for(q, CPU)
    if expansion == "compiled":
        if not native.available():
            pytest.skip("no C compiler: the torch-ops expansion serves prompts")
        assert kernel.native
        rows, cols = q.shape
        wt = native.expand_int4(kernel.packed, kernel.scales_zeros, kernel.group, kernel.starts, kernel.by_column,
                                cols, 0, rows)
        # the kernel's own weight, (q - 8)·s + z with its bfloat16 s and z, summed per input column in float32
        sz = kernel.scales_zeros.float()[:, None]
        terms_t = ((kernel.expand_codes(0, rows).float().view(-1, kernel.group, rows) - 8) * sz[..., 0] + sz[..., 1])
        index = torch.arange(kernel.kt) if kernel.index is None else kernel.index
        ref_t = torch.zeros(cols + 1, rows).index_add_(0, index, terms_t.view(kernel.kt, rows))[:cols]
        torch.testing.assert_close(wt.float(), ref_t, rtol=2 ** -8, atol=1e-6 * ref_t.abs().max().item())
    else:
        kernel.native = False
    monkeypatch.setattr(K, "DENSE_TILE_BYTES", 1)   # one tile of 64 rows at a time
    assert kernel.tile_rows == K.PACK_BLOCK < q.shape[0]
    x = problems()[layer].inputs[:64]
    ref = torch.nn.functional.linear(x, q.dequantize())
    assert rel_error(kernel(x, torch.float32), ref) < TOL


def test_rows_outside_the_packing_blocks_keep_the_int4_kernel_for_prompts():
    p = problems()[LAYERS[0]]
    q = GPTQ(bits=4, group_size=64).quantize(p.weight[:48], p.hessian)   # 48 rows: int4 yes, 64-row blocks no
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and not kernel.dense_ok
    x = p.inputs[:64]
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize())) < TOL


def test_quantlinear_uses_the_kernel_with_bias_and_dtypes():
    q = quantized(LAYERS[0], "gptq4-g128")
    bias = torch.randn(q.shape[0])
    layer = QuantLinear(q, bias)
    x = problems()[LAYERS[0]].inputs[:3].reshape(1, 3, -1)
    ref = torch.nn.functional.linear(x, q.dequantize(), bias)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert isinstance(layer.kernel, Int4Kernel) and layer.resident_nbytes > layer.nbytes
    assert rel_error(y, ref) < TOL
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.to(torch.float32)  # a move drops the cached kernel; the next forward rebuilds it
    assert "_kernel" not in layer.__dict__ and rel_error(layer(x), ref) < TOL


def test_unsupported_shapes_fall_back_to_the_tiled_kernel():
    p = problems()[LAYERS[0]]
    q = GPTQ(bits=4, group_size=32).quantize(p.weight[:, :560], p.hessian[:560, :560])  # 560 % 32 != 0
    assert int4_terms(q) is None
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, TiledKernel)
    x = p.inputs[:4, :560]
    torch.testing.assert_close(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize()))
