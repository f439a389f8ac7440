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

CUDA's int4 kernel (tinygemm) cannot run here: its two ops are written in torch below from their
documentation in torch's int4mm.cu and handed to `kernel_for` as a device's ops, which checks the
nibble packing, the dense path's read-back of that layout, the build probe and the fallback to
the tiled kernel (one warning) when the op raises or disagrees. On a GPU: `python bench/cuda_check.py`.
"""

import dataclasses
from functools import lru_cache

import pytest
import torch

from luq import errors
from luq.quant import GPTQ, QuantLinear, get_format, native
from luq.quant import kernels as K
from luq.quant import BiLLM, CompactBiLLM
from luq.quant.kernels import BinaryKernel, CompactBinaryKernel, Int4Kernel, TiledKernel, int4_terms, kernel_for
from luq.quant.packing import pack_bool
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


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the fallback warnings of its own kernels (they are given once per process)."""
    monkeypatch.setattr(errors, "_WARNED", set())


def require_native(name):
    """Skip only where this machine has no C compiler at all; a helper that does not build fails, quoting
    the compiler's error."""
    if native.compiler() is None:
        pytest.skip("no C compiler: the torch ops serve")
    error = native.build_error(name)
    assert error is None, f"{name}.c did not build: {error}"


def rel_error(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


GPTQ_FORMATS = [f"gptq{b}-g{g}{o}" for b in (2, 3, 4, 8) for g in (32, 64, 128) for o in ("", "-gidx")]
BINARY_FORMATS = ["billm", "billm-k16g64", "billm-k4g64", "billm-k5g64r"]


@pytest.mark.parametrize("fmt", GPTQ_FORMATS + BINARY_FORMATS)
@pytest.mark.parametrize("layer", LAYERS)
def test_int4_kernel_matches_dequantize(layer, fmt, monkeypatch):
    monkeypatch.setenv("LUQ_KERNEL", "int4")   # binarized weights: the int4 terms, not the default BinaryKernel
    q = quantized(layer, fmt)
    if fmt.endswith("-gidx"):
        assert q.g_idx is not None
    W = q.dequantize()
    terms = int4_terms(q)
    torch.testing.assert_close(terms.dense(W.shape[1]), W, rtol=1e-6, atol=1e-6 * W.abs().max().item())
    monkeypatch.setattr(K, "GEMV_DENSE_FROM_TOKENS", 0)   # the op's crossover: the 64 real tokens reach the dense path
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
    monkeypatch.setenv("LUQ_KERNEL", "int4")
    layer = LAYERS[1]   # 576 x 1536: several row tiles below
    q = quantized(layer, fmt)
    monkeypatch.setattr(K, "GEMV_DENSE_FROM_TOKENS", 0)   # 64 tokens take the dense path
    kernel = kernel_for(q, CPU)
    if expansion == "compiled":
        require_native("expand_int4")
        assert kernel.native
        rows, cols = q.shape
        wt = native.expand_int4(kernel.packed, kernel.scales_zeros, kernel.group, kernel.starts, kernel.by_column,
                                cols, 0, rows, kernel.packing.block, kernel.packing.adjacent)
        # the kernel's own weight, (q - 8)·s + z with its bfloat16 s and z, summed per input column in float32
        sz = kernel.scales_zeros.float()[:, None]
        terms_t = ((kernel.expand_codes(0, rows).float().view(-1, kernel.group, rows) - 8) * sz[..., 0] + sz[..., 1])
        index = torch.arange(kernel.kt) if kernel.index is None else kernel.index
        ref_t = torch.zeros(cols + 1, rows).index_add_(0, index, terms_t.view(kernel.kt, rows))[:cols]
        torch.testing.assert_close(wt.float(), ref_t, rtol=2 ** -8, atol=1e-6 * ref_t.abs().max().item())
    else:
        kernel.native = False
    monkeypatch.setattr(K, "DENSE_TILE_BYTES", 1)   # one tile of 64 rows at a time
    assert kernel.tile_rows == kernel.block < q.shape[0]
    x = problems()[layer].inputs[:64]
    ref = torch.nn.functional.linear(x, q.dequantize())
    assert rel_error(kernel(x, torch.float32), ref) < TOL


def test_rows_outside_the_packing_blocks_keep_the_int4_kernel_for_prompts():
    p = problems()[LAYERS[0]]
    q = GPTQ(bits=4, group_size=64).quantize(p.weight[:48], p.hessian)   # 48 rows: int4 yes, 32/64-row blocks no
    with pytest.warns(errors.FallbackWarning, match="48 rows are not a multiple of the packing's block"):
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


# Bytes a QuantLinear holds after its first forward, over its stored bytes, on these two real layers
# (measured: GPTQ-4 g128 1.149 / 1.075, act-order 1.384 / 1.155; BiLLM 1.144 / 1.024; compact BiLLM,
# its stored tensors read in place: billm-k5g64r 1.444 / 1.272 (a byte per sparse weight, 0.63 bit, for
# the 0.36 bit of its k-of-64 codes), billm-k16g64 1.252 / 1.169 (a bit per weight for 0.76 bit of codes);
# on the planes kernel billm-k5g64r held 2.465 / 2.077). The small layer (192 rows) pays more for what
# the kernels hold per column (gathers, column scales) or per group.
HELD_OVER_STORED = {"gptq4-g128": 1.2, "gptq3-g64-gidx": 1.85, "gptq8-g32": 1.55, "billm": 1.2,
                    "billm-k5g64r": 1.5, "billm-k16g64": 1.3}
HANDED_OVER = {"gptq": ("qweight",), "billm": ("signs", "residual_signs", "sparse_bitmap", "scales", "means"),
               "billm-compact": ("signs", "sparse_codes")}


@pytest.mark.parametrize("fmt", list(HELD_OVER_STORED))
@pytest.mark.parametrize("layer", LAYERS)
def test_quantlinear_hands_its_stored_tensors_to_the_kernel(layer, fmt):
    """After the first forward the module frees the stored tensors its kernel gives back exactly, so it
    holds about the stored bytes, not the stored form beside the kernel's; the stored form is rebuilt
    bit for bit wherever it is asked for (state dict, quantized_weight, a move, load_state_dict)."""
    q = quantized(layer, fmt)
    bias = torch.randn(q.shape[0])
    layer_ = QuantLinear(q, bias)
    x = problems()[layer].inputs[:2]
    y = layer_(x)
    assert layer_.handed_over == HANDED_OVER[q.method]
    assert all(layer_._buffers[n] is None for n in layer_.handed_over)
    assert layer_.resident_nbytes <= HELD_OVER_STORED[fmt] * layer_.nbytes
    stored = layer_.state_dict()
    assert list(stored) == list(q.state_dict()) + ["bias"]
    assert all(torch.equal(stored[n], t) for n, t in q.state_dict().items())
    assert torch.equal(layer_.quantized_weight.dequantize(), q.dequantize())
    assert torch.equal(layer_(x), y)                               # the kernel alone computes the same
    layer_.load_state_dict(stored)                                 # the buffers come back to be written into
    assert not layer_.handed_over and torch.equal(layer_(x), y)
    layer_.to(torch.float32)                                       # a move gives them back too
    assert not layer_.handed_over and all(b is not None for b in layer_._buffers.values())
    kept = QuantLinear(q, bias, hand_over=False)
    assert torch.equal(kept(x), y) and not kept.handed_over


def test_unsupported_shapes_fall_back_to_the_tiled_kernel():
    p = problems()[LAYERS[0]]
    q = GPTQ(bits=4, group_size=32).quantize(p.weight[:, :560], p.hessian[:560, :560])  # 560 % 32 != 0
    with pytest.raises(K.KernelRefused, match="560 columns"):
        int4_terms(q)
    with pytest.warns(errors.FallbackWarning, match=r"int4 kernel for gptq 4-bit g32 192x560: .*560 columns.*; "
                                                    r"the tiled de-quantizing kernel serves it"):
        kernel = kernel_for(q, CPU)
    assert isinstance(kernel, TiledKernel)
    x = p.inputs[:4, :560]
    torch.testing.assert_close(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize()))


