"""An off-grid control of a model whose weights sit on a GGUF quantization grid.

luq's test model SmolLM2-135M-Instruct is converted from a Q4_1 GGUF
(:func:`luq.zoo.smollm2.smollm2_dir`): every decoder linear is exactly ``m + d * q`` per row
and group of 32 columns (q in 0..15, d = (max - min) / 15), and the tied token embedding
is exactly ``d * q`` per group of 32 (Q8_0: q in -127..127, d = absmax / 127). A 4-bit
g32 quantizer that fits the same grid is then lossless on it, which flatters every
quality number. tiny-vlm's language model is that SmolLM2 (:mod:`luq.zoo.tinyvlm`: LoRA
deltas merged into its q/v projections, one more embedding row for ``<image>``), so
most of it sits on the same grids. :func:`offgrid_dir` writes a copy of either (a causal
LM, or a LLaVA model's language model) in which every such weight is moved by uniform
noise within its own grid cell:

* decoder linears (q/k/v/o/gate/up/down of each layer): per row and group of 32 columns,
  ``w += (u - 1/2) * (max - min) / 15`` with u uniform in [0, 1);
* the token embedding (tied to the head; the tie is kept): per row and group of 32,
  ``w += (u - 1/2) * absmax / 127``;
* everything else (the norms; a LLaVA model's vision tower and projector) unchanged.

The decoder linears and the embedding are found by their names in the loaded model's
state dict: ``model.layers.N.*`` and ``model.embed_tokens.weight`` for SmolLM2,
``model.language_model.layers.N.*`` and ``model.language_model.embed_tokens.weight`` for
tiny-vlm (transformers 5's names, the ones tiny-vlm's shipped LoRA factors use; its saved
file stores them under the older ``language_model.model.`` prefix). Those names seed the
noise and are recorded in ``luq_offgrid.json``.

The cell is recomputed from the weights. The noise is bit-identical on every machine:
each tensor has its own PCG64 stream, seeded from ``(seed, sha256 of its name)`` through
numpy's SeedSequence, and u is built from the raw 64-bit outputs (top 53 bits / 2**53),
not from a numpy sampling method (numpy keeps the bit streams of its bit generators
stable across versions and platforms, not the methods of ``Generator``). The arithmetic
is elementwise IEEE float64 (min, max, subtraction, division, multiply-add done as two
roundings), cast once to float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from luq.errors import LuqError
from luq.store import build_dir_once, cache_root, file_sha256
from luq.zoo.smollm2 import smollm2_dir
from luq.zoo.tinyvlm import trained_dir as tiny_vlm_dir

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
GROUP = 32
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "model.embed_tokens.weight"   # a causal LM's; a LLaVA model's is under its language model
EMBEDDING_SUFFIX = "embed_tokens.weight"
METADATA = "luq_offgrid.json"
SMOLLM2_OFFGRID_CACHE = "smollm2-offgrid-v1"
TINY_VLM_OFFGRID_CACHE = "tiny-vlm-offgrid-v{recipe}-{version}-{weights}"   # tiny-vlm's VERSION and weights digest
TINY_VLM_INFO = "luq_tiny_vlm.json"   # written by luq.zoo.tinyvlm.trained_dir
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
_WRITTEN_BY_SAVE = ("config.json", "generation_config.json")
_ROWS_PER_CHUNK = 4096  # rows of noise drawn at once: bounds the float64 temporaries


def recipe(embedding: str = EMBEDDING) -> dict:
    """The recipe as recorded in the metadata; ``embedding``: the state-dict name of the token embedding."""
    return {
        "version": RECIPE_VERSION,
        "linears": {"names": list(LINEAR_NAMES), "group": GROUP, "cell": "(max - min) / 15 per row and group",
                    "noise": "uniform [-cell/2, +cell/2)"},
        "embedding": {"name": embedding, "group": GROUP, "cell": "absmax / 127 per row and group",
                      "noise": "uniform [-cell/2, +cell/2)", "tied_head": "kept"},
        "other": "unchanged",
        "rng": "numpy PCG64 per tensor, SeedSequence([seed, first 8 bytes of sha256(name), little endian]); "
               "u = (raw >> 11) / 2**53",
        "arithmetic": "float64, then cast to float32",
    }


RECIPE = recipe()


def is_decoder_linear(name: str) -> bool:
    """Whether the state-dict name is the weight of a decoder linear (q/k/v/o/gate/up/down)."""
    parts = name.split(".")
    return (len(parts) >= 4 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES
            and ".layers." in f".{name}")


def _stream(seed: int, name: str) -> np.random.PCG64:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.PCG64(np.random.SeedSequence([int(seed), key]))


def _uniform(bits: np.random.PCG64, n: int) -> np.ndarray:
    """n float64 in [0, 1) from the raw 64-bit stream (53 random bits each)."""
    return (bits.random_raw(n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def q4_1_cell(groups: np.ndarray) -> np.ndarray:
    """Q4_1's step of each group [..., GROUP]: (max - min) / 15, float64, keepdims."""
    return (groups.max(axis=-1, keepdims=True) - groups.min(axis=-1, keepdims=True)) / 15.0


