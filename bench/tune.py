"""`luq tune` on the like-for-like rows: each artifact `bench.budget --set whole` wrote, tuned exactly as
`luq tune DIR --out DIR-tuned-sN --steps N` runs it (`luq.tune`), then scored on the same held-out windows
as the untuned rows (the validation windows: disjoint from the calibration, sensitivity and tuning windows).

    python -m bench.budget --model smollm2-offgrid --set whole --menu clip   # first: the artifacts
    python -m bench.tune --model smollm2-offgrid --menu clip   # -> bench/results/tune-smollm2-offgrid-clip.json

Prints each row's perplexity before and after, the ratios against uniform whole-model GPTQ-4 (untuned, on
min-max grids: the issue's baseline; and tuned the same way) and against uniform GPTQ-3, and writes the
result file and a plot of each row's training loss beside it (.png). A tuned artifact already in the work
directory with the same settings is scored, not redone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import luq
from bench.budget import RESULTS, work_dir
from bench.common import add_model_args, calibration_of
from luq.quant.dense import dequantize_modules

ROWS = ("uniform whole-model GPTQ-4 g128", "uniform whole-model GPTQ-3 g128",
        "measured at whole-model GPTQ-3's bytes", "measured at 75% of whole-model GPTQ-4's bytes")


def main(argv=None) -> None:
    from bench.frontier import Metric

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--menu", choices=("default", "clip"), default="clip", help="which bench.budget --set whole run")
    p.add_argument("--steps", type=int, default=50, help="luq tune --steps")
    p.add_argument("--windows", type=int, default=luq.TuneConfig.windows, help="luq tune --windows")
    p.add_argument("--batch-size", type=int, default=luq.TuneConfig.batch_size, help="luq tune --batch-size")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=luq.TuneConfig.schedule,
                   help="luq tune --schedule")
    p.add_argument("--rows", default=None, help="comma-separated row numbers (1-4 of ROWS) to tune; default all")
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--vqa-per-kind", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    suffix, label = ("-clip", " (clipped grids)") if args.menu == "clip" else ("", "")
    source_file = RESULTS / f"budget-whole-{args.model}{suffix}.json"
    baseline_file = RESULTS / f"budget-whole-{args.model}.json"
    if not source_file.is_file():
        raise SystemExit(f"no {source_file}: run `python -m bench.budget --model {args.model} --set whole"
                         f"{' --menu clip' if suffix else ''}` first")
    source = json.loads(source_file.read_text())
    work = work_dir(args.model)
    calibration = calibration_of(args)
    config = luq.TuneConfig(steps=args.steps, windows=args.windows, batch_size=args.batch_size,
                            schedule=args.schedule)
    picked = [ROWS[int(i) - 1] for i in args.rows.split(",")] if args.rows else list(ROWS)

    rows = {}
    for base in picked:
        name = base + label
        before = source["rows"][name]
        artifact = work / before["name"]
        if not (artifact / "luq_report.json").is_file():
            raise SystemExit(f"no artifact {artifact}: rerun `python -m bench.budget --model {args.model} --set whole"
                             f"{' --menu clip' if suffix else ''}`")
        out = work / f"{before['name']}-tuned-{_tag(config)}"
        t0 = time.perf_counter()
        report = _reuse(out, artifact, config) or luq.tune(artifact, out, config, log=lambda s: None)
        seconds = report["seconds"]["tune"]
        model, processor, _ = luq.load(out)
        dequantize_modules(model)   # the same weights as plain linears: scoring speed only
        value = Metric(args.model, model, processor, args, calibration)()["value"]
        tuning = report["tuning"]
        rows[name] = {"name": out.name, "source": before["name"], "total_bytes": report["total_bytes"],
                      "value_before": before["value"], "value": value, "ratio": value / before["value"],
                      "kl_first_steps": tuning["kl_first_steps"], "kl_last_steps": tuning["kl_last_steps"],
                      "kl_by_step": tuning["kl_by_step"], "tune_seconds": seconds,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {report['total_bytes'] / 1e6:.2f} MB, perplexity {before['value']:.2f} -> {value:.2f} "
              f"({seconds:.0f} s tuning)", flush=True)

    checks = {}
    gptq4 = f"{ROWS[0]}{label}"
    at75, at3, gptq3 = f"{ROWS[3]}{label}", f"{ROWS[2]}{label}", f"{ROWS[1]}{label}"
    if at75 in rows and baseline_file.is_file():
        plain4 = json.loads(baseline_file.read_text())["rows"][ROWS[0]]["value"]
        checks["tuned, at 75% of GPTQ-4's bytes / uniform GPTQ-4 on min-max grids, untuned"] = \
            rows[at75]["value"] / plain4
    if at75 in rows and gptq4 in rows:
        checks["tuned, at 75% of GPTQ-4's bytes / uniform GPTQ-4, tuned"] = rows[at75]["value"] / rows[gptq4]["value"]
    if at3 in rows and gptq3 in rows:
        checks["tuned, at GPTQ-3's bytes / uniform GPTQ-3, tuned"] = rows[at3]["value"] / rows[gptq3]["value"]
    result = {"model": args.model, "menu": args.menu, "source": source_file.name, "metric": "perplexity",
              "eval_samples": args.eval_samples,
              "tune": {**{k: v for k, v in vars(config).items() if k != "text"}, "seq_len": args.seq_len},
              "rows": rows, "checks": checks, "threads": torch.get_num_threads()}
    out_file = args.out or RESULTS / f"tune-{args.model}{suffix}.json"
    out_file.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_file.with_suffix(".png"))
    for name, value in checks.items():
        print(f"{name}: {value:.3f}")


def plot(result: dict, path: Path) -> None:
    """The distillation KL on the tuning windows at each step, one line per row (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in result["rows"].items():
        ax.plot(range(1, len(r["kl_by_step"]) + 1), r["kl_by_step"], label=f"{name} ({r['total_bytes'] / 1e6:.1f} MB)")
    ax.set_yscale("log")
    tune = result["tune"]
    ax.set_xlabel(f"tuning step ({tune['batch_size']} windows of {tune['seq_len']} tokens each)")
    ax.set_ylabel("KL(teacher || model) on the step's windows")
    ax.set_title(f"luq tune on {result['model']}: the training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tag(config) -> str:
    """The tuned artifact's name suffix: the steps, and each setting that is not luq tune's default."""
    default = luq.TuneConfig()
    tag = f"s{config.steps}"
    for key, short in (("windows", "w"), ("batch_size", "b"), ("schedule", "")):
        if getattr(config, key) != getattr(default, key):
            tag += f"-{short}{getattr(config, key)}"
    return tag


def _reuse(out: Path, artifact: Path, config) -> dict | None:
    """The report of a tuned artifact already at `out` made from `artifact` with these settings, else None."""
    path = out / "luq_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    tuning = report.get("tuning") or {}
    default = vars(luq.TuneConfig())   # a setting a report does not name ran at its default then
    same = tuning.get("source") == str(artifact) and all(
        tuning.get(k, default[k]) == v for k, v in vars(config).items()
        if v is not None and k not in ("text", "teacher", "checkpoint_every"))
    return report if same else None


if __name__ == "__main__":
    main()
