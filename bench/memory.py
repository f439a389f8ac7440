"""Peak memory and time of `luq quantize` with the decoder streamed from disk vs loaded whole.

A synthetic Llama (default: hidden 2048, 24 layers, MLP 5504, 16 heads, SmolLM2's tokenizer
and vocabulary: 1.41 B parameters, 5.6 GB in float32) is written as sharded float16
safetensors, a few layers per shard, so writing it needs one shard in memory. Each mode
then runs in its own process (so its peak is its own): `luq.quantize` with GPTQ-4 g128
only (uniform: one sequential pass, the final pass's, and the measured KL included),
calibration dtype float32, on 2 threads. The peak is VmHWM from /proc/self/status. Then
`luq.load` of the artifact, in a fresh process: its peak above the process's baseline
(after imports), against the artifact's bytes.

    python -m bench.memory                      # both modes on the 1.41 B model
    python -m bench.memory --modes stream       # streaming only
    python -m bench.memory --layers 4 --hidden 512 --intermediate 1376   # a quick run

The projection to LLaVA-1.5-7B scales the measured per-layer time by the GPTQ work of a
7B layer (sum over its linears of rows x cols^2, the solver's dominant term) and the
streamed peak by the 7B model's materialized parts (embeddings, head, CLIP-L vision tower,
projector) and one float32 decoder layer; both are printed with the ratios they use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def linear_shapes(hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """(rows, cols) of one Llama decoder layer's linears (multi-head attention, as LLaVA-1.5's)."""
    return [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]


def write_synthetic(folder: Path, hidden: int, layers: int, intermediate: int, heads: int,
                    layers_per_shard: int = 2, seed: int = 0) -> int:
    """A random Llama as sharded float16 safetensors + config + SmolLM2's tokenizer; returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from luq.zoo.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    vocab = len(tokenizer)
    LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                dtype="float16").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    groups = [range(i, min(i + layers_per_shard, layers)) for i in range(0, layers, layers_per_shard)]
    n_files = len(groups) + 1
    weight_map, count = {}, 0
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for f, group in enumerate(groups):
        shard = {}
        for i in group:
            p = f"model.layers.{i}."
            for name, shape in zip(names, linear_shapes(hidden, intermediate)):
                part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                shard[f"{p}{part}.{name}.weight"] = rand(*shape)
            shard[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
            shard[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        file = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(shard, str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        count += sum(t.numel() for t in shard.values())
        del shard
    shard = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
             "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    file = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(shard, str(folder / file), {"format": "pt"})
    weight_map.update(dict.fromkeys(shard, file))
    count += sum(t.numel() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return count


def child_quantize(args) -> dict:
    import luq
    from luq.calibration import CalibrationConfig

    config = luq.LUQConfig(calibration=CalibrationConfig(samples=args.samples, seq_len=args.seq_len, seed=0),
                           formats=("gptq4-g128",), sensitivity_samples=args.samples, final_pass=not args.no_final_pass)
    t0 = time.perf_counter()
    report = luq.quantize(args.model, args.out, config, cache_dir=args.cache, progress=False, log=lambda s: None,
                          stream=args.mode == "stream", device=args.device)
    return {"wall_s": time.perf_counter() - t0, "peak_kb": vm_kb("VmHWM"), "total_bytes": report["total_bytes"],
            "seconds": report["seconds"]}


def child_load(args) -> dict:
    import luq
    from luq.models.loading import parse_dtype

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # the baseline: the process with everything imported and the tokenizer loaded, before any weight
    from accelerate import init_empty_weights

    AutoTokenizer.from_pretrained(args.out)
    config = AutoConfig.from_pretrained(args.out)
    del config.quantization_config
    with init_empty_weights():
        AutoModelForCausalLM.from_config(config)
    baseline = vm_kb("VmRSS")
    t0 = time.perf_counter()
    if args.loader == "from_pretrained":  # transformers' loader through luq's HfQuantizer
        model = AutoModelForCausalLM.from_pretrained(args.out, dtype=parse_dtype(args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(args.out)
    else:
        model, tokenizer, _ = luq.load(args.out, dtype=parse_dtype(args.dtype))
    wall = time.perf_counter() - t0
    for t in model.state_dict().values():  # every page resident (from_pretrained may map files lazily)
        if t.numel():
            int(t.detach().reshape(-1).view(torch.uint8)[::4096].max())   # one byte a page, no copy
    peak = vm_kb("VmHWM")
    ids = tokenizer("Memory is what a layer-by-layer pass saves.", return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits
    return {"wall_s": wall, "baseline_kb": baseline, "peak_kb": peak, "after_forward_peak_kb": vm_kb("VmHWM"),
            "logits_sum": float(logits.double().sum())}


def run_child(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-m", "bench.memory", *argv], cwd=HERE, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"child {argv[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gptq_work(shapes) -> int:
    return sum(r * c * c for r, c in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--modes", default="stream,memory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-final-pass", action="store_true")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "bench" / "results" / "memory.json"),
                    help="where the measured figures go ('' for nowhere)")
    # child process options
    ap.add_argument("--child", choices=["quantize", "load"])
    ap.add_argument("--mode", default="stream")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--cache")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--loader", choices=["luq", "from_pretrained"], default="luq")
    ap.add_argument("--load-only", action="store_true",
                    help="redo only the load rows, on the artifact and quantize rows a run with --dir left")
    ap.add_argument("--reproject", action="store_true", help="redo the projection in --json from its measured rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.reproject:
        out = json.loads(Path(args.json).read_text())
        mode = "stream" if "stream" in out["quantize"] else next(iter(out["quantize"]))
        row = out["quantize"][mode]
        out["projection_llava_1_5_7b"] = project(out["model"], row, args.no_final_pass, out["threads"])
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return
    if args.child:
        result = child_quantize(args) if args.child == "quantize" else child_load(args)
        print(json.dumps(result))
        return

    if args.load_only:
        if not args.dir:
            raise SystemExit("--load-only needs the --dir of an earlier run")
        earlier = json.loads(Path(args.json).read_text())
        rows = {mode: {k: v for k, v in r.items() if k != "peak_gb"} for mode, r in earlier["quantize"].items()}
        report(args, rows, Path(args.dir), command=earlier["command"])
        return
    work = Path(args.dir or tempfile.mkdtemp(prefix="luq-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = 2 * args.layers * sum(r * c for r, c in linear_shapes(args.hidden, args.intermediate)) * 1.6
    print(f"work dir {work}: {free / 1e9:.1f} GB free, ~{need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough disk space")
    try:
        model = work / "model"
        if not (model / "model.safetensors.index.json").exists():
            model.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            n_params = write_synthetic(model, args.hidden, args.layers, args.intermediate, args.heads)
            print(f"wrote a {n_params / 1e9:.3f} B-parameter Llama ({n_params * 4 / 1e9:.2f} GB in float32) "
                  f"in {time.perf_counter() - t0:.0f} s")
        common = ["--threads", str(args.threads), "--device", args.device]
        rows = {}
        for mode in args.modes.split(","):
            out = work / f"q-{mode}"
            extra = ["--no-final-pass"] if args.no_final_pass else []
            rows[mode] = run_child("--child", "quantize", "--mode", mode, "--model", str(model), "--out", str(out),
                                   "--cache", str(work / f"cache-{mode}"), "--samples", str(args.samples),
                                   "--seq-len", str(args.seq_len), *common, *extra)
            print(f"{mode}: {json.dumps(rows[mode])}", flush=True)
        report(args, rows, work)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(args, rows: dict, work: Path, command: str | None = None) -> None:
    """The table, the load rows and the projection; `command`: the run that measured `rows`
    (when only the load rows are redone, --load-only)."""
    this = "python -m bench.memory " + " ".join(sys.argv[1:])
    out = {"command": command or this, **({"load_command": this} if command else {}),
           "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate,
                     "heads": args.heads},
           "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "threads": args.threads,
           "quantize": {mode: dict(r, peak_gb=r["peak_kb"] * 1024 / 1e9) for mode, r in rows.items()}, "load": {}}
    _report(args, rows, work, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")


def _report(args, rows: dict, work: Path, out: dict) -> None:
    print(f"\nluq.quantize, GPTQ-4 g128, {args.samples} x {args.seq_len} tokens, {args.threads} threads, "
          f"hidden {args.hidden}, {args.layers} layers:\n")
    print("| mode | peak resident GB | wall s | layer pass s | s per layer (all stages) |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_kb'] * 1024 / 1e9:.2f} | {r['wall_s']:.0f} | {r['seconds']['layer_pass']:.0f} | "
              f"{r['wall_s'] / args.layers:.1f} |")
    if len(rows) == 2:
        a, b = (work / "q-stream" / "model.safetensors.index.json"), (work / "q-memory" / "model.safetensors.index.json")
        files = sorted(p.name for p in (work / "q-stream").glob("*.safetensors"))
        same = all((work / "q-stream" / f).read_bytes() == (work / "q-memory" / f).read_bytes() for f in files)
        out["artifact_identical"] = same
        print(f"\nartifact tensors identical, streamed vs in memory: {same} ({', '.join(files)}"
              f"{', index' if a.exists() and b.exists() else ''})")
    mode = "stream" if "stream" in rows else next(iter(rows))
    artifact_dir = work / f"q-{mode}"
    print("\nloading the artifact (a fresh process each):\n")
    print("| loader | dtype | artifact GB | baseline GB | peak GB (every tensor touched) | (peak - baseline) / artifact "
          "| load s | peak GB after one forward (kernels built) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    artifact = rows[mode]["total_bytes"]
    for loader in ("luq", "from_pretrained"):
        for dtype in ("float32", "float16"):
            r = run_child("--child", "load", "--loader", loader, "--out", str(artifact_dir), "--dtype", dtype,
                          "--threads", str(args.threads))
            ratio = (r["peak_kb"] - r["baseline_kb"]) * 1024 / artifact
            key = dtype if loader == "luq" else f"from_pretrained {dtype}"
            out["load"][key] = dict(r, artifact_bytes=artifact, ratio_over_baseline=ratio)
            print(f"| {loader} | {dtype} | {artifact / 1e9:.3f} | {r['baseline_kb'] * 1024 / 1e9:.2f} | "
                  f"{r['peak_kb'] * 1024 / 1e9:.2f} | {ratio:.2f} | {r['wall_s']:.1f} | "
                  f"{r['after_forward_peak_kb'] * 1024 / 1e9:.2f} |")

    out["projection_llava_1_5_7b"] = project(out["model"], rows[mode], args.no_final_pass, args.threads)


def working_set(hidden: int, intermediate: int) -> int:
    """Bytes one layer's quantization holds above the process (the larger of its two moments):
    the float32 layer with its float64 Hessian sums at the end of its forward (one per distinct
    input: q/k/v share one, gate/up one), or, during GPTQ of its widest-input linear, the layer
    with four [cols, cols] float32 matrices (its Hessian, the permuted copy, two of L / H^-1 / U)
    and three float32 copies of that weight."""
    layer = 4 * sum(a * b for a, b in linear_shapes(hidden, intermediate))
    sums = 8 * (3 * hidden * hidden + intermediate * intermediate)
    gptq = 4 * 4 * intermediate * intermediate + 3 * 4 * hidden * intermediate
    return layer + max(sums, gptq)


def project(model: dict, r: dict, no_final_pass: bool, threads: int) -> dict:
    """LLaVA-1.5-7B (Vicuna-7B: hidden 4096, MLP 11008, 32 layers) from one measured run: arithmetic."""
    shapes = linear_shapes(model["hidden"], model["intermediate"])
    work_ratio = gptq_work(linear_shapes(4096, 11008)) / gptq_work(shapes)
    # the report's seconds per stage: a uniform model's one pass is its layer_pass (sequential, as a final
    # pass); runs of an earlier luq had a variant pass and a final_pass
    per_layer = r["seconds"]["layer_pass"] / model["layers"]
    final = 0 if no_final_pass else r["seconds"].get("final_pass", 0.0) / model["layers"]
    hours = (per_layer + final) * work_ratio * 32 / 3600
    here, big = working_set(model["hidden"], model["intermediate"]), working_set(4096, 11008)
    need = r["peak_kb"] * 1024 - here + big
    print("\nprojection to LLaVA-1.5-7B (arithmetic on the figures above, not a measurement):")
    print(f"- time: ({per_layer:.0f} s layer pass + {final:.0f} s final pass) per layer here x {work_ratio:.2f} "
          f"(GPTQ work, sum of rows x cols^2, of a 7B layer / this one's) x 32 layers = {hours:.1f} h "
          f"on {threads} threads")
    print(f"- memory: one layer's working set is {here / 1e9:.2f} GB here and {big / 1e9:.2f} GB for a 7B layer "
          f"(float32 calibration): the measured peak - {here / 1e9:.2f} + {big / 1e9:.2f} = {need / 1e9:.1f} GB")
    return {"seconds_per_layer_variant_pass": per_layer, "seconds_per_layer_final_pass": final,
            "gptq_work_ratio": work_ratio, "hours": hours, "working_set_gb_here": here / 1e9,
            "working_set_gb_7b": big / 1e9, "peak_gb": need / 1e9,
            "note": "arithmetic on the measured figures, not a measurement"}


if __name__ == "__main__":
    main()