# --------------------------------------------------------------------------- BinaryKernel (bit planes)
# and CompactBinaryKernel (compact BiLLM's stored tensors in place)
# Their few-token paths sum float32 inputs by subset-sum lookups and float32 arithmetic: against
# x @ dequantize().T in float32 they measured 1.4e-7 to 3.5e-7 relative (billm, billm-k5g64r, billm-k8g64,
# billm-k16g64 on both layers, 1..3 tokens); the bound is 2e-6. From `dense_from` tokens they round the
# inputs and each weight to bfloat16 (one GEMM): 2.1e-3 to 3.3e-3 measured, within TOL.
LOOKUP_TOL = 2e-6
# (format, LUQ_KERNEL): billm: neither gather nor column scales; billm-k8g64: column scales, the sparse group
# as positions or bits (8 of 64: as many bytes); billm-k5g64r: act-order and column scales, positions;
# billm-k16g64: bits; and compact BiLLM on the planes kernel (LUQ_KERNEL=binary)
BINARY_KERNEL_CASES = [("billm", "auto"), ("billm-k8g64", "auto"), ("billm-k5g64r", "auto"),
                       ("billm-k16g64", "auto"), ("billm-k5g64r", "binary")]
@pytest.fixture
def needs_native():
    for name in ("binary_gemm", "compact_gemm"):
        require_native(name)


