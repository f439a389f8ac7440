"""``luq eval MODEL_OR_DIR --task NAME``: arguments and the command itself.

The lead wires ``add_eval_arguments`` and ``run_eval`` into ``luq.cli``; bad input raises
``LuqError`` (one line, printed by the CLI). Under ``accelerate launch`` the samples (or
perplexity windows) are shared out between the processes and only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from luq.errors import LuqError

PERPLEXITY = "perplexity"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``luq eval``."""
    from luq.eval.datasets import known_tasks

    parser.add_argument("model", nargs="?", default=None,
                        help="hub id, local directory, quantized luq directory, or built-in name (default: smollm2)")
    parser.add_argument("--task", required=True, metavar="NAME",
                        help=f"one of: {', '.join(known_tasks())}, {PERPLEXITY}")
    parser.add_argument("--data", metavar="PATH",
                        help="VQA: a directory with samples.jsonl, 'hub' or a hub dataset id (default: the bundled "
                             "offline sample); perplexity: a text file/folder, 'wikitext2' or a hub dataset "
                             "(default: the offline Wikipedia excerpt)")
    parser.add_argument("--limit", type=int, metavar="N", help="first N questions (perplexity: N windows)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="results JSON (default: ./luq-eval-TASK.json)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="questions (perplexity: windows) per forward (default 8; perplexity 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="cap on generated tokens (default: the task's)")
    parser.add_argument("--seq-len", type=int, default=2048, metavar="L", help="perplexity window (default 2048)")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="perplexity: tokens between window starts (default: --seq-len)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")


class _Progress:
    """A tqdm bar on the main process (with ETA), nothing elsewhere."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="batch", file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(title: str, scores: dict, headline: str) -> None:
    """The scores, one per line, the headline marked."""
    print(title)
    width = max(len(k) for k in scores)
    for name, value in scores.items():
        mark = "  <- headline" if name == headline else ""
        print(f"  {name:<{width}}  {_format(value):>10}{mark}")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print a score table and write the results JSON. Returns 0; raises LuqError."""
    from luq.eval.datasets import task_spec
    from luq.eval.distributed import data_parallel_from_env
    from luq.eval.runner import load_for_eval
    from luq.checks import check_out_file
    from luq.models.loading import check_device, parse_dtype
    from luq.store import write_json

    task = args.task
    if task != PERPLEXITY:
        task_spec(task)  # an unknown task fails before any model is loaded
    if args.limit is not None and args.limit < 1:
        raise LuqError(f"--limit must be at least 1, got {args.limit}")
    dtype = parse_dtype(args.dtype)
    out = args.out or Path(f"luq-eval-{task}.json")
    check_out_file(out)   # before any model is loaded
    parallel = data_parallel_from_env(check_device(args.device))
    device = parallel.device(args.device)
    model_name = args.model or "smollm2"
    progress = _Progress(f"{task} on {model_name}", parallel.is_main)

    if task == PERPLEXITY:
        from luq.eval.perplexity import PerplexityConfig, evaluate_perplexity

        config = PerplexityConfig(data=args.data, seq_len=args.seq_len, stride=args.stride, limit=args.limit,
                                  batch_size=args.batch_size or 1)
        model, tokenizer, _ = load_for_eval(args.model, device, dtype)
        result = evaluate_perplexity(model, tokenizer, config, parallel=parallel, progress=progress)
        result = {"task": PERPLEXITY, "model": model_name, "data": args.data or "wikipedia (offline excerpt)",
                  "headline": "perplexity", "score": result["perplexity"], **result}
        scores = {k: result[k] for k in ("perplexity", "nll", "tokens", "windows", "seq_len", "stride")}
        title = (f"perplexity of {model_name} on {result['data']}: {result['tokens']:,} tokens, "
                 f"{result['seconds']:.1f} s")
    else:
        from luq.eval.datasets import load_samples
        from luq.eval.runner import EvalConfig, evaluate

        config = EvalConfig(task=task, data=args.data, limit=args.limit, batch_size=args.batch_size or 8,
                            max_new_tokens=args.max_new_tokens)
        samples = load_samples(task, args.data, args.limit)  # bad data fails before the model loads
        model, processor, _ = load_for_eval(args.model, device, dtype)
        evaluated = evaluate(model, processor, config, samples=samples, parallel=parallel, progress=progress)
        result = {"model": model_name, "data": args.data or "bundled sample", **evaluated.to_json()}
        scores, title = evaluated.scores, (f"{task_spec(task).title} ({task}) of {model_name} on {result['data']}: "
                                           f"{len(samples)} samples, {evaluated.seconds:.1f} s")
    result["device"], result["dtype"] = str(device), str(dtype).removeprefix("torch.")
    if parallel.is_main:
        print_table(title, scores, result["headline"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, json.loads(json.dumps(result, default=str)))
        print(f"wrote {out}")
    return 0
