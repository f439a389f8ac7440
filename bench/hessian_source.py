"""Where should layer i's Hessians come from? Full-precision chain (luq's default: every
variant is computed once, any k assembles from the cache) vs. re-quantizing the chosen
configuration sequentially (`--final-pass`: each layer fed by the quantized layers
before it, GPTQ's sequential mode). Held-out perplexity of the loaded artifacts, real
SmolLM2-135M, same calibration and validation windows as bench/frontier.py.

    python -m bench.hessian_source [--ks 0,4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import luq
from luq.eval.perplexity import token_window_perplexity
from luq.calibration import CalibrationConfig, text_token_ids, validation_windows

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ks", default="0,4")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "hessian_source.json")
    args = p.parse_args(argv)
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(x) for x in args.ks.split(",")]:
            for final_pass in (False, True):
                t0 = time.perf_counter()
                out = Path(tmp) / f"k{k}-{final_pass}"
                config = luq.LUQConfig(calibration=calibration, n_low_layers=k, kmeans_clusters=100, final_pass=final_pass,
                                       allocate="entropy")
                report = luq.quantize(args.model, out, config, log=lambda s: None)
                model, tokenizer, _ = luq.load(out)
                windows = validation_windows(text_token_ids(tokenizer, None), args.eval_samples, args.seq_len, 0,
                                             args.samples)
                ppl = token_window_perplexity(model, windows)
                rows.append({"k": k, "final_pass": final_pass, "ppl": ppl, "avg_bits": report["avg_bits"],
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"k={k} final_pass={final_pass}: ppl {ppl:.2f} ({rows[-1]['seconds']} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| k | Hessians | held-out ppl | true bits | seconds |\n|---|---|---|---|---|")
    for r in rows:
        source = "sequential final pass" if r["final_pass"] else "full-precision chain (cache)"
        print(f"| {r['k']} | {source} | {r['ppl']:.2f} | {r['avg_bits']:.3f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
