"""The off-grid controls against the models they come from (luq.zoo.offgrid): SmolLM2 against
smollm2-offgrid, tiny-vlm against tiny-vlm-offgrid.

For each off-grid model, two builds: the cached one (its built-in name) and a fresh one written into a
temporary directory by the same function (`offgrid.write_offgrid`, same source, seed 0): the tensors
sha256 of each, recomputed from the saved file, and whether they match. For every model, over the
tensors the recipe dithers (the language model's decoder linears and its token embedding):

- round-to-nearest onto the GGUF grids, exactly (float64): Q4_1's `min + d * q` per row and group of
  32 for each decoder linear (min and max over the linears, and how many sit on the grid, error
  below 1e-6), Q8_0's `d * q` for the embedding;
- luq's own round-to-nearest 4-bit g32 (`RTN(bits=4, group_size=32)`, fp16 scales), min and max;
- held-out perplexity on the text windows bench/frontier.py scores SmolLM2 with (16 windows of 256
  tokens, disjoint from the 16 x 256 calibration windows, seed 0), for the VLMs too (their language
  model on text alone);
- the VLMs: exact-match accuracy on bench/frontier.py's held-out generated VQA questions (its VQA_SEED,
  15 per question kind: 105), overall and per kind.

    python -m bench.offgrid                        # ~6 min on 2 cores with warm caches

Writes bench/results/offgrid.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import is_vlm
from bench.frontier import VQA_SEED
from luq.calibration import text_token_ids, validation_windows
from luq.eval.perplexity import token_window_perplexity
from luq.models.loading import load_model, resolve
from luq.quant import RTN
from luq.zoo import offgrid, tinyvlm

RESULTS = Path(__file__).parent / "results"
PAIRS = {"smollm2": "smollm2-offgrid", "tiny-vlm": "tiny-vlm-offgrid"}
ON_GRID = 1e-6   # an exact round-to-nearest error below this: the weight sits on the grid


def file_tensors_sha256(path: Path) -> str:
    """offgrid.tensors_sha256 of the tensors saved in a directory's safetensors files (names as saved)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return offgrid.tensors_sha256(state)


def builds(name: str, source: str) -> dict:
    """The cached build of off-grid model `name` against a fresh one of the same source (seed 0)."""
    cached = Path(resolve(name))
    with tempfile.TemporaryDirectory(prefix="luq-offgrid-") as tmp:
        t0 = time.perf_counter()
        offgrid.write_offgrid(Path(resolve(source)), Path(tmp), seed=offgrid.read_metadata(cached)["seed"])
        seconds = time.perf_counter() - t0
        fresh = {"tensors_sha256": file_tensors_sha256(Path(tmp)), "metadata": offgrid.read_metadata(Path(tmp))}
    first = {"tensors_sha256": file_tensors_sha256(cached), "metadata": offgrid.read_metadata(cached)}
    out = {"directory": cached.name, "build_seconds": round(seconds, 1)}
    for label, b in (("cached", first), ("fresh", fresh)):
        out[label] = {"tensors_sha256": b["tensors_sha256"], "model_tensors_sha256": b["metadata"]["tensors_sha256"],
                      "weights": b["metadata"]["weights"]}
    out["match"] = (first["tensors_sha256"] == fresh["tensors_sha256"]
                    and first["metadata"]["tensors_sha256"] == fresh["metadata"]["tensors_sha256"]
                    and first["metadata"]["weights"] == fresh["metadata"]["weights"])
    out["dithered"] = first["metadata"]["dithered"]
    return out


def grid_errors(net: torch.nn.Module) -> dict:
    """Round-to-nearest errors of the tensors the recipe dithers, as the module docstring says."""
    rtn = RTN(bits=4, group_size=32)
    linears, luq_rtn, by_kind, embedding = {}, [], {}, None
    with torch.no_grad():
        for name, p, cell in offgrid.targets(net):
            if cell is offgrid.q8_0_cell:
                embedding = {"name": name, "q8_0_rtn": offgrid.rtn_error(p, cell)}
                continue
            linears[name] = offgrid.rtn_error(p, cell)
            W = p.detach().float()
            luq_rtn.append(float((W - rtn.quantize(W).dequantize().float()).norm() / W.norm()))
            by_kind.setdefault(name.split(".")[-2], []).append(linears[name])
    errors = list(linears.values())
    return {"linears": len(linears), "q4_1_rtn": {"min": min(errors), "max": max(errors)},
            "on_q4_1_grid": sum(e < ON_GRID for e in errors),
            "q4_1_rtn_by_kind": {k: {"min": min(v), "max": max(v), "on_grid": sum(e < ON_GRID for e in v)}
                                 for k, v in by_kind.items()},
            "luq_rtn4_g32": {"min": min(luq_rtn), "max": max(luq_rtn)}, "embedding": embedding}


