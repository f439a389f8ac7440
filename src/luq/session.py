"""A quantization run, step by step (the data flow of docs/architecture.md):

    s = luq.Session(model, config, tokenizer=tok)   # checks, load, calibration (nothing solved yet)
    m = s.measure()       # every linear in every format of the menu (variant cache) + sizes + costs
    d = s.choose(m)       # the plan under the config's stopping rule (luq.plan.choose)
    s.finalize(d)         # the plan solved again sequentially, each layer fed by the chosen ones before it
    report = s.save(out)  # assembled, reported, written as an artifact

`luq.quantize` runs these steps (`Session.run`); a one-format model skips `measure` and `choose`: its
plan is known before any pass, so one sequential pass solves it (`Session.solve_uniform`). Every step
adds its wall time to `seconds` (the report's "seconds"); `on_stage(name, None)` hears each one start
and `on_stage(name, seconds)` end (stages: load, calibration, layer_pass, unit_pass, sensitivity,
plan, final_pass, write).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from luq.artifact import quantization_config, write_artifact
from luq.assembly import Assembly, linear_names, size_bounds, size_table
from luq.calibration import calibration_batches, sensitivity_batches, text_token_ids, validation_windows
from luq.checks import check_out_dir, check_run
from luq.config import LUQConfig
from luq.errors import LuqError
from luq.models import adapter_for, find_units
from luq.models.loading import can_stream, check_device, load_model, parse_dtype
from luq.pipeline import LayerPass, Passes, layer_pass, unit_pass
from luq.plan import KEEP, SizeTable, layer_plan, uniform_plan
from luq.plan.choose import Decision, check_reachable, choose_plan, compact_hint
from luq.plan.speed import check_reference
from luq.quant.formats import get_format
from luq.quant.linear import kernel_line
from luq.report import build_report, kernel_report
from luq.sensitivity import measure_sensitivity, output_kl, reference_log_probs
from luq.variants import VariantCache, model_fingerprint, settings_digest


@dataclass
class Measurement:
    """What the variant pass measured: its per-layer summaries (`Passes`: entropy where measured, each
    linear's bytes and error per format), the exact size table of every plan, and the costs (measured
    allocation with a choice to make; None otherwise)."""

    passed: Passes
    sizes: SizeTable
    costs: dict | None


class Session:
    """One quantization run of `model` under `config` (see the module doc for the steps).

    model: a hub id, a local directory, a built-in name (None: the offline default), or an nn.Module
    already loaded (a transformers model; give its `tokenizer` or processor). device/dtype: where and in
    what precision calibration and the solvers run. cache_dir: the variant cache root (default
    $LUQ_CACHE/variants); a rerun after an interruption resumes from it. stream: read the decoder layers
    from the safetensors shards one at a time (default: whenever the model has them and no stage needs
    the whole model in memory). Every refusal that needs no quantization happens here."""

    def __init__(self, model: str | nn.Module | None, config: LUQConfig, *, tokenizer=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 cache_dir: Path | str | None = None, progress: bool = True, log: Callable[[str], None] = print,
                 stream: bool | None = None, on_stage: Callable[[str, float], None] | None = None):
        self.t_start = time.perf_counter()
        self.config, self.progress, self.log, self.on_stage = config, progress, log, on_stage
        self.device = check_device(device)
        self.storage_dtype = parse_dtype(config.storage_dtype)
        self.vector_dtype = parse_dtype(config.vector_dtype()) if config.vector_dtype() else None
        self.seconds: dict[str, float] = {}
        self.final_pass = False
        dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        with self.stage("load"):
            self.model_name, self.net, self.processor, self.adapter = self._load(model, tokenizer, dtype, stream)
        self.units = find_units(self.net, self.adapter, config.unit_kinds())
        check_run(config, len(self.adapter.decoder_layers(self.net)), self.processor, self.adapter,
                  self.needs_sensitivity_windows)
        shapes = [self.net.get_submodule(n).weight.shape for layer in linear_names(self.net, self.adapter)
                  for n in layer]
        check_reference(config.measured.speed_of, shapes)   # a bad reference refused now, not after the measurement
        self.unit_formats = [get_format(n) for n in config.unit_menu()] if self.units else []
        bounds = size_bounds(self.net, self.adapter, list(config.menu()), self.storage_dtype, self.units,
                             list(config.unit_menu()) if self.units else [], self.vector_dtype)
        check_reachable(config, bounds, [k for k in ("embed", "head", "vision") if k not in config.unit_kinds()])
        hint = compact_hint(config, size_bounds(self.net, self.adapter, ["gptq3-g128"], self.storage_dtype,
                                                self.units, list(config.unit_menu()) if self.units else [],
                                                self.vector_dtype))
        if hint:
            log(hint)
        with self.stage("calibration"):
            self.batches = calibration_batches(self.processor, self.adapter, config.calibration)
            self.sens_batches = (sensitivity_batches(self.processor, self.adapter, config.calibration,
                                                     config.measured.sensitivity_samples, config.validation_samples)
                                 if self.needs_sensitivity_windows else None)
        self.cache = variant_cache(self.net, config, cache_dir)
        log(f"variant cache: {self.cache.dir}")

    def _load(self, model, tokenizer, dtype, stream):
        config = self.config
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise LuqError("luq.quantize(model, ...) of an nn.Module needs its tokenizer= (or processor)")
            net = model.to(self.device).eval()
            return getattr(net.config, "name_or_path", None) or type(net).__name__, net, tokenizer, \
                adapter_for(net.config.model_type)
        layerwise_metric = config.max_drop is None or config.metric == "perplexity"   # scored layer by layer
        if stream is None:
            stream = layerwise_metric and can_stream(model)
        elif stream and not layerwise_metric:
            raise LuqError(f"--max-drop with --metric {config.metric} evaluates the whole model in memory: it "
                           "does not stream; use --metric perplexity or --budget-gb to stream")
        net, processor, adapter = load_model(model, self.device, dtype, stream=stream)
        return model, net, processor, adapter

    # ----------------------------------------------------------------------------------- the steps

    def stage(self, name: str):
        """A context that adds the block's wall time to seconds[name] (and tells on_stage)."""
        return _Stage(self, name)

    @property
    def measures_entropy(self) -> bool:
        """K-means entropy: the paper's ranking; in the measured allocation only where asked for
        (kmeans_clusters)."""
        return self.config.allocate == "entropy" or self.config.entropy.kmeans_clusters is not None

    @property
    def plan_is_known(self) -> bool:
        """A one-format measured model with no units to budget: its plan needs no measurement."""
        config = self.config
        has_rule = config.budget_gb is not None or config.max_drop is not None
        return config.allocate == "measured" and len(config.menu()) == 1 and not (self.units and has_rule)

    @property
    def needs_sensitivity_windows(self) -> bool:
        """Whether the run reads the held-out sensitivity windows: to measure costs, or for the KL check."""
        return (self.config.allocate == "measured" and not self.plan_is_known) or bool(self.config.measure_kl)

    def measure(self) -> Measurement:
        """Every linear in every format of the menu (into the variant cache), the units outside the decoder
        in theirs, the size table, and (where the plan has choices to weigh) each choice's cost."""
        config, net, adapter = self.config, self.net, self.adapter
        formats = [get_format(n) for n in config.menu()]
        with self.stage("layer_pass"):
            passed = Passes.of(layer_pass(net, adapter, self.batches, formats=formats, cache=self.cache,
                                          hessians=config.hessians, k=config.entropy.kmeans_clusters,
                                          device=self.device, subsample=config.entropy.subsample,
                                          seed=config.calibration.seed, progress=self.progress, desc="quantize",
                                          offload_dir=config.offload_dir, entropy=self.measures_entropy))
        if self.units:
            with self.stage("unit_pass"):
                kinds = ", ".join(sorted({u.kind for u in self.units.values()}))
                self.log(f"quantizing {len(self.units)} units outside the decoder ({kinds}) in "
                         f"{len(self.unit_formats)} formats")
                passed.unit_pass = unit_pass(net, adapter, self.batches, self.units, self.unit_formats,
                                             self.cache, self.device)
        sizes = size_table(net, adapter, passed.layers, self.storage_dtype, passed.unit_pass, self.units,
                           self.vector_dtype)
        costs = None
        if config.allocate == "measured":
            with self.stage("sensitivity"):
                costs = measure_sensitivity(net, adapter, self.sens_batches, self.cache, formats, units=self.units,
                                            unit_formats=self.unit_formats, device=self.device,
                                            seed=config.calibration.seed, progress=self.progress)
                costs.update({name: {**c, KEEP: 0.0} for name, c in costs.items() if name in self.units})
        return Measurement(passed, sizes, costs)

    def choose(self, measured: Measurement) -> Decision:
        """The plan under the config's stopping rule (a threshold rule evaluates candidate plans for real)."""
        config = self.config
        evaluate = reference = None
        higher = _higher_is_better(config.metric)
        if config.max_drop is not None:
            score = self.metric_scorer()
            assembly = Assembly(self.net, self.adapter, self.cache, self.device, dense=True, units=self.units)

            def evaluate(plan):
                assembly.apply(plan)
                try:
                    return score()
                finally:
                    assembly.undo()
            reference = score
        entropy = measured.passed.entropy
        with self.stage("plan"):
            decision = choose_plan(config, measured.sizes, measured.costs, linear_names(self.net, self.adapter),
                                   list(self.units), None if entropy is None else entropy.entropy, evaluate,
                                   reference, higher, self.log)
        self.measurement, self.decision = measured, decision
        self.sources = [self.cache]
        return decision

    def finalize(self, decision: Decision | None = None) -> bool:
        """The plan solved once more sequentially, each layer fed by the chosen layers before it (GPTQ's
        sequential mode). Kept unless it makes a budgeted model too large (BiLLM's bytes depend on the
        data). Returns whether it was kept."""
        decision = decision or self.decision
        plan, measured = decision.plan, self.measurement
        self.log("final pass: re-quantizing the chosen plan sequentially")
        final_cache = self._final_cache(plan)
        with self.stage("final_pass"):
            final = self._plan_pass(plan, final_cache, "sequential", "final pass", entropy=False)
        sizes = _with_final(measured.sizes, size_table(self.net, self.adapter, final.layers, self.storage_dtype))
        budget = self.config.budget_gb
        if budget is not None and sizes.total_bytes(plan) > budget * 1e9:
            self.log(f"the final pass would make the model {sizes.total_bytes(plan):,} bytes, over the budget; "
                     "keeping the cached configuration, which fits")
            return False
        self.measurement = Measurement(replace(measured.passed, final_layers=final.layers), sizes, measured.costs)
        self.sources = [final_cache, self.cache]
        self.final_pass = True
        return True

    def solve_uniform(self) -> Decision:
        """A one-format model (`plan_is_known`): one pass over the layers in that format, sequential as the
        final pass (or with the config's Hessians when final_pass is off), the units in it too."""
        config = self.config
        fmt = config.menu()[0]
        names = [n for layer in linear_names(self.net, self.adapter) for n in layer]
        plan = uniform_plan(names + list(self.units), fmt)
        sequential = config.final_pass
        self.log(f"one format ({fmt}): one {'sequential ' if sequential else ''}pass over the layers")
        cache = self._final_cache(plan) if sequential else self.cache
        with self.stage("layer_pass"):
            passed = Passes.of(self._plan_pass(plan, cache, "sequential" if sequential else config.hessians,
                                               "quantize", entropy=self.measures_entropy))
        if self.units:
            with self.stage("unit_pass"):
                passed.unit_pass = unit_pass(self.net, self.adapter, self.batches, self.units, self.unit_formats,
                                             self.cache, self.device)
        sizes = size_table(self.net, self.adapter, passed.layers, self.storage_dtype, passed.unit_pass,
                           self.units, self.vector_dtype)
        if config.budget_gb is not None and sizes.total_bytes(plan) > config.budget_gb * 1e9:
            raise LuqError(f"the uniform {fmt} model is {sizes.total_bytes(plan) / 1e9:.4g} GB, over the budget")
        self.measurement = Measurement(passed, sizes, None)
        self.decision = Decision(plan, frontier=[{"plan": plan}])
        self.sources = [cache, self.cache]
        self.final_pass = sequential
        return self.decision

    def save(self, out: Path | str) -> dict:
        """The decided plan assembled into the model, its report (with the measured KL of the whole model
        from full precision on the sensitivity windows: `LUQConfig.measure_kl`) and the artifact at `out`."""
        check_out_dir(Path(out))
        decision, measured = self.decision, self.measurement
        measure_kl = self.sens_batches is not None and self.config.measure_kl is not False
        reference = reference_log_probs(self.net, self.sens_batches) if measure_kl else None
        Assembly(self.net, self.adapter, self.sources, self.device, units=self.units).apply(decision.plan)
        if reference is not None:
            decision.measured_cost = output_kl(self.net, self.sens_batches, reference)
        report = build_report(self.model_name, self.net, self.adapter, self.config, measured.passed, measured.sizes,
                              decision.plan, asdict(decision), measured.costs)
        report["kernels"] = kernel_report(self.net, self.adapter, decision.plan, self.device)
        self.log(kernel_line(report["kernels"]["by_format"]))
        report["final_pass"] = self.final_pass
        report["seconds"] = self.seconds
        with self.stage("write"):
            written = write_artifact(Path(out), self.net, self.processor,
                                     quantization_config(self.net, self.config, decision.plan), report,
                                     self.storage_dtype, vector_dtype=self.vector_dtype,
                                     describe=_gguf_report if self.config.for_gguf() else None)
        if written != report["total_bytes"]:  # the size table and the writer must agree to the byte
            raise RuntimeError(f"artifact holds {written} tensor bytes, the size table said {report['total_bytes']}")
        report["seconds"]["total"] = round(time.perf_counter() - self.t_start, 1)
        return report

    def run(self, out: Path | str) -> dict:
        """Every step: measure, choose, finalize (config.final_pass), save; or the one pass of a one-format
        model."""
        if self.plan_is_known:
            self.solve_uniform()
        else:
            self.choose(self.measure())
            if self.config.final_pass:
                self.finalize()
        return self.save(out)

    # ----------------------------------------------------------------------------------- helpers

    def _final_cache(self, plan) -> VariantCache:
        return VariantCache(self.cache.dir.parent, dict(self.cache.key, final=settings_digest(plan)))

    def _plan_pass(self, plan, cache: VariantCache, hessians: str, desc: str, entropy: bool) -> LayerPass:
        config, adapter = self.config, self.adapter
        return layer_pass(self.net, adapter, self.batches, plan_of_layer=lambda i: layer_plan(plan, adapter.layer_prefix(i)),
                          cache=cache, hessians=hessians, k=config.entropy.kmeans_clusters, device=self.device,
                          subsample=config.entropy.subsample, seed=config.calibration.seed, progress=self.progress, desc=desc,
                          entropy=entropy, offload_dir=config.offload_dir)

    def metric_scorer(self) -> Callable[[], float]:
        return metric_scorer(self.config.metric, self.net, self.processor, self.config)


