"""luq's GGUF against llama.cpp's own quantization, in llama.cpp, at the same tensor bytes.

For each model (SmolLM2, and the off-grid control whose weights sit on no 4-bit grid):
1. the unquantized model as a float32 GGUF (`luq export` of the checkpoint): the base;
2. llama.cpp's importance matrix (`llama-imatrix`) from the calibration text luq calibrates on, and
   llama.cpp's presets from the base with it (`llama-quantize`: Q8_0 ... Q2_K and IQ types);
3. luq at the tensor bytes of some of those presets (and at any other sizes asked for), with exactly
   the commands a user types:
       luq quantize MODEL --out D --formats ggml --budget-gb B --calib-text FILE --samples 16 --seq-len 256 --seed 0
       luq export D --format gguf --out D.gguf
4. optionally Intel AutoRound's own GGUF export at some presets (`--autoround gguf:q4_k_m ...`), its
   sign-gradient rounding tuned on the same calibration text, run in AutoRound's own virtual environment
   (`--autoround-python`; `pip install auto-round` there, with `gguf` and `sentencepiece`, never into luq's):
       python -m auto_round --model MODEL --format gguf:q4_k_m --iters N --nsamples 32 --seqlen 256
           --dataset calib-autoround-256.jsonl --device_map cpu --seed 0 --disable_torch_compile --output_dir D
   (AutoRound's defaults are 200 iters on 128 x 2048 tokens; the bench's lighter ones are recorded in each row;
   --iters 0, no tuning, is the RTN it recommends for GGUF but at 3 bits);
5. every file scored by llama.cpp itself: `llama-perplexity --kl-divergence` against the base's
   log-probabilities on held-out text (mean KL divergence, perplexity), `llama-bench` prefill/decode:
   each luq or AutoRound file beside its preset in `--speed-rounds` rounds of A B B A, the decode ratio
   the median of the rounds' (with their range).

Calibration and held-out text are two disjoint pieces of the offline Wikipedia text (its first
2,000,000 characters, and its last 400,000). Results go to bench/results/gguf-MODEL.json (rendered by
`make docs` into docs/gguf.md) and a plot of KL divergence against file MB.

    python -m bench.gguf --model smollm2-offgrid
    python -m bench.gguf --model smollm2 --luq-at Q4_K_M Q4_0 Q3_K_M Q2_K
    python -m bench.gguf --presets Q4_K_M --luq-at Q4_K_M --autoround gguf:q4_k_m \
        --autoround-python ../autoround-venv/bin/python --json bench/results/gguf-smollm2-offgrid-autoround.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from luq.errors import LuqError
from luq.export import export_gguf
from luq.export import llamacpp
from luq.models.loading import resolve
from luq.plan.speed import gguf_decode_ns
from luq.zoo.smollm2 import wikipedia_text

RESULTS = Path(__file__).parent / "results"
PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S",
           "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M")
LUQ_AT = ("Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "60MB", "69.6MB", "73MB", "77MB")
LUQ_FAST_AT = ()   # --speed-of auto holds to the same preset, as llama-quantize types it
LUQ_FREE_AT = ("Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# the decode speed a luq row's plan is held to -> its name's prefix
PREFIX = {"auto": "luq-at-", "file": "luq-fast-at-", "none": "luq-free-at-"}
TUNED = "-tuned-s"   # a luq row's name suffix after `luq tune`: luq-at-Q2_K-tuned-s50
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


def autoround_calib(work: Path, calib: Path, seqlen: int, nsamples: int) -> Path:
    """calib.txt cut into consecutive pieces of 6 x seqlen characters (over seqlen tokens each: AutoRound drops
    shorter samples and cuts longer ones to seqlen), one JSON line each: AutoRound's local dataset format."""
    text, n = calib.read_text(), 6 * seqlen
    lines = [json.dumps({"text": text[i:i + n]}) for i in range(0, len(text) - n + 1, n)]
    if len(lines) < nsamples:
        raise LuqError(f"AutoRound: {calib.name} holds {len(lines)} pieces of {n} characters, not {nsamples}")
    path = work / f"calib-autoround-{seqlen}.jsonl"
    body = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != body:
        path.write_text(body)
    return path


def autoround_name(scheme: str, iters: int) -> str:
    """gguf:q4_k_m at 50 iters -> autoround-Q4_K_M-i50 (its file's name and its row's)."""
    return f"autoround-{scheme.upper().removeprefix('GGUF:')}-i{iters}"


