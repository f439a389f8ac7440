"""Every tool's files on one held-out text, scored by one evaluator: llama.cpp's imatrix quants, AutoRound's
and luq's GGUFs beside luq's torch-format models of the whole model (the like-for-like frontier).

bench/gguf.py scores GGUF files in llama.cpp (KL divergence from the base on its held-out text) and
bench/budget.py scores luq's artifacts in torch (perplexity on luq's validation windows): two evaluators,
two texts. Here every model is scored the same way: its weights de-quantized to float32 in the model's
transformers class (a GGUF through transformers' own GGUF loader, which calls `gguf.quants.dequantize`;
a luq artifact through `luq.load`), then held-out perplexity and mean KL divergence from the unquantized
model's next-token distribution (`luq.sensitivity.output_kl`) on the same windows.

The windows are held out for every tool: 256-token slots of the offline Wikipedia text inside the last
400,000 characters (bench/gguf.py's held-out text, which neither llama-imatrix, AutoRound nor luq's GGUF
runs calibrate on: they read the first 2,000,000), leaving out every slot luq's own calibration,
validation and sensitivity windows can take (the first and last 64 of the seed-0 permutation those draw
from). The loader is checked first: the base's own float32 GGUF must score as the base does.

What differs from llama.cpp's own scoring: llama.cpp multiplies quantized weights by activations rounded to
8 bits; here the de-quantized weights multiply float32 activations, as luq's dense evaluation does, so the
figures rank the weights alone.

    python -m bench.gguf_frontier --model smollm2-offgrid    # after bench.gguf and bench.budget --set whole
    python -m bench.gguf_frontier --model smollm2            # the same on SmolLM2 itself

Reads bench/results/gguf-MODEL.json (and gguf-MODEL-autoround.json if present) for the GGUF files in
out/bench-gguf/MODEL/, bench/results/budget-whole-MODEL.json for luq's artifacts in bench.budget's work folder;
writes bench/results/gguf-frontier-MODEL.json and a plot of perplexity against tensor MB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.budget import work_dir
from bench.gguf import HELDOUT_CHARS, RESULTS, tensor_bytes
from luq.calibration import text_token_ids
from luq.capture import TEXT
from luq.errors import LuqError
from luq.eval.perplexity import token_window_perplexity
from luq.models.loading import load_model, resolve
from luq.sensitivity import output_kl, reference_log_probs
from luq.zoo.smollm2 import wikipedia_text

RESERVED = 64   # slots at each end of the seed-0 permutation luq's calibration, validation, sensitivity draw


def shared_heldout_windows(tokenizer, n: int, seq_len: int) -> tuple[torch.Tensor, list[int]]:
    """n windows of seq_len tokens inside the last HELDOUT_CHARS characters of the offline text that
    no luq window draw can take (see the module docstring), evenly spaced: ([n, seq_len], their slots)."""
    text = wikipedia_text()
    ids = text_token_ids(tokenizer, None)
    fast = getattr(tokenizer, "tokenizer", tokenizer)
    offsets = fast(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) != ids.numel():
        raise LuqError("the cached token ids are not the offline text's tokenization")
    slots = ids.numel() // seq_len
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(0)).tolist()
    taken = set(perm[:RESERVED]) | set(perm[-RESERVED:])
    first_char = len(text) - HELDOUT_CHARS
    free = [s for s in range(slots) if offsets[s * seq_len][0] >= first_char and s not in taken]
    if len(free) < n:
        raise LuqError(f"only {len(free)} held-out slots of {seq_len} tokens, fewer than the {n} asked")
    chosen = [free[round(i * (len(free) - 1) / max(n - 1, 1))] for i in range(n)]
    return torch.stack([ids[s * seq_len:(s + 1) * seq_len] for s in chosen]), chosen


def gguf_files(model: str, work: Path) -> list[dict]:
    """The GGUF files bench.gguf made and scored for MODEL: its rows (llama.cpp's KL and decode
    beside), each with the file's path; rows without a file (a size no plan reached) are left out."""
    rows = []
    for name in (f"gguf-{model}.json", f"gguf-{model}-autoround.json"):
        path = RESULTS / name
        if not path.is_file():
            if name == f"gguf-{model}.json":
                raise LuqError(f"{path} not found: run python -m bench.gguf --model {model} first")
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row.get("tensor_bytes") is None:
                continue
            stem = f"llama-{row['name']}" if row["tool"] == "llama.cpp" else row["name"]
            gguf = work / model / f"{stem}.gguf"
            if gguf.is_file() and not any(r["name"] == row["name"] and r["tool"] == row["tool"] for r in rows):
                rows.append({"tool": row["tool"], "name": row["name"], "path": gguf, "source": name,
                             "llama_kl": row.get("kl_divergence"), "llama_decode_tps": row.get("decode_tps")})
    return rows


def luq_artifacts(model: str) -> list[dict]:
    """luq's torch-format models of bench.budget --set whole for MODEL (written artifacts)."""
    path = RESULTS / f"budget-whole-{model}.json"
    if not path.is_file():
        return []
    work = work_dir(model)
    rows = []
    for label, row in json.loads(path.read_text())["rows"].items():
        directory = work / row["name"]
        if (directory / "luq_manifest.json").is_file():
            rows.append({"tool": "luq (torch)", "name": label, "path": directory, "tensor_bytes": row["total_bytes"]})
    return rows


