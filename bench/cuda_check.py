"""The CUDA int4 path of luq.quant.kernels (tinygemm), checked and timed on a GPU.

    python bench/cuda_check.py [--size 4096] [--formats gptq4 gptq3 billm] [--json out.json]

No test runs it (the machine the kernels were written on has no GPU); it ran on an H200
(bench/results/cuda_check-4096.json, -576.json). For GPTQ-4 g128,
GPTQ-3 g128, BiLLM and compact BiLLM (billm-k5g64r) QuantLinears of size x size random weights (luq's own solvers on a random W
and H = X^T X), it reports the kernel `kernel_for` chose (the tinygemm Int4Kernel when its build probe
passed, else the tiled fallback and the warning line), the relative error of its two paths (the
tinygemm op, the dense prompt path) against float32 F.linear on the dequantized weight (the largest
over tokens of ||y_t - ref_t|| / ||ref_t||, for 1 and 128 tokens; bfloat16 rounding gives ~3e-3,
tests/test_kernels.py bounds it by 6e-3), and the time per call by token count of both paths, of
dense bfloat16 F.linear and of the tiled kernel (CUDA events, median of 20 after 3 warm-up calls).
The crossover printed is the smallest token count from which the dense path is faster at every larger
count measured: `DENSE_FROM_TOKENS_CUDA` in luq/quant/kernels.py is set from it. Exits with one line when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from luq.quant import GPTQ, BiLLM, QuantLinear, get_format
from luq.quant import kernels as K

TOKENS = (1, 4, 16, 64, 128, 512, 2048)
CHECK_TOKENS = (1, 128)
SOLVERS = {"gptq4": lambda: GPTQ(bits=4, group_size=128), "gptq3": lambda: GPTQ(bits=3, group_size=128),
           "billm": lambda: BiLLM(), "billm-k5g64r": lambda: get_format("billm-k5g64r")}


def quantized_layer(fmt: str, size: int, device: torch.device) -> QuantLinear:
    g = torch.Generator(device=device).manual_seed(0)
    W = 0.02 * torch.randn(size, size, generator=g, device=device)
    X = torch.randn(2 * size, size, generator=g, device=device)
    return QuantLinear(SOLVERS[fmt]().quantize(W, X.t() @ X / X.shape[0]))


def max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def ms_per_call(fn, device: torch.device, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":   # a dry run on CPU (the check itself wants CUDA)
        import time
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return sorted(times)[calls // 2]
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[calls // 2]


def check(fmt: str, size: int, device: torch.device) -> dict:
    layer = quantized_layer(fmt, size, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = layer.kernel
    W = layer.quantized_weight.dequantize()
    W16 = W.bfloat16()
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(max(TOKENS), size, generator=g, device=device)
    out = {"format": fmt, "size": size, "kernel": type(kernel).__name__, "warnings": [str(w.message) for w in caught],
           "errors": {}, "ms": {}}
    is_int4 = isinstance(kernel, K.Int4Kernel)
    if is_int4:
        out.update(layout=kernel.layout, dense_ok=kernel.dense_ok, dense_from=kernel.dense_from,
                   inner_k_tiles=K.inner_k_tiles(kernel.kt), terms=kernel.kt // size)
    tiled = K.TiledKernel(layer.quantized_weight)
    with torch.inference_mode():
        for n in CHECK_TOKENS:
            ref = torch.nn.functional.linear(x[:n], W)
            out["errors"][f"forward {n}"] = max_rel_error(layer(x[:n]), ref)
            if is_int4:
                x2 = kernel.prepare(x[:n])
                out["errors"][f"op {n}"] = max_rel_error(kernel.packed_mm(x2), ref)
                if kernel.dense_ok:
                    out["errors"][f"dense {n}"] = max_rel_error(kernel.dense(x2), ref)
        for n in TOKENS:
            xb = x[:n].bfloat16()
            row = {"F.linear bf16": ms_per_call(lambda: torch.nn.functional.linear(xb, W16), device),
                   "tiled": ms_per_call(lambda: tiled(xb, torch.bfloat16), device)}
            if is_int4:
                x2 = kernel.prepare(x[:n])
                row["int4 op"] = ms_per_call(lambda: kernel.packed_mm(x2), device)
                if kernel.dense_ok:
                    row["dense path"] = ms_per_call(lambda: kernel.dense(x2), device)
            out["ms"][n] = row
    faster = [r.get("dense path", float("inf")) <= r.get("int4 op", float("inf")) for r in out["ms"].values()]
    out["crossover"] = next((TOKENS[j] for j in range(len(TOKENS)) if all(faster[j:])), None)
    return out


def report(results: list[dict]) -> None:
    print("| format | kernel | layout | dense path on | inner k-tiles | int4 terms | "
          + " | ".join(f"err {k}" for k in ("forward 1", "op 1", "dense 1", "forward 128", "op 128", "dense 128"))
          + " |")
    print("|---|---|---|---|---:|---:|" + "---:|" * 6)
    for r in results:
        errs = " | ".join(f"{r['errors'][k]:.2e}" if k in r["errors"] else "-"
                          for k in ("forward 1", "op 1", "dense 1", "forward 128", "op 128", "dense 128"))
        print(f"| {r['format']} {r['size']}x{r['size']} | {r['kernel']} | {r.get('layout', '-')} | "
              f"{r.get('dense_ok', '-')} | {r.get('inner_k_tiles', '-')} | {r.get('terms', '-')} | {errs} |")
        for w in r["warnings"]:
            print(f"  warning: {w}")
    paths = ("int4 op", "dense path", "F.linear bf16", "tiled")
    print("\nms per call (median of 20)\n")
    print("| format | path | " + " | ".join(f"{n} tok" for n in TOKENS) + " | crossover |")
    print("|---|---|" + "---:|" * (len(TOKENS) + 1))
    for r in results:
        for path in paths:
            cells = [r["ms"][n].get(path) for n in TOKENS]
            if any(c is not None for c in cells):
                cross = r["crossover"] if path == "dense path" else ""
                print(f"| {r['format']} | {path} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                      + f" | {cross} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--formats", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_check.py: no CUDA device (torch.cuda.is_available() is False); nothing checked")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, compute capability {torch.cuda.get_device_capability(device)}, "
          f"torch {torch.__version__}, DENSE_FROM_TOKENS_CUDA = {K.DENSE_FROM_TOKENS_CUDA}\n")
    results = []
    for fmt in args.formats:
        results.append(check(fmt, args.size, device))
        print(f"{fmt}: {results[-1]['kernel']}", file=sys.stderr, flush=True)
    report(results)
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(device),
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