def tokens(layer, n):
    """n real input rows (the 64 cached ones, then sign-flipped and scaled copies)."""
    x = problems()[layer].inputs
    return torch.cat([x, -x, 0.5 * x, x.flip(0)])[:n]


@pytest.mark.usefixtures("needs_native")
@pytest.mark.parametrize("fmt,choice", BINARY_KERNEL_CASES)
@pytest.mark.parametrize("layer", LAYERS)
def test_binary_kernel_matches_dequantize(layer, fmt, choice, monkeypatch):
    monkeypatch.setenv("LUQ_KERNEL", choice)
    q = quantized(layer, fmt)
    kernel = kernel_for(q, CPU)
    assert type(kernel) is (CompactBinaryKernel if q.method == "billm-compact" and choice == "auto" else BinaryKernel)
    if kernel.order is not None:
        assert torch.equal(kernel.order.sort().values, torch.arange(q.shape[1]))   # a permutation of the inputs
    assert (kernel.order is not None) == (fmt in ("billm", "billm-k5g64r"))      # the planes' or act-order's gather
    assert (kernel.col_scale is None) == (fmt == "billm")
    if type(kernel) is CompactBinaryKernel:   # the sparse group as bits from 8 per 64 columns on, else positions
        assert kernel.sparse_map == (fmt != "billm-k5g64r")
    W = q.dequantize()
    for n in (1, 3, 40, 200):   # lookups, then the bfloat16 tile + GEMM
        x = tokens(layer, n)
        y, ref = kernel(x, torch.float32), torch.nn.functional.linear(x, W)
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert rel_error(y, ref) < (LOOKUP_TOL if n < kernel.dense_from else TOL), n


@pytest.mark.usefixtures("needs_native")
def test_compact_kernel_on_codes_naming_no_sparse_weight():
    """Stored codes may name a salient column or a column past the block's end (a run wider than what is
    left of the block): no sparse weight. Blocks of 72 columns in runs of 64, codes edited to name such
    columns: they are NO_POSITION in the kernel, kept for the codes it gives back, and the product is exact."""
    from luq.quant.billm_compact import sparse_bits_from_positions

    p = problems()[LAYERS[0]]
    q = CompactBiLLM(block_size=72, sparse_runs=((64, 4),), max_salient_cols=30, lam=0.0,
                     act_order=True).quantize(p.weight, p.hessian)
    positions, _ = q.sparse_positions(0, q.shape[0])          # block b: 8 positions, two runs of 4
    salient = torch.nonzero(q.salient_mask()[:64]).flatten()
    assert len(salient) and positions.shape[1] == 8 * q.n_blocks
    positions[::3, 4:8] = torch.tensor([64 + 4, 64 + 5, 64 + 6, 64 + 63])  # column 127: past the block's 72
    first = torch.cat([positions[1::3, :3], salient[:1].expand(positions[1::3].shape[0], 1)], 1)
    positions[1::3, :4] = first.sort(1).values if not (first[:, :3] == salient[0]).any() else positions[1::3, :4]
    q = dataclasses.replace(q, sparse_codes=pack_bool(sparse_bits_from_positions(positions, q.sparse_runs.tolist(),
                                                                                 q.block_widths())))
    kernel = kernel_for(q, CPU)
    assert type(kernel) is CompactBinaryKernel and not kernel.sparse_map
    assert len(kernel.not_sparse[0]) >= q.shape[0] // 3
    assert int((kernel.sparse == K.NO_POSITION).sum()) == len(kernel.not_sparse[0])
    W = q.dequantize()
    for n in (1, 3, 40):
        x = tokens(LAYERS[0], n)
        assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, W)) < (
            LOOKUP_TOL if n < kernel.dense_from else TOL)
    tile = (W[:, kernel.order.long()] / kernel.col_scale).bfloat16()
    assert torch.equal(kernel.weight(0, q.shape[0]), tile)
    module = QuantLinear(q)
    module(x[:1])
    assert module.handed_over == ("signs", "sparse_codes")
    assert all(torch.equal(t, q.state_dict()[n]) for n, t in module.state_dict().items())


