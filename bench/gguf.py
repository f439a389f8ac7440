"""luq's GGUF against llama.cpp's own quantization, in llama.cpp, at the same tensor bytes.

For each model (SmolLM2, and the off-grid control whose weights sit on no 4-bit grid):
1. the unquantized model as a float32 GGUF (`luq export` of the checkpoint): the base;
2. llama.cpp's importance matrix (`llama-imatrix`) from the calibration text luq calibrates on, and
   llama.cpp's presets from the base with it (`llama-quantize`: Q8_0 ... Q2_K and IQ types);
3. luq at the tensor bytes of some of those presets (and at any other sizes asked for), with exactly
   the commands a user types:
       luq quantize MODEL --out D --formats ggml --budget-gb B --calib-text FILE --samples 16 --seq-len 256 --seed 0
       luq export D --format gguf --out D.gguf
4. every file scored by llama.cpp itself: `llama-perplexity --kl-divergence` against the base's
   log-probabilities on held-out text (mean KL divergence, perplexity), `llama-bench` prefill/decode.

Calibration and held-out text are two disjoint pieces of the offline Wikipedia text (its first
2,000,000 characters, and its last 400,000). Results go to bench/results/gguf-MODEL.json (rendered by
`make docs` into docs/gguf.md) and a plot of KL divergence against file MB.

    python -m bench.gguf --model smollm2-offgrid
    python -m bench.gguf --model smollm2 --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from luq.errors import LuqError
from luq.export import export_gguf
from luq.export import llamacpp
from luq.models.loading import resolve
from luq.zoo.smollm2 import wikipedia_text

RESULTS = Path(__file__).parent / "results"
PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S",
           "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M")
LUQ_AT = ("Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "60MB")
CALIB_CHARS, HELDOUT_CHARS = 2_000_000, 400_000


def texts(work: Path) -> tuple[Path, Path]:
    """calib.txt and heldout.txt in `work`: disjoint pieces of the offline Wikipedia text."""
    text = wikipedia_text()
    assert len(text) > CALIB_CHARS + HELDOUT_CHARS
    calib, heldout = work / "calib.txt", work / "heldout.txt"
    for path, piece in ((calib, text[:CALIB_CHARS]), (heldout, text[-HELDOUT_CHARS:])):
        if not path.is_file() or path.read_text() != piece:
            path.write_text(piece)
    return calib, heldout


def tensor_bytes(gguf_file: Path) -> tuple[int, dict[str, int]]:
    """The tensor bytes of a GGUF file and how many tensors of each type it holds."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return sum(int(t.n_bytes) for t in reader.tensors), types


