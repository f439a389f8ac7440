"""What each ggml type costs llama.cpp per weight when it decodes: a per-type speed table, checked on files it
was not fitted on.

From the float32 base and the importance matrix that `python -m bench.gguf` leaves in its work folder, one
file per type made by `llama-quantize --pure` (every tensor, the token embedding too, in that type where its
rows allow it; llama.cpp's fallback type elsewhere: the K-quants fit only the 1536-wide rows of SmolLM2's
down projections). `llama-bench` decodes each (`-p 0 -n GEN`, OpenMP's own thread waiting, as a user's
llama.cpp runs) in rounds that alternate the files, so the machine's drift falls on all alike; each file's
figure is the median of its rounds. Then, by least squares, the seconds per token of a file as the sum over
its tensors of weights x seconds per weight of the tensor's type. Every other GGUF in the folder (llama.cpp's
presets, luq's files) whose types were all fitted is the check: measured against predicted.

    python -m bench.gguf --model smollm2-offgrid      # first: the base, the imatrix, the files to check on
    python -m bench.ggml_speed --model smollm2-offgrid

Time it on idle cores: spin-waiting threads slow down many times when another process runs. Writes
bench/results/ggml-speed-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from luq.errors import LuqError
from luq.export import llamacpp

RESULTS = Path(__file__).parent / "results"
PURE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl")      # 32-weight blocks: every tensor
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")               # 256: the rows they divide (ffn_down here)


def weights_by_type(gguf_file: Path) -> dict[str, int]:
    """Weights of each quantized type in a GGUF file (float tensors left out: norms, a few hundred KB)."""
    import gguf

    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(gguf_file)).tensors:
        name = t.tensor_type.name.lower()
        if name not in ("f32", "f16", "bf16"):
            out[name] = out.get(name, 0) + int(t.n_elements)
    return out


def fit(files: dict[str, dict[str, int]], seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per weight of each type: least squares of seconds per token on weights by type."""
    types = sorted({t for f in files.values() for t in f})
    a = np.array([[files[f].get(t, 0) for t in types] for f in files], dtype=np.float64)
    b = np.array([seconds[f] for f in files])
    c, *_ = np.linalg.lstsq(a, b, rcond=None)
    return dict(zip(types, map(float, c)))


