"""The `luq` command: thin, argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from luq.errors import LuqError


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line (and a pointer to --help), not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", metavar="SRC", help="local text file/folder or hub dataset (default: offline Wikipedia)")
    g.add_argument("--calib-images", metavar="SRC", help="local JSONL of {image, question} or hub dataset")
    g.add_argument("--alpha", type=float, default=0.0, help="fraction of multimodal tokens (default 0)")
    g.add_argument("--samples", type=int, default=128, help="N calibration sequences (default 128)")
    g.add_argument("--seq-len", type=int, default=2048, help="L tokens per sequence (default 2048)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="keep activations between layers in memory-mapped files here instead of RAM")


def _clusters_value(text: str):
    if text == "auto":
        return None
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kmeans-clusters takes 'auto' or an integer, not {text!r}") from None
    if k < 2:
        raise argparse.ArgumentTypeError("--kmeans-clusters must be at least 2")
    return k


def _entropy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kmeans-clusters", "--k", dest="kmeans_clusters", type=_clusters_value, default=None,
                   metavar="auto|INT", help="K-means clusters of the entropy ranking (default: auto)")
    p.add_argument("--subsample", type=int, default=None, help="fit K-means on this many tokens per layer")


class _DeprecatedKeep(argparse.Action):
    """--keep-fp16, the old name of --keep (units are kept at --storage-dtype, not only float16)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("luq: warning: --keep-fp16 is deprecated; use --keep (kept units are stored at --storage-dtype)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _order_value(text: str):
    if text in ("entropy", "reverse-entropy", "depth", "random"):
        return text
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--order takes entropy, reverse-entropy, depth, random or comma-separated layer indices, not {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="luq", description="Layerwise ultra-low-bit quantization of (multimodal) LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("entropy", help="rank decoder layers by output-activation entropy")
    p.add_argument("model", nargs="?", default=None, help="hub id, local directory, or built-in name (default: smollm2)")
    p.add_argument("--out", required=True, type=Path, help="directory for entropy.json and plots")
    _entropy_options(p)
    _calibration_options(p)

    p = sub.add_parser("quantize", help="quantize a model and write the artifact",
                       description="Quantize MODEL: by default the best plan (one format per linear, from the "
                                   "--formats menu) under --budget-gb, chosen on measured costs; "
                                   "--allocate entropy is the LUQ paper's method.")
    p.add_argument("model", nargs="?", default=None, help="hub id, local directory, or built-in name (default: smollm2)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    rule = p.add_argument_group("stopping rule (exactly one; none for a one-format menu)")
    rule.add_argument("--budget-gb", type=float, help="the artifact fits in this many GB (10^9 bytes)")
    rule.add_argument("--max-drop", type=float,
                      help="smallest model whose --metric stays within this of full precision (measured) "
                           "or of the all-high model (entropy)")
    rule.add_argument("--n-low-layers", "--layers", dest="n_low_layers", type=int, metavar="N",
                      help="--allocate entropy: exactly this many layers at the low format")
    p.add_argument("--allocate", default="measured", choices=("measured", "entropy"),
                   help="measured (default): knapsack over the format menu on measured costs; "
                        "entropy: the paper's entropy-ordered layers at --low, the rest at --high")
    p.add_argument("--formats", default=None, metavar="A,B,...",
                   help="the menu of --allocate measured (default: every gptq<b>-g<g>; see `luq formats`); "
                        "one name makes the uniform model; the menu names default and compact (the compact "
                        "1-bit formats: best below GPTQ-3's size) stand for their formats")
    p.add_argument("--high", default=None, metavar="FORMAT",
                   help="--allocate entropy: the high format (default gptq4-g128)")
    p.add_argument("--low", default=None, metavar="FORMAT", help="--allocate entropy: the low format (default billm)")
    p.add_argument("--keep", default=None, metavar="KINDS",
                   help="units outside the decoder kept unquantized (at --storage-dtype): any of embed,head,vision "
                        "('' quantizes all). Default: all join the budget of --allocate measured with --budget-gb or "
                        "--max-drop; --allocate entropy and a one-format model keep them")
    p.add_argument("--keep-fp16", dest="keep", action=_DeprecatedKeep, help=argparse.SUPPRESS)
    p.add_argument("--sensitivity-samples", type=int, default=16, metavar="N",
                   help="held-out sequences the costs are measured on (default 16)")
    p.add_argument("--speed-of", default="auto", metavar="auto|none|GGUF|TYPE",
                   help="with --formats ggml: decode in llama.cpp no slower than llama.cpp's own file of the budget's "
                        "size (auto, the default: the largest preset that fits), this GGUF file, or the model with "
                        "every linear in this ggml type; none: least KL at the size, however it decodes. Predicted "
                        "from luq's measured per-type speed table")
    p.add_argument("--speed-margin", type=float, default=None, metavar="FRACTION",
                   help="with --speed-of: how much faster than the reference the plan is predicted (0.05: 5%% more "
                        "tokens/s; default: the speed table's median error on files it was not fitted on)")
    p.add_argument("--metric", default="perplexity",
                   help="metric of --max-drop: perplexity on held-out text (default) or a VQA task (textvqa, pope, ...)")
    p.add_argument("--metric-data", default=None, metavar="PATH",
                   help="data of a VQA --metric (default: its bundled offline sample)")
    p.add_argument("--search", default="binary", choices=("binary", "greedy"), help="search of --max-drop")
    p.add_argument("--order", default=None, type=_order_value,
                   help="--allocate entropy: entropy (default), reverse-entropy, depth, random, or layer indices "
                        "like 3,1,2")
    p.add_argument("--hessians", default="fp", choices=("fp", "sequential"),
                   help="Hessians from the full-precision chain (default) or the quantized-so-far chain")
    p.add_argument("--final-pass", action=argparse.BooleanOptionalAction, default=True,
                   help="re-quantize the chosen configuration sequentially (default: on; it lowers perplexity)")
    p.add_argument("--measure-kl", action=argparse.BooleanOptionalAction, default=None,
                   help="the finished model's KL from full precision on the sensitivity windows, in the report "
                        "(default: where a plan was chosen from measured costs; a uniform model skips it)")
    _entropy_options(p)
    p.add_argument("--storage-dtype", default="float16", help="dtype of the unquantized tensors (default float16)")
    p.add_argument("--cache-dir", type=Path, default=None, help="variant cache root (default: $LUQ_CACHE/variants)")
    p.add_argument("--tune-steps", type=int, default=None, metavar="N",
                   help="then tune the artifact in place for N steps (`luq tune`: its GPTQ and llama.cpp block "
                        "scales and its norms trained against the full-precision model)")
    p.add_argument("--export", default=None, choices=("gguf",),
                   help="also write the artifact as OUT.gguf for llama.cpp (every tensor needs a ggml form: "
                        "--formats ggml)")
    _calibration_options(p)

    from luq.eval.command import add_eval_arguments

    p = sub.add_parser("eval", help="evaluate a model or a quantized artifact (VQA tasks, perplexity)")
    add_eval_arguments(p)

    p = sub.add_parser("formats", help="list the format names with their true bits per weight")
    p.add_argument("--shape", default="4096x4096", metavar="OUTxIN", help="layer shape the bits are counted on")

    p = sub.add_parser("report", help="redraw the plots of a run")
    p.add_argument("dir", type=Path)

    p = sub.add_parser("export", help="write an artifact for another runtime (GGUF for llama.cpp), not re-quantized",
                       description="Write the artifact DIR as a GGUF file for llama.cpp (Llama, Qwen2 and Gemma 3 "
                                   "text decoders): llama.cpp's block formats (--formats ggml) as stored; GPTQ-4 with "
                                   "contiguous groups -> Q4_1 (Q4_0 when symmetric), GPTQ-8 -> Q8_0 when its grid "
                                   "fits; unquantized tensors as stored. Anything else is refused, naming the "
                                   "tensor.")
    p.add_argument("dir", type=Path, help="luq artifact directory")
    p.add_argument("--format", required=True, choices=("gguf",))
    p.add_argument("--out", required=True, type=Path, help="file to write")

    p = sub.add_parser("tune",
                       help="train an artifact's scales and norms end to end against its full-precision model",
                       description="Distil the full-precision model into the quantized artifact DIR: the fp16 scales "
                                   "of its GPTQ-format weights (of each group) and of its llama.cpp-type weights "
                                   "(each block's d) and its norm weights learn to match the teacher's "
                                   "next-token distributions on calibration text (codes, formats and bytes "
                                   "unchanged), written as a new artifact. Resumes after an interruption.")
    p.add_argument("dir", type=Path, help="luq artifact directory (changed only when --out names it too)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--windows", type=int, default=128, help="text windows drawn from (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the artifact's calibration)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam step of the scales' relative change (default 2e-3)")
    p.add_argument("--norm-lr", type=float, default=1e-3, help="Adam step of the norm weights; 0 freezes them")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rates kept (constant, default) or decayed to 0 over the steps (cosine)")
    p.add_argument("--calib-text", metavar="SRC", default=None,
                   help="text to tune on (default: the artifact's calibration text)")
    p.add_argument("--teacher", default=None, help="full-precision model (default: the one the artifact was made from)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    return parser


def cmd_entropy(args) -> None:
    from luq.calibration import CalibrationConfig, calibration_batches, multimodal_fraction
    from luq.checks import check_out_dir
    from luq.models.loading import load_model, parse_dtype
    from luq.pipeline import measure_entropy
    from luq.report import plot_entropy
    from luq.store import write_json

    config = CalibrationConfig(text=args.calib_text, images=args.calib_images, alpha=args.alpha,
                               samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    check_out_dir(args.out)
    model, tokenizer, adapter = load_model(args.model, args.device, parse_dtype(args.dtype))
    batches = calibration_batches(tokenizer, adapter, config)
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure_entropy(model, adapter, batches, k=args.kmeans_clusters, device=args.device, subsample=args.subsample,
                             seed=args.seed, offload_dir=args.offload_dir).to_json()
    result["tokens"]["multimodal_fraction"] = multimodal_fraction(batches)
    result.update(model=args.model or "smollm2", calibration=vars(config))
    write_json(args.out / "entropy.json", result)
    plots = plot_entropy(result, args.out)
    print(f"K = {result['kmeans_clusters']}; lowest-entropy layers first: {result['ranking']}")
    print(f"wrote {args.out / 'entropy.json'} and {', '.join(p.name for p in plots)}")


def cmd_quantize(args) -> None:
    from luq.api import quantize
    from luq.calibration import CalibrationConfig
    from luq.config import LUQConfig
    from luq.report import plot_run, print_summary

    calibration = CalibrationConfig(text=args.calib_text, images=args.calib_images, alpha=args.alpha,
                                    samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    paper_only = [flag for flag, value in (("--order", args.order), ("--high", args.high), ("--low", args.low))
                  if value is not None]
    if paper_only and args.allocate != "entropy":
        raise LuqError(f"{', '.join(paper_only)} {'is an option' if len(paper_only) == 1 else 'are options'} of the "
                       "paper's method: add --allocate entropy")
    paper = {k: v for k, v in (("order", args.order), ("high", args.high), ("low", args.low)) if v is not None}
    config = LUQConfig(calibration=calibration, budget_gb=args.budget_gb, max_drop=args.max_drop, metric=args.metric,
                       metric_data=args.metric_data, n_low_layers=args.n_low_layers, search=args.search, **paper,
                       hessians=args.hessians, allocate=args.allocate, formats=args.formats,
                       sensitivity_samples=args.sensitivity_samples, speed_of=args.speed_of,
                       speed_margin=args.speed_margin, keep=args.keep,
                       final_pass=args.final_pass, kmeans_clusters=args.kmeans_clusters, subsample=args.subsample,
                       storage_dtype=args.storage_dtype, offload_dir=args.offload_dir, measure_kl=args.measure_kl)
    gguf_out = args.out.with_name(args.out.name + ".gguf") if args.export else None
    if gguf_out is not None:   # refused now, not after the run: a format with no ggml form
        from luq.checks import check_out_file
        from luq.quant.formats import get_format

        check_out_file(gguf_out)
        other = [f for f in config.menu() + config.unit_menu() if get_format(f).settings()["solver"] not in ("GGML", "GGMLRTN")]
        if other:
            raise LuqError(f"--export gguf writes llama.cpp's block formats as stored; {other[0]} has no ggml "
                           "form: use --formats ggml (or ggml type names)")
    tune_config = None
    if args.tune_steps is not None:   # its settings refused now, not after the run
        from luq.tuning import TuneConfig

        tune_config = TuneConfig(steps=args.tune_steps, text=args.calib_text)
    report = quantize(args.model, args.out, config, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    if tune_config is not None:
        from luq.tuning import tune

        report = tune(args.out, args.out, tune_config, device=args.device)
    print_summary(report)
    plots = plot_run(report, args.out)
    print(f"wrote {args.out} (plots: {', '.join(p.name for p in plots)})")
    if gguf_out is not None:
        _export(args.out, gguf_out)


def cmd_formats(args) -> None:
    from luq.quant.formats import MENUS, list_formats, reference_bits

    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError
    except ValueError:
        raise LuqError(f"--shape takes OUTxIN like 4096x4096, not {args.shape!r}") from None
    print(f"{'format':<14} {'true bits':>12}  {'menu':<8} description (true bits on a {shape[0]}x{shape[1]} layer)")
    for fmt in list_formats():
        bits = reference_bits(fmt, shape)
        text = "?" if bits is None else (f"{bits[0]:.3f}" if abs(bits[1] - bits[0]) < 5e-4
                                          else f"{bits[0]:.3f}-{bits[1]:.3f}")
        menu = next((name for name, names in MENUS.items() if fmt.name in names), "")
        print(f"{fmt.name:<14} {text:>12}  {menu:<8} {fmt.description}")


def cmd_eval(args) -> None:
    from luq.eval.command import run_eval

    code = run_eval(args)
    if code:
        raise SystemExit(code)


def cmd_report(args) -> None:
    from luq.artifact import REPORT
    from luq.report import plot_entropy, plot_run

    report_path = args.dir / REPORT
    if report_path.is_file():  # a quantized artifact: its frontier and its entropy plots
        report = json.loads(report_path.read_text())
        plots = plot_run(report, args.dir)
        print(f"wrote {', '.join(str(p) for p in plots)}")
        return
    path = args.dir / "entropy.json"
    if not path.is_file():
        raise LuqError(f"no entropy.json or luq_report.json in {args.dir}")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LuqError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    plots = plot_entropy(result, args.dir)
    print(f"wrote {', '.join(str(p) for p in plots)}")


def cmd_tune(args) -> None:
    from luq.tuning import TuneConfig, tune

    config = TuneConfig(steps=args.steps, batch_size=args.batch_size, windows=args.windows, seq_len=args.seq_len,
                        lr=args.lr, norm_lr=args.norm_lr, schedule=args.schedule, text=args.calib_text,
                        teacher=args.teacher, seed=args.seed)
    tune(args.dir, args.out, config, device=args.device)


def cmd_export(args) -> None:
    _export(args.dir, args.out)


def _export(artifact: Path, out: Path) -> None:
    from luq.export import export_gguf

    summary = export_gguf(artifact, out)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary["tensors"].items()))
    print(f"wrote {out}: {summary['bytes']:,} bytes ({summary['architecture']}); tensors {types}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return int(e.code or 0)
    try:
        {"entropy": cmd_entropy, "quantize": cmd_quantize, "eval": cmd_eval, "formats": cmd_formats,
         "report": cmd_report, "export": cmd_export, "tune": cmd_tune}[args.command](args)
    except LuqError as e:
        print(f"luq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("luq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`luq formats | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