def q8_0_cell(groups: np.ndarray) -> np.ndarray:
    """Q8_0's step of each group [..., GROUP]: absmax / 127, float64, keepdims."""
    return np.abs(groups).max(axis=-1, keepdims=True) / 127.0


def rtn_error(weight: torch.Tensor, cell: Callable[[np.ndarray], np.ndarray]) -> float:
    """Relative error ||W - RTN(W)|| / ||W|| (float64) of round-to-nearest onto the grid of ``cell`` per row
    and group of GROUP columns: Q4_1's ``min + d * q`` (q in 0..15) for :func:`q4_1_cell`, Q8_0's ``d * q``
    for :func:`q8_0_cell`. 0 (to float64 rounding) for a weight that sits on the grid."""
    w = weight.detach().to("cpu", torch.float64).numpy()
    if w.ndim != 2 or w.shape[1] % GROUP:
        raise LuqError(f"expected a 2-D weight with a multiple of {GROUP} columns, got {w.shape}")
    g = w.reshape(w.shape[0], -1, GROUP)
    d = cell(g)
    step = np.where(d > 0, d, 1.0)
    if cell is q4_1_cell:
        lo = g.min(axis=-1, keepdims=True)
        rounded = lo + d * np.clip(np.round((g - lo) / step), 0, 15)
    elif cell is q8_0_cell:
        rounded = d * np.round(g / step)
    else:
        raise LuqError("rtn_error knows the grids of q4_1_cell and q8_0_cell")
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(g - rounded)) / norm if norm else 0.0


def dither(weight: torch.Tensor, cell: Callable[[np.ndarray], np.ndarray], seed: int, name: str) -> torch.Tensor:
    """``weight`` [rows, cols] (cols a multiple of GROUP) moved by uniform noise in
    [-cell/2, +cell/2) per row and group of GROUP columns; float32, on the CPU."""
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        raise LuqError(f"{name}: expected a 2-D weight with a multiple of {GROUP} columns, got {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float64).numpy()
    rows, cols = w.shape
    out = np.empty((rows, cols), dtype=np.float32)
    bits = _stream(seed, name)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):  # the stream is read in row-major order either way
        g = w[r0:r0 + _ROWS_PER_CHUNK].reshape(-1, cols // GROUP, GROUP)
        u = _uniform(bits, g.size).reshape(g.shape)
        moved = g + (u - 0.5) * cell(g)
        out[r0:r0 + _ROWS_PER_CHUNK] = moved.reshape(-1, cols).astype(np.float32)
    return torch.from_numpy(out)


def embedding_name(model: torch.nn.Module) -> str:
    """The state-dict name of the (language model's) token embedding: ``model.embed_tokens.weight`` for a
    causal LM, ``model.language_model.embed_tokens.weight`` for a LLaVA model in transformers 5."""
    weight = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False)
             if p is weight and n.split(".")[-2:] == EMBEDDING_SUFFIX.split(".")]
    if len(names) != 1:
        raise LuqError(f"found {len(names)} token embeddings named '*.{EMBEDDING_SUFFIX}'; "
                       "is it a Llama-style causal LM or a LLaVA model around one?")
    return names[0]


def targets(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, Callable]]:
    """(name, parameter, cell) of the embedding and of every decoder linear of the language model (the
    layers beside its embedding: a LLaVA vision tower's are never picked), each tensor once."""
    embedding = embedding_name(model)
    language_model = embedding[:-len(EMBEDDING_SUFFIX)]   # "model." or "model.language_model."
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        if name == embedding:
            seen.add(id(p))
            yield name, p, q8_0_cell
        elif name.startswith(f"{language_model}layers.") and is_decoder_linear(name):
            seen.add(id(p))
            yield name, p, q4_1_cell


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of tensor contents independent of the file format: sorted names, dtype,
    shape and raw little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # native order: little endian on x86/ARM
    return h.hexdigest()


