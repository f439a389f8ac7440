"""`quantize`: a whole run, from MODEL to a written artifact (DESIGN.md's data flow).

checks that need no quantization (paths, the reachable sizes) -> calibration -> one
layer-by-layer pass (entropy + every linear in every format of the menu, into the
variant cache) -> sensitivity of each (linear, format) (measured allocation) -> the plan
(luq.plan: knapsack, or the paper's entropy rule) -> the sequential final pass of the
plan -> assembly -> artifact + report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from luq import __version__
from luq.assembly import Assembly, linear_names, size_bounds, size_table
from luq.checks import check_out_dir, check_run
from luq.calibration import calibration_batches, sensitivity_batches, text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.errors import LuqError
from luq.models import Adapter, Unit, outside_units
from luq.models.loading import can_stream, check_device, load_model, parse_dtype
from luq.pipeline import layer_pass, outside_pass
from luq.plan import (KEEP, Plan, SizeTable, entropy_plan, knapsack, lagrangian_bound, layer_order, layer_plan,
                      smallest_budget_within, smallest_fitting_k, threshold_search, uniform_plan)
from luq.quant.embedding import QuantEmbedding, TiedQuantHead
from luq.quant.linear import QuantLinear, kernel_line
from luq.quant.formats import COMPACT_MENU, get_format
from luq.report import build_report, kernel_report
from luq.sensitivity import measure_sensitivity, output_kl, reference_log_probs
from luq.store import write_artifact
from luq.variants import VariantCache, model_fingerprint, settings_digest


def higher_is_better(metric: str) -> bool:
    """Perplexity goes down as a model gets better; every VQA task's score goes up."""
    from luq.eval.datasets import known_tasks

    if metric == "perplexity":
        return False
    if metric in known_tasks():
        return True
    raise LuqError(f"unknown metric {metric!r}; known: perplexity, {', '.join(known_tasks())}")


def metric_scorer(metric: str, model, processor, config: LUQConfig) -> Callable[[], float]:
    """score(): the metric of `model` as it stands. perplexity: held-out text windows disjoint
    from the calibration and sensitivity windows. A VQA task (textvqa, pope, ...): its score
    on `config.metric_data` (default: the bundled sample)."""
    higher_is_better(metric)
    if metric == "perplexity":
        from luq.eval.perplexity import token_window_perplexity

        cal = config.calibration
        windows = validation_windows(text_token_ids(processor, cal.text), config.validation_samples, cal.seq_len,
                                     cal.seed, cal.n_text)
        return lambda: token_window_perplexity(model, windows)
    from luq.eval.datasets import load_samples
    from luq.eval.runner import EvalConfig, evaluate

    if not hasattr(processor, "image_processor"):
        raise LuqError(f"--metric {metric} needs a vision-language model; use --metric perplexity")
    samples = load_samples(metric, config.metric_data)
    return lambda: evaluate(model, processor, EvalConfig(task=metric), samples).score


def plan_evaluator(score: Callable[[], float], assembly: Assembly) -> Callable[[Plan], float]:
    """evaluate(plan): the metric of the model with `plan` assembled (then taken out again)."""
    def evaluate(plan: Plan) -> float:
        assembly.apply(plan)
        try:
            return score()
        finally:
            assembly.undo()
    return evaluate


def variant_cache(net: nn.Module, config: LUQConfig, cache_dir: Path | str | None = None,
                  chain_format: str | None = None) -> VariantCache:
    """The cache directory for this model, calibration and Hessian source (formats are keyed
    per file inside it, so any menu shares it)."""
    from luq.assets import cache_root

    key = {"model": model_fingerprint(net), "calibration": asdict(config.calibration), "hessians": config.hessians}
    if config.hessians == "sequential":
        key["chain"] = get_format(chain_format).settings()
    return VariantCache(Path(cache_dir) if cache_dir else cache_root() / "variants", key)


