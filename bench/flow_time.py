"""How long `luq quantize smollm2 --formats gptq3-g128` takes now against an earlier commit of luq, the two
runs side by side (started together, one thread each).

A one-format model needs no measurement: the current flow solves it in one sequential pass. The earlier
flow (default: commit 1cf34b0, before the Session) ran the variant pass (the format solved on the
full-precision chain, with the K-means entropy of every layer for the report) and then a final pass that
solved everything again sequentially; its log shows no sensitivity pass for one format (the file's
`sensitivity_pass` says so for each side). Each side gets a fresh variant cache, so nothing is reused.
Writes bench/results/flow-time.json: wall and CPU seconds of each (user + system: CPU seconds do not
depend on what else the machine runs, wall seconds do, and the old run's last part runs alone once the
new one is done), their ratios, and the load average. With --bound B the old run is stopped once it has
used B times the new one's CPU seconds: its seconds are then lower bounds (the ratios upper bounds), with
its last progress line.

    python -m bench.flow_time                       # needs git and this repository's history
    python -m bench.flow_time --samples 16 --seq-len 256 --bound 2   # a smaller calibration, both sides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
COMMAND = ["quantize", "smollm2", "--formats", "gptq3-g128"]


def checkout(commit: str, where: Path) -> Path:
    """The source tree of `commit` (git archive: no worktree bookkeeping left behind)."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(where)], input=archive, check=True)
    return where / "src"


def start(src: Path, out: Path, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sys.executable, "-c", "import sys; from luq.cli import main; sys.exit(main())", *COMMAND, *extra,
            "--out", str(out / "artifact"), "--cache-dir", str(out / "cache")]
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="1cf34b0", help="the earlier commit")
    p.add_argument("--new", default="HEAD")
    p.add_argument("--json", type=Path, default=RESULTS / "flow-time.json")
    p.add_argument("--bound", type=float, default=None,
                   help="stop the old run once it has used BOUND x the new one's CPU seconds; the file then gives "
                        "lower bounds on the old time (ratio new/old at most 1/BOUND)")
    p.add_argument("--samples", type=int, default=None, help="calibration sequences, both sides (default: luq's)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length, both sides")
    args = p.parse_args(argv)
    extra = [*(["--samples", str(args.samples)] if args.samples else []),
             *(["--seq-len", str(args.seq_len)] if args.seq_len else [])]
    revs = {side: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                 capture_output=True, text=True).stdout.strip()
            for side, rev in (("old", args.old), ("new", args.new))}
    with tempfile.TemporaryDirectory(prefix="luq-flow-") as tmp:
        tmp = Path(tmp)
        procs, t0 = {}, time.perf_counter()
        for side, rev in revs.items():
            (tmp / side).mkdir()
            procs[side] = start(checkout(rev, tmp / f"{side}-src"), tmp / side, tmp / f"{side}.log", extra)
        seconds, cpu, stopped, loads = {}, {}, None, []
        live = {side: psutil.Process(proc.pid) for side, proc in procs.items()}
        while len(seconds) < len(procs):
            loads.append(os.getloadavg()[0])
            for side, proc in procs.items():
                if side in seconds:
                    continue
                try:   # CPU seconds so far (user + system): what the run cost, whatever else the machine ran
                    times = live[side].cpu_times()
                    cpu[side] = round(times.user + times.system, 1)
                except psutil.NoSuchProcess:
                    pass
                if proc.poll() is not None:
                    if proc.returncode != 0:
                        sys.exit(f"{side} ({revs[side]}) failed: {(tmp / f'{side}.log').read_text()[-2000:]}")
                    seconds[side] = round(time.perf_counter() - t0, 1)
                    print(f"{side} ({revs[side]}): {seconds[side]} s wall, {cpu[side]} s CPU", flush=True)
            if args.bound and "new" in seconds and "old" not in seconds and cpu["old"] >= args.bound * cpu["new"]:
                procs["old"].kill()
                procs["old"].wait()
                seconds["old"] = stopped = round(time.perf_counter() - t0, 1)
                print(f"old ({revs['old']}): still running at {cpu['old']} s CPU ({args.bound}x new's): stopped",
                      flush=True)
            time.sleep(1)
        logs = {side: (tmp / f"{side}.log").read_text() for side in procs}
        old_stage = logs["old"].replace("\r", "\n").strip().splitlines()[-1][:200] if stopped else None
    result = {"command": "luq " + " ".join(COMMAND + extra), "commits": revs, "seconds": seconds,
              "cpu_seconds": cpu, "ratio_new_to_old": round(seconds["new"] / seconds["old"], 3),
              "cpu_ratio_new_to_old": round(cpu["new"] / cpu["old"], 3),
              "old_stopped_at": stopped, "old_last_progress": old_stage,   # old's seconds lower bounds if stopped
              "sensitivity_pass": {side: "sensitivity" in log for side, log in logs.items()},
              "threads_each": 1, "side_by_side": True,
              "load_average": {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2)}}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