@pytest.mark.usefixtures("needs_native")
def test_compact_kernel_falls_back_to_the_planes():
    """Blocks wider than a byte's positions (> 248 columns) with few sparse weights: the planes kernel."""
    p = problems()[LAYERS[0]]
    q = CompactBiLLM(block_size=288, sparse_runs=((64, 5),)).quantize(p.weight, p.hessian)
    assert CompactBinaryKernel.supports(q) and CompactBinaryKernel.build(q) is None
    with pytest.warns(errors.FallbackWarning, match="wider than 248 columns.*the bit-plane kernel serves it"):
        kernel = kernel_for(q, CPU)
    assert type(kernel) is BinaryKernel
    x = tokens(LAYERS[0], 2)
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize())) < LOOKUP_TOL


@pytest.mark.usefixtures("needs_native")
@pytest.mark.parametrize("fmt", ["billm", "billm-k5g64r"])
def test_binary_kernel_prompt_tiles_and_exact_tile(fmt, monkeypatch):
    layer = LAYERS[1]
    q = quantized(layer, fmt)
    kernel = kernel_for(q, CPU)
    # the tile: the weight in kernel column order (input column order[k]), before the column scales, in bfloat16
    cs = torch.ones(q.shape[1]) if kernel.col_scale is None else kernel.col_scale
    tile = (q.dequantize()[8:40, kernel.order] / cs).bfloat16().float()
    torch.testing.assert_close(kernel.weight(8, 40).float(), tile,
                               rtol=2 ** -7, atol=1e-6)
    monkeypatch.setattr(K, "DENSE_TILE_BYTES", 1)   # tiles of 8 rows
    assert kernel.tile_rows == 8
    x = tokens(layer, 40)
    assert rel_error(kernel(x.reshape(2, 20, -1), torch.float32).reshape(40, -1),
                     torch.nn.functional.linear(x, q.dequantize())) < TOL
    assert kernel(x[:2], torch.bfloat16).dtype == torch.bfloat16


def test_binary_kernel_selection_and_fallbacks(monkeypatch):
    q = quantized(LAYERS[0], "billm")
    x, W = tokens(LAYERS[0], 3), q.dequantize()
    monkeypatch.setenv("LUQ_KERNEL", "int4")
    assert isinstance(kernel_for(q, CPU), Int4Kernel)
    monkeypatch.setenv("LUQ_KERNEL", "tiled")
    assert isinstance(kernel_for(q, CPU), TiledKernel)
    monkeypatch.delenv("LUQ_KERNEL")
    monkeypatch.setattr(native, "available", lambda name="expand_int4": False)   # no compiler
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and not kernel.native
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, W)) < TOL


@pytest.mark.usefixtures("needs_native")
def test_shapes_the_binary_kernel_refuses_fall_back():
    p = problems()[LAYERS[0]]
    q = BiLLM(block_size=100).quantize(p.weight, p.hessian)          # blocks not byte-aligned: int4 terms
    with pytest.warns(errors.FallbackWarning, match=r"bit-plane kernel for billm 192x576: .*block 100.*int4 terms"):
        kernel = kernel_for(q, CPU)
    assert not BinaryKernel.supports(q) and isinstance(kernel, Int4Kernel)
    x = p.inputs[:3]
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize())) < TOL
    q = BiLLM().quantize(p.weight[:, :570], p.hessian[:570, :570])   # 570 columns: not whole bytes, tiled
    with pytest.warns(errors.FallbackWarning, match="570 columns"):
        kernel = kernel_for(q, CPU)
    assert isinstance(kernel, TiledKernel)
    x = x[:, :570]
    torch.testing.assert_close(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize()))