def check_reachable(net, adapter, config: LUQConfig, storage_dtype: torch.dtype,
                    units: dict[str, Unit] | None = None) -> tuple[int, int] | None:
    """The least and most bytes any plan of this menu can reach, known before quantizing; a budget
    below the least is refused now, with the smallest reachable size."""
    units = units or {}
    bounds = size_bounds(net, adapter, list(config.menu()), storage_dtype, units,
                         list(config.unit_menu()) if units else [])
    if bounds is not None and config.budget_gb is not None and bounds[0] > config.budget_gb * 1e9:
        kept = [k for k in ("embed", "head", "vision") if k not in config.outside_kinds()]
        raise LuqError(f"no configuration fits {config.budget_gb:.4g} GB: the smallest reachable with formats "
                       f"{','.join(config.menu())} is {bounds[0] / 1e9:.4g} GB ({bounds[0]:,} bytes)"
                       + (f", with {','.join(kept)} kept unquantized" if kept else ""))
    return bounds


def compact_hint(net, adapter, config: LUQConfig, storage_dtype: torch.dtype,
                 units: dict[str, Unit] | None = None) -> str | None:
    """One line for a measured budget below the uniform GPTQ-3 g128 decoder's size (the other units at
    their smallest) whose menu has none of the compact 1-bit formats: there they lower the perplexity
    many times over (SmolLM2 at 2.5 true bits: 92.6 against 19,595; docs/results.md, section 3)."""
    if config.budget_gb is None or config.allocate != "measured" or set(config.menu()) & set(COMPACT_MENU):
        return None
    units = units or {}
    gptq3 = size_bounds(net, adapter, ["gptq3-g128"], storage_dtype, units, list(config.unit_menu()) if units else [])
    if gptq3 is None or config.budget_gb * 1e9 >= gptq3[0]:
        return None
    return (f"hint: {config.budget_gb:.4g} GB is below a GPTQ-3 g128 decoder ({gptq3[0] / 1e9:.4g} GB); "
            "the compact 1-bit formats do far better there: --formats default,compact")


