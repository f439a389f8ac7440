"""`quantize`: a whole LUQ run, from MODEL to a written artifact (DESIGN.md's data flow).

calibration -> one layer-by-layer pass (entropy + every layer quantized both ways, into
the variant cache) -> order -> k by budget, threshold or count -> assemble from the
cache (or re-quantize the chosen configuration sequentially) -> artifact + report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from luq import __version__
from luq.calibration import calibration_batches, text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.errors import LuqError
from luq.models import Adapter, quantizable_linears
from luq.models.loading import load_model, parse_dtype
from luq.pipeline import DEFAULT_K_GRID, layer_pass
from luq.plan import HIGH, LOW, SizeModel, assignment, layer_order, smallest_fitting_k, threshold_search
from luq.quant.linear import replace_linears, restore_linears
from luq.store import stored_bytes, write_artifact
from luq.variants import VariantCache, model_fingerprint

def quantized_weight_names(model: nn.Module, adapter: Adapter) -> dict[str, str]:
    """Full state-dict name of every quantized weight -> its module name."""
    out = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(i)
        for name in quantizable_linears(layer):
            out[f"{prefix}{name}.weight"] = f"{prefix}{name}"
    return out


def size_model(model: nn.Module, adapter: Adapter, layers: list[dict], storage_dtype: torch.dtype) -> SizeModel:
    """Exact artifact bytes for any assignment, from the FP model and the cached variants."""
    base = stored_bytes(model, storage_dtype, exclude=set(quantized_weight_names(model, adapter)))
    variants = layers[0]["bytes"].keys()
    return SizeModel(base_bytes=base,
                     layer_bytes={v: [layer["bytes"][v] for layer in layers] for v in variants},
                     n_weights=[layer["n_weights"] for layer in layers],
                     nominal_bits={v: [layer["nominal_bits"][v] for layer in layers] for v in variants})


class Assembly:
    """Puts a candidate configuration into the model from variant caches, and takes it out.

    `caches`: one cache or several (each variant is read from the first cache holding it).
    dense=True puts in plain nn.Linear modules holding the dequantized weights instead of
    QuantLinear: the same weights, without unpacking them at every forward (for the
    many evaluations of a search; the artifact always gets QuantLinear).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, caches: VariantCache | list[VariantCache], device,
                 dtype=None, dense: bool = False):
        self.model, self.adapter, self.device, self.dtype, self.dense = model, adapter, device, dtype, dense
        self.caches = caches if isinstance(caches, list) else [caches]
        self._replaced: dict[int, dict] = {}

    def _weights(self, index: int, variant: str) -> dict:
        for cache in self.caches:
            cached = cache.load(index, device=self.device)
            if cached is not None and variant in cached.weights:
                return cached.weights[variant]
        raise LuqError(f"layer {index} has no {variant!r} variant in {', '.join(str(c.dir) for c in self.caches)}")

    def apply(self, variants: list[str]) -> None:
        self.undo()
        for i, layer in enumerate(self.adapter.decoder_layers(self.model)):
            self._replaced[i] = replace_linears(layer, self._weights(i, variants[i]), dtype=self.dtype,
                                                dense=self.dense)

    def undo(self) -> None:
        layers = self.adapter.decoder_layers(self.model)
        for i, replaced in self._replaced.items():
            restore_linears(layers[i], replaced)
        self._replaced = {}


def higher_is_better(metric: str) -> bool:
    """Perplexity goes down as a model gets better; every VQA task's score goes up."""
    from luq.eval.datasets import known_tasks

    if metric == "perplexity":
        return False
    if metric in known_tasks():
        return True
    raise LuqError(f"unknown metric {metric!r}; known: perplexity, {', '.join(known_tasks())}")


