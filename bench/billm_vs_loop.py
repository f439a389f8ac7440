"""Today's BiLLM against the loop searches it replaced, on this machine: the stored bytes and
the relative output error on the 21 real SmolLM2 linears (luq.zoo.smollm2.smollm2_linear_problems).

    python -m bench.billm_vs_loop [--commit 587b3f0] [--threads 2]

The loop version is checked out from git (`git worktree add` into a temporary directory) at
--commit, the last commit before the searches were vectorised; each version runs in its own
process at --threads threads on the same saved problems. BiLLM's float32 BLAS work (its
Cholesky and block updates) rounds differently on other CPUs and thread counts, which can flip
near-ties of its searches, so the two versions are compared on one machine, not against pins
made elsewhere (tests/test_solvers_real.py explains the pins' tolerance).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def child(problems: Path, out: Path, threads: int) -> None:
    """Run whichever luq is on the path over the saved problems; write digests and errors."""
    from luq.quant import BiLLM

    torch.set_num_threads(threads)
    result = {}
    for name, (W, H) in torch.load(problems).items():
        q = BiLLM().quantize(W.clone(), H.clone())
        d = W.double() - q.dequantize().double()
        error = (torch.trace(d @ H.double() @ d.T) / torch.trace(W.double() @ H.double() @ W.double().T)).item()
        digest = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                  for k, v in sorted(q.state_dict().items())}
        result[name] = {"relative_output_error": error, "sha256": digest}
    out.write_text(json.dumps(result))


def run_version(src: Path, problems: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    subprocess.run([sys.executable, __file__, "--child", str(problems), str(out), "--threads", str(threads)],
                   env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="587b3f0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("PROBLEMS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.threads)
        return
    from luq.zoo.smollm2 import smollm2_linear_problems

    with tempfile.TemporaryDirectory(prefix="luq-billm-loop-") as tmp:
        tmp = Path(tmp)
        problems = tmp / "problems.pt"
        torch.save({p.name: (p.weight, p.hessian) for p in smollm2_linear_problems()}, problems)
        old_tree = tmp / "loop"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.commit],
                       check=True, capture_output=True)
        try:
            old = run_version(old_tree / "src", problems, tmp / "old.json", args.threads)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=False,
                           capture_output=True)
        new = run_version(ROOT / "src", problems, tmp / "new.json", args.threads)
    same = [name for name in old if old[name]["sha256"] == new[name]["sha256"]]
    ratios = {name: new[name]["relative_output_error"] / old[name]["relative_output_error"] for name in old}
    print(f"BiLLM, loop searches (commit {args.commit}) vs today's, {args.threads} threads, "
          f"21 SmolLM2 linears:\n")
    print(f"identical stored bytes: {len(same)} of {len(old)}")
    print(f"relative output error, today / loop: {min(ratios.values()):.6f} .. {max(ratios.values()):.6f}")
    for name in sorted(set(old) - set(same)):
        print(f"  differs: {name}: {old[name]['relative_output_error']:.6e} -> {new[name]['relative_output_error']:.6e}")


if __name__ == "__main__":
    main()