def load(row: dict) -> torch.nn.Module:
    """The model of a row: a luq artifact through `luq.load`, a GGUF file de-quantized (`gguf_model`)."""
    if row["tool"] == "luq (torch)":
        import luq

        return luq.load(row["path"])[0].eval()
    return gguf_model(row["path"])


def gguf_model(path: Path) -> torch.nn.Module:
    """A GGUF file de-quantized into its transformers model (float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def cached_score(path: Path, key: dict, score) -> dict:
    """score() of the model at `path`, kept beside it (PATH.torch-score.json) for a rerun while the file
    (its bytes and time) and the windows are the same."""
    weights = path / "model.safetensors" if path.is_dir() else path
    key = {**key, "bytes": weights.stat().st_size, "mtime": weights.stat().st_mtime}
    saved = path.with_name(path.name + ".torch-score.json")
    kept = json.loads(saved.read_text()) if saved.is_file() else None
    if kept is not None and kept["key"] == key:
        return kept["score"]
    scored = score()
    saved.write_text(json.dumps({"key": key, "score": scored}))
    return scored


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-offgrid")
    p.add_argument("--windows", type=int, default=32, help="held-out windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, tokenizer, _ = load_model(args.model)
    windows, slots = shared_heldout_windows(tokenizer, args.windows, args.seq_len)
    batches = [({"input_ids": w, "attention_mask": torch.ones_like(w)}, torch.full_like(w, TEXT))
               for w in windows.split(4)]
    reference = reference_log_probs(base, batches)

    def score(net: torch.nn.Module) -> dict:
        return {"perplexity": token_window_perplexity(net, windows), "kl": output_kl(net, batches, reference)}

    full = score(base)
    del base
    check_path = args.work.resolve() / args.model / "base-f32.gguf"
    loader_check = score(gguf_model(check_path)) if check_path.is_file() else None
    if loader_check is not None and abs(loader_check["perplexity"] / full["perplexity"] - 1) > 1e-4:
        raise LuqError(f"{check_path} de-quantized scores {loader_check['perplexity']:.4f}, the base "
                       f"{full['perplexity']:.4f}: the GGUF loader does not reproduce the model")
    checked = "not found" if loader_check is None else f"{loader_check['perplexity']:.3f}"
    print(f"full precision: perplexity {full['perplexity']:.3f}; {check_path.name} de-quantized: {checked}", flush=True)
    todo = gguf_files(args.model, args.work.resolve()) + luq_artifacts(args.model)
    rows, t_rows = [], time.perf_counter()
    key = {"windows": args.windows, "seq_len": args.seq_len, "slots": slots, "full": round(full["perplexity"], 4)}
    for i, row in enumerate(todo):
        t = time.perf_counter()
        if row["tool"] != "luq (torch)":
            row["tensor_bytes"], row["types"] = tensor_bytes(row["path"])
        row = {**row, **cached_score(row["path"], key, lambda: score(load(row))), "path": str(row["path"])}
        rows.append(row)
        left = (time.perf_counter() - t_rows) / (i + 1) * (len(todo) - i - 1)
        print(f"[{i + 1}/{len(todo)}] {row['tool']:>12} {row['name']:<34} {row['tensor_bytes'] / 1e6:7.2f} MB  "
              f"ppl {row['perplexity']:9.3f}  KL {row['kl']:.4f}  ({time.perf_counter() - t:.0f} s, ETA {left:.0f} s)",
              flush=True)
    rows.sort(key=lambda r: r["tensor_bytes"])
    result = {"model": args.model, "resolved": Path(resolve(args.model)).name, "windows": args.windows,
              "seq_len": args.seq_len, "slots": slots, "heldout_chars": HELDOUT_CHARS, "reserved_slots": RESERVED,
              "full_precision": full, "loader_check": loader_check, "rows": rows,
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1)}
    out = args.json or RESULTS / f"gguf-frontier-{args.model}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def series_of(row: dict) -> str:
    """The plot line a row belongs to."""
    if row["tool"] == "luq (torch)":
        return "luq, torch formats (uniform GPTQ)" if row["name"].startswith("uniform") else "luq, torch formats (measured)"
    if row["tool"] == "luq":
        return "luq GGUF, speed-held" if row["name"].startswith("luq-fast") else "luq GGUF"
    return {"llama.cpp": "llama.cpp imatrix presets", "auto-round": "AutoRound GGUF"}.get(row["tool"], row["tool"])


def plot(result: dict, path: Path) -> None:
    """Held-out perplexity against tensor MB, one line per tool (log scale; points past 10x full precision cut)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = result["full_precision"]["perplexity"]
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[dict]] = {}
    for row in result["rows"]:
        if row["perplexity"] <= 10 * fp:
            series.setdefault(series_of(row), []).append(row)
    for name, rows in series.items():
        ax.plot([r["tensor_bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], "o-" if len(rows) > 1 else "o",
                label=name)
    ax.axhline(fp, color="gray", ls=":", label=f"full precision ({fp:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("tensor MB")
    ax.set_ylabel("held-out perplexity (same windows, de-quantized weights)")
    ax.set_title(f"{result['model']}: every tool on one held-out text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except LuqError as e:
        raise SystemExit(f"error: {e}")