def _evaluator(metric: str, model, processor, config: LUQConfig, assembly: Assembly, order: list[int],
               n_layers: int, device) -> Callable[[int], float]:
    """evaluate(k): the metric of the model with the first k layers of `order` at low bit.

    perplexity: held-out text windows disjoint from the calibration windows. A VQA task
    (textvqa, pope, ...): its score on `config.metric_data` (default: the bundled sample).
    """
    higher_is_better(metric)
    if metric == "perplexity":
        from luq.eval.perplexity import token_window_perplexity

        cal = config.calibration
        windows = validation_windows(text_token_ids(processor, cal.text), config.validation_samples, cal.seq_len,
                                     cal.seed, cal.n_text)

        def score() -> float:
            return token_window_perplexity(model, windows)
    else:
        from luq.eval.datasets import load_samples
        from luq.eval.runner import EvalConfig, evaluate

        if not hasattr(processor, "image_processor"):
            raise LuqError(f"--metric {metric} needs a vision-language model; use --metric perplexity")
        samples = load_samples(metric, config.metric_data)

        def score() -> float:
            return evaluate(model, processor, EvalConfig(task=metric), samples).score

    def evaluate_k(k: int) -> float:
        assembly.apply(assignment(order, k, n_layers))
        value = score()
        assembly.undo()
        return value
    return evaluate_k


def variant_cache(net: nn.Module, config: LUQConfig, solvers: dict, cache_dir: Path | str | None = None,
                  ) -> VariantCache:
    """The cache directory for this model, calibration, solvers and entropy settings."""
    from luq.assets import cache_root

    key = {"model": model_fingerprint(net), "calibration": asdict(config.calibration),
           "variants": {v: {"solver": type(s).__name__, **asdict(s)} for v, s in solvers.items()},
           "hessians": config.hessians, "k_means": config.k_means, "k_grid": DEFAULT_K_GRID,
           "subsample": config.subsample}
    return VariantCache(Path(cache_dir) if cache_dir else cache_root() / "variants", key)


