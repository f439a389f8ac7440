"""The whole pipeline on a GPU: quantize a model on CUDA, load the artifact on CUDA and on CPU, compare.

    python -m bench.cuda_pipeline MODEL_DIR [--out DIR] [--json out.json]

Two runs of `luq.quantize(..., device="cuda")` on MODEL_DIR (calibration on the real Wikipedia text, 4 x 64
tokens): the paper's mix (`--allocate entropy --n-low-layers 1`, compact BiLLM `billm-k5g64r` for the low layer,
GPTQ-4 g64 for the rest) and the budget mode (menu GPTQ-4 g64, GPTQ-8 g64 and `billm-k5g64r`, half the
model's float16 bytes, the embedding and head included in the allocation). Each artifact is then loaded
with `luq.load` on CUDA and on CPU and run on the same tokens: the relative difference of their logits
(both bfloat16-rounded kernels: tinygemm on CUDA, the CPU kernels here) and of each against the artifact's
dequantized weights on CPU in float32. Prints a table; exits with one line when there is no CUDA device.
No test runs it (the machine luq is developed on has no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import luq
from luq.calibration import CalibrationConfig
from luq.quant.dense import dequantize_modules

CALIBRATION = CalibrationConfig(samples=4, seq_len=64, seed=0)


def configs(model_dir: str) -> dict[str, luq.LUQConfig]:
    from luq.models.loading import load_model
    fp16_bytes = 2 * sum(p.numel() for p in load_model(model_dir)[0].parameters())
    return {"entropy-1-k5g64r": luq.LUQConfig(calibration=CALIBRATION, allocate="entropy", n_low_layers=1,
                                              high="gptq4-g64", low="billm-k5g64r", kmeans_clusters=8),
            "budget-half-fp16": luq.LUQConfig(calibration=CALIBRATION, formats=("gptq4-g64", "gptq8-g64", "billm-k5g64r"),
                                              budget_gb=0.5 * fp16_bytes / 1e9, sensitivity_samples=2,
                                              final_pass=False, kmeans_clusters=8)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@torch.inference_mode()
def logits(path: Path, device: str, ids: torch.Tensor, dense: bool = False) -> torch.Tensor:
    model = luq.load(path, device=device, dtype=torch.float32)[0]
    if dense:
        dequantize_modules(model)
    return model(input_ids=ids.to(device)).logits


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--out", type=Path, default=Path("out/cuda-pipeline"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/cuda_pipeline.py: no CUDA device (torch.cuda.is_available() is False); nothing run")
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}, torch {torch.__version__}\n")
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, config in configs(args.model).items():
        out = args.out / name
        t = time.perf_counter()
        report = luq.quantize(args.model, out, config, device=args.device, cache_dir=args.out / "cache", progress=False,
                              log=lambda s: None)
        seconds = time.perf_counter() - t
        formats = sorted({r["format"] for r in report["linears"].values()})
        cuda, cpu, dense = logits(out, args.device, ids), logits(out, "cpu", ids), logits(out, "cpu", ids, dense=True)
        rows.append({"run": name, "seconds": seconds, "avg_bits": report["avg_bits"], "formats": formats,
                     "cuda_vs_cpu": rel(cuda, cpu), "cuda_vs_dense": rel(cuda, dense), "cpu_vs_dense": rel(cpu, dense)})
    print("| run | quantize s (CUDA) | true bits | formats | logits CUDA vs CPU | CUDA vs dequantized | CPU vs dequantized |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['avg_bits']:.3f} | {', '.join(r['formats'])} | "
              f"{r['cuda_vs_cpu']:.2e} | {r['cuda_vs_dense']:.2e} | {r['cpu_vs_dense']:.2e} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
