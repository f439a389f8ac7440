"""The menu of formats: one registry entry per way of storing a linear's weight.

A format is one entry of this registry: a name, a solver (a frozen dataclass whose `quantize(W, H)`
returns a `QuantizedWeight`), the packed weight class the solver declares it returns (`weight_type`:
its stored tensors, its config and how they are read back) and that weight's own forward (QuantLinear
runs it), plus a line of description. Adding a format is one `register_format(Format(...))`; the
planner, the variant cache, the report and the artifact only ever see format names, and a stored weight
is read back (`weight_from_state_dict`) by the class of the registered format whose `method` it names.

Built in: `gptq<b>-g<g>` (b in 2, 3, 4, 8; g in 32, 64, 128: GPTQ, act-order, static
asymmetric groups), `rtn<b>-g<g>` (the same grid, round-to-nearest, no Hessian) and
`billm` (BiLLM as the paper stores it, every byte counted) and the compact BiLLM
formats `billm-k<k>g<G>` (BiLLM's solver, side information in few bits: k sparse
weights per run of G columns coded as one k-of-G number, 5-bit log scales; see
luq.quant.billm_compact), and `billm-k5g64f` (the same, solved column by column in
act-order with GPTQ's error feedback, side information in 4 and 8 bits), llama.cpp's block types
(`q4_k`, `rtn-q4_k`, ...; luq.quant.ggml) and `sign` (the 1-bit baseline, in no menu).
The true bits and errors of every format on real and synthetic layers: bench/results/solvers*.json
(`python -m bench.solvers`), rendered in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import torch

from luq.errors import LuqError
from luq.quant.base import OMIT_AT_DEFAULT, QuantizedWeight
from luq.quant.baselines import Sign
from luq.quant.billm import BiLLM
from luq.quant.billm_compact import CompactBiLLM
from luq.quant.ggml import GGML, GGML_BITS, GGMLRTN
from luq.quant.gptq import GPTQ, RTN

# the shape `luq formats` quotes true bits on (a 7B model's attention projection)
REFERENCE_SHAPE = (4096, 4096)


@dataclass(frozen=True)
class Format:
    """One entry of the menu: `name` -> `solver` (+ what it is, for `luq formats`).

    The solver's class declares the packed weight it returns (`weight_type`, a `QuantizedWeight`
    subclass); a stored weight is read back by that class (`weight_from_state_dict`). The forward is
    the packed weight's own: QuantLinear computes from it (luq.quant.kernels picks a fast kernel by
    the weight's type, else unpacks rows with its `dequantize_rows`), so a format adds no forward of its
    own. Several formats may share a weight class (gptq* and rtn* store `GPTQWeight`).
    """

    name: str
    solver: Any
    description: str = ""

    def quantize(self, W: torch.Tensor, H: torch.Tensor) -> QuantizedWeight:
        return self.solver.quantize(W, H)

    @property
    def weight_type(self) -> type[QuantizedWeight]:
        """The packed weight class this format's solver returns (and its stored weights are read back by)."""
        cls = getattr(type(self.solver), "weight_type", None)
        if not (isinstance(cls, type) and issubclass(cls, QuantizedWeight)
                and isinstance(getattr(cls, "method", None), str)):
            raise LuqError(f"format {self.name!r}: its solver {type(self.solver).__name__} declares no weight_type "
                           "(a ClassVar naming the QuantizedWeight subclass, with its `method`, that quantize returns)")
        return cls

    def settings(self) -> dict[str, Any]:
        """The solver and its settings: what a cached result of this format depends on."""
        fields = asdict(self.solver) if is_dataclass(self.solver) else {}
        for f in dataclass_fields(self.solver) if is_dataclass(self.solver) else ():
            if f.metadata.get(OMIT_AT_DEFAULT) and fields[f.name] == f.default:
                del fields[f.name]   # a setting added later: at its default, caches written before it stay valid
        return {"solver": type(self.solver).__name__, **fields}

    @property
    def digest(self) -> str:
        """Short hash of `settings()`: a cached weight is reused only under the same settings."""
        blob = json.dumps(self.settings(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def supports(self, shape: tuple[int, int]) -> bool:
        """Whether this format can store a weight of `shape` [out, in] (a ggml type only when its block
        divides `in`); a solver without `supports` takes every shape."""
        check = getattr(self.solver, "supports", None)
        return True if check is None else bool(check(tuple(shape)))

    def nbytes_bounds(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        """(least, most) stored bytes of a weight of `shape`, known before quantizing; None if
        the solver cannot say (its size depends on the data in ways it does not bound)."""
        bounds = getattr(self.solver, "nbytes_bounds", None)
        return None if bounds is None else bounds(tuple(shape))

    @property
    def ggml_type(self) -> str | None:
        """The llama.cpp block type this format stores its weights as (a GGUF file holds them as they
        are), or None."""
        return self.solver.type if isinstance(self.solver, (GGML, GGMLRTN)) else None


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Add `fmt` to the menu; a name already taken is refused unless `replace`, and so is a solver
    without a `weight_type` or one whose weight class claims a stored `method` another class already
    has (formats may share one weight class, never one method between two classes)."""
    if not fmt.name or any(c in fmt.name for c in " ,/"):
        raise LuqError(f"format names are one word without ',' or '/', got {fmt.name!r}")
    if fmt.name in _REGISTRY and not replace:
        raise LuqError(f"format {fmt.name!r} is already registered")
    cls = fmt.weight_type
    for other in _REGISTRY.values():
        if other.name != fmt.name and other.weight_type.method == cls.method and other.weight_type is not cls:
            raise LuqError(f"format {fmt.name!r}: its weight class {cls.__module__}.{cls.__qualname__} stores method "
                           f"{cls.method!r}, already that of {other.weight_type.__module__}."
                           f"{other.weight_type.__qualname__} (format {other.name!r}); give it another method")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The format called `name`; one clear error naming the known ones if none is."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LuqError(f"unknown format {name!r}; known: {', '.join(_REGISTRY)} (see `luq formats`)") from None


def list_formats() -> list[Format]:
    return list(_REGISTRY.values())


def weight_from_state_dict(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> QuantizedWeight:
    """Rebuild a stored weight from its tensors and its config, by the weight class of the registered
    formats whose stored `method` the config names; one clear error naming the known methods if none."""
    method = config.get("method")
    for fmt in _REGISTRY.values():
        if fmt.weight_type.method == method:
            return fmt.weight_type.from_state_dict(tensors, config)
    known = sorted({fmt.weight_type.method for fmt in _REGISTRY.values()})
    raise LuqError(f"a stored weight names method {method!r}, which no registered format stores; known: "
                   f"{', '.join(known)} (a peer's format is read back once its Format is registered)")


def parse_formats(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'a,b,c' (or a list) -> the format names, each checked; a menu name (`MENUS`: default,
    compact) stands for its formats; a name written twice is refused."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise LuqError("--formats needs at least one format name (see `luq formats`)")
    if len(set(names)) != len(names):
        raise LuqError(f"--formats names a format twice: {','.join(names)}")
    expanded = [f for n in names for f in MENUS.get(n, (n,))]
    for n in expanded:
        get_format(n)
    return tuple(dict.fromkeys(expanded))   # a format both named and in a menu once


def reference_bits(fmt: Format, shape: tuple[int, int] = REFERENCE_SHAPE) -> tuple[float, float] | None:
    """True bits per weight of `fmt` on a `shape` layer: (least, most), from its byte bounds."""
    bounds = fmt.nbytes_bounds(shape)
    if bounds is None:
        return None
    n = shape[0] * shape[1]
    return 8.0 * bounds[0] / n, 8.0 * bounds[1] / n


GPTQ_MENU_BITS = (2, 3, 4, 8)
GPTQ_MENU_GROUPS = (32, 64, 128)

for _bits in GPTQ_MENU_BITS:
    for _group in GPTQ_MENU_GROUPS:
        register_format(Format(f"gptq{_bits}-g{_group}", GPTQ(bits=_bits, group_size=_group),
                               f"GPTQ {_bits}-bit, asymmetric groups of {_group}, act-order (static groups)"))
        register_format(Format(f"rtn{_bits}-g{_group}", RTN(bits=_bits, group_size=_group),
                               f"round-to-nearest {_bits}-bit, groups of {_group} (data-free baseline)"))
register_format(Format("billm", BiLLM(), "BiLLM ~1-bit: salient columns at order 2, split non-salient "
                                          "weights; fp16 scales and means per 128-column block"))
# compact BiLLM: (k, lam) chosen on the 21 SmolLM2 linears by `python -m bench.billm_compact_sweep`
# (bench/results/billm_compact_sweep.json); their true bits and errors against BiLLM's: bench/results/solvers.json,
# docs/formats.md, "Compact BiLLM"
for _k, _lam in ((16, 0.2), (8, 0.2), (4, 0.3)):
    register_format(Format(f"billm-k{_k}g64", CompactBiLLM(sparse_runs=((64, _k),), col_scale=True, lam=_lam),
                           f"compact BiLLM: {_k} sparse weights per 64 columns (one k-of-64 code), 5-bit log "
                           f"scales, fp16 column scales, salient columns priced at lam={_lam}"))
# compact BiLLM solved as GPTQ solves: act-order, signs chosen column by column with error feedback; side
# information in fewer bits (4-bit scales over 5 octaves, 8-bit column scales and row references); its true
# bits and error against BiLLM's on the 21 SmolLM2 linears: bench/results/solvers_issue14b.json (docs/formats.md)
register_format(Format("billm-k5g64f", CompactBiLLM(
    sparse_runs=((64, 5),), lam=0.2, column_feedback=True, act_order=True, scale_bits=4, scale_octaves=5,
    ref_headroom=1.0, col_scale_bits=8, row_ref_bits=8),
    "compact BiLLM at ~1.6 bits: 5 sparse weights per 64 columns, act-order, signs chosen column by column "
    "with error feedback, 4-bit scales, 8-bit column scales and row references"))
# billm-k5g64f with its scales fitted again to the values the signs were chosen on (refits=1), the
# salient order-2 scale stored as 3 bits below the order-1 one, and salient columns priced lower
# (lam 0.1); its true bits and error against BiLLM's on the 21 SmolLM2 linears: bench/results/solvers_issue14c.json
# (docs/formats.md)
register_format(Format("billm-k5g64r", CompactBiLLM(
    sparse_runs=((64, 5),), lam=0.1, column_feedback=True, act_order=True, scale_bits=4, scale_octaves=5,
    ref_headroom=1.0, col_scale_bits=8, row_ref_bits=8, refits=1, delta_bits=3),
    "compact BiLLM at ~1.6 bits: billm-k5g64f with the scales refitted after the signs, the residual "
    "scale as a 3-bit step below the first, more salient columns"))

# 6 bits: offered to the units outside the decoder (embeddings, head, vision tower), where
# llama.cpp's recipes also spend 6 bits (Q6_K output heads)
for _group in GPTQ_MENU_GROUPS:
    register_format(Format(f"gptq6-g{_group}", GPTQ(bits=6, group_size=_group),
                           f"GPTQ 6-bit, asymmetric groups of {_group}, act-order (static groups)"))

# GPTQ with clipped grids (GPTQ.clip): each group's range shrunk to least Hessian-diagonal-weighted rounding
# error, each row kept from whichever of the two solutions errs less; the same stored form, two solves (their
# error and time: bench/results/gptq-clip.json). Not yet in the default menu: `--formats clip` (its effect on
# the whole model: docs/results.md, section 0c)
CLIP_MENU = tuple(f"gptq{b}-g{g}-clip" for b in GPTQ_MENU_BITS for g in GPTQ_MENU_GROUPS)
for _bits in GPTQ_MENU_BITS + (6,):
    for _group in GPTQ_MENU_GROUPS:
        register_format(Format(f"gptq{_bits}-g{_group}-clip", GPTQ(bits=_bits, group_size=_group, clip=True),
                               f"GPTQ {_bits}-bit, groups of {_group}, act-order, each row on the better of its "
                               "min-max and clipped grids"))

# the default menu of the measured allocation: every GPTQ grid (BiLLM stores 3 true bits
# per weight and loses to GPTQ-3 there, so it is offered only when asked for)
DEFAULT_MENU = tuple(f"gptq{b}-g{g}" for b in GPTQ_MENU_BITS for g in GPTQ_MENU_GROUPS)
# the compact 1-bit formats (their true bits: bench/results/solvers.json): below uniform GPTQ-3's size they lower
# the measured allocation's perplexity many times over (bench/results/frontier-smollm2-compact-menu.json,
# docs/results.md, section 3); `--formats default,compact`
COMPACT_MENU = ("billm-k5g64r", "billm-k8g64", "billm-k16g64")
MENUS = {"default": DEFAULT_MENU, "compact": COMPACT_MENU, "clip": CLIP_MENU}

# llama.cpp's block formats (luq.quant.ggml), named as ggml names its types: GPTQ inside each type's grid,
# stored byte for byte as ggml stores it (a plan over them exports to GGUF without quantizing again), and
# `rtn-<type>`: the same grids, round-to-nearest. A type stores only weights whose input columns its block
# (32, or 256 for the K-quants and tq*) divides: `Format.supports`. tq2_0 / tq1_0 (ternary, one grid stored two
# ways) are registered but not in the menu: on SmolLM2's down_projs their output error is several times q2_k's
# (tests/test_ggml_formats.py; no result file holds the figures).
GGML_MENU = ("q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "iq4_nl", "q3_k", "q2_k")
for _type in GGML_MENU + ("tq2_0", "tq1_0"):
    register_format(Format(_type, GGML(_type), f"llama.cpp {_type.upper()} ({GGML_BITS[_type]:g} bits): GPTQ "
                                               "inside ggml's grid, stored as ggml's blocks"))
    register_format(Format(f"rtn-{_type}", GGMLRTN(_type), f"llama.cpp {_type.upper()}: the same grid fitted "
                                                           "per block, round-to-nearest"))
MENUS["ggml"] = GGML_MENU

# the plainest 1-bit baseline (a sign bit per weight, a scale per row), in no menu: a yardstick
# (bench/solvers.py, the tests), registered so its stored weights read back like any format's
register_format(Format("sign", Sign(), "sign(w) * mean|w| per output row (1-bit, data-free baseline)"))
