"""Where the dense prompt path of luq.quant.kernels pays: its time against the int4 kernel's and
dense float32's, by token count, per layer shape and format.

    python -m bench.kernels [--threads 2] [--json bench/results/kernels.json]

For SmolLM2's linear shapes (576x576, 192x576, 1536x576, 576x1536) and a 7B model's (4096x4096,
11008x4096), GPTQ-4 g128 (RTN codes on random weights: the same stored form and kernel, the
speed does not depend on the values) and BiLLM (solved on random weights with a random Hessian,
SmolLM2 shapes only), for 1..128 tokens: the int4 kernel (`Int4Kernel` with the dense path off),
the dense path (expand the packed terms to a bfloat16 tile, one bfloat16 GEMM) and float32
`F.linear` on the dequantized weight. Times are this process's CPU time per call (2 threads; the
machine may be shared), the best of 5 rounds. The crossover printed per row is the smallest token
count from which the dense path is faster at every larger count measured; `DENSE_FROM_TOKENS` in
luq/quant/kernels.py is set from this table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from luq.quant import RTN, BiLLM
from luq.quant import kernels as K

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128)
SHAPES = {"gptq4-g128": [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)],
          "billm": [(576, 576), (1536, 576), (576, 1536)]}


def cpu_ms(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t) / calls)
    return 1e3 * best


def quantized(fmt: str, rows: int, cols: int):
    torch.manual_seed(0)
    W = torch.randn(rows, cols) * 0.02
    if fmt == "gptq4-g128":
        return RTN(bits=4, group_size=128).quantize(W)
    X = torch.randn(4 * cols, cols)
    return BiLLM().quantize(W, X.t() @ X / X.shape[0])


def measure(fmt: str, rows: int, cols: int) -> dict:
    q = quantized(fmt, rows, cols)
    kernel = K.kernel_for(q, torch.device("cpu"))
    assert isinstance(kernel, K.Int4Kernel) and kernel.dense_ok, "the shape is served by the int4 kernel"
    W = q.dequantize()
    calls = max(1, int(2e8 // (rows * cols)))
    out = {"format": fmt, "rows": rows, "cols": cols, "native": kernel.native, "int4_ms": [], "dense_ms": [],
           "fp32_ms": []}
    for n in TOKENS:
        x = torch.randn(n, cols)
        xb = x.to(torch.bfloat16)
        dense = (lambda: kernel.dense(xb)) if kernel.col_scale is None else (lambda: kernel.dense(xb * kernel.col_scale))
        out["int4_ms"].append(cpu_ms(lambda: kernel._mm(kernel.gather(xb).contiguous(), kernel.packed, kernel.group,
                                                        kernel.scales_zeros), calls))
        out["dense_ms"].append(cpu_ms(dense, calls))
        out["fp32_ms"].append(cpu_ms(lambda: torch.nn.functional.linear(x, W), calls))
    faster = [d <= i for d, i in zip(out["dense_ms"], out["int4_ms"])]
    out["crossover"] = next((TOKENS[j] for j in range(len(TOKENS)) if all(faster[j:])), None)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| format | shape | path | " + " | ".join(f"{n} tok" for n in TOKENS) + " | crossover |")
    print("|---|---|---|" + "---:|" * (len(TOKENS) + 1))
    with torch.inference_mode():
        for fmt, shapes in SHAPES.items():
            for r, c in shapes:
                m = measure(fmt, r, c)
                rows.append(m)
                for path in ("int4", "dense", "fp32"):
                    cells = " | ".join(f"{v:.3f}" for v in m[f"{path}_ms"])
                    cross = m["crossover"] if path == "dense" else ""
                    print(f"| {fmt} | {r}x{c} | {path} ms | {cells} | {cross} |", flush=True)
    result = {"threads": args.threads, "tokens": list(TOKENS), "dense_from_tokens": K.DENSE_FROM_TOKENS,
              "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
