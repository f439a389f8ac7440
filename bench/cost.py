"""Cost: wall time of each stage and peak memory (RSS) of the whole pipeline, luq vs
llmcompressor's GPTQ `oneshot`, on the real SmolLM2-135M with the same calibration.

    python -m bench.cost                    # like for like: luq GPTQ-4 vs llmcompressor GPTQ-4
    python -m bench.cost --full             # + `luq.quantize` end to end (k = 0): its stages
                                            #   (luq.Session's on_stage), the measured KL, the artifact
    python -m bench.cost --quick --threads 1   # smoke test: 2 windows of 64 tokens

Runtime. `--quick --threads 1` took 1.5 minutes here (7.5 with --full, when luq's one-format
run still made a GPTQ-4 + BiLLM variant pass before its final pass) while a training job held
both cores of this 2-core CPU. The full-size run has not been timed yet; expect about 3-5
minutes on an idle 2-core CPU with --threads 2; --full now adds one sequential GPTQ-4 pass,
the measured KL and the artifact.

What runs. Every tool runs in its own fresh process (`--worker NAME`, started by this
script), so each one's memory is its own; a warm-up worker first makes sure the offline
SmolLM2 directory and the tokenized calibration text are cached, so no tool pays for that.

* luq, like for like: import, load (`load_model("smollm2")`, float32), calibration
  (`calibration_batches`: N text windows of L tokens, seed 0), the layer pass with only the
  GPTQ-4 variant, Hessians from the chain of already quantized layers and no entropy
  (`layer_pass(formats=[gptq4-gG], hessians="sequential", entropy=False)`: what
  llmcompressor's sequential pipeline does), and writing the artifact (the layers assembled
  from the pass by `Assembly`, `write_artifact` with `quantization_config`, unquantized tensors in
  float16, luq's default). The pass keeps its variants in a fresh variant cache in a temporary
  folder (as `luq quantize` always does; the artifact is assembled from it). These are luq's
  public pieces, called one by one rather than through `luq.Session`, whose run also prepares
  the sensitivity windows and measures the written model's KL: work llmcompressor does not do.
* llmcompressor: import, load (`AutoModelForCausalLM.from_pretrained`, float32), calibration
  (the very same token windows, from luq's `calibration_batches`, as a `datasets.Dataset` of
  input_ids / attention_mask; the worker checks they hash the same as luq's), `oneshot` with
  a GPTQModifier (4-bit, group G, asymmetric, actorder "static" -- luq's GPTQ default
  act_order + static groups -- damping 0.01, block 128, lm_head ignored, the sequential
  pipeline, no shuffling, the same batch size of 8), and `save_pretrained(save_compressed=True)`
  plus the tokenizer. It picks its own device, the accelerator if it sees one; with
  --device cpu no worker sees any (CUDA_VISIBLE_DEVICES="").
* --full: `luq.Session("smollm2", LUQConfig(formats=("gptq4-gG",))).run(out)` (what
  `luq.quantize` runs) timed as a whole with luq's defaults otherwise (a one-format model: one
  sequential pass in that format, the final pass's; the measured KL of the written model; a
  cold variant cache in a temporary folder), its stages told apart by the Session's
  `on_stage` callback (load, calibration, layer_pass, ..., write; the same seconds as the
  report's "seconds"); "between" is the rest: checks, the cache key, assembly, the measured KL,
  the report.

Inside each pass, the time spent quantizing the weights once the Hessians are there is shown
as an "of which" row: luq's from the pass's own summary (each layer's solver seconds per
format, `passed.layers[i].seconds`), llmcompressor's by wrapping
`GPTQModifier.on_sequential_epoch_end` with a timer; the rest is the layer forwards and the
Hessian accumulation.

Group size G. llmcompressor needs the group size to divide every weight's columns (its
divisibility check refuses, and with `bypass_divisibility_checks=True` its weight observer
fails in `unflatten`; bench/peer.py pads to get around that for one bare solve, which does
not carry over to `oneshot`). SmolLM2's linears have 576 and 1536 columns, which 128 does
not divide; so both tools run at G = 64 by default (the largest power of two that does).
GPTQ's time hardly depends on G (one grid fit per group). `--group-size 128` runs luq at
g128 and reports llmcompressor's refusal as its row.

Memory. "peak RSS" of a stage is the process's resident-set high-water mark during that
stage (Linux: /proc/self/clear_refs resets VmHWM at each stage start); the tool's "total"
row has the peak of the whole process. Where the reset is not available the figures are
the peak so far (`peak_scope` in the JSON says which). With a CUDA --device the peak
allocated device memory of each stage is recorded too.

Timing: wall clock; torch threads = --threads (also OMP_NUM_THREADS / MKL_NUM_THREADS),
OMP_WAIT_POLICY=PASSIVE (see bench/solvers.py: spin-waiting makes timings hostage to any
other busy process), TOKENIZERS_PARALLELISM=false. Import time is a stage of its own
(llmcompressor's import takes seconds).

Prints a markdown table, writes bench/results/cost.json (with threads, machine, load
average at start and end) and cost.png. The workers' logs go to a temporary folder whose
path is printed; progress goes to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (in the workers)

import argparse
import contextlib
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
BATCH = 8  # calibration batch size, both tools (luq's calibration_batches default)
SEED = 0

LUQ = "luq"
LLMC = "llmcompressor"
E2E = "luq-e2e"
WARM = "warm"
DEFAULT_WORKERS = (LUQ, LLMC)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool_label(worker: str, group_size: int) -> str:
    return {LUQ: f"luq GPTQ-4 g{group_size} (sequential)",
            LLMC: f"llmcompressor oneshot GPTQ-4 g{group_size}",
            E2E: f"luq quantize end to end (k=0, g{group_size})"}[worker]


# --------------------------------------------------------------------------- memory and time, in a worker


def _vm_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class Meter:
    """Contiguous stages of one process: `switch(name)` ends the current stage (its wall
    time and peak RSS) and starts the next; a name seen before accumulates."""

    def __init__(self, device: str):
        self.device = device
        self.per_stage = _reset_hwm() and _vm_hwm_kb() is not None
        self.stages: dict[str, dict] = {}
        self.current: str | None = None
        self.failed: str | None = None  # the stage an exception came out of
        self.solver: dict[str, float] = {}  # per stage: seconds spent quantizing the weights
        self.last: tuple[str, ...] = ()  # stages listed last
        self.t0 = self.t_start = time.perf_counter()

    def _gpu_peak_mb(self) -> float | None:
        if not str(self.device).startswith("cuda") or "torch" not in sys.modules:
            return None
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return peak

    def switch(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            peak = _vm_hwm_kb() / 1024 if self.per_stage else _maxrss_mb()
            s = self.stages.setdefault(self.current, {"stage": self.current, "seconds": 0.0, "peak_rss_mb": 0.0,
                                                      "peak_gpu_mb": None})
            s["seconds"] += now - self.t0
            s["peak_rss_mb"] = max(s["peak_rss_mb"], peak)
            gpu = self._gpu_peak_mb()
            if gpu is not None:
                s["peak_gpu_mb"] = max(s["peak_gpu_mb"] or 0.0, gpu)
        if self.per_stage:
            _reset_hwm()
        self.current, self.t0 = name, time.perf_counter()

    def add_solver(self, stage: str, seconds: float) -> None:
        """`seconds` of weight quantization inside `stage` (luq's: from its pass's summary)."""
        self.solver[stage] = self.solver.get(stage, 0.0) + seconds

    def on_stage(self, labels: dict[str, str], between: str):
        """A `luq.Session` on_stage callback that switches stages: a Session stage starting
        (`on_stage(name, None)`) starts the meter's `labels[name]`, one ending (`on_stage(name,
        seconds)`) starts `between`. A stage that raises never ends: the meter stays in it."""
        def callback(name: str, seconds: float | None) -> None:
            self.switch(labels.get(name, name) if seconds is None else between)
        return callback

    def time_calls(self, owner, attr: str) -> bool:
        """Wrap `owner.attr` (a function or method of the peer tool, llmcompressor; never luq's)
        so that the time spent in it counts as "solver" time of the current stage. Instrumentation
        only; False if it is not there."""
        fn = getattr(owner, attr, None)
        if not callable(fn):
            return False

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.solver[self.current] = self.solver.get(self.current, 0.0) + time.perf_counter() - t0
        try:
            setattr(owner, attr, timed)
        except (AttributeError, TypeError):
            return False
        return True

    @contextlib.contextmanager
    def stage(self, name: str, then: str | None = None):
        self.switch(name)
        try:
            yield
        except BaseException:
            self.failed = self.failed or name
            raise
        finally:
            self.switch(then)

    def finish(self) -> dict:
        self.switch(None)
        rows = sorted(self.stages.values(), key=lambda r: r["stage"] in self.last)
        for r in rows:
            r["solver_s"] = self.solver.get(r["stage"])
        gpu = [r["peak_gpu_mb"] for r in rows if r["peak_gpu_mb"] is not None]
        return {"rows": rows, "total_s": time.perf_counter() - self.t_start,
                "peak_rss_mb": max([r["peak_rss_mb"] for r in rows] + [_maxrss_mb() if not self.per_stage else 0.0]),
                "peak_gpu_mb": max(gpu) if gpu else None,
                "peak_scope": "per stage" if self.per_stage else "cumulative"}


def _short(e: BaseException) -> str:
    """One line for a table: the exception type and its message's first sentence."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0]
    return f"{type(e).__name__}: {text[:200]}"


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _windows(tokenizer, adapter, samples: int, seq_len: int):
    """luq's calibration batches and the [N, L] token windows in them, with their digest."""
    import torch

    from luq.calibration import CalibrationConfig, calibration_batches

    batches = calibration_batches(tokenizer, adapter, CalibrationConfig(samples=samples, seq_len=seq_len, seed=SEED),
                                  batch_size=BATCH)
    ids = torch.cat([inputs["input_ids"] for inputs, _ in batches])
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return batches, ids, digest


# --------------------------------------------------------------------------- workers


def worker_warm(args) -> dict:
    """Build the offline caches every tool reads (SmolLM2 HF dir, tokenized text), untimed."""
    from transformers import AutoTokenizer

    from luq.zoo.smollm2 import smollm2_dir
    from luq.calibration import text_token_ids

    path = smollm2_dir()
    n = text_token_ids(AutoTokenizer.from_pretrained(str(path)), None).numel()
    return {"model_dir": str(path), "text_tokens": int(n)}


LUQ_PASS = "layer pass (capture + Hessians + GPTQ-4, sequential)"


def solver_seconds(layers: list) -> float:
    """The weight-quantization seconds of a luq layer pass, from its summary: each layer's solver
    seconds per format (`pipeline.layer_pass`'s `layers`; a Session's `measurement.passed.layers`)."""
    return sum(sum(layer.seconds.values()) for layer in layers)


def worker_luq(args, meter: Meter) -> dict:
    out: dict = {}
    with meter.stage("import"):
        torch = _setup_torch(args.threads)
        import transformers  # noqa: F401  (luq's load_model imports it lazily; count it here, as for llmcompressor)

        from luq import __version__
        from luq.artifact import quantization_config, write_artifact
        from luq.assembly import Assembly, linear_names
        from luq.config import LUQConfig
        from luq.models.loading import load_model
        from luq.pipeline import layer_pass
        from luq.plan import uniform_plan
        from luq.quant import get_format
        from luq.variants import VariantCache
    with meter.stage("load model"):
        net, tokenizer, adapter = load_model(MODEL, args.device, torch.float32)
    with meter.stage("calibration windows"):
        batches, ids, out["windows_sha256"] = _windows(tokenizer, adapter, args.samples, args.seq_len)
    fmt = get_format(f"gptq4-g{args.group_size}")
    # a fresh cache: nothing is read from it, the pass writes each layer's variant to it (as `luq quantize` does)
    cache = VariantCache(Path(args.work_dir) / "luq-variants", {"bench": "cost", "pid": os.getpid()})
    with meter.stage(LUQ_PASS):
        passed = layer_pass(net, adapter, batches, formats=[fmt], cache=cache, hessians="sequential",
                            entropy=False, device=args.device, seed=SEED, desc="luq GPTQ-4")
    meter.add_solver(LUQ_PASS, solver_seconds(passed.layers))
    with meter.stage("write artifact"):
        plan = uniform_plan([n for layer in linear_names(net, adapter) for n in layer], fmt.name)
        Assembly(net, adapter, cache, args.device).apply(plan)
        qconfig = quantization_config(net, LUQConfig(formats=(fmt.name,), storage_dtype="float16"), plan)
        artifact = Path(args.work_dir) / "luq-artifact"
        write_artifact(artifact, net, tokenizer, qconfig, {"model": MODEL, "bench": "cost"}, torch.float16)
    out["artifact_mb"] = _dir_mb(artifact)
    out["versions"] = {"luq": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    return out


def worker_llmcompressor(args, meter: Meter) -> dict:
    out: dict = {}
    with meter.stage("import"):
        torch = _setup_torch(args.threads)
        import transformers
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        from luq.models.loading import resolve
        from luq.models import adapter_for
    out["versions"] = {"llmcompressor": getattr(llmcompressor, "__version__", "?"), "torch": torch.__version__,
                       "transformers": transformers.__version__}
    source = resolve(MODEL)
    with meter.stage("load model"):
        # on the default device: llmcompressor's sequential pipeline moves each layer to its own device
        net = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    with meter.stage("calibration windows (luq's, as a Dataset)"):
        _, ids, out["windows_sha256"] = _windows(tokenizer, adapter_for(net.config.model_type), args.samples,
                                                 args.seq_len)
        dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # one layer's weights quantized after its calibration forward: observers (grids) + GPTQ solves
    meter.time_calls(GPTQModifier, "on_sequential_epoch_end")
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"],
                                   "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                               "group_size": args.group_size, "actorder": "static"}}},
        ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    with meter.stage("oneshot (capture + Hessians + GPTQ-4, sequential)"):
        oneshot(model=net, tokenizer=tokenizer, dataset=dataset, recipe=recipe, pipeline="sequential",
                num_calibration_samples=len(ids), max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
                batch_size=BATCH)
    with meter.stage("save_pretrained (compressed)"):
        artifact = Path(args.work_dir) / "llmc-artifact"
        net.save_pretrained(artifact, save_compressed=True)
        tokenizer.save_pretrained(artifact)
    out["artifact_mb"] = _dir_mb(artifact)
    return out


E2E_BETWEEN = "checks, assembly, measured KL, report (between stages)"
# the Session's stages (its on_stage names) as rows; a one-format model's layer_pass is its one pass,
# sequential as the final pass
E2E_STAGES = {"load": "load model", "calibration": "calibration and sensitivity windows",
              "layer_pass": "layer pass (capture + Hessians + GPTQ-4, sequential)",
              "unit_pass": "outside the decoder (embedding, head)", "sensitivity": "sensitivity",
              "plan": "plan", "final_pass": "final pass (sequential)", "write": "write artifact"}


def worker_e2e(args, meter: Meter) -> dict:
    with meter.stage("import"):
        torch = _setup_torch(args.threads)
        import transformers  # noqa: F401

        import luq
        from luq import Session   # luq.session and what it imports: here, not in the first stage
        from luq.calibration import CalibrationConfig

    meter.last = (E2E_BETWEEN,)
    config = luq.LUQConfig(calibration=CalibrationConfig(samples=args.samples, seq_len=args.seq_len, seed=SEED),
                           formats=(f"gptq4-g{args.group_size}",))
    artifact = Path(args.work_dir) / "e2e-artifact"
    meter.switch(E2E_BETWEEN)
    # `luq.quantize` is exactly Session(...).run(out); the Session keeps what its passes measured
    session = Session(MODEL, config, device=args.device, dtype=torch.float32,
                      cache_dir=Path(args.work_dir) / "e2e-variants", progress=True, log=log,
                      on_stage=meter.on_stage(E2E_STAGES, E2E_BETWEEN))
    report = session.run(artifact)
    meter.switch(None)
    passed = session.measurement.passed
    meter.add_solver(E2E_STAGES["layer_pass"], solver_seconds(passed.layers))
    if passed.final_layers:
        meter.add_solver(E2E_STAGES["final_pass"], solver_seconds(passed.final_layers))
    if passed.unit_pass is not None:
        meter.add_solver(E2E_STAGES["unit_pass"], sum(passed.unit_pass.seconds.values()))
    return {"artifact_mb": _dir_mb(artifact), "final_pass": report["final_pass"], "quantize_seconds": report["seconds"],
            "versions": {"luq": luq.__version__, "torch": torch.__version__}}


WORKERS = {LUQ: worker_luq, LLMC: worker_llmcompressor, E2E: worker_e2e}


def run_worker(args) -> None:
    """In the worker process: run one tool, write its result JSON (failures included)."""
    result: dict = {"worker": args.worker, "loadavg_start": os.getloadavg(), "pid": os.getpid()}
    if args.worker == WARM:
        result.update(worker_warm(args))
    else:
        meter = Meter(args.device)
        try:
            result.update(WORKERS[args.worker](args, meter))
        except Exception as e:  # noqa: BLE001 - a tool's failure is a result of the benchmark, reported as a row
            import traceback

            traceback.print_exc()
            result["error"] = _short(e)
            result["failed_stage"] = meter.failed or meter.current
        result.update(meter.finish())
        if "torch" in sys.modules:
            result["threads"] = sys.modules["torch"].get_num_threads()
    result["loadavg_end"] = os.getloadavg()
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))


# --------------------------------------------------------------------------- parent


def spawn(worker: str, args, work: Path) -> dict:
    """Run one worker in a fresh process; its result (or why it gave none)."""
    result_path, log_path = work / f"{worker}.json", work / f"{worker}.log"
    wdir = work / worker
    wdir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "bench.cost", "--worker", worker, "--result", str(result_path),
           "--work-dir", str(wdir), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), "--group-size", str(args.group_size), "--device", args.device]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":  # llmcompressor takes any accelerator it sees: a CPU run shows it none
        env["CUDA_VISIBLE_DEVICES"] = ""
    log(f"{worker}: started (log: {log_path})")
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        result = {"worker": worker, "error": f"worker exited with status {rc}, no result"
                  + (f" (last line: {tail[0][:200]})" if tail else ""), "rows": []}
    result["process_wall_s"] = wall
    result["returncode"] = rc
    shutil.rmtree(wdir, ignore_errors=True)  # artifacts and caches; their sizes are in the result
    status = f"failed: {result['error']}" if result.get("error") else f"{result.get('total_s', wall):.1f} s"
    log(f"{worker}: {status}")
    return result


def markdown(result: dict) -> str:
    gs = result["settings"]["group_size"]
    any_gpu = any(r.get("peak_gpu_mb") is not None for w in result["workers"].values() for r in w.get("rows", []))
    head = "| tool | stage | seconds | peak RSS MB |" + (" peak GPU MB |" if any_gpu else "")
    out = [head, "|---|---|---:|---:|" + ("---:|" if any_gpu else "")]

    def gpu(v):
        return (f" {v:.0f} |" if v is not None else " |") if any_gpu else ""
    blank = " |" if any_gpu else ""

    for name, w in result["workers"].items():
        tool = tool_label(name, gs)
        for r in w.get("rows", []):
            out.append(f"| {tool} | {r['stage']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |"
                       f"{gpu(r['peak_gpu_mb'])}")
            if r.get("solver_s") is not None:
                out.append(f"| {tool} | ↳ of which quantizing the weights¹ | {r['solver_s']:.2f} | |{blank}")
        if w.get("error"):
            failed = w.get("failed_stage")
            where = "↳ " if failed in {r["stage"] for r in w.get("rows", [])} else f"{failed or 'run'}: "
            out.append(f"| {tool} | {where}failed: {w['error']} | | |{blank}")
        if w.get("rows"):
            out.append(f"| {tool} | **total{' (until the failure)' if w.get('error') else ''}** | "
                       f"**{w['total_s']:.2f}** | **{w['peak_rss_mb']:.0f}** |{gpu(w.get('peak_gpu_mb'))}")
    s = result["settings"]
    notes = ["", f"SmolLM2-135M, float32, {s['samples']} windows x {s['seq_len']} tokens (seed {SEED}, batch {BATCH}), "
             f"GPTQ 4-bit group {gs} asymmetric, act-order static groups, damp 0.01, block 128, device "
             f"{s['device']}; torch threads {s['threads']}, OMP_WAIT_POLICY={result['omp_wait_policy']}, "
             f"{result['cpu_count']} CPUs ({result['machine']}), load average {result['loadavg_start'][0]:.1f} "
             f"at start / {result['loadavg_end'][0]:.1f} at end{' (--quick)' if result['quick'] else ''}."]
    sizes = [f"{tool_label(n, gs)} {w['artifact_mb']:.1f} MB" for n, w in result["workers"].items()
             if w.get("artifact_mb") is not None]
    if sizes:
        notes.append("Artifact on disk: " + "; ".join(sizes) + " (luq stores unquantized tensors in float16, "
                     "llmcompressor in the model's float32).")
    shas = {w.get("windows_sha256") for w in result["workers"].values() if w.get("windows_sha256")}
    if shas:
        notes.append("Same calibration tokens in every tool: " + ("yes" if len(shas) == 1 else f"NO ({shas})") + ".")
    scopes = {w.get("peak_scope") for w in result["workers"].values() if w.get("peak_scope")}
    notes.append("¹ time spent quantizing the weights, given the Hessians: luq's solver seconds from its layer "
                 "pass's summary (grids, GPTQ / BiLLM solves, packing), llmcompressor's "
                 "`GPTQModifier.on_sequential_epoch_end` (weight observers, GPTQ solves, qparams). The rest of the "
                 "pass is the layer forwards and the Hessian accumulation.")
    notes.append("Peak RSS: " + ("the high-water mark within each stage (reset at its start); total = the "
                                 "whole process." if scopes == {"per stage"}
                                 else "the peak so far (no per-stage reset here)."))
    return "\n".join(out + notes)


def plot(result: dict, path: Path) -> None:
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    gs = result["settings"]["group_size"]
    names = [n for n in result["workers"]]
    labels = [tool_label(n, gs) for n in names]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 2.2 + 0.8 * len(names)), gridspec_kw={"width_ratios": [3, 1]})
    colors = {}
    cmap = plt.get_cmap("tab10")
    for y, n in enumerate(names):
        left = 0.0
        for r in result["workers"][n].get("rows", []):
            key = r["stage"].split(" (")[0]
            if key not in colors:
                colors[key] = cmap(len(colors) % 10)
            ax_t.barh(y, r["seconds"], left=left, color=colors[key], edgecolor="white",
                      label=key if key not in ax_t.get_legend_handles_labels()[1] else None)
            left += r["seconds"]
        if result["workers"][n].get("error"):
            ax_t.text(left, y, "  failed", va="center", color="red")
    ax_t.set_yticks(range(len(names)), labels)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("wall seconds (stages stacked)")
    ax_t.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)
    peaks = [result["workers"][n].get("peak_rss_mb") or 0 for n in names]
    ax_m.barh(range(len(names)), peaks, color="gray")
    ax_m.set_yticks(range(len(names)), [""] * len(names))
    ax_m.invert_yaxis()
    ax_m.set_xlabel("peak RSS MB (whole process)")
    for y, p in enumerate(peaks):
        ax_m.text(p, y, f" {p:.0f}", va="center", fontsize=8)
    s = result["settings"]
    fig.suptitle(f"SmolLM2-135M on {s['device']}, {s['samples']}x{s['seq_len']} tokens, {s['threads']} threads",
                 fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="N calibration windows (default 16; --quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="L tokens per window (default 256; --quick 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every worker (default 2)")
    ap.add_argument("--group-size", type=int, default=64,
                    help="GPTQ group size, both tools (default 64: llmcompressor needs it to divide 576 and 1536)")
    ap.add_argument("--device", default="cpu",
                    help="torch device for luq (default cpu; llmcompressor takes the accelerator, if visible)")
    ap.add_argument("--full", action="store_true", help="also time luq.quantize end to end (k=0, full LUQ pass)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 windows of 64 tokens")
    ap.add_argument("--out", type=Path, default=RESULTS / "cost.json", help="JSON output (the plot goes beside it)")
    ap.add_argument("--worker", choices=(WARM, *WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.samples = args.samples or (2 if args.quick else 16)
    args.seq_len = args.seq_len or (64 if args.quick else 256)
    if args.samples <= 0 or args.seq_len <= 0 or args.threads <= 0 or args.group_size <= 0:
        ap.error("--samples, --seq-len, --threads and --group-size must be positive")
    if args.worker:
        run_worker(args)
        return

    t_start, load_start = time.perf_counter(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="luq-bench-cost-"))
    log(f"worker logs and scratch in {work}")
    warm = spawn(WARM, args, work)
    if warm.get("error"):
        sys.exit(f"warm-up failed: {warm['error']} (see {work / 'warm.log'})")
    workers = {w: spawn(w, args, work) for w in (*DEFAULT_WORKERS, *((E2E,) if args.full else ()))}
    result = {"quick": args.quick, "settings": {"model": MODEL, "samples": args.samples, "seq_len": args.seq_len,
                                                "batch": BATCH, "seed": SEED, "group_size": args.group_size,
                                                "threads": args.threads, "device": args.device, "full": args.full},
              "machine": platform.machine(), "processor": platform.processor(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t_start,
              "model_dir": warm.get("model_dir"), "logs": str(work), "workers": workers}
    result["markdown"] = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(result["markdown"])
    log(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
