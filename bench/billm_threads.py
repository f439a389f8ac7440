"""How much BiLLM on every layer moves with floating-point rounding alone: SmolLM2's held-out
perplexity with every decoder linear in `billm`, solved at 1 and at 2 threads on the same
full-precision Hessians (16 x 256 calibration windows), scored as `bench.frontier` scores.

    python -m bench.billm_threads [--threads 1,2]

The Hessians are bitwise the same at any thread count; the Cholesky factor, the triangular solve
and the error-feedback matmul are not (their last bits follow BLAS/LAPACK's blocking), and that
flips a salient column here and there, which BiLLM's error feedback carries into every later block.
docs/results.md (section 3) quotes this to explain why two runs of the same code on other machines
or thread counts gave 8,181 and 10,121. Writes --out (default bench/results/billm_threads.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import calibration_of
from luq.api import variant_cache
from luq.assembly import Assembly, linear_names
from luq.calibration import calibration_batches, text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.eval.perplexity import token_window_perplexity
from luq.models.loading import load_model
from luq.pipeline import layer_pass
from luq.plan import uniform_plan
from luq.quant import get_format

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "billm_threads.json")
    args = p.parse_args(argv)
    args.model, args.alpha = "smollm2", None
    calibration = calibration_of(args)
    net, processor, adapter = load_model("smollm2", "cpu", torch.float32)
    batches = calibration_batches(processor, adapter, calibration)
    windows = validation_windows(text_token_ids(processor, None), args.eval_samples, calibration.seq_len, 0,
                                 calibration.samples)
    billm = get_format("billm")
    config = LUQConfig(calibration=calibration, budget_gb=1.0, formats=("billm",))
    rows = []
    print("| threads | nominal avg bits | perplexity | seconds |\n|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            cache = variant_cache(net, config, Path(tmp))
            passed = layer_pass(net, adapter, batches, formats=[billm], cache=cache, entropy=False, progress=False)
            assembly = Assembly(net, adapter, cache, "cpu", dense=True)
            assembly.apply(uniform_plan([n for layer in linear_names(net, adapter) for n in layer], "billm"))
            try:
                ppl = token_window_perplexity(net, windows)
            finally:
                assembly.undo()
        weights = bits = 0.0
        for layer in passed["layers"]:
            for linear in layer["linears"].values():
                n = linear["shape"][0] * linear["shape"][1]
                weights += n
                bits += n * linear["formats"]["billm"]["nominal_bits"]
        rows.append({"threads": threads, "nominal_avg_bits": bits / weights, "perplexity": ppl,
                     "seconds": time.perf_counter() - t0})
        print(f"| {threads} | {bits / weights:.6f} | {ppl:,.1f} | {rows[-1]['seconds']:.0f} |", flush=True)
    args.out.write_text(json.dumps({"model": "smollm2", "samples": calibration.samples, "seq_len": calibration.seq_len,
                                    "eval_windows": args.eval_samples, "torch": torch.__version__, "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