def predict(per_weight: dict[str, float], weights: dict[str, int]) -> float | None:
    """Seconds per token of a file from its weights by type; None where a type was not fitted."""
    if any(t not in per_weight for t in weights):
        return None
    return sum(per_weight[t] * n for t, n in weights.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-offgrid")
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="llama-bench repetitions a run")
    p.add_argument("--gen", type=int, default=64, help="tokens decoded a repetition")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--package", action="store_true",
                   help="also write the fitted table into luq's package (luq/data/ggml_decode_speed.json, read by "
                        "`luq quantize --speed-of`)")
    args = p.parse_args(argv)
    folder = args.work.resolve() / args.model
    base, imatrix = folder / "base-f32.gguf", folder / "imatrix.gguf"
    if not base.is_file() or not imatrix.is_file():
        raise SystemExit(f"bench.ggml_speed: no {base.name} and {imatrix.name} in {folder}: run "
                         f"`python -m bench.gguf --model {args.model}` first")
    pure_dir = folder / "pure"
    pure_dir.mkdir(exist_ok=True)
    pure = {}
    for qtype in PURE + K_TYPES:
        k = qtype in K_TYPES
        path = pure_dir / (f"q4_0-down-{qtype}.gguf" if k else f"pure-{qtype}.gguf")
        if not path.is_file():
            llamacpp.quantize(base, path, "Q4_0" if k else qtype.upper(), imatrix=imatrix, threads=args.threads,
                              pure=True, tensor_types={"ffn_down": qtype} if k else None)
        pure[path.stem] = path
    others = {p.stem: p for p in sorted(folder.glob("*.gguf")) if p.stem not in ("base-f32", "imatrix")}
    paths = {**pure, **others}
    weights = {name: weights_by_type(path) for name, path in paths.items()}

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    runs: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            tps = llamacpp.bench(paths[name], threads=args.threads, prompt=0, gen=args.gen, reps=args.reps)
            runs[name].append(tps["decode_tps"])
        done = (r + 1) / args.rounds
        eta = (time.perf_counter() - t0) * (1 - done) / done
        print(f"round {r + 1}/{args.rounds} done, ETA {eta:.0f} s", flush=True)
    load_after = os.getloadavg()[0]
    tps = {name: statistics.median(v) for name, v in runs.items()}
    seconds = {name: 1.0 / v for name, v in tps.items()}
    per_weight = fit({n: weights[n] for n in pure}, {n: seconds[n] for n in pure})

    print("\n| type | ns per weight | vs q4_0 |\n|---|---:|---:|")
    for t, c in sorted(per_weight.items(), key=lambda kv: kv[1]):
        print(f"| {t} | {c * 1e9:.4f} | {c / per_weight['q4_0']:.2f} |")
    rows = []
    print("\n| file | fitted on | decode tok/s (median) | predicted | error |\n|---|---|---:|---:|---:|")
    for name in paths:
        s = predict(per_weight, weights[name])
        row = {"file": name, "fitted_on": name in pure, "weights": weights[name], "decode_tps_runs": runs[name],
               "decode_tps": tps[name], "predicted_tps": None if s is None else 1.0 / s}
        rows.append(row)
        pred = "" if s is None else f"{1 / s:.1f}"
        err = "" if s is None else f"{(tps[name] * s - 1) * 100:+.1f}%"
        print(f"| {name} | {'yes' if name in pure else 'no'} | {tps[name]:.1f} | {pred} | {err} |")
    checks = [abs(r["decode_tps"] / r["predicted_tps"] - 1) for r in rows
              if not r["fitted_on"] and r["predicted_tps"] is not None]
    result = {"model": args.model, "llama_cpp": llamacpp.LLAMA_VERSION, "threads": args.threads,
              "rounds": args.rounds, "reps": args.reps, "gen": args.gen, "omp_wait_policy": "default",
              "load_average": [round(load_before, 2), round(load_after, 2)],
              "seconds": round(time.perf_counter() - t0, 1),
              "ns_per_weight": {t: c * 1e9 for t, c in per_weight.items()},
              "check_median_abs_error": statistics.median(checks) if checks else None,
              "check_max_abs_error": max(checks) if checks else None, "rows": rows}
    path = args.json or RESULTS / f"ggml-speed-{args.model}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nfiles not fitted on: median |error| {result['check_median_abs_error']:.1%}, "
          f"max {result['check_max_abs_error']:.1%}\nwrote {path}")
    if args.package:
        package(result, path)


def package(result: dict, source: Path) -> None:
    """The fitted table into luq's package data, with where and how it was measured."""
    import platform

    import torch

    bad = [t for t, ns in result["ns_per_weight"].items() if ns <= 0]
    if bad:
        raise SystemExit(f"bench.ggml_speed: the fit gives {', '.join(bad)} no positive time (too noisy a run?); "
                         "not packaged")
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    table = {"source": f"bench/results/{source.name}", "model": result["model"], "llama_cpp": result["llama_cpp"],
             "threads": result["threads"], "cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "ns_per_weight": result["ns_per_weight"],
             # the error on files not fitted on: the default margin a plan held to a speed keeps (luq.plan.speed)
             "check_median_abs_error": result["check_median_abs_error"],
             "check_max_abs_error": result["check_max_abs_error"]}
    out = Path(__file__).resolve().parent.parent / "src" / "luq" / "data" / "ggml_decode_speed.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except LuqError as e:
        raise SystemExit(f"bench.ggml_speed: {e}")
