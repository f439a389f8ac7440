"""The paper's allocation (`allocate="entropy"`) end to end on a tiny random Llama with
SmolLM2's real tokenizer and real text: budget / threshold / count rules, the variant
cache (resume), the artifact (bytes, checksums, atomic write) and loading it back.
The measured allocation is tested in test_allocate.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import luq
from luq.assembly import Assembly, linear_names
from luq.calibration import CalibrationConfig
from luq.cli import main
from luq.errors import LuqError
from luq.models.loading import load_model
from luq.plan import LinearSizes, SizeTable, entropy_plan, layer_order, smallest_fitting_k, threshold_search
from luq.artifact import MANIFEST, REPORT
from luq.variants import VariantCache
from tiny_models import tiny_llama_dir

N_LAYERS = 6
CALIBRATION = CalibrationConfig(samples=4, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("luq")
    model_dir = tiny_llama_dir(root / "model", layers=N_LAYERS)
    return {"model": model_dir, "cache": root / "cache", "root": root}


def run(tiny, out, **kw):
    config = luq.LUQConfig(calibration=CALIBRATION, kmeans_clusters=8, **{"final_pass": False, "allocate": "entropy", **kw})
    return luq.quantize(tiny["model"], tiny["root"] / out, config, cache_dir=tiny["cache"], progress=False,
                        log=lambda s: None)


@pytest.fixture(scope="module")
def by_layers(tiny):
    return run(tiny, "layers2", n_low_layers=2)


def stored_tensor_bytes(folder: Path) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
    return total


def test_layers_rule_takes_the_first_k_of_the_order(tiny, by_layers):
    assert by_layers["n_low_layers"] == 2
    assert by_layers["low_layers"] == sorted(by_layers["order"][:2])
    assert by_layers["order"] == sorted(range(N_LAYERS), key=lambda i: by_layers["entropy"][i])
    methods = [layer["method"] for layer in by_layers["layers"]]
    assert [i for i, m in enumerate(methods) if m == "billm"] == by_layers["low_layers"]
    explicit = run(tiny, "explicit", n_low_layers=3, order=(5, 0, 3, 1))
    assert explicit["low_layers"] == [0, 3, 5]
    depth = run(tiny, "depth", n_low_layers=2, order="depth")
    assert depth["low_layers"] == [N_LAYERS - 2, N_LAYERS - 1]


def test_budget_picks_the_smallest_fitting_k_and_the_bytes_are_real(tiny, by_layers):
    totals = {f["n_low_layers"]: f["total_bytes"] for f in by_layers["frontier"]}
    assert all(totals[k + 1] < totals[k] for k in range(N_LAYERS))  # each low-bit layer saves bytes here
    budget = (totals[3] + totals[2]) / 2 / 1e9  # fits k = 3, not k = 2
    report = run(tiny, "budget", budget_gb=budget)
    assert report["n_low_layers"] == 3
    assert report["total_bytes"] == totals[3] <= budget * 1e9
    out = tiny["root"] / "budget"
    assert stored_tensor_bytes(out) == report["total_bytes"]  # every tensor counted, to the byte
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(on_disk - report["total_bytes"]) / report["total_bytes"] < 0.01
    assert json.loads((out / REPORT).read_text())["total_bytes"] == report["total_bytes"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "luq" and config["format_version"] == 1
    assert len(config["modules"]) == len(config["plan"]) == 7 * N_LAYERS
    assert set(config["plan"].values()) == {"gptq4-g128", "billm"} and config["allocate"] == "entropy"
    assert {m["method"] for m in config["modules"].values()} == {"gptq", "billm"}


def test_impossible_budget_names_the_smallest_reachable_size(tiny, by_layers, capsys):
    smallest = by_layers["frontier"][-1]["total_bytes"]
    with pytest.raises(LuqError, match="smallest reachable with formats gptq4-g128,billm is") as refused:
        run(tiny, "never", budget_gb=smallest / 2 / 1e9)
    # the bound is known before quantizing: BiLLM's size varies by a few bytes per row with its salient columns
    bound = int(str(refused.value).split("(")[-1].split(" bytes")[0].replace(",", ""))
    assert 0.999 * smallest <= bound <= smallest
    fresh_cache = tiny["root"] / "never-cache"
    code = main(["quantize", tiny["model"], "--out", str(tiny["root"] / "never"), "--budget-gb", "0.000001",
                 "--allocate", "entropy", "--samples", "4", "--seq-len", "64", "--k", "8",
                 "--cache-dir", str(fresh_cache)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("luq: error: no configuration fits")
    assert not (tiny["root"] / "never").exists()
    assert not fresh_cache.exists()  # refused from the sizes alone, before any quantization


def test_bad_rules_are_one_line_errors(tiny, capsys):
    assert main(["quantize", tiny["model"], "--out", "x", "--layers", "2", "--budget-gb", "1"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["quantize", tiny["model"], "--out", "x", "--order", "depth,1"]) == 2  # argparse usage error
    assert main(["quantize", tiny["model"], "--out", "x", "--layers", "2"]) == 2
    assert "--allocate entropy" in capsys.readouterr().err
    assert main(["quantize", tiny["model"], "--out", "x", "--budget-gb", "1", "--formats", "gptq4-g128,nope"]) == 2
    assert "unknown format 'nope'" in capsys.readouterr().err
    with pytest.raises(LuqError, match="layers 0..5"):
        layer_order((0, 9), [1.0] * N_LAYERS)


def test_binary_search_matches_an_exhaustive_scan():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 40)
        values = sorted(rng.uniform(0, 10) for _ in range(n + 1))  # metric grows with k (lower is better)
        max_drop = rng.uniform(0, 12)
        exhaustive = max(k for k in range(n + 1) if values[k] - values[0] <= max_drop)
        binary, steps = threshold_search(lambda k: values[k], n, max_drop, higher_is_better=False)
        greedy, _ = threshold_search(lambda k: values[k], n, max_drop, higher_is_better=False, search="greedy")
        assert binary == greedy == exhaustive
        assert len(steps) <= n.bit_length() + 2


def test_threshold_search_on_the_model_logs_every_k(tiny):
    report = run(tiny, "threshold", max_drop=0.0, search="greedy")
    steps = report["search"]
    assert steps[0]["n_low_layers"] == 0 and steps[0]["drop"] == 0.0
    assert report["n_low_layers"] == max(s["n_low_layers"] for s in steps if s["ok"])
    assert all(s["ok"] for s in steps if s["n_low_layers"] <= report["n_low_layers"])


def test_load_forward_equals_the_in_memory_quantized_model(tiny, by_layers):
    out = tiny["root"] / "layers2"
    lines = []
    loaded, tokenizer, _ = luq.load(out, log=lines.append)
    # luq.load and the report say which kernel serves each format (2 BiLLM layers of 6, 7 linears each)
    kernels = {"gptq4-g128": {"int4": 28}, "billm": {"binary": 14}}
    assert loaded.luq_kernels == kernels and by_layers["kernels"]["by_format"] == kernels
    assert lines == ["kernels: billm: binary x14; gptq4-g128: int4 x28"]
    model, _, adapter = load_model(tiny["model"])
    for p in model.parameters():  # the artifact stores unquantized tensors in float16
        p.data = p.data.half().float()
    cache = VariantCache(tiny["cache"], {})
    (cache.dir,) = [p.parent for p in tiny["cache"].glob("*/key.json")  # every run here shares one key
                    if "final" not in json.loads(p.read_text())]
    plan = entropy_plan(by_layers["order"], 2, linear_names(model, adapter), "gptq4-g128", "billm")
    Assembly(model, adapter, cache, "cpu").apply(plan)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    generated = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


def test_corrupt_partial_or_newer_artifacts_are_refused(tiny, by_layers, tmp_path):
    import shutil

    src = tiny["root"] / "layers2"
    for case in ("truncated", "edited", "no-manifest", "newer"):
        bad = tmp_path / case
        shutil.copytree(src, bad)
        weights = bad / "model.safetensors"
        if case == "truncated":
            weights.write_bytes(weights.read_bytes()[:-1000])
            message = "corrupt or partial artifact.*model.safetensors is"
        elif case == "edited":
            data = bytearray(weights.read_bytes())
            data[-10] ^= 0xFF
            weights.write_bytes(bytes(data))
            message = "does not match its checksum"
        elif case == "no-manifest":
            (bad / MANIFEST).unlink()
            message = "not a complete luq artifact"
        else:
            manifest = json.loads((bad / MANIFEST).read_text())
            manifest["format_version"] = 99
            (bad / MANIFEST).write_text(json.dumps(manifest))
            message = "newer luq"
        with pytest.raises(LuqError, match=message):
            luq.load(bad)


def test_a_killed_run_resumes_from_the_cache_and_gives_the_same_artifact(tiny, tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "luq.cli", "quantize", tiny["model"], "--layers", "2", "--allocate", "entropy",
            "--samples", "4",
            "--seq-len", "64", "--k", "8", "--cache-dir", str(cache)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cache.glob("*/layer_0001/*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted({p.parent.name for p in cache.glob("*/layer_*/*.safetensors")})
    assert 2 <= len(done_before) < N_LAYERS
    assert not (tmp_path / "killed").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*/layer_*/*.safetensors")}
    config = luq.LUQConfig(calibration=CALIBRATION, kmeans_clusters=8, n_low_layers=2, allocate="entropy")  # final pass on, as the CLI
    for out, cache_root in (("resumed", cache), ("fresh", tmp_path / "cache2")):
        luq.quantize(tiny["model"], tmp_path / out, config, cache_dir=cache_root, progress=False, log=lambda s: None)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # cached layers were not redone
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    luq.load(tmp_path / "resumed")


def test_size_table_counts_every_linear_in_its_format():
    sizes = SizeTable(base_bytes=100, linears={
        "l0.a": LinearSizes(0, 40, {"hi": 20, "lo": 15}, {"hi": 4.0, "lo": 1.1}),
        "l0.b": LinearSizes(0, 40, {"hi": 20, "lo": 15}, {"hi": 4.0, "lo": 1.1}),
        "l1.a": LinearSizes(1, 80, {"hi": 40, "lo": 25}, {"hi": 4.0, "lo": 1.1})})
    plan = entropy_plan([1, 0], 1, [["l0.a", "l0.b"], ["l1.a"]], "hi", "lo")
    assert plan == {"l0.a": "hi", "l0.b": "hi", "l1.a": "lo"}
    assert sizes.total_bytes(plan) == 100 + 20 + 20 + 25
    plan_for_k = lambda k: entropy_plan([1, 0], k, [["l0.a", "l0.b"], ["l1.a"]], "hi", "lo")  # noqa: E731
    assert smallest_fitting_k(sizes, plan_for_k, 2, 166) == 1
    assert sizes.avg_bits(plan_for_k(2)) == pytest.approx(8 * 55 / 160)
    assert sizes.nominal_avg_bits(plan) == pytest.approx((4.0 * 80 + 1.1 * 80) / 160)


def test_final_pass_requantizes_sequentially_and_counts_its_own_bytes(tiny, by_layers):
    report = run(tiny, "final", n_low_layers=2, final_pass=True)
    assert report["final_pass"] and report["low_layers"] == by_layers["low_layers"]
    out = tiny["root"] / "final"
    assert stored_tensor_bytes(out) == report["total_bytes"]
    final, tokenizer, _ = luq.load(out)
    cached, _, _ = luq.load(tiny["root"] / "layers2")  # the same plan from the full-precision-chain cache
    # layer 0 sees the same inputs either way; every later layer's Hessians come from the quantized chain
    def packed(model, i):
        tensors = model.model.layers[i].mlp.down_proj.quantized_weight.state_dict().values()
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])

    assert torch.equal(packed(final, 0), packed(cached, 0))
    changed = [i for i in range(1, N_LAYERS) if not torch.equal(packed(final, i), packed(cached, i))]
    assert changed == list(range(1, N_LAYERS))
    ids = tokenizer("A short sentence.", return_tensors="pt").input_ids
    assert torch.isfinite(final(input_ids=ids).logits).all()


def test_a_llava_with_image_calibration_and_a_vqa_threshold(tmp_path):
    from tiny_models import tiny_llava_dir

    model_dir = tiny_llava_dir(tmp_path / "llava")
    calibration = CalibrationConfig(alpha=0.5, samples=4, seq_len=160)
    config = luq.LUQConfig(calibration=calibration, kmeans_clusters=8, max_drop=0.0, metric="pope", search="greedy",
                           final_pass=False, allocate="entropy")
    report = luq.quantize(model_dir, tmp_path / "q", config, cache_dir=tmp_path / "cache", progress=False,
                          log=lambda s: None)
    assert report["family"] == "llava" and report["metric"] == "pope"
    assert report["tokens"]["image"] > 0 and None not in report["image_entropy"]
    assert all(0 <= s["value"] <= 1 for s in report["search"])
    assert stored_tensor_bytes(tmp_path / "q") == report["total_bytes"]  # vision tower and projector included
    model, processor, adapter = luq.load(tmp_path / "q")
    assert adapter.family == "llava" and hasattr(model.model, "vision_tower")
    with pytest.raises(LuqError, match="unknown metric"):
        luq.quantize(model_dir, tmp_path / "x", luq.LUQConfig(calibration=calibration, kmeans_clusters=8, max_drop=1.0,
                                                              metric="bleu"), cache_dir=tmp_path / "cache",
                     progress=False, log=lambda s: None)


def test_a_large_artifact_is_sharded_and_loads_the_same(tiny, by_layers, tmp_path):
    from luq.artifact import write_artifact

    src = tiny["root"] / "layers2"
    model, tokenizer, _ = luq.load(src)
    qconfig = json.loads((src / "config.json").read_text())["quantization_config"]
    report = json.loads((src / REPORT).read_text())
    written = write_artifact(tmp_path / "sharded", model, tokenizer, qconfig, report, torch.float16,
                             max_shard_bytes=1_000_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert written == report["total_bytes"] == stored_tensor_bytes(tmp_path / "sharded")
    again, _, _ = luq.load(tmp_path / "sharded")
    ids = tokenizer("Sharded weights load the same.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_menu_names_and_the_hint_below_gptq3(tiny):
    """`--formats default,compact` names the two menus; a measured budget below a GPTQ-3 decoder's size
    without the compact formats gets one hint line, and none once they are in the menu or above it."""
    from luq.assembly import size_bounds
    from luq.plan.choose import compact_hint
    from luq.quant import COMPACT_MENU, DEFAULT_MENU, parse_formats
    from luq.quant.formats import MENUS
    assert parse_formats("default,compact") == DEFAULT_MENU + COMPACT_MENU
    assert parse_formats("gptq3-g128,default") == ("gptq3-g128",) + tuple(f for f in DEFAULT_MENU if f != "gptq3-g128")
    assert set(MENUS) == {"default", "compact", "ggml", "clip"}
    with pytest.raises(LuqError, match="twice"):
        parse_formats("default,default")
    net, _, adapter = load_model(str(tiny["model"]), "cpu", torch.float32)
    bounds = size_bounds(net, adapter, ["gptq3-g128"], torch.float16)
    gptq3 = bounds[0]

    def hint(budget_bytes, formats=None):
        config = luq.LUQConfig(calibration=CALIBRATION, budget_gb=budget_bytes / 1e9, formats=formats)
        return compact_hint(config, bounds)
    assert hint(0.9 * gptq3).startswith("hint:") and "--formats default,compact" in hint(0.9 * gptq3)
    assert hint(1.1 * gptq3) is None
    assert hint(0.9 * gptq3, parse_formats("default,compact")) is None


def test_a_model_that_ran_writes_the_same_artifact(tiny, by_layers):
    """After a forward the QuantLinears have handed their stored tensors to their kernels (where these can
    give them back); writing the model again rebuilds them: the same tensors, dtypes and bytes as the
    artifact it was loaded from."""
    import json as json_
    from safetensors.torch import load_file
    from luq.quant import QuantLinear
    from luq.artifact import write_artifact
    src = tiny["root"] / "layers2"
    model, processor, *_ = luq.load(str(src), dtype=torch.float16)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    handed = [bool(m.handed_over) for m in model.modules() if isinstance(m, QuantLinear)]
    assert any(handed), handed   # (the tiny model's narrow linears keep theirs: rows the int4 packing refuses)
    qc = json_.loads((src / "config.json").read_text())["quantization_config"]
    write_artifact(tiny["root"] / "resaved", model, processor, qc, by_layers, torch.float16)

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    before, after = tensors(src), tensors(tiny["root"] / "resaved")
    assert set(before) == set(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)


def test_each_cached_variant_says_where_it_was_solved(tiny, by_layers):
    """The cache keys a result by the format's settings only; the file records the thread count and CPU
    that solved it (BiLLM's results differ in rounding between them: docs/results.md, section 3)."""
    files = [f for f in tiny["cache"].rglob("*.safetensors")]
    assert files
    with safe_open(str(files[0]), framework="pt") as f:
        solved = json.loads(f.metadata()["luq"])["solved_on"]
    assert solved["threads"] >= 1 and solved["torch"] == torch.__version__ and solved["cpu"]


def test_variant_cache_reads_a_file_once_and_refuses_torn_or_foreign_ones(tmp_path):
    """A cached layer comes back whole (metadata and tensors from one open); a file of other weights is
    None; a torn file is None with one warning (it is then recomputed)."""
    import warnings

    from luq.quant import get_format
    from luq.variants import FormatResult, VariantCache

    fmt = get_format("rtn4-g64")
    q = fmt.quantize(torch.randn(64, 128), None)
    cache = VariantCache(tmp_path, {"model": "test"})
    cache.save(3, fmt, FormatResult(fmt.name, {"mlp.up_proj": q}, {"mlp.up_proj": FormatResult.record_of(q, 0.1)}, 1.5),
               layer_digest="abc")
    got = cache.load(3, fmt, layer_digest="abc")
    assert torch.equal(got.weights["mlp.up_proj"].dequantize(), q.dequantize()) and got.seconds == 1.5
    assert cache.record(3, fmt, layer_digest="abc").records["mlp.up_proj"]["error"] == 0.1
    assert cache.load(3, fmt, layer_digest="other") is None and cache.record(3, fmt, layer_digest="other") is None
    assert cache.load(4, fmt) is None   # absent
    path = cache.path(3, fmt)
    path.write_bytes(path.read_bytes()[:40])   # torn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load(3, fmt, layer_digest="abc") is None
    assert len(caught) == 1 and "unreadable cache file" in str(caught[0].message)
