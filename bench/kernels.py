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

Then the binarized kernels `kernel_for` picks on CPU: `BinaryKernel` for BiLLM (bit planes; 576x576,
1536x576, 576x1536, 4096x4096) and `CompactBinaryKernel` for compact BiLLM (its stored tensors read in
place; billm-k5g64r on 192x576, 1536x576, 576x1536 and 4096x4096, billm-k16g64 on 1536x576 and
4096x4096), with the planes kernel beside it (`planes_*`, as LUQ_KERNEL=binary serves compact BiLLM):
the few-token path (subset-sum lookups) and the prompt path (bfloat16 tile + GEMM) against the int4 terms
kernel (`Int4Kernel`, as LUQ_KERNEL=int4 serves it) and float32 `F.linear`, by token count: wall-clock
median of 7 rounds, all paths alternating inside every round; the crossover (lookups -> tile) sets
`BINARY_DENSE_FROM_TOKENS`; and the bits per weight stored, held by a QuantLinear after its first
forward (its kernel and what it kept of the stored tensors: `QuantLinear.resident_nbytes`) and held by
each kernel. `--only binary` runs this part.

`--only threads`: one token through torch's int4 CPU op at --threads threads and at one, per GPTQ-4
shape (wall clock: waking the other OpenMP threads is the cost); sets `INT4_ONE_THREAD_BELOW`.

