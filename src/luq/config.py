"""LUQConfig: every knob of a quantization run, validated once here (the edge)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from luq.calibration import CalibrationConfig
from luq.errors import LuqError
from luq.quant import GPTQ, BiLLM

ORDERS = ("entropy", "reverse-entropy", "depth", "random")
SEARCHES = ("binary", "greedy")
HESSIAN_SOURCES = ("fp", "sequential")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class LUQConfig:
    """What `luq.quantize` does, and how.

    Exactly one stopping rule: `budget_gb` (smallest number k of 1-bit layers whose
    artifact fits in budget_gb * 1e9 bytes), `max_drop` with `metric` (largest k whose
    metric stays within max_drop of the all-4-bit model, found by `search`), or
    `layers` (exactly k = layers).

    order: "entropy" (ascending, the method), "reverse-entropy", "depth" (deepest
    first), "random" (seeded), or an explicit list of decoder-layer indices.
    high / low: the two solvers (GPTQ-4 g128 and BiLLM by default).
    hessians: where layer i's Hessians come from: "fp", the full-precision model's
    activations (every variant of every layer is computed once and any k assembles from
    the cache), or "sequential", the chain of already quantized layers (each at its
    high-precision variant while the cache is filled). final_pass (default) re-quantizes
    the chosen configuration once more sequentially, each layer fed by the chosen quantized
    layers before it (GPTQ's sequential mode, exactly): on SmolLM2-135M it lowered held-out
    perplexity from 31.01 to 30.46 at k=0 and from 102.97 to 74.26 at k=4
    (bench/hessian_source.py), for one more pass over the layers.
    k_means: K for the entropy (None: chosen by the Kendall/Kneedle rule);
    subsample: tokens per layer K-means is fitted on (None: all).
    storage_dtype: dtype of every unquantized tensor in the artifact (embeddings, norms,
    vision tower, projector, lm_head).
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    budget_gb: float | None = None
    max_drop: float | None = None
    metric: str = "perplexity"
    metric_data: str | None = None
    layers: int | None = None
    search: str = "binary"
    order: str | tuple[int, ...] = "entropy"
    high: GPTQ = field(default_factory=GPTQ)
    low: BiLLM = field(default_factory=BiLLM)
    hessians: str = "fp"
    final_pass: bool = True
    k_means: int | None = None
    subsample: int | None = None
    validation_samples: int = 16
    storage_dtype: str = "float16"
    offload_dir: str | None = None  # activations between layers in memory-mapped files there, not RAM

    # metric / metric_data: what --max-drop watches: held-out perplexity, or a VQA task's
    # score (luq.eval) on metric_data (None: its bundled offline sample).

    def __post_init__(self) -> None:
        rules = [r for r, v in (("--budget-gb", self.budget_gb), ("--max-drop", self.max_drop),
                                ("--layers", self.layers)) if v is not None]
        if len(rules) != 1:
            raise LuqError("give exactly one of --budget-gb, --max-drop (with --metric) or --layers"
                           + (f"; got {' and '.join(rules)}" if rules else ""))
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise LuqError(f"--budget-gb must be positive, got {self.budget_gb}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise LuqError(f"--max-drop must be zero or positive, got {self.max_drop}")
        if self.layers is not None and self.layers < 0:
            raise LuqError(f"--layers must be zero or positive, got {self.layers}")
        if self.search not in SEARCHES:
            raise LuqError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                raise LuqError(f"--order must be one of {', '.join(ORDERS)} or a comma-separated list of "
                               f"layer indices, got {self.order!r}")
        elif len(set(self.order)) != len(self.order) or any(i < 0 for i in self.order):
            raise LuqError(f"--order lists each layer index at most once, non-negative; got {list(self.order)}")
        if self.hessians not in HESSIAN_SOURCES:
            raise LuqError(f"--hessians must be one of {', '.join(HESSIAN_SOURCES)}, got {self.hessians!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise LuqError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.k_means is not None and self.k_means < 2:
            raise LuqError(f"--k must be at least 2, got {self.k_means}")
        if self.validation_samples <= 0:
            raise LuqError(f"--validation-samples must be positive, got {self.validation_samples}")

    def variants(self) -> dict[str, GPTQ | BiLLM]:
        """The per-layer variants every layer is quantized to: {'high': ..., 'low': ...}."""
        return {"high": self.high, "low": self.low}

    def to_json(self) -> dict:
        out = asdict(self)
        out["order"] = self.order if isinstance(self.order, str) else list(self.order)
        return out