def quantize(model: str | None, out: Path | str, config: LUQConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32, cache_dir: Path | str | None = None,
             progress: bool = True, log: Callable[[str], None] = print, stream: bool | None = None) -> dict:
    """Quantize MODEL and write the artifact to `out`; returns the report.

    device/dtype: where and in what precision calibration and the solvers run (the
    solvers always work in float32). cache_dir: the variant cache root (default
    $LUQ_CACHE/variants); a rerun after an interruption resumes from it. stream: read the
    decoder layers from the safetensors shards one at a time (memory: one layer); default:
    whenever MODEL has safetensors and no stage needs the whole model in memory (the threshold
    rule's evaluations on a VQA metric do; perplexity is scored layer by layer).
    """
    t_start = time.perf_counter()
    check_out_dir(Path(out))
    check_device(device)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    storage_dtype = parse_dtype(config.storage_dtype)
    layerwise_metric = config.max_drop is None or config.metric == "perplexity"  # scored layer by layer
    if stream is None:
        stream = layerwise_metric and can_stream(model)
    elif stream and not layerwise_metric:
        raise LuqError(f"--max-drop with --metric {config.metric} evaluates the whole model in memory: it does "
                       "not stream; use --metric perplexity or --budget-gb to stream")
    net, processor, adapter = load_model(model, device, dtype, stream=stream)
    check_run(config, len(adapter.decoder_layers(net)), processor, adapter)
    menu = list(config.menu())
    formats = [get_format(name) for name in menu]
    units = outside_units(net, adapter, config.outside_kinds())
    unit_formats = [get_format(name) for name in config.unit_menu()] if units else []
    check_reachable(net, adapter, config, storage_dtype, units)
    hint = compact_hint(net, adapter, config, storage_dtype, units)
    if hint:
        log(hint)
    batches = calibration_batches(processor, adapter, config.calibration)
    has_rule = config.budget_gb is not None or config.max_drop is not None
    measured = config.allocate == "measured" and (len(menu) > 1 or (bool(units) and has_rule))
    sens_batches = (sensitivity_batches(processor, adapter, config.calibration, config.sensitivity_samples,
                                        config.validation_samples) if config.allocate == "measured" else None)
    cache = variant_cache(net, config, cache_dir, chain_format=menu[0])
    log(f"variant cache: {cache.dir}")
    passed = layer_pass(net, adapter, batches, formats=formats, cache=cache, hessians=config.hessians,
                        k=config.k_means, device=device, subsample=config.subsample, seed=config.calibration.seed,
                        progress=progress, desc="quantize", offload_dir=config.offload_dir)
    seconds = {"layer_pass": round(time.perf_counter() - t_start, 1)}
    if units:
        t0 = time.perf_counter()
        log(f"quantizing {len(units)} units outside the decoder ({', '.join(sorted({u.kind for u in units.values()}))})"
            f" in {len(unit_formats)} formats")
        passed["outside"] = outside_pass(net, adapter, batches, units, unit_formats, cache, device)
        seconds["outside_pass"] = round(time.perf_counter() - t0, 1)
    names = linear_names(net, adapter)
    sizes = size_table(net, adapter, passed["layers"], storage_dtype, passed.get("outside"), units)
    costs = None
    if measured:
        t0 = time.perf_counter()
        costs = measure_sensitivity(net, adapter, sens_batches, cache, formats, units=units,
                                    unit_formats=unit_formats, device=device, seed=config.calibration.seed,
                                    progress=progress)
        costs.update({name: {**c, KEEP: 0.0} for name, c in costs.items() if name in units})
        seconds["sensitivity"] = round(time.perf_counter() - t0, 1)
    reference = reference_log_probs(net, sens_batches) if sens_batches is not None else None

    decision = choose_plan(net, processor, adapter, config, cache, passed, sizes, costs, names, device, log, units)
    plan = decision["plan"]

    source, final_pass_used = cache, False
    if config.final_pass:
        log("final pass: re-quantizing the chosen plan sequentially")
        t0 = time.perf_counter()
        final_cache = VariantCache(cache.dir.parent, dict(cache.key, final=settings_digest(plan)))
        final = layer_pass(net, adapter, batches, plan_of_layer=lambda i: layer_plan(plan, adapter.layer_prefix(i)),
                           cache=final_cache, hessians="sequential", device=device, progress=progress,
                           desc="final pass", entropy=False, offload_dir=config.offload_dir)
        # BiLLM's stored size depends on how many salient columns it picks: count the final bytes
        final_sizes = _with_final(sizes, size_table(net, adapter, final["layers"], storage_dtype))
        if config.budget_gb is not None and final_sizes.total_bytes(plan) > config.budget_gb * 1e9:
            log(f"the final pass would make the model {final_sizes.total_bytes(plan):,} bytes, over the budget; "
                "keeping the cached configuration, which fits")
        else:
            sizes, source, final_pass_used = final_sizes, final_cache, True
            passed = dict(passed, final_layers=final["layers"])
        seconds["final_pass"] = round(time.perf_counter() - t0, 1)
    Assembly(net, adapter, [source, cache], device, units=units).apply(plan)
    if reference is not None:
        decision["measured_cost"] = output_kl(net, sens_batches, reference)
    report = build_report(model, net, adapter, config, passed, sizes, plan, decision, costs)
    report["kernels"] = kernel_report(net, adapter, plan, device)
    log(kernel_line(report["kernels"]["by_format"]))
    report["final_pass"] = final_pass_used
    report["seconds"] = seconds
    modules = dict(net.named_modules())
    qconfig = {"luq_version": __version__, "storage_dtype": config.storage_dtype, "allocate": config.allocate,
               "modules": {name: m.weight_config for name, m in modules.items() if isinstance(m, QuantLinear)},
               "embeddings": {name: m.weight_config for name, m in modules.items() if isinstance(m, QuantEmbedding)},
               "tied_heads": {name: next(n for n, e in modules.items() if e is m.embedding)
                              for name, m in modules.items() if isinstance(m, TiedQuantHead)},
               "plan": plan, "formats": {f: get_format(f).settings() for f in sorted(set(plan.values()) - {KEEP})}}
    written = write_artifact(Path(out), net, processor, qconfig, report, storage_dtype)
    if written != report["total_bytes"]:  # the size table and the writer must agree to the byte
        raise RuntimeError(f"artifact holds {written} tensor bytes, the size table said {report['total_bytes']}")
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    return report


def _with_final(sizes: SizeTable, final: SizeTable) -> SizeTable:
    """The size table with each decoder linear's planned format's bytes taken from the final pass
    (the units outside the decoder are not re-quantized by it)."""
    linears = {}
    for name, s in sizes.linears.items():
        f = final.linears.get(name)
        if f is None:
            linears[name] = s
            continue
        linears[name] = type(s)(s.layer, s.n_weights, {**s.bytes, **f.bytes}, {**s.nominal_bits, **f.nominal_bits})
    return SizeTable(sizes.base_bytes, linears)