# --------------------------------------------------------------------------- CUDA (tinygemm), without a GPU
# tinygemm's two ops written in torch from their documentation in torch's int4mm.cu (the index arithmetic of
# its packing kernel, w = (q - 8)·s + z rounded once to bfloat16, float32 sums): `kernel_for` is given them
# as a device's ops, so that the packing, the dense path's read-back, the probe and the fallback run on CPU.


def _grid(*sizes):
    return torch.meshgrid(*(torch.arange(s) for s in sizes), indexing="ij")


def fake_convert(w, tiles):
    """uint8 [N, K / 2] -> int32 [N / 8, K / (16·tiles), 32, tiles / 2]: lane l of a word reads row
    8·n_tile + l // 4, bytes base + l % 4 + {0, 4, 8, 12}; their high nibbles go to bits 0..15, low to 16..31."""
    assert w.dtype == torch.uint8 and w.dim() == 2 and w.is_contiguous() and tiles in (2, 4, 8)
    n, k = w.shape[0], 2 * w.shape[1]
    assert k % (16 * tiles) == 0
    nt, ko, lane, j = _grid(n // 8, k // (16 * tiles), 32, tiles // 2)
    row, base = nt * 8 + lane // 4, (ko * tiles + 2 * j) * 8 + lane % 4
    v = [w[row, base + off].long() for off in (0, 4, 8, 12)]
    word = sum(((v[i] & 15) << (16 + 4 * i)) | ((v[i] >> 4) << (4 * i)) for i in range(4))
    return ((word + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def fake_unpack(packed):
    """Inverse of `fake_convert`, as codes [N, K]."""
    n_tiles, k_outer, _, half = packed.shape
    nt, ko, lane, j, nib = _grid(n_tiles, k_outer, 32, half, 8)
    code = (packed.long()[nt, ko, lane, j] >> (4 * nib)) & 15
    byte = (ko * 2 * half + 2 * j) * 8 + lane % 4 + 4 * (nib % 4)
    out = torch.zeros(n_tiles * 8, k_outer * 32 * half, dtype=torch.long)
    out[nt * 8 + lane // 4, 2 * byte + nib // 4] = code   # a high nibble is the even column
    return out


def fake_mm(x, packed, group, scales_zeros):
    assert x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous() and packed.dtype == torch.int32
    q = fake_unpack(packed)
    assert scales_zeros.shape == (q.shape[1] // group, q.shape[0], 2) and scales_zeros.dtype == torch.bfloat16
    s, z = (scales_zeros[..., i].float().t().repeat_interleave(group, 1) for i in (0, 1))
    return (x.float() @ ((q - 8) * s + z).bfloat16().float().t()).bfloat16()


@pytest.fixture
def fake_cuda(monkeypatch):
    """kernel_for(.., CPU) gets tinygemm's ops (the fakes above; replace them through the returned dict)."""
    ops = {"convert": fake_convert, "mm": fake_mm}
    monkeypatch.setenv("LUQ_KERNEL", "int4")   # on CPU, binarized weights would get BinaryKernel
    monkeypatch.setattr(K, "int4_ops", lambda device: K.tinygemm_ops(lambda w, t: ops["convert"](w, t),
                                                                      lambda *a: ops["mm"](*a)))
    return ops


def test_nibble_packing_and_its_inverse():
    q = torch.randint(0, 16, (6, 10), generator=torch.Generator().manual_seed(0))
    p = K.pack_nibbles(q)
    assert p.dtype == torch.uint8 and p.shape == (6, 5) and p.is_contiguous()
    assert int(p[2, 3]) == 16 * int(q[2, 6]) + int(q[2, 7])   # even column high, odd column low
    assert torch.equal(K.unpack_nibbles(p), q.to(torch.uint8))
    assert torch.equal(fake_unpack(fake_convert(K.pack_nibbles(q.repeat(4, 7)[:, :64]), 2)), q.repeat(4, 7)[:, :64])


def test_inner_k_tiles_is_the_widest_that_divides_k():
    assert [K.inner_k_tiles(k) for k in (4096, 1536, 576, 96, 32)] == [8, 8, 4, 2, 2]
    with pytest.raises(ValueError):
        K.inner_k_tiles(48)


@pytest.mark.parametrize("fmt", ["gptq4-g128", "gptq3-g64-gidx", "gptq8-g32", "billm", "billm-k4g64"])
def test_tinygemm_path_on_fake_ops(fmt, fake_cuda, monkeypatch):
    layer = LAYERS[1]
    q = quantized(layer, fmt)
    monkeypatch.setattr(K, "DENSE_FROM_TOKENS_CUDA", 16)   # the real inputs hold 64 tokens
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and kernel.layout == "tinygemm" and kernel.dense_from == 16
    assert kernel.dense_ok and not kernel.native          # the expansion reads tinygemm's packing back exactly
    x = problems()[layer].inputs[:64]
    W = q.dequantize()
    for n in (1, 15, 16, 64):                             # tinygemm, then the dense path
        assert rel_error(kernel(x[:n], torch.float32), torch.nn.functional.linear(x[:n], W)) < TOL
    monkeypatch.setattr(K, "DENSE_TILE_BYTES", 1)         # one tile of 8 rows at a time
    assert kernel.tile_rows == K.TINYGEMM_N_TILE
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, W)) < TOL


def test_tinygemm_that_disagrees_falls_back_with_one_warning(fake_cuda):
    fake_cuda["convert"] = lambda w, t: fake_convert(((w & 15) << 4 | w >> 4).contiguous(), t)   # nibbles swapped
    q = quantized(LAYERS[0], "gptq4-g128")
    with pytest.warns(RuntimeWarning, match="off by") as caught:
        assert isinstance(kernel_for(q, CPU), TiledKernel)
        assert isinstance(kernel_for(q, CPU), TiledKernel)
    assert len([w for w in caught if "off by" in str(w.message)]) == 1


def test_tinygemm_that_raises_falls_back(fake_cuda):
    def no_image(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")
    fake_cuda["mm"] = no_image
    q = quantized(LAYERS[0], "billm")
    with pytest.warns(RuntimeWarning, match="RuntimeError: CUDA error: no kernel image"):
        kernel = kernel_for(q, CPU)
    assert isinstance(kernel, TiledKernel)
    x = problems()[LAYERS[0]].inputs[:4]
    torch.testing.assert_close(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize()))


def test_a_packing_other_than_tinygemms_keeps_prompts_on_the_op(fake_cuda):
    # right products from another layout (rows reversed): the probe passes, the dense read-back does not apply
    fake_cuda["convert"] = lambda w, t: fake_convert(w.flip(0).contiguous(), t)
    fake_cuda["mm"] = lambda x, p, g, sz: fake_mm(x, p, g, sz.flip(1)).flip(1)
    q = quantized(LAYERS[0], "gptq4-g64")
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and not kernel.dense_ok and kernel.transient_nbytes == 0
    x = problems()[LAYERS[0]].inputs[:64]
    assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, q.dequantize())) < TOL


def test_gpus_before_sm80_are_not_given_tinygemm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.warns(RuntimeWarning, match=r"compute capability \(7, 5\)"):
        assert K.int4_ops(torch.device("cuda", 0)) is None


# --------------------------------------------------------------------------- torch's CPU int4 packings


@pytest.mark.parametrize("packing", K.CPU_PACKINGS)
def test_every_cpu_packing_reads_back_and_expands(packing):
    """Each packing torch uses on some CPU capability: `unpack` inverts `pack`, and the compiled
    expansion reads it as the torch ops do (the same bfloat16 W^T), whatever this machine's own is."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = packing.pack(q)
    assert packed.shape == (128, 32) and packed.dtype == torch.uint8
    assert torch.equal(packing.unpack(packed, torch.empty(64, 128, dtype=torch.uint8)), q.t().to(torch.uint8))
    require_native("expand_int4")
    group = 32
    sz = torch.randn(64 // group, 128, 2).bfloat16()
    wt = native.expand_int4(packed, sz, group, None, None, 64, 0, 128, packing.block, packing.adjacent)
    s, z = (sz[..., i].float().repeat_interleave(group, 0) for i in (0, 1))
    ref = ((q.t().float() - 8) * s + z).bfloat16()
    assert torch.equal(wt, ref)
    half = native.expand_int4(packed, sz, group, None, None, 64, packing.block, 128, packing.block, packing.adjacent)
    assert torch.equal(half, ref[:, packing.block:])


def test_this_process_packing_is_known_and_used():
    """torch's CPU int4 packing of this process (AVX-512, AVX2 or the portable default) is one luq reads:
    real SmolLM2 weights get the dense prompt path and the compiled expansion (on any capability; `make
    test` runs this file again with ATEN_CPU_CAPABILITY=avx2)."""
    packing = K.cpu_packing(torch.backends.cpu.get_cpu_capability())
    assert packing in K.CPU_PACKINGS
    kernel = kernel_for(quantized(LAYERS[1], "gptq4-g128"), CPU)
    assert kernel.packing == packing and kernel.block == packing.block
    assert kernel.dense_ok and kernel.native == native.available("expand_int4")


def break_native_source(tmp_path, monkeypatch, name: str, statement: str) -> None:
    """luq's C helpers served from a copy in which `name`'s `statement` no longer compiles (a fresh build dir)."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    broken = tmp_path / "src"
    broken.mkdir()
    for f in native.HERE.glob("*.[ch]"):
        (broken / f.name).write_text(f.read_text())
    source = broken / name
    assert statement in source.read_text()
    source.write_text(source.read_text().replace(statement, statement[:-1] + " undeclared_name;", 1))
    monkeypatch.setattr(native, "HERE", broken)
    monkeypatch.setenv("LUQ_NATIVE_DIR", str(tmp_path / "build"))
    native._library.cache_clear()


def test_a_c_source_that_does_not_compile_warns_with_the_compilers_error(tmp_path, monkeypatch):
    break_native_source(tmp_path, monkeypatch, "expand_int4.c", "free(acc);")
    try:
        with pytest.warns(errors.FallbackWarning, match=r"expand_int4\.c: .*error.*undeclared_name.*; int4 prompts "
                                                         r"expand with torch ops") as caught:
            assert not native.available("expand_int4")
            kernel = kernel_for(quantized(LAYERS[1], "gptq4-g128"), CPU)
        assert len([w for w in caught if "expand_int4" in str(w.message)]) == 1
        assert kernel.dense_ok and not kernel.native          # the fallback named above serves prompts
        assert isinstance(native.build_error("expand_int4"), native.BuildError)
    finally:
        native._library.cache_clear()


# --------------------------------------------------------------------------- the compiled int4 GEMV (few tokens, CPU)
# luq.quant.native.int4_gemv reads torch's CPU int4 packing in place with float32 inputs and sums: its only
# rounding beyond float32 is the weight's own (bfloat16 scales and zeros, as torch's op). Measured on these
# layers and formats, 1..dense_from - 1 tokens: 0.7e-3 to 2.2e-3 relative to F.linear(x, dequantize()),
# against 1.4e-3 to 4.7e-3 for torch's op (which also rounds the input and output to bfloat16).
# Against a float64 product with the same bfloat16 scales, |error| / (|x| @ |W|^T) measured <= 8.3e-7 (14
# float32 ulps: it sums x·(1 + q/16), then 16·s·acc + (z - 24·s)·sum x per group); the bound is 64 ulps.
GEMV_ULPS = 64 * 2 ** -24


@pytest.fixture
def gemv_native():
    require_native("int4_gemv")


@pytest.mark.usefixtures("gemv_native")
@pytest.mark.parametrize("fmt", GPTQ_FORMATS + BINARY_FORMATS)
@pytest.mark.parametrize("layer", LAYERS)
def test_int4_gemv_matches_dequantize(layer, fmt, monkeypatch):
    monkeypatch.setenv("LUQ_KERNEL", "int4")   # binarized weights: the int4 terms
    q = quantized(layer, fmt)
    kernel = kernel_for(q, CPU)
    assert isinstance(kernel, Int4Kernel) and kernel.gemv == Int4Kernel.gemv_pays()
    W = q.dequantize()
    x = problems()[layer].inputs
    for n in [n for n in list(range(1, 32)) + [48, 64] if n < kernel.dense_from]:   # every count to 31, then prompts
        y = kernel.gemv_mm(x[:n])          # whatever this process picks, the GEMV itself
        assert y.dtype == torch.float32 and y.shape == (n, q.shape[0])
        assert rel_error(y, torch.nn.functional.linear(x[:n], W)) < TOL
        if kernel.gemv:                    # and it is what the kernel serves few tokens with
            assert torch.equal(kernel(x[:n], torch.float32), y)


def packed_problem(packing, group, tokens, seed=0, rows=192, cols=384):
    """Random codes packed by `packing`, bfloat16 scales and zeros, float32 inputs; the float64 product
    with the same bfloat16 scales, and |x| @ |W|^T (the scale of float32 summation errors)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int32)
    sz = torch.randn(cols // group, rows, 2, generator=g).bfloat16()
    s, z = (sz[..., i].double().repeat_interleave(group, 0).t() for i in (0, 1))
    W = (q.double() - 8) * s + z
    x = torch.randn(tokens, cols, generator=g)
    return packing.pack(q), sz, x, x.double() @ W.t(), x.double().abs() @ W.abs().t()


def assert_float32_exact(y, ref, scale):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= GEMV_ULPS * scale).all(), ((y.double() - ref).abs() / scale).max()


@pytest.mark.usefixtures("gemv_native")
@pytest.mark.parametrize("packing", K.CPU_PACKINGS)
def test_int4_gemv_reads_every_cpu_packing(packing):
    """Each packing torch uses on some CPU capability, whatever this machine's own: the GEMV's product is
    the float32 one of the same weight, and rows split over threads give the same sums."""
    for group in (32, 64, 128):
        for tokens in (1, 2, 3, 16):
            packed, sz, x, ref, scale = packed_problem(packing, group, tokens, seed=group + tokens)
            y = native.int4_gemv(packed, sz, group, x, packing.block, packing.adjacent, 1)
            assert_float32_exact(y, ref, scale)
    # weights_per_thread=1: every block its own part, 3 threads
    assert torch.equal(native.int4_gemv(packed, sz, group, x, packing.block, packing.adjacent, 3, weights_per_thread=1), y)


def test_int4_gemv_portable_c_path(tmp_path, monkeypatch):
    """Built for a CPU without AVX2 (the plain C loops), the GEMV computes the same products."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(native, "cpu_flags", lambda: set())
    monkeypatch.setenv("LUQ_NATIVE_DIR", str(tmp_path))
    native._library.cache_clear()
    try:
        assert native.build_error("int4_gemv") is None
        for packing in K.CPU_PACKINGS:
            for group, tokens in ((32, 1), (128, 3)):
                packed, sz, x, ref, scale = packed_problem(packing, group, tokens, seed=tokens)
                assert_float32_exact(native.int4_gemv(packed, sz, group, x, packing.block, packing.adjacent, 1),
                                     ref, scale)
        assert [p.name for p in tmp_path.glob("int4_gemv-*.so")]   # its own build, not the AVX2 one
    finally:
        native._library.cache_clear()


def test_int4_gemv_choice_and_fallback(tmp_path, monkeypatch):
    """Few tokens take the GEMV where it pays (AVX2 + FMA, torch's capability in INT4_GEMV_CAPABILITIES) and
    builds; torch's op serves them where it does not build (one warning quoting the compiler) or where the
    capability is another (AVX-512: not measured against it)."""
    q = quantized(LAYERS[1], "gptq4-g128")
    x, W = problems()[LAYERS[1]].inputs[:3], q.dequantize()
    kernel = kernel_for(q, CPU)
    assert kernel.gemv == (Int4Kernel.gemv_pays() and native.available("int4_gemv"))
    if kernel.gemv:   # any leading shape, any input dtype; the output in the asked dtype
        y = kernel(x.reshape(1, 3, -1), torch.float32)
        assert y.shape == (1, 3, q.shape[0]) and torch.equal(y[0], kernel.gemv_mm(x))
        assert kernel(x.bfloat16(), torch.bfloat16).dtype == torch.bfloat16
    with monkeypatch.context() as m:
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert not Int4Kernel.gemv_pays() and not kernel_for(q, CPU).gemv
    break_native_source(tmp_path, monkeypatch, "int4_gemv.c", "free(xs);")
    monkeypatch.setattr(Int4Kernel, "gemv_pays", staticmethod(lambda: True))
    try:
        with pytest.warns(errors.FallbackWarning, match=r"int4_gemv\.c: .*error.*undeclared_name.*; few tokens "
                                                         r"take torch's int4 op"):
            kernel = kernel_for(q, CPU)
        assert not kernel.gemv and kernel.native   # the expansion still built
        assert rel_error(kernel(x, torch.float32), torch.nn.functional.linear(x, W)) < TOL
    finally:
        native._library.cache_clear()
