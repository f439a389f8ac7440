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
from luq.assembly import Assembly
from luq.calibration import text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.eval.perplexity import token_window_perplexity
from luq.models.loading import load_model
from luq.session import Session

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
    net, processor, _ = load_model("smollm2", "cpu", torch.float32)   # once: each thread count solves the same model
    windows = validation_windows(text_token_ids(processor, None), args.eval_samples, calibration.seq_len, 0,
                                 calibration.samples)
    # BiLLM alone on the full-precision chain's Hessians, no final pass: one pass of the one format (luq's
    # Session.solve_uniform), into a fresh variant cache per thread count
    config = LUQConfig(calibration=calibration, formats=("billm",), final_pass=False)
    rows = []
    print("| threads | nominal avg bits | perplexity | seconds |\n|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            session = Session(net, config, tokenizer=processor, device="cpu", cache_dir=tmp, progress=False,
                              log=lambda s: None)
            decision = session.solve_uniform()
            passed = session.measurement.passed
            assembly = Assembly(net, session.adapter, session.cache, "cpu", dense=True)
            assembly.apply(decision.plan)
            try:
                ppl = token_window_perplexity(net, windows)
            finally:
                assembly.undo()
        weights = bits = 0.0
        for layer in passed.layers:
            for linear in layer.linears.values():
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
