"""The `luq` command: one clear line and exit 2 on bad input; `luq entropy` on the real SmolLM2."""

import json
import subprocess
import sys

import pytest

from luq.cli import main


@pytest.mark.parametrize("argv, message", [
    (["entropy", "--out", "{tmp}/o", "--alpha", "2"], "--alpha must be in [0, 1]"),
    (["entropy", "--out", "{tmp}/o", "--calib-text", "{tmp}/missing.txt"], "calibration text not found"),
    (["entropy", "{tmp}/no-such-model", "--out", "{tmp}/o"], "model directory not found"),
    (["entropy", "--out", "{tmp}/o", "--calib-images", "x.jsonl", "--alpha", "0.5"], "take no images"),
    (["entropy", "--out", "{tmp}/o", "--samples", "100000", "--seq-len", "512"], "fewer than the"),
    (["report", "{tmp}"], "no entropy.json"),
    (["quantize", "--out", "{tmp}/o", "--formats", "ggml", "--budget-gb", "0.1", "--speed-margin", "-0.1"],
     "--speed-margin is a fraction"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("luq: error: ") and message in err[-1]


def test_old_option_names_still_parse():
    """--k and --layers are short aliases of --kmeans-clusters and --n-low-layers; --keep-fp16, the old
    name of --keep, warns (kept units are stored at --storage-dtype, not only float16)."""
    from luq.cli import build_parser

    new = build_parser().parse_args(["quantize", "--out", "o", "--kmeans-clusters", "8", "--n-low-layers", "2",
                                     "--keep", "embed"])
    old = build_parser().parse_args(["quantize", "--out", "o", "--k", "8", "--layers", "2", "--keep", "embed"])
    assert vars(new) == vars(old) and (new.kmeans_clusters, new.n_low_layers, new.keep) == (8, 2, "embed")
    assert build_parser().parse_args(["entropy", "--out", "o", "--k", "auto"]).kmeans_clusters is None


def test_keep_fp16_is_a_deprecated_alias_of_keep(capsys):
    from luq.cli import build_parser

    args = build_parser().parse_args(["quantize", "--out", "o", "--keep-fp16", "embed,head"])
    assert args.keep == "embed,head"
    assert "--keep-fp16 is deprecated; use --keep" in capsys.readouterr().err
    assert "--keep-fp16" not in build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()


def test_no_traceback_from_the_real_command(tmp_path):
    run = subprocess.run([sys.executable, "-m", "luq.cli", "entropy", "--out", str(tmp_path), "--alpha", "-1"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["luq: error: --alpha must be in [0, 1] (the fraction of multimodal "
                                               "tokens), got -1.0"]


def test_entropy_on_real_smollm2_is_deterministic(tmp_path):
    args = ["entropy", "smollm2", "--samples", "4", "--seq-len", "64", "--k", "8"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "entropy.json").read_text())
    b = json.loads((tmp_path / "b" / "entropy.json").read_text())
    assert a["ranking"] == b["ranking"] and a["entropy"] == b["entropy"]
    assert len(a["entropy"]) == 30 and sorted(a["ranking"]) == list(range(30)) and a["kmeans_clusters"] == 8
    assert a["image_entropy"] == [None] * 30 and a["text_entropy"] == a["entropy"]
    assert a["tokens"] == {"text": 256, "image": 0, "padding": 0, "multimodal_fraction": 0.0}
    assert all(0 < e <= 2.08 for e in a["entropy"])  # at most ln 8
    assert [k for k, _ in a["kendall"]] == [16, 32, 50, 75, 100, 150, 200][:len(a["kendall"])]
    for png in ("entropy_vs_depth.png", "entropy_by_modality.png", "k_stability.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000
    assert main(["report", str(tmp_path / "a")]) == 0