def luq_cli(*args: object) -> str:
    """One `luq` command in its own process (as a user runs it); its output, or LuqError with its last line."""
    proc = subprocess.run([sys.executable, "-m", "luq", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise LuqError(lines[-1])
    return proc.stdout


def score(row: dict, path: Path, heldout: Path, logits: Path, args) -> dict:
    """KL divergence and perplexity by llama-perplexity, bytes, types (speed is measured at the end);
    kept beside the file (FILE.score.json) for a rerun while the file and the protocol are the same."""
    row["tensor_bytes"], row["types"] = tensor_bytes(path)
    row["file_bytes"] = path.stat().st_size
    saved = path.with_suffix(".score.json")
    key = {"file_bytes": row["file_bytes"], "mtime": path.stat().st_mtime, "ctx": args.ctx, "chunks": args.chunks}
    kept = json.loads(saved.read_text()) if saved.is_file() else None
    if kept is not None and kept["key"] == key:
        return {**row, **kept["score"]}
    scored = llamacpp.perplexity(path, heldout, ctx=args.ctx, chunks=args.chunks, threads=args.threads, kl_base=logits)
    saved.write_text(json.dumps({"key": key, "score": scored}))
    return {**row, **scored}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-offgrid")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--luq-at", nargs="*", default=list(LUQ_AT),
                   help="a preset's tensor bytes, or a size like 60MB (decimal megabytes)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=64, help="held-out chunks of --ctx tokens scored (second halves)")
    p.add_argument("--imatrix-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions (0: no speed)")
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.work.resolve()
    (work / args.model).mkdir(parents=True, exist_ok=True)
    calib, heldout = texts(work)
    out = work / args.model
    t0 = time.perf_counter()

    base = out / "base-f32.gguf"
    if not base.is_file():
        export_gguf(resolve(args.model), base)
    logits = out / "base-logits.bin"
    if not logits.is_file():
        base_ppl = llamacpp.save_logits(base, heldout, logits, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
        (out / "base-perplexity.json").write_text(json.dumps(base_ppl))
    base_ppl = json.loads((out / "base-perplexity.json").read_text())["perplexity"]
    imatrix = out / "imatrix.gguf"
    if not imatrix.is_file():
        llamacpp.imatrix(base, calib, imatrix, ctx=args.ctx, chunks=args.imatrix_chunks, threads=args.threads)
    print(f"{args.model}: base perplexity {base_ppl:.3f}; imatrix from {args.imatrix_chunks} x {args.ctx} tokens "
          f"of {calib.name}", flush=True)

    rows: list[dict] = []
    for preset in args.presets:
        path = out / f"llama-{preset}.gguf"
        row = {"tool": "llama.cpp", "name": preset}
        try:
            if not path.is_file():
                llamacpp.quantize(base, path, preset, imatrix=imatrix, threads=args.threads)
            rows.append(score(row, path, heldout, logits, args))
        except LuqError as e:
            rows.append(dict(row, error=str(e)))
        print(_line(rows[-1]), flush=True)

    sizes = {r["name"]: r["tensor_bytes"] for r in rows if "tensor_bytes" in r}
    for target in args.luq_at:
        nbytes = sizes.get(target) if not target.upper().endswith("MB") else int(float(target[:-2]) * 1e6)
        if nbytes is None:
            print(f"luq at {target}: no such preset measured", flush=True)
            continue
        tag = f"luq-at-{target}"
        row = {"tool": "luq", "name": tag, "budget_bytes": nbytes}
        d = out / tag
        command = ["quantize", args.model, "--out", d, "--formats", "ggml", "--budget-gb", f"{nbytes / 1e9:.9f}",
                   "--calib-text", calib, "--samples", "16", "--seq-len", "256", "--seed", "0"]
        row["command"] = "luq " + " ".join(map(str, command)).replace(str(work) + "/", "")
        try:
            started = time.perf_counter()
            if not (d / "luq_report.json").is_file():
                luq_cli(*command)
            gguf_file = d.parent / f"{tag}.gguf"
            if not gguf_file.is_file() or gguf_file.stat().st_mtime < (d / "luq_report.json").stat().st_mtime:
                luq_cli("export", d, "--format", "gguf", "--out", gguf_file)
            report = json.loads((d / "luq_report.json").read_text())
            row.update(seconds=round(time.perf_counter() - started, 1), report_gguf=report.get("gguf"),
                       predicted_kl=report.get("predicted_cost"), measured_kl=report.get("measured_cost"))
            rows.append(score(row, gguf_file, heldout, logits, args))
        except LuqError as e:
            rows.append(dict(row, error=str(e)))
        print(_line(rows[-1]), flush=True)

    if args.bench_reps:
        speeds(rows, out, args)

    result = {"model": args.model, "base_perplexity": base_ppl, "ctx": args.ctx, "chunks": args.chunks,
              "imatrix_chunks": args.imatrix_chunks, "threads": args.threads, "calib_chars": CALIB_CHARS,
              "heldout_chars": HELDOUT_CHARS, "llama_cpp": llamacpp.LLAMA_VERSION,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    path = args.json or RESULTS / f"gguf-{args.model}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def speeds(rows: list[dict], out: Path, args) -> None:
    """llama-bench of every file, last: each luq file beside the preset of its size in the order A B B A (the
    machine's drift falls on both alike; each figure the mean of its two runs), then the other presets."""
    def path(row):
        return out / (f"llama-{row['name']}.gguf" if row["tool"] == "llama.cpp" else f"{row['name']}.gguf")

    ok = [r for r in rows if "error" not in r]
    presets = {r["name"]: r for r in ok if r["tool"] == "llama.cpp"}
    runs: dict[int, list[dict]] = {}
    for row in ok:
        if row["tool"] == "luq":
            peer = presets.get(row["name"].replace("luq-at-", "")) or presets.get("Q2_K")
            order = [peer, row, row, peer] if peer else [row]
            for r in order:
                runs.setdefault(id(r), []).append(llamacpp.bench(path(r), threads=args.threads, reps=args.bench_reps))
    for row in ok:
        if id(row) not in runs:
            runs[id(row)] = [llamacpp.bench(path(row), threads=args.threads, reps=args.bench_reps)]
    for row in ok:
        got = runs[id(row)]
        row.update({k: sum(g[k] for g in got) / len(got) for k in ("prefill_tps", "decode_tps")}, speed_runs=len(got))
        print(f"{row['name']}: prefill {row['prefill_tps']:.1f} tok/s, decode {row['decode_tps']:.1f} tok/s", flush=True)


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['tool']} {row['name']}: {row['error']}"
    return (f"{row['tool']:>9} {row['name']:>16}: {row['tensor_bytes'] / 1e6:8.2f} MB tensors, "
            f"KL {row['kl_divergence']:.5f}, ppl {row['perplexity']:.3f}")


def plot(result: dict, path: Path) -> None:
    """Mean KL divergence from the base against file MB, one line per tool (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tool, style in (("llama.cpp", "o-"), ("luq", "s-")):
        rows = sorted((r for r in result["rows"] if r["tool"] == tool and "error" not in r),
                      key=lambda r: r["file_bytes"])
        if not rows:
            continue
        ax.plot([r["file_bytes"] / 1e6 for r in rows], [r["kl_divergence"] for r in rows], style,
                label=f"{tool} ({'imatrix presets' if tool == 'llama.cpp' else '--formats ggml, budget'})")
        for r in rows:
            label = r["name"].replace("luq-at-", "")
            ax.annotate(label, (r["file_bytes"] / 1e6, r["kl_divergence"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("GGUF file MB")
    ax.set_ylabel("mean KL divergence from the base (nats/token)")
    ax.set_title(f"{result['model']}: llama-perplexity --kl-divergence, {result['chunks']} held-out chunks of "
                 f"{result['ctx']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except LuqError as e:
        sys.exit(f"error: {e}")