def autoround(scheme: str, iters: int, model: str, out: Path, calib: Path, args) -> tuple[Path, dict]:
    """AutoRound's GGUF of MODEL at SCHEME (gguf:q4_k_m ...) after ITERS tuning steps a block (0: its RTN
    weighted by an importance matrix, which it recommends for GGUF but at 3 bits), run by --autoround-python
    in its own process: out/autoround-Q4_K_M-i50.gguf, and its settings and time (kept beside it in
    autoround-Q4_K_M-i50.json; the file is made again when the settings change)."""
    name = autoround_name(scheme, iters)
    path, saved = out / f"{name}.gguf", out / f"{name}.json"
    dataset = autoround_calib(out.parent, calib, args.autoround_seqlen, args.autoround_nsamples)
    settings = {"scheme": scheme.lower(), "iters": iters, "nsamples": args.autoround_nsamples,
                "seqlen": args.autoround_seqlen, "calibration": f"{calib.name} in pieces of "
                f"{6 * args.autoround_seqlen} characters ({dataset.name})", "seed": 0}
    kept = json.loads(saved.read_text()) if saved.is_file() else None
    if path.is_file() and kept is not None and {k: kept.get(k) for k in settings} == settings:
        return path, kept
    python = str(args.autoround_python)
    version = subprocess.run([python, "-c", "import auto_round; print(auto_round.__version__)"],
                             capture_output=True, text=True)
    if version.returncode != 0:
        raise LuqError(f"AutoRound: cannot import auto_round with {python}")
    d = out / f"{name}.d"
    shutil.rmtree(d, ignore_errors=True)
    command = ["--model", resolve(model), "--format", scheme.lower(), "--iters", iters,
               "--nsamples", args.autoround_nsamples, "--seqlen", args.autoround_seqlen, "--dataset", dataset,
               "--device_map", "cpu", "--seed", 0, "--disable_torch_compile", "--output_dir", d]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run([python, "-m", "auto_round", *map(str, command)], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    seconds = round(time.perf_counter() - started, 1)
    made = sorted(d.rglob("*.gguf"))
    if proc.returncode != 0 or len(made) != 1:
        raise LuqError(f"AutoRound {scheme}: exit {proc.returncode}, {len(made)} GGUF files; see {name}.log")
    made[0].replace(path)
    shutil.rmtree(d, ignore_errors=True)
    kept = {**settings, "auto_round": version.stdout.strip(), "seconds": seconds,
            "command": "python -m auto_round " + " ".join(map(str, command)).replace(str(out.parent) + "/", "")
                                                    .replace(str(Path.home()), "~")}
    saved.write_text(json.dumps(kept, indent=1) + "\n")
    return path, kept


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-offgrid")
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--luq-at", nargs="*", default=list(LUQ_AT),
                   help="a preset's tensor bytes, or a size like 60MB (decimal megabytes)")
    p.add_argument("--luq-fast-at", nargs="*", default=list(LUQ_FAST_AT),
                   help="a preset: luq at its tensor bytes held to the decode speed of that very file (--speed-of FILE)")
    p.add_argument("--luq-free-at", nargs="*", default=list(LUQ_FREE_AT),
                   help="a preset: luq at its tensor bytes held to no decode speed (--speed-of none: least KL)")
    p.add_argument("--luq-tuned-at", nargs="*", default=[],
                   help="a preset or size of --luq-at: that file again after `luq tune` (default none)")
    p.add_argument("--tune-steps", type=int, default=50, help="luq tune --steps of the --luq-tuned-at rows")
    p.add_argument("--speed-margin", default=None, help="luq quantize --speed-margin of the --luq-at rows (default: "
                   "luq's, the speed table's median error)")
    p.add_argument("--autoround", nargs="*", default=[], metavar="SCHEME",
                   help="AutoRound's GGUF at these schemes too (gguf:q4_k_m gguf:q4_0 ...; default none)")
    p.add_argument("--autoround-python", type=Path, default=None,
                   help="the python of a virtual environment with auto-round (never luq's)")
    p.add_argument("--autoround-iters", type=int, nargs="+", default=[50],
                   help="AutoRound's tuning steps a block, a file for each (its default 200; 0: no tuning)")
    p.add_argument("--autoround-nsamples", type=int, default=32, help="its calibration samples (its default 128)")
    p.add_argument("--autoround-seqlen", type=int, default=256, help="their tokens (its default 2048)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=64, help="held-out chunks of --ctx tokens scored (second halves)")
    p.add_argument("--imatrix-chunks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions (0: no speed)")
    p.add_argument("--speed-rounds", type=int, default=5,
                   help="rounds of A B B A for each file beside its preset (the decode ratio: their median; "
                        "0: each file timed once, no ratio)")
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.autoround and args.autoround_python is None:
        p.error("--autoround needs --autoround-python (the python of AutoRound's own virtual environment)")
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
    targets = ([(t, "auto", 0) for t in args.luq_at] + [(t, "file", 0) for t in args.luq_fast_at]
               + [(t, "none", 0) for t in args.luq_free_at] + [(t, "auto", args.tune_steps) for t in args.luq_tuned_at])
    for target, speed_of, tune_steps in targets:
        nbytes = sizes.get(target) if not target.upper().endswith("MB") else int(float(target[:-2]) * 1e6)
        if nbytes is None:
            print(f"luq at {target}: no such preset measured", flush=True)
            continue
        tag = PREFIX[speed_of] + target
        row = {"tool": "luq", "name": tag, "budget_bytes": nbytes, "speed_of": speed_of}
        d = source = out / tag
        if tune_steps:   # the same artifact as the untuned row, then `luq tune` of it
            d = out / f"{tag}{TUNED}{tune_steps}"
            row.update(name=d.name, tune_steps=tune_steps)
            tune_command = ["tune", source, "--out", d, "--steps", str(tune_steps)]
        command = ["quantize", args.model, "--out", source, "--formats", "ggml", "--budget-gb", f"{nbytes / 1e9:.9f}",
                   "--calib-text", calib, "--samples", "16", "--seq-len", "256", "--seed", "0"]
        if speed_of != "none" and args.speed_margin is not None:
            command += ["--speed-margin", args.speed_margin]
        if speed_of == "file":
            command += ["--speed-of", out / f"llama-{target}.gguf"]
        elif speed_of == "none":
            command += ["--speed-of", "none"]
        row["command"] = quantize_line = "luq " + " ".join(map(str, command)).replace(str(work) + "/", "")
        if tune_steps:
            row["command"] += "; luq " + " ".join(map(str, tune_command)).replace(str(work) + "/", "")
        try:
            started = time.perf_counter()
            made_by = source / "bench-command.txt"   # an artifact is reused only for the same command
            if source.is_dir() and (not made_by.is_file() or made_by.read_text() != quantize_line):
                shutil.rmtree(source)
                if d != source and d.is_dir():   # tuned from the old artifact
                    shutil.rmtree(d)
            if not (source / "luq_report.json").is_file():
                luq_cli(*command)
                made_by.write_text(quantize_line)
            if tune_steps and not (d / "luq_report.json").is_file():
                luq_cli(*tune_command)
            gguf_file = out / f"{d.name}.gguf"   # the tuned row its own file, beside the untuned one
            if not gguf_file.is_file() or gguf_file.stat().st_mtime < (d / "luq_report.json").stat().st_mtime:
                luq_cli("export", d, "--format", "gguf", "--out", gguf_file)
            report = json.loads((d / "luq_report.json").read_text())
            speed = report.get("knapsack") or {}
            row.update(seconds=round(time.perf_counter() - started, 1), report_gguf=report.get("gguf"),
                       predicted_kl=report.get("predicted_cost"), measured_kl=report.get("measured_cost"),
                       predicted_kl_lower_bound=speed.get("lagrangian_lower_bound"),
                       predicted_decode_tps=speed.get("predicted_decode_tps"),
                       speed_of_decode_tps=speed.get("speed_of_decode_tps"),
                       speed_margin=speed.get("speed_margin"), held_to_decode_tps=speed.get("held_to_decode_tps"),
                       speed_held_to=speed.get("speed_held_to"))
            rows.append(score(row, gguf_file, heldout, logits, args))
        except LuqError as e:
            rows.append(dict(row, error=str(e)))
        print(_line(rows[-1]), flush=True)

    for scheme in args.autoround:
        for iters in args.autoround_iters:
            row = {"tool": "auto-round", "name": autoround_name(scheme, iters)}
            try:
                path, settings = autoround(scheme, iters, args.model, out, calib, args)
                rows.append(score({**row, **settings}, path, heldout, logits, args))
            except LuqError as e:
                rows.append(dict(row, error=str(e)))
            print(_line(rows[-1]), flush=True)

    load = None
    if args.bench_reps:
        before = os.getloadavg()[0]
        speeds(rows, out, args)
        load = [round(before, 2), round(os.getloadavg()[0], 2)]   # the 1-minute load around the speed runs

    result = {"model": args.model, "base_perplexity": base_ppl, "ctx": args.ctx, "chunks": args.chunks,
              "imatrix_chunks": args.imatrix_chunks, "threads": args.threads, "calib_chars": CALIB_CHARS,
              "heldout_chars": HELDOUT_CHARS, "llama_cpp": llamacpp.LLAMA_VERSION,
              "seconds": round(time.perf_counter() - t0, 1), "speed_load_average": load, "rows": rows}
    path = args.json or RESULTS / f"gguf-{args.model}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def speeds(rows: list[dict], out: Path, args) -> None:
    """llama-bench of every file, last. Each luq (or AutoRound) file beside the preset of its size in
    `--speed-rounds` rounds of A B B A (the machine's drift falls on both alike): its `decode_ratio` is the
    median over the rounds of its decode tokens/s over the preset's in that round, with the rounds' range
    and every round kept, since on shared cores one round's ratio moves by up to ±20%, and beside it the
    ratio luq's per-type speed table predicts (`predicted_decode_ratio`). Each file's
    tokens/s is the mean of all its runs; the presets no file stands beside run once."""
    def path(row):
        return out / (f"llama-{row['name']}.gguf" if row["tool"] == "llama.cpp" else f"{row['name']}.gguf")

    def run(row):
        got = llamacpp.bench(path(row), threads=args.threads, reps=args.bench_reps)
        runs.setdefault(id(row), []).append(got)
        return got

    ok = [r for r in rows if "error" not in r]
    presets = {r["name"]: r for r in ok if r["tool"] == "llama.cpp"}
    runs: dict[int, list[dict]] = {}
    for row in ok:
        peer = (presets.get(preset_of(row)) or presets.get("Q2_K")) if row["tool"] != "llama.cpp" else None
        if peer is None or args.speed_rounds < 1:
            continue
        ratios = []
        for _ in range(args.speed_rounds):
            a1, b1, b2, a2 = run(peer), run(row), run(row), run(peer)
            ratios.append((b1["decode_tps"] + b2["decode_tps"]) / (a1["decode_tps"] + a2["decode_tps"]))
        row.update(decode_ratio=statistics.median(ratios), decode_ratio_range=[min(ratios), max(ratios)],
                   decode_ratio_rounds=[round(x, 4) for x in ratios], speed_peer=peer["name"],
                   predicted_decode_ratio=_predicted_ratio(path(row), path(peer)))
        print(f"{row['name']}: decode {row['decode_ratio']:.3f}x {peer['name']}'s (rounds "
              f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    for row in ok:
        if id(row) not in runs:
            run(row)
    for row in ok:
        got = runs[id(row)]
        row.update({k: sum(g[k] for g in got) / len(got) for k in ("prefill_tps", "decode_tps")}, speed_runs=len(got))
        print(f"{row['name']}: prefill {row['prefill_tps']:.1f} tok/s, decode {row['decode_tps']:.1f} tok/s", flush=True)


def _predicted_ratio(file: Path, peer: Path) -> float | None:
    """The decode ratio luq's per-type speed table predicts (`--speed-of` holds plans to it); None where
    a file holds a type the table has not measured."""
    try:
        return gguf_decode_ns(peer) / gguf_decode_ns(file)
    except LuqError:
        return None


def preset_of(row: dict) -> str:
    """The preset a luq or AutoRound row stands beside: luq-at-Q4_K_M, autoround-Q4_K_M-i50 -> Q4_K_M."""
    if row["tool"] == "auto-round":
        return row["name"].removeprefix("autoround-").rsplit("-i", 1)[0]
    for prefix in PREFIX.values():
        if row["name"].startswith(prefix):
            return row["name"].removeprefix(prefix).split(TUNED)[0]
    return row["name"]


def speed_of(row: dict) -> str:
    """What a luq row's plan is held to: auto, file or none. Rows written before `--speed-of auto` was the
    default have no such field: their luq-at rows were held to nothing."""
    if "speed_of" in row:
        return row["speed_of"]
    return "file" if row["name"].startswith(PREFIX["file"]) else "none"


def _luq_series(row: dict) -> str:
    return "tuned" if row.get("tune_steps") else speed_of(row)


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
    series = [("llama.cpp", None, "o-", "imatrix presets"),
              ("luq", "auto", "s-", "--formats ggml, budget; as fast as the preset that fits"),
              ("luq", "file", "D-", "the same held to that very file, --speed-of FILE"),
              ("luq", "none", "x--", "least KL however it decodes, --speed-of none"),
              ("luq", "tuned", "P-", "as fast as the preset, then luq tune")]
    series += [("auto-round", n, "^-" if n else "v-", f"its GGUF export, {n} iters" if n else "its GGUF export, no tuning")
               for n in sorted({r["iters"] for r in result["rows"] if r["tool"] == "auto-round" and "iters" in r})]
    for tool, iters, style, what in series:   # one line per tool (AutoRound: per tuning steps)
        rows = sorted((r for r in result["rows"] if r["tool"] == tool and "error" not in r
                       and (iters is None or (_luq_series(r) if tool == "luq" else r["iters"]) == iters)),
                      key=lambda r: r["file_bytes"])
        if not rows:
            continue
        ax.plot([r["file_bytes"] / 1e6 for r in rows], [r["kl_divergence"] for r in rows], style,
                label=f"{tool} ({what})")
        for r in rows:
            label = preset_of(r)
            ax.annotate(label, (r["file_bytes"] / 1e6, r["kl_divergence"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.ticklabel_format(axis="x", useOffset=False)   # a few files of nearly one size: MB, not an offset
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
