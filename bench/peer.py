"""The peer GPTQ: llmcompressor's `quantize_weight`, called as its GPTQModifier calls it.

What GPTQModifier (llmcompressor 0.14, compressed-tensors 0.19) does per Linear, and
what `peer_gptq` repeats on a bare (W, H):

1. weight qparams: a `memoryless_minmax` observer (the default for weights) looks at
   the *original* weight once, before GPTQ, and `calculate_qparams` turns per-group
   min/max (range forced to include 0) into scale and zero point
   (`observe` -> `weight_observer.get_qparams()`);
2. `prepare_batch` stacks [W], [H / num_samples], [scale], [zero_point] into batches of one;
3. `quantize_weight(weights, hessians, scale, zero_point, None, quant_args,
   blocksize=block_size, percdamp=dampening_frac)`; the first output is the fake-quantized
   (dequantized) weight.

Activation order. compressed-tensors 0.19 keeps only actorder "weight" (alias "static",
GPTQModifier's default): columns are solved in decreasing diag(H) order but the groups
stay the contiguous original ones, with grids fixed from the original W (step 1), so no
g_idx is stored. The old "group" order (grids fitted on the error-updated weights of each
act-order group, g_idx stored; luq's GPTQ(static_groups=False)) is rejected by
`quantize_weight` in this version. So act_order=True maps to actorder="static"; its exact
counterpart in luq is GPTQ(act_order=True, static_groups=True), luq's default.
act_order=False maps to actorder=None (contiguous groups, still with grids fixed from the
original W, i.e. luq's GPTQ(act_order=False, static_groups=True)).

Hessian convention. llmcompressor accumulates 2 * sum_tokens x x^T and divides by the
number of *samples* (the batch dimension of the module input, i.e. sequences), so its
H is seq_len times luq's 2/n_tokens * sum x x^T. GPTQ is invariant to a positive
scaling of H (the damping is relative to mean(diag H)), so H is passed as it is; see
`check()` below, which verifies that.

Group size. llmcompressor's weight observer needs `group_size` to divide the columns
(compressed-tensors only warns at init, then the observer's reshape fails; SmolLM2's
576 and 1536 are not multiples of 128). Where it does not, W gets zero columns up to a
multiple and H the matching rows/columns, zero off the diagonal and mean(diag H) on it.
That is exactly a narrower last group, as luq does: the min-max range includes 0
anyway, the zero columns quantize to 0 with no error, they are decoupled from the rest
in H^-1, and mean(diag H) (so the damping) is unchanged. The padding is cut off again.
"""

from __future__ import annotations

import warnings

import torch


def peer_available() -> bool:
    """Whether llmcompressor's GPTQ can be imported here."""
    try:
        _peer()
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _peer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.observers import Observer
    return QuantizationArgs, Observer, quantize_weight


def peer_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, act_order: bool = True,
              sym: bool = False, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """llmcompressor GPTQ of W [out, in] under H [in, in]; returns the dequantized weight (float32)."""
    QuantizationArgs, Observer, quantize_weight = _peer()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
                            dynamic=False, actorder="static" if act_order else None)
    W, H = W.detach().float(), H.detach().float()
    cols = W.shape[1]
    pad = -cols % group_size
    if pad:  # see "Group size" above: zero columns, decoupled in H with the mean diagonal
        W = torch.nn.functional.pad(W, (0, pad))
        H = torch.block_diag(H, torch.diagonal(H).mean() * torch.eye(pad))
    with torch.no_grad():
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        qparams = observer(W).get_qparams()
        Q, _loss, rtn_fallback = quantize_weight(
            weights=W.unsqueeze(0).clone(), hessians=H.unsqueeze(0).clone(),
            scale=qparams["scale"].unsqueeze(0), zero_point=qparams["zero_point"].unsqueeze(0),
            global_scale=None, quant_args=args, blocksize=block_size, percdamp=damp)
    if rtn_fallback.any():
        warnings.warn("llmcompressor fell back to round-to-nearest (H not positive definite)")
    return Q[0, :, :cols]


def peer_qparams(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The grids `peer_gptq` quantizes onto: (scale, zero) [out, n_groups], float32."""
    QuantizationArgs, Observer, _ = _peer()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
                            dynamic=False)
    W = W.detach().float()
    pad = -W.shape[1] % group_size
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    with torch.no_grad():
        qparams = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(W).get_qparams()
    return qparams["scale"].float(), qparams["zero_point"].float()


def check(rows: int = 512, cols: int = 1000, n: int = 4096, seed: int = 0) -> None:
    """Sanity check on a random problem: peer error far below RTN, invariant to H's scale."""
    from luq.quant import GPTQ, RTN, relative_output_error

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g) @ torch.randn(16, cols, generator=g) * 0.5 + torch.randn(n, cols, generator=g)
    X *= torch.exp(torch.randn(cols, generator=g))          # correlated channels, uneven scales
    H = 2 / n * X.T @ X
    W = torch.randn(rows, cols, generator=g) * 0.02

    def err(Q):
        return relative_output_error(W, Q, H)

    peer = peer_gptq(W, H)
    print(f"RTN-4 g128                      {err(RTN(4, 128).quantize(W).dequantize()):.3e}")
    print(f"peer GPTQ-4 g128 static order   {err(peer):.3e}")
    print(f"peer, H x 256 (llmc convention) {err(peer_gptq(W, 256 * H)):.3e}  max|dQ| = "
          f"{(peer_gptq(W, 256 * H) - peer).abs().max().item():.2e}")
    print(f"peer, no act order              {err(peer_gptq(W, H, act_order=False)):.3e}")
    ours_static = GPTQ(4, 128, static_groups=True).quantize(W, H).dequantize()
    print(f"luq GPTQ static_groups          {err(ours_static):.3e}  within 1e-4 of peer (scale fp16 vs fp32) for "
          f"{(ours_static - peer).abs().le(1e-4).float().mean().item():.2%} of weights")
    print(f"luq GPTQ act-order groups+g_idx {err(GPTQ(4, 128, static_groups=False).quantize(W, H).dequantize()):.3e}")


if __name__ == "__main__":
    print("peer available:", peer_available())
    check()