`--only gemv`: the few-token paths of `Int4Kernel` on CPU, GPTQ-4 g128, wall-clock medians of 9 rounds, all
paths alternating inside every round: (1) one token on SmolLM2's shapes and 4096x4096 at 1 and --threads
threads: torch's int4 op (`packed_mm` on the bfloat16 input, one thread below INT4_ONE_THREAD_BELOW), the
compiled GEMV (`gemv_mm`: luq.quant.native.int4_gemv) and float32 `F.linear`; (2) by token count below
`dense_from` at --threads threads, the same three and the dense path, which set INT4_GEMV_CAPABILITIES; (3) the
GEMV on one thread against --threads threads (rows split), which sets native.INT4_GEMV_WEIGHTS_PER_THREAD.
Written to `<json stem>-gemv.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from luq.quant import RTN, QuantLinear, get_format, native
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
    return get_format(fmt).quantize(W, X.t() @ X / X.shape[0])


def measure(fmt: str, rows: int, cols: int) -> dict:
    q = quantized(fmt, rows, cols)
    ops = K.int4_ops(torch.device("cpu"))
    kernel = K.Int4Kernel(K.int4_terms(q), cols, ops)   # BiLLM too (its int4 terms)
    assert isinstance(kernel, K.Int4Kernel) and kernel.dense_ok, "the shape is served by the int4 kernel"
    W = q.dequantize()
    calls = max(1, int(2e8 // (rows * cols)))
    out = {"format": fmt, "rows": rows, "cols": cols, "native": kernel.native, "int4_ms": [], "dense_ms": [],
           "fp32_ms": []}
    for n in TOKENS:
        x = torch.randn(n, cols)
        xb = x.to(torch.bfloat16)
        dense = (lambda: kernel.dense(xb)) if kernel.col_scale is None else (lambda: kernel.dense(xb * kernel.col_scale))
        out["int4_ms"].append(cpu_ms(lambda: ops.mm(kernel.gather(xb).contiguous(), kernel.packed, kernel.group,
                                                    kernel.scales_zeros), calls))
        out["dense_ms"].append(cpu_ms(dense, calls))
        out["fp32_ms"].append(cpu_ms(lambda: torch.nn.functional.linear(x, W), calls))
    faster = [d <= i for d, i in zip(out["dense_ms"], out["int4_ms"])]
    out["crossover"] = next((TOKENS[j] for j in range(len(TOKENS)) if all(faster[j:])), None)
    return out


BINARY_TOKENS = (1, 2, 3, 4, 8, 16, 128)
BINARY_SHAPES = {"billm": [(576, 576), (1536, 576), (576, 1536), (4096, 4096)],
                 "billm-k5g64r": [(192, 576), (1536, 576), (576, 1536), (4096, 4096)],
                 "billm-k16g64": [(1536, 576), (4096, 4096)]}


def wall_medians(fns: dict, calls: int, rounds: int = 7) -> dict:
    """Median wall ms per call of each fn, the fns alternating inside every round."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[k].append(1e3 * (time.perf_counter() - t) / calls)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def measure_binary(fmt: str, rows: int, cols: int) -> dict:
    q = quantized(fmt, rows, cols)
    binary = K.kernel_for(q, torch.device("cpu"))   # BinaryKernel; compact BiLLM: CompactBinaryKernel
    planes = K.BinaryKernel(q) if type(binary) is not K.BinaryKernel else None   # compact: the planes beside it
    int4 = K.Int4Kernel(K.int4_terms(q), cols, K.int4_ops(torch.device("cpu")))
    W = q.dequantize()
    module = QuantLinear(q)
    module(torch.randn(1, cols))   # built its kernel and handed it what the kernel gives back
    planes_module = None
    if planes is not None:   # LUQ_KERNEL=binary: the planes, as the QuantLinear held them before CompactBinaryKernel
        before, os.environ["LUQ_KERNEL"] = os.environ.get("LUQ_KERNEL"), "binary"
        try:
            planes_module = QuantLinear(q)
            planes_module(torch.randn(1, cols))
        finally:
            os.environ.pop("LUQ_KERNEL") if before is None else os.environ.update(LUQ_KERNEL=before)
    out = {"format": fmt, "rows": rows, "cols": cols, "kernel": type(binary).__name__,
           "binary_bits_per_weight": 8 * binary.nbytes / W.numel(), "int4_bits_per_weight": 8 * int4.nbytes / W.numel(),
           "stored_bits_per_weight": 8 * q.nbytes / W.numel(),
           "module_bits_per_weight": 8 * module.resident_nbytes / W.numel(),
           "planes_module_bits_per_weight": None if planes is None else 8 * planes_module.resident_nbytes / W.numel(),
           "lookup_ms": [], "tile_ms": [], "int4_ms": [], "fp32_ms": [], "planes_lookup_ms": [], "planes_tile_ms": []}
    for n in BINARY_TOKENS:
        x = torch.randn(n, cols)
        x2 = binary.prepare(x)
        calls = max(1, int(3e7 // (rows * cols) // max(1, n // 4)))
        fns = {"lookup": lambda: binary.lookup(x2), "tile": lambda: binary.dense(x2),
               "int4": lambda: int4(x, torch.float32), "fp32": lambda: torch.nn.functional.linear(x, W)}
        if planes is not None:
            p2 = planes.prepare(x)
            fns.update({"planes_lookup": lambda: planes.lookup(p2), "planes_tile": lambda: planes.dense(p2)})
        med = wall_medians(fns, calls)
        for k, v in med.items():
            out[f"{k}_ms"].append(v)
    faster = [d <= i for d, i in zip(out["tile_ms"], out["lookup_ms"])]
    out["crossover"] = next((BINARY_TOKENS[j] for j in range(len(BINARY_TOKENS)) if all(faster[j:])), None)
    return out


def binary_table() -> list[dict]:
    rows = []
    print("| format | shape | bits/weight: stored, QuantLinear holds; kernels: binary, int4 terms | path | "
          + " | ".join(f"{n} tok" for n in BINARY_TOKENS) + " | crossover |")
    print("|---|---|---|---|" + "---:|" * (len(BINARY_TOKENS) + 1))
    for fmt, shapes in BINARY_SHAPES.items():
        for r, c in shapes:
            m = measure_binary(fmt, r, c)
            rows.append(m)
            bits = (f"{m['stored_bits_per_weight']:.2f}, {m['module_bits_per_weight']:.2f}; "
                    f"{m['binary_bits_per_weight']:.2f}, {m['int4_bits_per_weight']:.2f}")
            paths = ["lookup", "tile", "int4", "fp32"] + (["planes_lookup", "planes_tile"] if m["planes_lookup_ms"] else [])
            for path in paths:
                cells = " | ".join(f"{v:.3f}" for v in m[f"{path}_ms"])
                label = path if not path.startswith("planes") else (
                    f"{path} (BinaryKernel, QuantLinear holds {m['planes_module_bits_per_weight']:.2f})")
                print(f"| {fmt} | {r}x{c} | {bits} | {label} ms | {cells} | {m['crossover'] if path == 'tile' else ''} |",
                      flush=True)
    return rows


THREAD_SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536), (1024, 1024), (2048, 2048), (4096, 4096),
                 (11008, 4096)]


def threads_table(threads: int) -> list[dict]:
    """One token through torch's int4 CPU op on a GPTQ-4 weight, at `threads` threads and at one:
    wall-clock medians (alternating), which set INT4_ONE_THREAD_BELOW."""
    rows_out = []
    print(f"| GPTQ-4 shape | weights | {threads} threads us | 1 thread us | one thread faster |")
    print("|---|---:|---:|---:|---|")
    for r, c in THREAD_SHAPES:
        k = K.Int4Kernel(K.int4_terms(quantized("gptq4-g128", r, c)), c, K.int4_ops(torch.device("cpu")))
        x2 = k.prepare(torch.randn(1, c))
        op = torch.ops.aten._weight_int4pack_mm_for_cpu

        def at(n):
            def run():
                torch.set_num_threads(n)
                op(x2, k.packed, k.group, k.scales_zeros)
            return run
        med = wall_medians({"many": at(threads), "one": at(1)}, max(1, int(3e8 // (r * c))))
        torch.set_num_threads(threads)
        rows_out.append({"rows": r, "cols": c, "threads_us": 1e3 * med["many"], "one_thread_us": 1e3 * med["one"]})
        print(f"| {r}x{c} | {r * c:,} | {1e3 * med['many']:.1f} | {1e3 * med['one']:.1f} | "
              f"{med['one'] < med['many']} |", flush=True)
    return rows_out


GEMV_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)]
GEMV_TOKENS = (1, 2, 3, 4, 8, 16, 31)
GEMV_THREAD_SHAPES = [(1536, 576), (1024, 1024), (2048, 2048), (4096, 4096), (11008, 4096)]


def gemv_kernel(rows: int, cols: int):
    q = quantized("gptq4-g128", rows, cols)
    kernel = K.Int4Kernel(K.int4_terms(q), cols, K.int4_ops(torch.device("cpu")))
    assert kernel.dense_ok and native.available("int4_gemv"), "the GEMV reads this packing"
    return kernel, q.dequantize()


def gemv_tables(threads: int) -> dict:
    """The three tables of `--only gemv` (microseconds per call)."""
    one_token = []
    print("| GPTQ-4 g128 shape | threads | torch int4 op us | luq GEMV us | float32 F.linear us | op / GEMV | "
          "F.linear / GEMV |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r, c in GEMV_SHAPES:
        kernel, W = gemv_kernel(r, c)
        x = torch.randn(1, c)
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            med = wall_medians({"op": lambda: kernel.packed_mm(kernel.prepare(x)), "gemv": lambda: kernel.gemv_mm(x),
                                "fp32": lambda: torch.nn.functional.linear(x, W)}, max(2, int(3e7 // (r * c))), 9)
            us = {k: 1e3 * v for k, v in med.items()}
            one_token.append({"rows": r, "cols": c, "threads": n, **{f"{k}_us": v for k, v in us.items()}})
            print(f"| {r}x{c} | {n} | {us['op']:.1f} | {us['gemv']:.1f} | {us['fp32']:.1f} | "
                  f"{us['op'] / us['gemv']:.2f} | {us['fp32'] / us['gemv']:.2f} |", flush=True)
    torch.set_num_threads(threads)
    by_tokens = []
    print(f"\n{threads} threads | shape | path | " + " | ".join(f"{n} tok" for n in GEMV_TOKENS) + " |")
    print("|---|---|---|" + "---:|" * len(GEMV_TOKENS))
    for r, c in GEMV_SHAPES[:4]:
        kernel, W = gemv_kernel(r, c)
        row = {"rows": r, "cols": c, "op_us": [], "gemv_us": [], "dense_us": [], "fp32_us": []}
        for n in GEMV_TOKENS:
            x = torch.randn(n, c)
            med = wall_medians({"op": lambda: kernel.packed_mm(kernel.prepare(x)), "gemv": lambda: kernel.gemv_mm(x),
                                "dense": lambda: kernel.dense(kernel.prepare(x)),
                                "fp32": lambda: torch.nn.functional.linear(x, W)},
                               max(2, int(1e7 // (r * c) // n)), 9)
            for k, v in med.items():
                row[f"{k}_us"].append(1e3 * v)
        by_tokens.append(row)
        for path in ("op", "gemv", "dense", "fp32"):
            print(f"| | {r}x{c} | {path} us | " + " | ".join(f"{v:.0f}" for v in row[f"{path}_us"]) + " |", flush=True)
    split = []
    print(f"\n| GEMV, one token | weights | 1 thread us | {threads} threads us (rows split) |")
    print("|---|---:|---:|---:|")
    for r, c in GEMV_THREAD_SHAPES:
        kernel, _ = gemv_kernel(r, c)
        x = kernel.gather(torch.randn(1, c)).contiguous()

        def at(n):   # weights_per_thread=1: split wherever there are blocks enough
            return lambda: native.int4_gemv(kernel.packed, kernel.scales_zeros, kernel.group, x, kernel.block,
                                            kernel.packing.adjacent, n, weights_per_thread=1)
        med = wall_medians({"one": at(1), "many": at(threads)}, max(2, int(3e7 // (r * c))), 9)
        split.append({"rows": r, "cols": c, "one_thread_us": 1e3 * med["one"], "threads_us": 1e3 * med["many"]})
        print(f"| {r}x{c} | {r * c:,} | {1e3 * med['one']:.0f} | {1e3 * med['many']:.0f} |", flush=True)
    return {"tokens": list(GEMV_TOKENS), "one_token": one_token, "by_tokens": by_tokens, "thread_split": split}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    p.add_argument("--only", choices=("int4", "binary", "threads", "gemv"), default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only == "gemv":
        with torch.inference_mode():
            result = gemv_tables(args.threads)
        torch.set_num_threads(args.threads)
        path = args.json.with_name(args.json.stem + "-gemv.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                    "int4_gemv_capabilities": list(K.INT4_GEMV_CAPABILITIES),
                                    "int4_gemv_weights_per_thread": native.INT4_GEMV_WEIGHTS_PER_THREAD,
                                    **result}, indent=1) + "\n")
        print(f"wrote {path}")
        return
    if args.only == "threads":
        with torch.inference_mode():
            table = threads_table(args.threads)
        path = args.json.with_name(args.json.stem + "-threads.json")
        path.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                    "int4_one_thread_below": K.INT4_ONE_THREAD_BELOW, "rows": table}, indent=1) + "\n")
        print(f"wrote {path}")
        return
    if args.only == "binary":
        with torch.inference_mode():
            binary = binary_table()
        path = args.json.with_name(args.json.stem + "-binary.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"threads": args.threads, "tokens": list(BINARY_TOKENS), "torch": torch.__version__,
                                    "binary_dense_from_tokens": K.BINARY_DENSE_FROM_TOKENS, "rows": binary},
                                   indent=1) + "\n")
        print(f"wrote {path}")
        return
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
        binary = binary_table() if args.only is None else []
    result = {"binary": binary, "binary_dense_from_tokens": K.BINARY_DENSE_FROM_TOKENS,
              "threads": args.threads, "tokens": list(TOKENS), "dense_from_tokens": K.DENSE_FROM_TOKENS,
              "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