def choose_plan(net, processor, adapter: Adapter, config: LUQConfig, cache: VariantCache, passed: dict,
                sizes: SizeTable, costs: dict | None, names: list[list[str]], device, log,
                units: dict[str, Unit] | None = None) -> dict:
    """The plan under the config's stopping rule, and how it was found (for the report)."""
    menu = list(config.menu())
    units = units or {}
    budget = int(config.budget_gb * 1e9) if config.budget_gb is not None else None
    if config.allocate == "entropy":
        order = layer_order(config.order, passed["entropy"], seed=config.calibration.seed)

        def plan_for_k(k: int) -> Plan:
            return {**entropy_plan(order, k, names, config.high, config.low), **{u: config.high for u in units}}

        steps = []
        if budget is not None:
            k = smallest_fitting_k(sizes, plan_for_k, len(order), budget)
        elif config.layers is not None:
            if config.layers > len(order):
                raise LuqError(f"--layers {config.layers} asked for, but the order has {len(order)} layers")
            k = config.layers
        else:
            evaluate = plan_evaluator(metric_scorer(config.metric, net, processor, config),
                                      Assembly(net, adapter, cache, device, dense=True, units=units))
            k, search = threshold_search(
                lambda kk: evaluate(plan_for_k(kk)), len(order), config.max_drop,
                higher_is_better=higher_is_better(config.metric), search=config.search,
                log=lambda s: log(f"  k = {s.k:3d}: {config.metric} {s.value:.4f} (drop {s.drop:+.4f}) "
                                  f"{'ok' if s.ok else 'too far'}"))
            steps = [asdict(s) for s in search]
        frontier = [{"k": kk, "plan": plan_for_k(kk)} for kk in range(len(order) + 1)]
        return {"plan": plan_for_k(k), "k": k, "order": order, "search": steps, "frontier": frontier}

    all_names = [n for layer in names for n in layer]
    if len(menu) == 1 and (not units or (budget is None and config.max_drop is None)):
        plan = uniform_plan(all_names + list(units), menu[0])  # every unit of the budget in the one format
        if budget is not None and sizes.total_bytes(plan) > budget:
            raise LuqError(f"the uniform {menu[0]} model is {sizes.total_bytes(plan) / 1e9:.4g} GB, over the budget")
        return {"plan": plan, "search": [], "frontier": [{"plan": plan}]}

    smallest = sizes.total_bytes(sizes.extreme_plan(menu))
    largest = sizes.total_bytes(sizes.extreme_plan(menu, largest=True))

    def plan_for_budget(b: int):
        return knapsack(sizes, costs, menu, b)

    frontier = [{"budget_bytes": int(b), "plan": plan_for_budget(int(b)).plan}
                for b in torch.linspace(smallest, largest, 12).tolist()]
    steps = []
    if budget is not None:
        result = plan_for_budget(budget)
        bound, _ = lagrangian_bound(sizes, costs, menu, budget)
    else:
        evaluate = plan_evaluator(metric_scorer(config.metric, net, processor, config),
                                  Assembly(net, adapter, cache, device, dense=True, units=units))
        reference = metric_scorer(config.metric, net, processor, config)()
        log(f"  full precision: {config.metric} {reference:.4f}")
        result, history = smallest_budget_within(
            plan_for_budget, evaluate, reference, config.max_drop, smallest, largest,
            higher_is_better=higher_is_better(config.metric),
            log=lambda s: log(f"  budget {s.budget_bytes / 1e9:.4f} GB ({s.total_bytes:,} bytes): {config.metric} "
                              f"{s.value:.4f} (drop {s.drop:+.4f}) {'ok' if s.ok else 'too far'}"))
        steps = [asdict(s) for s in history]
        bound, _ = lagrangian_bound(sizes, costs, menu, result.total_bytes)
    return {"plan": result.plan, "search": steps, "frontier": frontier, "predicted_cost": result.cost,
            "knapsack": {"cell_bytes": result.cell_bytes, "lagrangian_lower_bound": bound,
                         "gap": result.cost - bound}}
