"""Data-parallel evaluation: two CPU processes (accelerate launch, gloo) score exactly as one."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from luq.eval.distributed import DataParallel, run_sharded
from luq.eval.command import run_eval
from test_eval_runner import eval_args
from test_eval_support import tiny_llava_dir

SCRIPT = textwrap.dedent("""
    import argparse, sys, torch
    torch.set_num_threads(1)
    from luq.eval.command import add_eval_arguments, run_eval
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    for argv in sys.argv[1:]:
        run_eval(parser.parse_args(argv.split("|")))
""")


def test_shards_are_whole_batches_gathered_in_order():
    batches = [[0, 1], [2, 3], [4]]
    assert DataParallel(rank=0, world_size=2).my_batches(3) == [0, 2]
    assert DataParallel(rank=1, world_size=2).my_batches(3) == [1]
    assert run_sharded(batches, lambda b: [x * 10 for x in b], DataParallel()) == [0, 10, 20, 30, 40]
    assert DataParallel(world_size=2, local_rank=1).device("cuda") == torch.device("cuda", 1)
    assert DataParallel(world_size=2, local_rank=1).device("cpu") == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate's launcher is not installed")
def test_two_processes_score_exactly_as_one(tmp_path):
    torch.set_num_threads(1)
    model_dir = tiny_llava_dir()
    runs = {  # name -> luq eval arguments (perplexity windows and VQA batches both get shared out)
        "mmbench": [model_dir, "--task", "mmbench", "--batch-size", "3", "--max-new-tokens", "4"],
        "perplexity": [model_dir, "--task", "perplexity", "--seq-len", "64", "--stride", "48", "--limit", "5",
                       "--batch-size", "2"],
    }
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    launcher = Path(sys.executable).parent / "accelerate"
    argv = ["|".join(map(str, args + ["--out", tmp_path / f"two-{name}.json"])) for name, args in runs.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    launched = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(script), *argv],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    for name, args in runs.items():
        run_eval(eval_args(*args, "--out", tmp_path / f"one-{name}.json"))
        one = json.loads((tmp_path / f"one-{name}.json").read_text())
        two = json.loads((tmp_path / f"two-{name}.json").read_text())
        assert (one["world_size"], two["world_size"]) == (1, 2)
        if name == "perplexity":
            assert two["perplexity"] == one["perplexity"] and two["tokens"] == one["tokens"]
        else:
            assert two["scores"] == one["scores"]
            assert [s["prediction"] for s in two["samples"]] == [s["prediction"] for s in one["samples"]]
            assert [s["id"] for s in two["samples"]] == [s["id"] for s in one["samples"]]
    # only rank 0 reports
    assert launched.stdout.count("wrote ") == len(runs)
