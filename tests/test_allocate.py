"""The measured allocation (the default): the knapsack against exhaustive search, the
sensitivity estimate against the measured KL on real SmolLM2 weights, the budget, threshold
and uniform rules end to end, and the per-(linear, format) variant cache."""

import itertools
import json
import random

import pytest
import torch

import luq
from luq.assembly import Assembly, linear_names
from luq.calibration import CalibrationConfig, sensitivity_batches
from luq.cli import main
from luq.errors import LuqError
from luq.models import find_units
from luq.models.loading import load_model
from luq.plan import KEEP, LinearSizes, SizeTable, knapsack, lagrangian_bound, plan_cost
from luq.sensitivity import measure_sensitivity, output_kl, reference_log_probs
from tiny_models import smollm2_head_dir

CALIBRATION = CalibrationConfig(samples=4, seq_len=64, seed=0)
MENU = ("gptq2-g128", "gptq3-g128", "gptq4-g128", "gptq4-g32")


def random_problem(rng: random.Random, n_linears: int, n_formats: int):
    linears, costs = {}, {}
    for i in range(n_linears):
        size = rng.randint(50, 500)
        byte_counts = sorted(rng.sample(range(size, 4 * size), n_formats))
        base_cost = rng.uniform(0.1, 10)
        linears[f"l{i}"] = LinearSizes(i, size * 2, {f"f{j}": b for j, b in enumerate(byte_counts)},
                                       {f"f{j}": 2.0 + j for j in range(n_formats)})
        costs[f"l{i}"] = {f"f{j}": base_cost / (1 + j + rng.random()) for j in range(n_formats)}
    return SizeTable(base_bytes=rng.randint(0, 1000), linears=linears), costs


def test_knapsack_finds_the_exhaustive_optimum():
    rng = random.Random(0)
    for trial in range(60):
        sizes, costs = random_problem(rng, rng.randint(1, 5), rng.randint(2, 4))
        formats = sorted(sizes.formats())
        plans = [dict(zip(sizes.names, combo)) for combo in itertools.product(formats, repeat=len(sizes.names))]
        lo = min(sizes.total_bytes(p) for p in plans)
        hi = max(sizes.total_bytes(p) for p in plans)
        budget = rng.randint(lo, hi)
        best = min((p for p in plans if sizes.total_bytes(p) <= budget), key=lambda p: plan_cost(p, costs))
        result = knapsack(sizes, costs, formats, budget)
        assert result.cell_bytes == 1  # these ranges fit the grid exactly, so the DP is exact
        assert result.total_bytes <= budget
        assert result.cost == pytest.approx(plan_cost(best, costs))
        bound, feasible = lagrangian_bound(sizes, costs, formats, budget)
        assert bound <= result.cost + 1e-9
        assert feasible is None or feasible.cost >= result.cost - 1e-9


