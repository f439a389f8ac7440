"""luq tune: scales and norms trained against the full-precision model, on real SmolLM2 weights (its
first two decoder layers, the tied embedding packed: the conftest's "embed" artifact)."""

import json

import pytest
import torch

import luq
from luq.calibration import text_token_ids, validation_windows
from luq.errors import LuqError
from luq.models.loading import load_model
from luq.tuning import TuneConfig, distillation_kl, tune

QUICK = dict(steps=12, batch_size=2, windows=16, seq_len=64, lr=5e-3)


def _held_out_kl(model, teacher, windows) -> float:
    with torch.no_grad():
        return float(distillation_kl(teacher(input_ids=windows).logits, model(input_ids=windows).logits))


@pytest.fixture(scope="module")
def tuned(smollm2_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "embed-tuned"
    report = tune(smollm2_artifacts["embed"], out, TuneConfig(**QUICK), progress=False, log=lambda s: None)
    return out, report


def test_tuning_keeps_codes_and_bytes_and_moves_only_scales_and_norms(smollm2_artifacts, tuned):
    from safetensors.torch import load_file

    out, report = tuned
    source = load_file(smollm2_artifacts["embed"] / "model.safetensors")
    result = load_file(out / "model.safetensors")
    assert source.keys() == result.keys()
    assert sum(t.numel() * t.element_size() for t in result.values()) == report["total_bytes"]
    changed = {k for k in source if not torch.equal(source[k], result[k])}
    assert changed, "nothing was trained"
    assert all(k.endswith(".scales") or "norm" in k for k in changed), sorted(changed)[:5]
    assert any(k.endswith(".scales") for k in changed) and any("norm" in k for k in changed)
    for k in source:   # stored dtypes and shapes unchanged
        assert (source[k].dtype, source[k].shape) == (result[k].dtype, result[k].shape), k
    src_config = json.loads((smollm2_artifacts["embed"] / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == src_config
    tuning = report["tuning"]
    assert tuning["steps"] == QUICK["steps"] and len(tuning["kl_by_step"]) == QUICK["steps"]
    assert tuning["tuned_weights"] == 15   # 2 layers x 7 linears + the embedding (the head shares it)


def test_tuning_lowers_the_kl_on_held_out_windows(smollm2_artifacts, tuned):
    """On windows the tuning never saw. Measured: 12 steps on 16 windows of 64 tokens take this 2-layer model's
    KL from 0.189 to 0.181 nats (0.955x; its KL on the tuning windows falls 0.19 -> 0.09: with this little text
    it mostly fits those); asserted below 0.98x."""
    out, _ = tuned
    teacher_dir = smollm2_artifacts["root"] / "model"
    teacher, tokenizer, _ = load_model(str(teacher_dir))
    windows = validation_windows(text_token_ids(tokenizer, None), 8, 64, 0, 4)
    before = _held_out_kl(luq.load(smollm2_artifacts["embed"])[0], teacher, windows)
    after = _held_out_kl(luq.load(out)[0], teacher, windows)
    assert after < 0.98 * before, (before, after)


def test_an_interrupted_tuning_resumes_to_the_same_result(smollm2_artifacts, tmp_path, monkeypatch):
    import luq.tuning

    config = TuneConfig(**dict(QUICK, steps=4), checkpoint_every=2)
    whole = tune(smollm2_artifacts["embed"], tmp_path / "whole", config, progress=False, log=lambda s: None)
    calls = {"n": 0}
    real = luq.tuning.distillation_kl

    def fails_at_step_three(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(luq.tuning, "distillation_kl", fails_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        tune(smollm2_artifacts["embed"], tmp_path / "resumed", config, progress=False, log=lambda s: None)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(luq.tuning, "distillation_kl", real)
    said = []
    resumed = tune(smollm2_artifacts["embed"], tmp_path / "resumed", config, progress=False, log=said.append)
    assert any("resuming the tuning at step 2" in s for s in said)
    assert resumed["tuning"]["kl_by_step"] == whole["tuning"]["kl_by_step"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, message", [
    (dict(steps=0), "steps must be positive"),
    (dict(lr=0.0), "--lr > 0"),
    (dict(batch_size=9, windows=8), "more than the 8 --windows"),
    (dict(seq_len=1), "at least 2"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(LuqError, match=message):
        TuneConfig(**kw)


def test_refusals_name_the_problem(smollm2_artifacts, tmp_path):
    source = smollm2_artifacts["embed"]
    with pytest.raises(LuqError, match="no quantized model"):
        tune(tmp_path / "nothing", tmp_path / "out", TuneConfig(**QUICK), progress=False, log=lambda s: None)
    from tiny_models import tiny_llama_dir

    other = tiny_llama_dir(tmp_path / "other")   # a teacher that is not the artifact's model
    with pytest.raises(LuqError, match="output head of"):
        tune(source, tmp_path / "out", TuneConfig(**dict(QUICK, teacher=str(other))), progress=False,
             log=lambda s: None)
    with pytest.raises(LuqError, match="tuning windows"):
        tune(source, tmp_path / "out", TuneConfig(**dict(QUICK, windows=10 ** 6, batch_size=2)),
             progress=False, log=lambda s: None)


def test_tuning_in_place_replaces_the_artifact(smollm2_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(smollm2_artifacts["gptq4"], copy)
    report = tune(copy, copy, TuneConfig(**dict(QUICK, steps=1)), progress=False, log=lambda s: None)
    assert report["tuning"]["steps"] == 1
    assert json.loads((copy / "luq_report.json").read_text())["tuning"]["steps"] == 1
    luq.load(copy)   # its manifest checks out
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]   # no temporary left beside it


def test_quantize_with_tune_steps_writes_a_tuned_artifact(smollm2_artifacts, tmp_path, capsys):
    from luq.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(smollm2_artifacts["root"] / "model"), "--out", str(out), "--formats", "gptq4-g128",
                 "--samples", "4", "--seq-len", "64", "--no-final-pass", "--tune-steps", "1",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "tuned 14 weights' scales over 1 steps" in capsys.readouterr().out
    assert json.loads((out / "luq_report.json").read_text())["tuning"]["steps"] == 1


def test_the_command_line_tunes(smollm2_artifacts, tmp_path, capsys):
    from luq.cli import main

    assert main(["tune", str(smollm2_artifacts["gptq4"]), "--out", str(tmp_path / "t"), "--steps", "1",
                 "--batch-size", "1", "--windows", "2", "--seq-len", "32"]) == 0
    assert "tuned 14 weights' scales over 1 steps" in capsys.readouterr().out
    assert main(["tune", str(tmp_path / "missing"), "--out", str(tmp_path / "u")]) == 2
    assert capsys.readouterr().err.startswith("luq: error: no quantized model at")