def quantize(model: str | None, out: Path | str, config: LUQConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | str = torch.float32, cache_dir: Path | str | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Quantize MODEL with LUQ and write the artifact to `out`; returns the report.

    device/dtype: where and in what precision calibration and the solvers run (the
    solvers always work in float32). cache_dir: the variant cache root (default
    $LUQ_CACHE/variants); a rerun after an interruption resumes from it.
    """
    t_start = time.perf_counter()
    if config.max_drop is not None:
        higher_is_better(config.metric)  # an unknown metric fails now, not after the pass
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    storage_dtype = parse_dtype(config.storage_dtype)
    net, processor, adapter = load_model(model, device, dtype)
    batches = calibration_batches(processor, adapter, config.calibration)
    solvers = config.variants()
    cache = variant_cache(net, config, solvers, cache_dir)
    log(f"variant cache: {cache.dir}")
    passed = layer_pass(net, adapter, batches, variants=solvers, cache=cache, hessians=config.hessians,
                        k=config.k_means, device=device, subsample=config.subsample, seed=config.calibration.seed,
                        progress=progress, desc="quantize", offload_dir=config.offload_dir)
    t_pass = time.perf_counter()
    n = len(passed["layers"])
    sizes = size_model(net, adapter, passed["layers"], storage_dtype)
    order = layer_order(config.order, passed["entropy"], seed=config.calibration.seed)
    steps = []
    if config.budget_gb is not None:
        k = smallest_fitting_k(sizes, order, int(config.budget_gb * 1e9))
    elif config.layers is not None:
        if config.layers > len(order):
            raise LuqError(f"--layers {config.layers} asked for, but the order has {len(order)} layers")
        k = config.layers
    else:
        evaluate = _evaluator(config.metric, net, processor, config, Assembly(net, adapter, cache, device, dense=True),
                              order, n, device)
        k, search = threshold_search(
            evaluate, len(order), config.max_drop, higher_is_better=higher_is_better(config.metric),
            search=config.search,
            log=lambda s: log(f"  k = {s.k:3d}: {config.metric} {s.value:.4f} (drop {s.drop:+.4f}) "
                              f"{'ok' if s.ok else 'too far'}"))
        steps = [asdict(s) for s in search]
    chosen = assignment(order, k, n)
    source, final_pass_used = cache, False
    if config.final_pass:
        log(f"final pass: re-quantizing the chosen configuration (k = {k}) sequentially")
        final_cache = VariantCache(cache.dir.parent, dict(cache.key, final=chosen))
        final = layer_pass(net, adapter, batches, variants=solvers, assignment=chosen, cache=final_cache,
                           hessians="sequential", device=device, progress=progress, desc="final pass",
                           entropy=False, offload_dir=config.offload_dir)
        # BiLLM's stored size depends on how many salient columns it picks: count the final bytes
        final_layers = [_with_final(layer, f, v) for layer, f, v in zip(passed["layers"], final["layers"], chosen)]
        final_sizes = size_model(net, adapter, final_layers, storage_dtype)
        if config.budget_gb is not None and final_sizes.total_bytes(chosen) > config.budget_gb * 1e9:
            log(f"the final pass would make the model {final_sizes.total_bytes(chosen):,} bytes, over the budget; "
                "keeping the cached configuration, which fits")
        else:
            passed, sizes, source, final_pass_used = dict(passed, layers=final_layers), final_sizes, final_cache, True
    Assembly(net, adapter, source, device).apply(chosen)
    report = build_report(model, net, adapter, config, passed, sizes, order, k, chosen, steps)
    report["final_pass"] = final_pass_used
    report["seconds"] = {"layer_pass": round(t_pass - t_start, 1)}
    qconfig = {"luq_version": __version__, "storage_dtype": config.storage_dtype,
               "modules": {name: m.weight_config for name, m in net.named_modules() if hasattr(m, "weight_config")},
               "layers": [{"index": i, "variant": v, "method": report["layers"][i]["method"],
                           "settings": asdict(solvers[v])} for i, v in enumerate(chosen)]}
    written = write_artifact(Path(out), net, processor, qconfig, report, storage_dtype)
    if written != report["total_bytes"]:  # the size model and the writer must agree to the byte
        raise RuntimeError(f"artifact holds {written} tensor bytes, the size model said {report['total_bytes']}")
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    return report


def _with_final(layer: dict, final: dict, variant: str) -> dict:
    """A layer's summary with its chosen variant's figures taken from the final pass."""
    out = dict(layer)
    for key in ("bytes", "nominal_bits", "errors", "seconds"):
        out[key] = {**layer[key], variant: final[key][variant]}
    return out


def build_report(model_name, net, adapter, config: LUQConfig, passed: dict, sizes: SizeModel, order: list[int],
                 k: int, chosen: list[str], steps: list[dict]) -> dict:
    methods = {HIGH: type(config.high).__name__.lower(), LOW: type(config.low).__name__.lower()}
    layers = []
    for i, v in enumerate(chosen):
        summary = passed["layers"][i]
        errors = summary["errors"].get(v, {})
        layers.append({"index": i, "method": methods[v], "variant": v,
                       "bits_per_weight": 8.0 * summary["bytes"][v] / summary["n_weights"],
                       "nominal_bits": summary["nominal_bits"][v], "bytes": summary["bytes"][v],
                       "entropy": passed["entropy"][i],
                       "mean_relative_error": sum(errors.values()) / len(errors) if errors else None})
    total = sizes.total_bytes(chosen)
    return {
        "model": model_name or "smollm2", "family": adapter.family, "luq_version": __version__,
        "k": k, "low_bit_layers": sorted(order[:k]), "order": order,
        "order_rule": config.order if isinstance(config.order, str) else "explicit",
        "avg_bits": sizes.avg_bits(chosen), "nominal_avg_bits": sizes.nominal_avg_bits(chosen),
        "total_bytes": total, "total_gb": total / 1e9, "unquantized_bytes": sizes.base_bytes,
        "budget_gb": config.budget_gb, "max_drop": config.max_drop, "metric": config.metric if steps else None,
        "search": steps, "entropy": passed["entropy"], "entropy_k": passed["k"], "kendall": passed["kendall"],
        "text_entropy": passed["text_entropy"], "image_entropy": passed["image_entropy"],
        "tokens": passed["tokens"], "hessians": config.hessians, "final_pass": config.final_pass,
        "calibration": asdict(config.calibration), "layers": layers,
        "frontier": [{"k": kk, "avg_bits": sizes.avg_bits(assignment(order, kk, len(chosen))),
                      "nominal_avg_bits": sizes.nominal_avg_bits(assignment(order, kk, len(chosen))),
                      "total_bytes": sizes.total_bytes(assignment(order, kk, len(chosen)))}
                     for kk in range(len(order) + 1)],
    }