def _load(source: Path) -> tuple[torch.nn.Module, bool]:
    """(the fp32 model of the HF directory ``source``, whether it is multimodal), by luq's adapter of its family."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from luq.models import adapter_for

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise LuqError(f"cannot read the model in {source}: {str(e).splitlines()[0]}") from None
    multimodal = adapter_for(config.model_type).multimodal
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    return auto.from_pretrained(source, dtype=torch.float32).eval(), multimodal


def write_offgrid(source: Path, out: Path, seed: int = 0) -> dict:
    """Write the off-grid copy of the HF model directory ``source`` (a causal LM, or a LLaVA model: its
    language model is dithered) into the existing directory ``out`` (not atomic; see :func:`offgrid_dir`).
    Returns its metadata."""
    source, out = Path(source), Path(out)
    model, multimodal = _load(source)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embedding = embedding_name(model)
    counts = {"linears": 0, "embedding": 0}
    names = []
    with torch.no_grad():
        for name, p, cell in targets(model):
            p.copy_(dither(p, cell, seed, name))
            counts["embedding" if name == embedding else "linears"] += 1
            names.append(name)
    if counts["embedding"] != 1 or counts["linears"] == 0:
        raise LuqError(f"{source}: found {counts['linears']} decoder linears and {counts['embedding']} "
                       f"'{embedding}'; is it a Llama-style causal LM or a LLaVA model around one?")
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise LuqError(f"{source}: the tied embedding and head came apart")
    model.save_pretrained(out)
    for f in sorted(source.iterdir()):  # tokenizer, chat template, ...
        if f.is_file() and f.name not in _WRITTEN_BY_SAVE and not any(f.match(p) for p in _WEIGHT_FILES):
            shutil.copy2(f, out / f.name)
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    meta = {
        "seed": int(seed),
        "recipe": recipe(embedding),
        "source": source.name,
        "source_weights": {p.name: file_sha256(p) for p in sorted(source.glob("*.safetensors"))},
        "dithered": counts,
        "tied_embedding": tied,
        "weights": {w: file_sha256(out / w) for w in weights},
        "tensors_sha256": tensors_sha256(model.state_dict()),
    }
    if len(weights) == 1:
        meta["sha256"] = meta["weights"][weights[0]]
    if multimodal:   # (a causal LM's metadata stays as smollm2-offgrid-v1 first wrote it)
        meta["dithered_names"] = names
        meta["unchanged"] = "every other tensor: the vision tower, the projector, the norms"
    (out / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def offgrid_dir(source: Path, target: Path, seed: int = 0) -> Path:
    """``target``: the off-grid copy of ``source`` with noise ``seed``, built once
    (atomically: written beside ``target`` and renamed into place)."""
    target = Path(target)
    if target.is_dir():
        return target
    log.info("building the off-grid copy of %s in %s (once)", source, target)
    return build_dir_once(target, lambda tmp: write_offgrid(Path(source), tmp, seed))


def smollm2_offgrid_dir() -> Path:
    """SmolLM2-135M-Instruct with every weight moved off its GGUF grid (seed 0), cached
    under ``luq.store.cache_root()``."""
    return offgrid_dir(smollm2_dir(), cache_root() / SMOLLM2_OFFGRID_CACHE, seed=0)


def tiny_vlm_offgrid_dir() -> Path:
    """tiny-vlm (:func:`luq.zoo.tinyvlm.trained_dir`, the shipped weights merged) with its language
    model's decoder linears and token embedding moved off their GGUF grids (seed 0); the vision tower
    and the projector are tiny-vlm's. Cached under ``luq.store.cache_root()``, keyed by tiny-vlm's
    VERSION and weights digest (a new tiny-vlm builds a new copy)."""
    source = tiny_vlm_dir()
    try:
        info = json.loads((source / TINY_VLM_INFO).read_text())
        name = TINY_VLM_OFFGRID_CACHE.format(recipe=RECIPE_VERSION, version=info["version"],
                                             weights=info["weights_sha256"])
    except (OSError, ValueError, KeyError):
        raise LuqError(f"{source} has no readable {TINY_VLM_INFO}; is it luq.zoo.tinyvlm's trained_dir?") from None
    return offgrid_dir(source, cache_root() / name, seed=0)


def read_metadata(path: Path) -> dict:
    """The ``luq_offgrid.json`` of an off-grid directory."""
    return json.loads((Path(path) / METADATA).read_text())