class _Stage:
    def __init__(self, session: Session, name: str):
        self.session, self.name = session, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.session.on_stage is not None:
            self.session.on_stage(self.name, None)

    def __exit__(self, *exc):
        took = time.perf_counter() - self.t0
        seconds = self.session.seconds
        seconds[self.name] = round(seconds.get(self.name, 0.0) + took, 1)
        if self.session.on_stage is not None and exc[0] is None:
            self.session.on_stage(self.name, took)


def variant_cache(net: nn.Module, config: LUQConfig, cache_dir: Path | str | None = None) -> VariantCache:
    """The variant cache of this model, calibration and Hessian source (formats are keyed per file
    inside it, so any menu shares it); cache_dir: its root (default $LUQ_CACHE/variants)."""
    from luq.store import cache_root

    key = {"model": model_fingerprint(net), "calibration": asdict(config.calibration), "hessians": config.hessians}
    if config.hessians == "sequential":
        key["chain"] = get_format(config.menu()[0]).settings()
    return VariantCache(Path(cache_dir) if cache_dir else cache_root() / "variants", key)


def metric_scorer(metric: str, net: nn.Module, processor, config: LUQConfig) -> Callable[[], float]:
    """score(): the --max-drop metric of `net` as it stands. perplexity: held-out text windows disjoint
    from the calibration and sensitivity windows; a VQA task: its score on config.metric_data (default:
    the bundled sample)."""
    if metric == "perplexity":
        from luq.eval.perplexity import token_window_perplexity

        cal = config.calibration
        windows = validation_windows(text_token_ids(processor, cal.text), config.validation_samples, cal.seq_len,
                                     cal.seed, cal.n_text)
        return lambda: token_window_perplexity(net, windows)
    from luq.eval.datasets import load_samples
    from luq.eval.runner import EvalConfig, evaluate

    samples = load_samples(metric, config.metric_data)
    return lambda: evaluate(net, processor, EvalConfig(task=metric), samples).score


def _gguf_report(folder: Path) -> dict:
    """report["gguf"] of a run bound for GGUF: the file `luq export --format gguf` writes (its bytes with
    metadata and tokenizer, its tensor bytes: the budget's), or why it would be refused."""
    from luq.export.gguf import gguf_size

    try:
        return {"gguf": gguf_size(folder)}
    except LuqError as e:
        return {"gguf": {"refused": str(e)}}


def _higher_is_better(metric: str) -> bool:
    """Perplexity goes down as a model gets better; every VQA task's score goes up (checked known before)."""
    return metric != "perplexity"


def _with_final(sizes: SizeTable, final: SizeTable) -> SizeTable:
    """The size table with each decoder linear's planned format's bytes taken from the final pass (the
    units outside the decoder are not re-quantized by it)."""
    linears = {}
    for name, s in sizes.linears.items():
        f = final.linears.get(name)
        linears[name] = s if f is None else type(s)(s.layer, s.n_weights, {**s.bytes, **f.bytes},
                                                    {**s.nominal_bits, **f.nominal_bits})
    return SizeTable(sizes.base_bytes, linears)
