"""LUQConfig: every knob of a quantization run, validated once here (the edge)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from luq.calibration import CalibrationConfig
from luq.errors import LuqError
from luq.models import UNIT_KINDS
from luq.plan.speed import AUTO, NONE
from luq.quant.formats import CLIP_MENU, DEFAULT_MENU, GPTQ_MENU_GROUPS, get_format, parse_formats

ALLOCATIONS = ("measured", "entropy")
ORDERS = ("entropy", "reverse-entropy", "depth", "random")
SEARCHES = ("binary", "greedy")
HESSIAN_SOURCES = ("fp", "sequential")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class MeasuredConfig:
    """The measured allocation's part of a run (`LUQConfig.measured`).

    formats: the menu: every linear is quantized in each, its cost on the model's output measured
    (luq.sensitivity), and a knapsack picks the least-cost plan under the rule (luq.plan.measured);
    None: `luq.quant.DEFAULT_MENU`. One format alone makes the uniform model (no rule needed).
    sensitivity_samples: held-out sequences of L tokens the costs are measured on.
    speed_of: where the plan is of llama.cpp's block types, it also decodes in llama.cpp (as predicted by
    luq.plan.speed) no slower than: "auto", llama.cpp's own file of the budget's size (the largest preset
    that fits it, luq.plan.presets); a GGUF file; the model with every linear in a ggml type (its name);
    "none": bytes and cost only.
    speed_margin: how much faster than that reference the plan is predicted (0.05: 5% more tokens/s);
    None: the speed table's median error on files it was not fitted on (luq.plan.speed.table_error).
    """

    formats: tuple[str, ...] | None = None
    sensitivity_samples: int = 16
    speed_of: str = AUTO
    speed_margin: float | None = None

    def __post_init__(self) -> None:
        if self.formats is not None:
            object.__setattr__(self, "formats", parse_formats(self.formats))
        if self.sensitivity_samples <= 0:
            raise LuqError(f"--sensitivity-samples must be positive, got {self.sensitivity_samples}")
        if self.speed_margin is not None and not 0 <= self.speed_margin < 1:
            raise LuqError(f"--speed-margin is a fraction from 0 to below 1 (0.05: 5% faster), got {self.speed_margin}")


@dataclass(frozen=True)
class EntropyConfig:
    """The entropy allocation's part of a run (`LUQConfig.entropy`): the paper's method, exactly.

    high, low: the two formats; layers in `order` ("entropy": ascending K-means entropy, the method;
    "reverse-entropy"; "depth", deepest first; "random", seeded; or an explicit list of decoder-layer
    indices), the first `n_low_layers` (or as many as the budget / max_drop allows, found by `search`)
    at `low`, the rest at `high`. The entropy ranking: kmeans_clusters, K (None: chosen by the
    Kendall/Kneedle rule); subsample, the tokens per layer K-means is fitted on (None: all). A measured
    run computes that entropy only when kmeans_clusters is given.
    """

    high: str = "gptq4-g128"
    low: str = "billm"
    order: str | tuple[int, ...] = "entropy"
    n_low_layers: int | None = None
    search: str = "binary"
    kmeans_clusters: int | None = None
    subsample: int | None = None

    def __post_init__(self) -> None:
        get_format(self.high), get_format(self.low)
        if self.n_low_layers is not None and self.n_low_layers < 0:
            raise LuqError(f"--n-low-layers must be zero or positive, got {self.n_low_layers}")
        if self.search not in SEARCHES:
            raise LuqError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if isinstance(self.order, str):
            if self.order not in ORDERS:
                raise LuqError(f"--order must be one of {', '.join(ORDERS)} or a comma-separated list of "
                               f"layer indices, got {self.order!r}")
        else:
            if len(set(self.order)) != len(self.order) or any(i < 0 for i in self.order):
                raise LuqError(f"--order lists each layer index at most once, non-negative; got {list(self.order)}")
            object.__setattr__(self, "order", tuple(self.order))
        if self.kmeans_clusters is not None and self.kmeans_clusters < 2:
            raise LuqError(f"--kmeans-clusters must be at least 2, got {self.kmeans_clusters}")


PARTS = {"measured": MeasuredConfig, "entropy": EntropyConfig}


@dataclass(frozen=True, init=False)
class LUQConfig:
    """What `luq.quantize` does, and how: the run's own fields, and one part per allocation
    (`measured`: MeasuredConfig, `entropy`: EntropyConfig). Every field is a keyword, validated once here.
    A part's fields may be given flat (`LUQConfig(formats=("gptq4-g128",))` is
    `LUQConfig(measured=MeasuredConfig(formats=("gptq4-g128",)))`) and read flat (`config.formats`).

    allocate: how the plan (linear -> format) is chosen: "measured" (default; its part says the menu)
    or "entropy" (the paper's two-tier rule; its part says the formats and the order).

    Stopping rules (exactly one, except for a one-format menu): `budget_gb` (the artifact fits in
    budget_gb * 1e9 bytes: the best plan (measured) or the fewest low layers (entropy)), `max_drop`
    with `metric` (the smallest budget (measured) or most low layers (entropy) whose real metric stays
    within max_drop: of the full-precision model for measured, of the all-high model for entropy), or
    `n_low_layers` (entropy only, in its part: exactly that many).

    metric: what max_drop watches: held-out perplexity (on validation_samples windows) or a VQA
    task's score (luq.eval) on metric_data (None: its bundled offline sample).
    hessians: where layer i's Hessians come from: "fp", the full-precision model's activations (every
    format of every layer is computed once and any plan assembles from the cache), or "sequential",
    the chain of already quantized layers (in the menu's first format while the cache is filled).
    final_pass (default) re-quantizes the chosen plan once more sequentially, each layer fed by the
    chosen quantized layers before it (GPTQ's sequential mode, exactly): on SmolLM2-135M it lowered
    held-out perplexity, most with BiLLM layers in the plan (bench/results/hessian_source.json,
    docs/architecture.md).
    storage_dtype: dtype of every unquantized tensor in the artifact (embeddings, norms, vision tower,
    projector, lm_head, when not quantized).
    keep: which units outside the decoder are kept, unquantized, at storage_dtype: any of "embed" (the
    token embedding, and a head tied to it), "head" (an untied output head), "vision" (the vision
    tower's and projector's linears). The rest join the budget: in the measured allocation each picks a
    format of `unit_menu()` or stays unquantized, whichever the knapsack prefers; in the entropy
    allocation they take `high`. Default (None): every unit joins the budget of a measured allocation
    with a stopping rule; the entropy allocation and a one-format uniform model keep them all, as the
    paper and peers do.
    offload_dir: activations between layers in memory-mapped files there, not RAM.
    measure_kl: the finished model's KL from full precision on the held-out sensitivity windows, in the
    report (`measured_cost`): two more forwards of the whole model over those windows. None (default):
    where the plan was chosen from predicted costs (a measured allocation over more than one format),
    whose sum it checks; True: for any run (a uniform model, the entropy allocation); False: never.
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    allocate: str = "measured"
    budget_gb: float | None = None
    max_drop: float | None = None
    metric: str = "perplexity"
    metric_data: str | None = None
    validation_samples: int = 16
    hessians: str = "fp"
    final_pass: bool = True
    storage_dtype: str = "float16"
    keep: tuple[str, ...] | None = None
    offload_dir: str | None = None
    measure_kl: bool | None = None
    measured: MeasuredConfig = field(default_factory=MeasuredConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)

    def __init__(self, **given) -> None:
        for name, part_type in PARTS.items():
            own = {k: given.pop(k) for k in [f.name for f in fields(part_type)] if k in given}
            part = given.pop(name, None)
            if part is not None and not isinstance(part, part_type):
                raise LuqError(f"LUQConfig({name}=...) takes a {part_type.__name__}, got {type(part).__name__}")
            part = part_type() if part is None else part
            object.__setattr__(self, name, replace(part, **own) if own else part)
        for f in fields(self):
            if f.name not in PARTS:
                value = given.pop(f.name) if f.name in given else (
                    f.default_factory() if f.default is MISSING else f.default)
                object.__setattr__(self, f.name, value)
        if given:
            raise LuqError(f"LUQConfig has no field {', '.join(sorted(given))}")
        self._validate()

    def __getattr__(self, name: str):
        """A part's field read flat: `config.formats` is `config.measured.formats`."""
        for part in PARTS:
            if name in _PART_FIELDS[part]:
                return getattr(object.__getattribute__(self, part), name)
        raise AttributeError(f"LUQConfig has no field {name!r}")

    def _validate(self) -> None:
        """What spans the run and its parts (each part checks its own fields)."""
        if self.allocate not in ALLOCATIONS:
            raise LuqError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        if self.measured.formats is not None and self.allocate == "entropy":
            raise LuqError("--formats is the menu of --allocate measured; --allocate entropy takes --high and --low")
        n_low = self.entropy.n_low_layers
        rules = [r for r, v in (("--budget-gb", self.budget_gb), ("--max-drop", self.max_drop),
                                ("--n-low-layers", n_low)) if v is not None]
        uniform = self.allocate == "measured" and len(self.menu()) == 1
        if len(rules) > 1 or (not rules and not uniform):
            raise LuqError("give exactly one of --budget-gb, --max-drop (with --metric) or --n-low-layers"
                           + (f"; got {' and '.join(rules)}" if rules else ""))
        if n_low is not None and self.allocate != "entropy":
            raise LuqError("--n-low-layers N is the paper's rule (N layers at the low format): use it with "
                           "--allocate entropy")
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise LuqError(f"--budget-gb must be positive, got {self.budget_gb}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise LuqError(f"--max-drop must be zero or positive, got {self.max_drop}")
        if self.measured.speed_of not in (AUTO, NONE) and (self.allocate != "measured" or not self.for_gguf()
                                                   or (self.budget_gb is None and self.max_drop is None)):
            raise LuqError("--speed-of holds a plan of llama.cpp's block types to a decode speed: use it with "
                           "--formats ggml (or ggml type names) and --budget-gb or --max-drop")
        if self.measured.speed_margin is not None and (self.measured.speed_of == NONE or self.allocate != "measured"
                                                       or not self.for_gguf()):
            raise LuqError("--speed-margin is how much faster than --speed-of's reference a plan of llama.cpp's block "
                           "types decodes: use it with --formats ggml and a --speed-of other than none")
        if self.hessians not in HESSIAN_SOURCES:
            raise LuqError(f"--hessians must be one of {', '.join(HESSIAN_SOURCES)}, got {self.hessians!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise LuqError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.validation_samples <= 0:
            raise LuqError(f"--validation-samples must be positive, got {self.validation_samples}")
        if self.keep is not None:
            kinds = ([k.strip() for k in self.keep.split(",") if k.strip()] if isinstance(self.keep, str)
                     else list(self.keep))
            unknown = [k for k in kinds if k not in UNIT_KINDS]
            if unknown:
                raise LuqError(f"--keep takes {', '.join(UNIT_KINDS)}; got {','.join(unknown)}")
            object.__setattr__(self, "keep", tuple(kinds))

    def menu(self) -> tuple[str, ...]:
        """The format names every linear is quantized to in the variant pass."""
        if self.allocate == "entropy":
            high, low = self.entropy.high, self.entropy.low
            return (high, low) if high != low else (high,)
        return self.measured.formats or DEFAULT_MENU

    def unit_kinds(self) -> tuple[str, ...]:
        """The kinds of units outside the decoder that join the budget (see `keep`)."""
        if self.keep is None:
            uniform = self.allocate == "measured" and len(self.menu()) == 1 and self.budget_gb is None \
                and self.max_drop is None
            return () if self.allocate == "entropy" or uniform else UNIT_KINDS
        return tuple(k for k in UNIT_KINDS if k not in self.keep)

    def unit_menu(self) -> tuple[str, ...]:
        """The formats the units outside the decoder are quantized to (each may also stay
        unquantized): the decoder's menu, plus 6-bit GPTQ with the default menu and the `clip` menu
        (heads and embeddings are where llama.cpp's recipes spend 6 bits), or `high` with --allocate entropy."""
        if self.allocate == "entropy":
            return (self.entropy.high,)
        if self.measured.formats is None:
            return DEFAULT_MENU + tuple(f"gptq6-g{g}" for g in GPTQ_MENU_GROUPS)
        if self.measured.formats == CLIP_MENU:
            return CLIP_MENU + tuple(f"gptq6-g{g}-clip" for g in GPTQ_MENU_GROUPS)
        return self.menu()

    def for_gguf(self) -> bool:
        """Every format the run can pick is a llama.cpp block type: the artifact is bound for a GGUF file,
        so it stores its vectors (norms, biases) at float32 as GGUF does, and its bytes are the file's
        tensor bytes."""
        return all(get_format(f).ggml_type for f in self.menu() + self.unit_menu())

    def vector_dtype(self) -> str | None:
        """The dtype of the artifact's unquantized 1-D tensors where it is not `storage_dtype`."""
        return "float32" if self.for_gguf() else None

    def to_json(self) -> dict:
        """The run's fields with each part's under its name."""
        out = asdict(self)
        order = self.entropy.order
        out["entropy"]["order"] = order if isinstance(order, str) else list(order)
        out["menu"] = list(self.menu())
        out["unit_kinds"] = list(self.unit_kinds())
        return out


_PART_FIELDS = {name: frozenset(f.name for f in fields(part)) for name, part in PARTS.items()}
