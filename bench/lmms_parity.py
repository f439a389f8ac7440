"""lmms-eval through the luq plugin against luq's own runner, on luq's bundled samples.

    python -m bench.lmms_parity MODEL_OR_DIR [--tasks textvqa,pope,...] [--batch-size 8] [--out DIR]

Runs, offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1), the command a researcher types::

    lmms-eval --model luq --model_args path=MODEL_OR_DIR --include_path <luq's lmms tasks> \\
        --tasks luq_textvqa,... --batch_size 8 --log_samples --output_path DIR

prints lmms-eval's own table, then answers the same samples with luq's runner
(``luq.eval.runner.evaluate``, the same batch size) and prints, per task, how many answers are
identical, how many per-sample scores agree, and both headline scores. Needs the lmms extra.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from luq.eval.datasets import known_tasks


def run_lmms_eval(model: str, tasks: list[str], batch_size: int, out: Path) -> tuple[list[str], str, float]:
    from luq.eval.lmms_tasks import TASKS_DIR, lmms_task

    lmms = Path(sys.executable).with_name("lmms-eval")
    command = [str(lmms), "--model", "luq", "--model_args", f"path={model}", "--include_path", str(TASKS_DIR),
               "--tasks", ",".join(lmms_task(t) for t in tasks), "--batch_size", str(batch_size),
               "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"lmms-eval failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return command, done.stdout, seconds


def logged_samples(out: Path, task: str) -> list[dict]:
    from luq.eval.lmms_tasks import lmms_task

    files = sorted(out.rglob(f"*_samples_{lmms_task(task)}.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"no logged samples of {lmms_task(task)} under {out}")
    records = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["doc_id"])


def latest_results(out: Path) -> dict:
    files = sorted(out.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text())["results"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tasks", default=",".join(known_tasks()))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="out/lmms_parity")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    out = Path(args.out) / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)

    command, table, lmms_seconds = run_lmms_eval(args.model, tasks, args.batch_size, out)
    print("$ " + " ".join(command))
    print(table.strip())
    print(f"(lmms-eval: {lmms_seconds:.0f} s including its start)")

    import torch

    from luq.eval.lmms_tasks import SCORER_DIFFERENCES, lmms_task
    from luq.eval.lmms_tasks.parity import HEADLINES, lmms_answer, lmms_headline, lmms_sample_score
    from luq.eval.runner import EvalConfig, evaluate, load_for_eval

    started = time.perf_counter()
    model, processor, _ = load_for_eval(args.model, "cpu", torch.float32)
    results = latest_results(out)
    rows = []
    for task in tasks:
        ours = evaluate(model, processor, EvalConfig(task=task, batch_size=args.batch_size))
        theirs = logged_samples(out, task)
        same = sum(r["prediction"] == lmms_answer(t) for r, t in zip(ours.samples, theirs))
        scored = [(r["score"], lmms_sample_score(task, t)) for r, t in zip(ours.samples, theirs)]
        # to 1e-9: lmms-eval averages VQA answers with statistics.mean, luq with sum / n
        agree = "n/a" if scored[0][1] is None else f"{sum(abs(a - b) <= 1e-9 for a, b in scored)}/{len(scored)}"
        key = HEADLINES[task][0]
        rows.append((task, len(theirs), f"{same}/{len(ours.samples)}", agree, key, ours.scores[key],
                     lmms_headline(task, results[lmms_task(task)]), "yes" if task in SCORER_DIFFERENCES else ""))
    print(f"\nluq's runner on the same samples, batch size {args.batch_size} ({time.perf_counter() - started:.0f} s)")
    print("| task | samples | identical answers | per-sample scores equal | headline | luq | lmms-eval "
          "| scorers differ |")
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for task, n, same, agree, key, luq_score, lmms_score, differ in rows:
        shown = "None" if lmms_score is None else f"{lmms_score:.4g}"
        print(f"| {task} | {n} | {same} | {agree} | {key} | {luq_score:.4g} | {shown} | {differ} |")


if __name__ == "__main__":
    main()