def vqa_accuracy(net, processor, per_kind: int) -> dict:
    samples = tinyvlm.make_samples(per_kind, seed=VQA_SEED)
    predictions = tinyvlm.answer_questions(net, processor, [s.image for s in samples], [s.question for s in samples])
    hits: dict[str, list[bool]] = {}
    for s, p in zip(samples, predictions):
        hits.setdefault(s.kind, []).append(tinyvlm.is_correct(p, s.answer))
    every = [h for kind in hits.values() for h in kind]
    return {"accuracy": sum(every) / len(every), "questions": len(every),
            "by_kind": {k: sum(v) / len(v) for k, v in hits.items()}}


def measure(name: str, args) -> dict:
    t0 = time.perf_counter()
    net, processor, _ = load_model(name, "cpu", torch.float32)
    row: dict = {"directory": Path(resolve(name)).name, "grid": grid_errors(net)}
    windows = validation_windows(text_token_ids(processor, None), args.eval_samples, args.seq_len, 0, args.samples)
    row["perplexity"] = token_window_perplexity(net, windows)
    if is_vlm(name):
        row["vqa"] = vqa_accuracy(net, processor, args.vqa_per_kind)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def fmt_range(r: dict) -> str:
    return f"{r['min']:.2e} – {r['max']:.2e}"


def print_table(result: dict) -> None:
    print("| model | two builds: tensors sha256 | match | Q4_1 RTN error, decoder linears (on grid) | "
          "luq RTN-4 g32 error | embedding Q8_0 RTN error | held-out perplexity | VQA accuracy |")
    print("|---|---|---|---|---|---|---:|---:|")
    for name, r in result["models"].items():
        g, b = r["grid"], r.get("builds")
        sha = f"{b['cached']['tensors_sha256'][:12]} / {b['fresh']['tensors_sha256'][:12]}" if b else ""
        vqa = f"{r['vqa']['accuracy']:.3f}" if "vqa" in r else ""
        print(f"| {name} | {sha} | {'' if b is None else b['match']} | {fmt_range(g['q4_1_rtn'])} "
              f"({g['on_q4_1_grid']}/{g['linears']}) | {fmt_range(g['luq_rtn4_g32'])} | "
              f"{g['embedding']['q8_0_rtn']:.2e} | {r['perplexity']:.2f} | {vqa} |")
    vlms = [n for n in result["models"] if "vqa" in result["models"][n]]
    if vlms:
        kinds = list(result["models"][vlms[0]]["vqa"]["by_kind"])
        print(f"\n| VQA accuracy ({result['vqa']['questions']} held-out questions) | " + " | ".join(vlms) + " |")
        print("|---|" + "---:|" * len(vlms))
        for k in kinds + ["all"]:
            cells = [result["models"][n]["vqa"]["accuracy"] if k == "all" else result["models"][n]["vqa"]["by_kind"][k]
                     for n in vlms]
            print(f"| {k} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PAIRS), help=f"comma-separated, from {', '.join(PAIRS)}: "
                   "each with its off-grid copy")
    p.add_argument("--samples", type=int, default=16, help="calibration windows the held-out windows avoid")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16, help="held-out text windows of --seq-len tokens")
    p.add_argument("--vqa-per-kind", type=int, default=15, help="held-out generated questions per kind (VLMs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "offgrid.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    originals = [m for m in args.models.split(",") if m]
    unknown = [m for m in originals if m not in PAIRS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    t0 = time.perf_counter()
    models = {}
    for original in originals:
        for name in (original, PAIRS[original]):
            models[name] = measure(name, args)
            if name != original:
                models[name]["source"] = original
                models[name]["builds"] = builds(name, original)
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"models": models,
              "text_windows": {"n": args.eval_samples, "seq_len": args.seq_len, "seed": 0,
                               "after_calibration_windows": args.samples, "text": "luq's default (Wikipedia)"},
              "vqa": {"seed": VQA_SEED, "per_kind": args.vqa_per_kind,
                      "questions": args.vqa_per_kind * len(tinyvlm.QUESTION_KINDS)},
              "on_grid_below": ON_GRID, "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


if __name__ == "__main__":
    main()