def test_knapsack_on_a_coarse_grid_still_fits_and_refuses_the_impossible():
    rng = random.Random(1)
    sizes, costs = random_problem(rng, 200, 4)
    formats = sorted(sizes.formats())
    smallest = sizes.total_bytes(sizes.extreme_plan(formats))
    largest = sizes.total_bytes(sizes.extreme_plan(formats, largest=True))
    budget = (smallest + largest) // 2
    coarse = knapsack(sizes, costs, formats, budget, grid_cells=500)
    fine = knapsack(sizes, costs, formats, budget)
    assert coarse.cell_bytes > 1 and coarse.total_bytes <= budget and fine.total_bytes <= budget
    bound, _ = lagrangian_bound(sizes, costs, formats, budget)
    assert bound <= fine.cost <= coarse.cost
    assert (fine.cost - bound) / fine.cost < 0.01  # the DP on the default grid is within 1% of the bound
    with pytest.raises(LuqError, match=f"smallest reachable with formats .* is .*{smallest:,} bytes"):
        knapsack(sizes, costs, formats, smallest - 1)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real SmolLM2 weights, first 4 layers; every linear in every format of MENU."""
    root = tmp_path_factory.mktemp("allocate")
    model_dir = smollm2_head_dir(root / "model", layers=4)
    return {"model": model_dir, "root": root, "cache": root / "cache"}


def run(real, out, **kw):
    config = luq.LUQConfig(calibration=CALIBRATION, kmeans_clusters=8, sensitivity_samples=2,
                           **{"final_pass": False, "formats": MENU, **kw})
    return luq.quantize(real["model"], real["root"] / out, config, cache_dir=real["cache"], progress=False,
                        log=lambda s: None)


@pytest.fixture(scope="module")
def uniform3(real):
    return run(real, "uniform3", formats=("gptq3-g128",), measure_kl=True)


def test_one_format_makes_the_uniform_model(real, uniform3):
    assert {info["format"] for info in uniform3["linears"].values()} == {"gptq3-g128"}
    assert uniform3["allocate"] == "measured" and uniform3["predicted_cost"] is None
    assert uniform3["measured_cost"] > 0


def test_sensitivity_predicts_the_measured_kl_of_each_linear(real, uniform3):
    """The per-token Fisher estimate against the KL measured by swapping each (linear, format)
    into the full-precision model alone, on the same held-out windows."""
    from scipy.stats import spearmanr

    from luq.session import variant_cache
    from luq.quant import get_format

    net, tokenizer, adapter = load_model(real["model"])
    config = luq.LUQConfig(calibration=CALIBRATION, formats=MENU, budget_gb=1.0)
    cache = variant_cache(net, config, real["cache"])
    batches = sensitivity_batches(tokenizer, adapter, CALIBRATION, 2, config.validation_samples)
    formats = [get_format(f) for f in ("gptq2-g128", "gptq3-g128", "gptq4-g128")]
    luq.quantize(real["model"], real["root"] / "fill", luq.LUQConfig(calibration=CALIBRATION, kmeans_clusters=8,
                 formats=MENU, budget_gb=1.0, final_pass=False, sensitivity_samples=2), cache_dir=real["cache"],
                 progress=False, log=lambda s: None)
    units = find_units(net, adapter)  # the tied embedding (and head), in the same cache
    predicted = measure_sensitivity(net, adapter, batches, cache, formats, units=units, unit_formats=formats,
                                    progress=False)
    reference = reference_log_probs(net, batches, dtype=torch.float32)
    assembly = Assembly(net, adapter, cache, "cpu", dense=True, units=units)
    names = [n for layer in linear_names(net, adapter) for n in layer[::2]]  # q, v, gate, down of each layer
    pairs = {}
    for name in names + list(units):
        for fmt in formats:
            assembly.apply({name: fmt.name})
            pairs[name, fmt.name] = (predicted[name][fmt.name], output_kl(net, batches, reference))
            assembly.undo()
    values = list(pairs.values())
    rho = spearmanr([p for p, _ in values], [m for _, m in values]).statistic
    print(f"spearman {rho:.3f} over {len(values)} (unit, format) pairs; median predicted/measured "
          f"{sorted(p / m for p, m in values)[len(values) // 2]:.3f}; tied embedding: "
          + ", ".join(f"{f} {pairs['model.embed_tokens', f][0]:.4g}/{pairs['model.embed_tokens', f][1]:.4g}"
                      for f in (fmt.name for fmt in formats)))
    assert rho > 0.9, rho
    ratios = [p / m for p, m in values if m > 1e-6]
    assert 0.2 < sorted(ratios)[len(ratios) // 2] < 5  # the estimate is on the KL's scale
    for fmt in formats:  # the tied embedding's logit-Fisher + lookup estimate too
        p, m = pairs["model.embed_tokens", fmt.name]
        assert 0.2 < p / m < 5, (fmt.name, p, m)


def test_budget_mode_fits_beats_uniform_and_counts_every_byte(real, uniform3):
    report = run(real, "budget", budget_gb=uniform3["total_bytes"] / 1e9)
    assert report["total_bytes"] <= uniform3["total_bytes"]
    out = real["root"] / "budget"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["allocate"] == "measured" and set(config["plan"].values()) <= set(MENU) | {KEEP}
    assert len(set(config["plan"].values())) > 1
    assert {n: i["format"] for n, i in report["linears"].items()} == config["plan"]
    assert report["knapsack"]["gap"] >= 0
    assert report["predicted_cost"] == pytest.approx(sum(i["predicted_cost"] for i in report["linears"].values()))
    assert report["measured_cost"] < uniform3["measured_cost"]  # the point of measuring: less KL at the same bytes
    loaded, tokenizer, _ = luq.load(out)
    from luq.artifact import REPORT
    assert json.loads((out / REPORT).read_text())["total_bytes"] == report["total_bytes"]


def test_adding_a_format_reuses_every_cached_one(real, uniform3):
    files = {p: p.stat().st_mtime_ns for p in real["cache"].glob("*/layer_*/gptq3-g128-*.safetensors")}
    assert files
    run(real, "more", formats=("gptq3-g128", "gptq3-g64"), budget_gb=uniform3["total_bytes"] / 1e9)
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())
    assert list(real["cache"].glob("*/layer_0000/gptq3-g64-*.safetensors"))


def test_threshold_mode_evaluates_real_models_over_budgets(real):
    from luq.session import metric_scorer

    net, tokenizer, _ = load_model(real["model"])
    full_precision = metric_scorer("perplexity", net, tokenizer, luq.LUQConfig(calibration=CALIBRATION,
                                                                               budget_gb=1.0))()
    max_drop = 0.05 * full_precision  # the cut model's perplexity is huge: allow 5% of it
    report = run(real, "threshold", max_drop=max_drop)
    steps = report["search"]
    assert len(steps) >= 3 and all(s["ok"] == (s["drop"] <= max_drop) for s in steps)
    assert not all(s["ok"] for s in steps)  # the search met budgets too small to pass
    ok = [s for s in steps if s["ok"]]
    assert report["total_bytes"] == min(s["total_bytes"] for s in ok)


def test_paths_and_sizes_are_refused_before_any_work(real, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = tmp_path / "cache"
    code = main(["quantize", real["model"], "--out", str(blocker / "out"), "--budget-gb", "1",
                 "--cache-dir", str(cache)])
    assert code == 2 and "is a file, not a directory" in capsys.readouterr().err
    code = main(["quantize", real["model"], "--out", str(tmp_path / "o"), "--budget-gb", "0.001",
                 "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "smallest reachable with formats gptq2-g32" in errors[0]
    assert not cache.exists()
