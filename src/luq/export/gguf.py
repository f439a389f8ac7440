"""A luq artifact as a GGUF file that llama.cpp runs, with no re-quantization.

A stored weight goes to GGUF only where a GGUF block type holds the same numbers:

- A weight of one of llama.cpp's own block formats (method "ggml", luq.quant.ggml: q8_0, q6_k, q5_k,
  q5_1, q5_0, q4_k, q4_1, q4_0, iq4_nl, q3_k, q2_k, tq2_0, tq1_0) -> its own type, its stored bytes
  as they are (they are ggml's blocks byte for byte): exact.
- GPTQ 4-bit, asymmetric, contiguous groups of a multiple of 32 columns -> Q4_1: per block of
  32 weights d = scale (the stored fp16, exact) and m = -scale * zero rounded once to fp16, so
  d * q + m = scale * (q - zero) up to that one rounding of m (half an fp16 ulp of |scale * zero|).
- GPTQ 4-bit symmetric (zero 8) -> Q4_0: d * (q - 8), exact.
- GPTQ 8-bit -> Q8_0 (d * q, q in int8), exact, when every code minus its zero fits int8: always for
  a symmetric grid (zero 128); for an asymmetric one only if the data happen to.
- Unquantized tensors as stored: 2-D at their stored float type (f16 or f32; bf16 -> f32,
  exact), 1-D (norms, biases) at f32 as llama.cpp wants them.

A transformers checkpoint that luq did not quantize (no quantization_config) exports the same way, every
tensor unquantized: the float GGUF that llama.cpp's `llama-quantize` and `llama-perplexity
--kl-divergence-base` start from.

Anything else is refused with one line naming the first such linear and why: binarized weights
(BiLLM, sign) and 2/3-bit grids with free fp16 scales have no GGUF type; act-order groups (`g_idx`)
are not contiguous; groups not a multiple of 32 columns cross GGUF's blocks.

Architectures (config.json's model_type -> llama.cpp's architecture), written as llama.cpp's own
`convert_hf_to_gguf.py` writes them, with its tensor names (the `gguf` package's tensor name map):

- `llama` -> llama (SmolLM2, Llama 2, Llama 3.0; default or linear rope): the q and k projections'
  rows (and biases) are reordered from transformers' rotary layout (halves) to llama.cpp's
  (interleaved pairs), as the converter does; `llama.vocab_size`, `llama.rope.dimension_count`.
- `qwen2` -> qwen2 (Qwen2, Qwen2.5 text): q/k/v biases; no reordering (llama.cpp's NEOX rope is
  transformers' layout).
- `gemma3_text` -> gemma3 (Gemma3ForCausalLM): every norm weight (input, post-attention,
  pre/post-feedforward, q/k norms, final) is written as 1 + w, since Gemma3RMSNorm computes
  x * (1 + w) and llama.cpp x * w (added in float32, as transformers computes it; the converter adds
  in the stored dtype); no reordering; the embedding unscaled (llama.cpp multiplies by sqrt(hidden)
  itself); the rope base of the global layers and of the sliding ones (`rope.freq_base_swa`), linear
  rope scaling of the global layers, `attention.sliding_window`, and the per-layer sliding pattern as
  an array where the model's layer_types differ from the one llama.cpp assumes (every 6th global).

What llama.cpp would compute differently is refused up front, in one line: other rope scalings
(llama3, yarn, ...), Qwen2's sliding window, Gemma 3 with attention biases, attention logit
softcapping, bidirectional attention, another activation, or a query scale llama.cpp does not use.

Tokenizers, from the artifact's tokenizer.json:

- byte-level BPE -> `gpt2` with the pre-tokenizer llama.cpp names, recognised from its structure:
  GPT-2's split (`gpt-2`), with single digits first (`smollm`), Qwen2's regex (`qwen2`) or
  Llama 3's (`llama-bpe`); merges as stored.
- SentencePiece-style BPE (byte fallback, spaces as "▁": Gemma, Llama 2) -> `llama` (SentencePiece),
  each piece scored by minus the rank of the first merge that makes it (SentencePiece merges the
  best-scored adjacent pair first, BPE applies the lowest-ranked merge first, and the merges of such
  a tokenizer.json were generated in score order), byte tokens typed BYTE, `add_space_prefix` from
  the normalizer. llama.cpp's converter reads tokenizer.model with sentencepiece instead; a luq
  artifact holds the tokenizer.json that transformers saves.

Special tokens, add_bos/add_eos and the chat template (`tokenizer.chat_template`) come from the
tokenizer files through the `gguf` package's SpecialVocab, as in the converter.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from luq.artifact import CONFIG, QUANT_METHOD, read_tensors, verify_artifact
from luq.errors import LuqError
from luq.quant import GGMLWeight, GPTQWeight, QuantizedWeight, weight_from_state_dict
from luq.quant.ggml import ggml_nbytes, to_gguf_bytes
from luq.quant.packing import unpack_bits

BLOCK = 32  # weights per block of Q4_0, Q4_1 and Q8_0 (the GPTQ mappings)


class NoGgufType(Exception):
    """A stored weight that no GGUF block type holds exactly (the message says why)."""


@dataclass
class Encoded:
    """One tensor as GGUF stores it: `data` is [rows, bytes per row] for a block type."""

    qtype: "object"            # gguf.GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]     # torch order: [rows, cols]


def _block_params(weight: GPTQWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [rows, blocks, 32] int64, scale [rows, blocks] fp16, zero [rows, blocks] int64)."""
    rows, cols = weight.shape
    if weight.g_idx is not None:
        raise NoGgufType("its act-order groups (g_idx) are not contiguous, and GGUF blocks are")
    if cols % BLOCK or weight.group_size % BLOCK:
        raise NoGgufType(f"its groups of {weight.group_size} columns (of {cols}) cross GGUF's blocks of {BLOCK}")
    group_of_block = torch.arange(0, cols, BLOCK) // weight.group_size
    codes = unpack_bits(weight.qweight, weight.bits, cols).reshape(rows, cols // BLOCK, BLOCK)
    scale = weight.scales[:, group_of_block].to(torch.float16)
    if weight.qzeros is None:
        zero = torch.full(scale.shape, 2 ** weight.bits // 2, dtype=torch.int64)
    else:
        zero = unpack_bits(weight.qzeros, weight.bits, weight.n_groups)[:, group_of_block]
    return codes.numpy(), scale.numpy(), zero.numpy()


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """32 codes in 0..15 per block -> 16 bytes: byte j holds code j (low nibble) and code j+16 (high)."""
    codes = codes.astype(np.uint8)
    return codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << np.uint8(4))


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)[..., None].view(np.uint8)


def encode_weight(weight: QuantizedWeight):
    """(GGUF type, [rows, bytes per row] uint8) of a stored weight, exactly; NoGgufType if none holds it."""
    from gguf import GGMLQuantizationType as T

    if isinstance(weight, GGMLWeight):  # ggml's own blocks: written as they are
        qtype, data = to_gguf_bytes(weight)
        rows, row_bytes = weight.shape[0], ggml_nbytes(weight.shape, weight.type) // weight.shape[0]
        if data.shape != (rows, row_bytes):
            raise NoGgufType(f"its stored {weight.type} blocks are {list(data.shape)} bytes, a {list(weight.shape)} "
                             f"weight needs [{rows}, {row_bytes}] (corrupt artifact)")
        return qtype, data
    if not isinstance(weight, GPTQWeight):
        kind = "binarized" if weight.method in ("billm", "billm-compact", "sign") else weight.method
        raise NoGgufType(f"it is {kind} ({weight.method}): no GGUF type holds {kind} weights")
    rows = weight.shape[0]
    if weight.bits == 4:
        codes, scale, zero = _block_params(weight)
        if weight.sym:
            blocks = np.concatenate([_fp16_bytes(scale), _nibbles(codes)], axis=-1)
            return T.Q4_0, blocks.reshape(rows, -1)
        # m = -scale * zero: the product is exact in float32 (11 + 4 bits), then one rounding to fp16
        m = -(scale.astype(np.float32) * zero.astype(np.float32))
        blocks = np.concatenate([_fp16_bytes(scale), _fp16_bytes(m), _nibbles(codes)], axis=-1)
        return T.Q4_1, blocks.reshape(rows, -1)
    if weight.bits == 8:
        codes, scale, zero = _block_params(weight)
        q = codes - zero[..., None]
        if q.min() < -128 or q.max() > 127:
            raise NoGgufType("its 8-bit grid is asymmetric and its codes minus zeros leave int8's range, "
                             "so Q8_0 cannot hold it")
        blocks = np.concatenate([_fp16_bytes(scale), q.astype(np.int8).view(np.uint8)], axis=-1)
        return T.Q8_0, blocks.reshape(rows, -1)
    raise NoGgufType(f"it is {weight.bits}-bit GPTQ with free fp16 group scales; GGUF's {weight.bits}-bit types "
                     "(k-quants) quantize their scales, so they cannot hold it")


def rope_permutation(n_heads: int, rows: int) -> torch.Tensor:
    """Row order taking transformers' rotary layout (each head: first half, second half) to
    llama.cpp's (each head: interleaved pairs): new row (h, j, s) is old row (h, s, j)."""
    head_dim = rows // n_heads
    return torch.arange(rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------------------- tokenizers

# byte-level BPE pre-tokenizers whose Split regex llama.cpp knows by name (tokenizer.json's text): Qwen2's
# splits digits one by one, Llama 3's in runs of up to three
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEXES = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}
SPACE = "\u2581"  # SentencePiece's "▁"


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer of tokenizer.json, from its structure."""
    def byte_level(p, use_regex=True):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == use_regex

    if spec and byte_level(spec):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"
        if (len(parts) == 2 and parts[0].get("type") == "Split" and not parts[0].get("invert")
                and parts[0].get("behavior") == "Isolated" and byte_level(parts[1], use_regex=False)):
            name = _SPLIT_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
            if name is not None:
                return name
    raise LuqError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(spec)[:80]} has no llama.cpp name "
                   "known to luq (byte-level BPE with the GPT-2 split, with or without single digits, or Qwen2's "
                   "or Llama 3's split)")


def _parts(spec: dict | None, key: str) -> list[dict]:
    """A normalizer / pre-tokenizer of tokenizer.json as its flat list of steps."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [q for p in spec.get(key, []) for q in _parts(p, key)]
    return [spec]


def _sentencepiece_style(spec: dict) -> bool | None:
    """For a BPE tokenizer.json made from a SentencePiece model (byte fallback, spaces as "▁"): whether it
    prepends "▁" to the text (llama.cpp's add_space_prefix); None for any other tokenizer."""
    model = spec["model"]
    norm = _parts(spec.get("normalizer"), "normalizers")
    pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
    metaspace = [p for p in pre if p.get("type") == "Metaspace"]
    spaces = any(p.get("type") == "Replace" and p.get("content") == SPACE for p in norm) or metaspace
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not spaces:
        return None
    other = [p for p in pre if p.get("type") != "Metaspace"
             and not (p.get("type") == "Split" and (p.get("pattern") or {}).get("String") == " ")]
    if other:  # a split before the pieces (digits, punctuation) that llama.cpp's SentencePiece does not make
        raise LuqError(f"GGUF export: the SentencePiece-style tokenizer splits its text first ({other[0].get('type')}),"
                       " which llama.cpp's SentencePiece tokenizer does not do")
    prepend = any(p.get("type") == "Prepend" and p.get("prepend") == SPACE for p in norm)
    for m in metaspace:
        scheme = m.get("prepend_scheme", "always" if m.get("add_prefix_space", True) else "never")
        prepend = prepend or scheme in ("always", "first")
    return prepend


def _sentencepiece_vocab(spec: dict, vocab_size: int):
    """(tokens, scores, types) for llama.cpp's SentencePiece tokenizer ("llama") from tokenizer.json:
    a piece made by merges scores minus the rank of the first merge that makes it (SentencePiece
    merges the best-scored adjacent pair first, BPE the lowest-ranked merge); other pieces score below
    every merge; byte tokens are BYTE, added tokens CONTROL (special) or USER_DEFINED, as the converter."""
    import gguf

    model = spec["model"]
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    unknown = model.get("unk_token")
    for piece, i in model["vocab"].items():
        if i >= vocab_size:
            continue
        tokens[i] = piece
        scores[i] = -float(rank[piece]) if piece in rank else -float(len(merges) + 1)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            types[i] = gguf.TokenType.BYTE
        elif piece == unknown:
            types[i] = gguf.TokenType.UNKNOWN
        else:
            types[i] = gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            continue
        if added.get("special"):
            tokens[i], types[i] = added["content"], gguf.TokenType.CONTROL
        else:  # pre-normalized, as the converter writes user-defined tokens
            tokens[i], types[i] = added["content"].replace(SPACE, " "), gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
    return tokens, scores, types


def _tokenizer_writer(folder: Path, vocab_size: int) -> Callable[[Any], None]:
    """Checks the artifact's tokenizer now (one LuqError if llama.cpp has no equal of it); returns the
    function that writes it into a GGUFWriter."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LuqError(f"GGUF export: {folder} has no tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    kind = spec["model"].get("type")
    if kind != "BPE":
        raise LuqError(f"GGUF export: only BPE tokenizers (byte-level, or SentencePiece-style with byte fallback) "
                       f"are supported, not {kind}")
    prefix = _sentencepiece_style(spec)
    if prefix is not None:
        tokens, scores, types = _sentencepiece_vocab(spec, vocab_size)

        def add(writer) -> None:
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(prefix)
            gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return add

    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in spec["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED

    def add(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return add


# ------------------------------------------------------------------------------------- architectures

def _rope_params(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_kind(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def _check_rope(params: dict, what: str = "") -> None:
    kind = _rope_kind(params)
    if kind not in ("default", "linear"):
        raise LuqError(f"GGUF export: {what}rope scaling {kind!r} is not supported (luq writes default and linear "
                       "rope)")


def _add_rope(writer, params: dict, theta: float) -> None:
    import gguf

    writer.add_rope_freq_base(float(theta))
    if _rope_kind(params) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def _theta(config: dict, default: float = 10000.0) -> float:
    return float(_rope_params(config).get("rope_theta", config.get("rope_theta", default)))


def _check_activation(config: dict, key: str, expected: str, arch: str) -> None:
    act = config.get(key)
    if act is not None and act != expected:
        raise LuqError(f"GGUF export: llama.cpp's {arch} computes {expected}; this model's {key} is {act!r}")


def _common_metadata(writer, config: dict) -> None:
    """What llama.cpp's converter writes for every text model (TextModel.set_gguf_parameters)."""
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _check_llama(config: dict) -> None:
    _check_rope(_rope_params(config))
    _check_activation(config, "hidden_act", "silu", "llama")


def _llama_metadata(writer, config: dict) -> None:
    _common_metadata(writer, config)
    _add_rope(writer, _rope_params(config), _theta(config))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _check_qwen2(config: dict) -> None:
    _check_rope(_rope_params(config))
    _check_activation(config, "hidden_act", "silu", "qwen2")
    if config.get("use_sliding_window"):
        raise LuqError("GGUF export: llama.cpp's qwen2 has no sliding-window attention; this model uses it")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise LuqError("GGUF export: llama.cpp's qwen2 needs heads x head_dim = hidden size")


def _qwen2_metadata(writer, config: dict) -> None:
    _common_metadata(writer, config)
    _add_rope(writer, _rope_params(config), _theta(config))


def _gemma3_rope(config: dict) -> tuple[dict, dict]:
    """(rope of the global layers, rope of the sliding ones), each with its rope_theta: transformers 5
    nests them by layer type; transformers 4 had rope_theta + rope_scaling (global) and
    rope_local_base_freq (sliding)."""
    params = _rope_params(config)
    if "full_attention" in params or "sliding_attention" in params:
        return ({"rope_theta": 1_000_000.0, **params.get("full_attention", {})},
                {"rope_theta": 10000.0, **params.get("sliding_attention", {})})
    return ({**params, "rope_theta": params.get("rope_theta", config.get("rope_theta", 1_000_000.0))},
            {"rope_theta": config.get("rope_local_base_freq", 10000.0)})


def _gemma3_sliding(config: dict) -> list[bool]:
    """Per layer: does it use sliding-window attention."""
    types = config.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types]
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
    return [bool((i + 1) % pattern) for i in range(config["num_hidden_layers"])]


def _check_gemma3(config: dict) -> None:
    full, sliding = _gemma3_rope(config)
    _check_rope(full, "the global layers' ")
    if _rope_kind(sliding) != "default":
        raise LuqError(f"GGUF export: the sliding layers' rope scaling {_rope_kind(sliding)!r} has no GGUF key")
    _check_activation(config, "hidden_activation", "gelu_pytorch_tanh", "gemma3")
    if config.get("attention_bias"):
        raise LuqError("GGUF export: llama.cpp's gemma3 has no attention biases; this model has them")
    if config.get("attn_logit_softcapping") is not None:
        raise LuqError("GGUF export: llama.cpp's gemma3 has no attention logit softcapping; this model uses it")
    if config.get("use_bidirectional_attention"):
        raise LuqError("GGUF export: this Gemma 3 attends bidirectionally; llama.cpp's gemma3 is causal")
    types = config.get("layer_types") or []
    if any(t not in ("sliding_attention", "full_attention") for t in types):
        raise LuqError(f"GGUF export: layer types {sorted(set(types))} are not Gemma 3's")
    # llama.cpp scales queries by 1/sqrt(head_dim) (27B: 1/sqrt(hidden / heads)); transformers by
    # query_pre_attn_scalar^-1/2
    heads, head_dim = config["num_attention_heads"], config.get("head_dim") or 256
    implied = config["hidden_size"] / heads if config["num_hidden_layers"] == 62 else head_dim
    scalar = config.get("query_pre_attn_scalar", implied)
    if abs(float(scalar) - implied) > 1e-6 * implied:
        raise LuqError(f"GGUF export: this Gemma 3 scales queries by query_pre_attn_scalar={scalar}^-1/2; "
                       f"llama.cpp's gemma3 uses {implied:g}^-1/2 for a model of this shape")


def _gemma3_metadata(writer, config: dict) -> None:
    _common_metadata(writer, config)
    head_dim = config.get("head_dim") or 256
    if not config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    full, sliding = _gemma3_rope(config)
    _add_rope(writer, full, full["rope_theta"])
    writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    swa = _gemma3_sliding(config)
    if any(swa):
        writer.add_sliding_window(int(config["sliding_window"]))
        if swa != [i % 6 < 5 for i in range(len(swa))]:  # llama.cpp's default pattern for gemma3
            writer.add_sliding_window_pattern(swa)


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type becomes a llama.cpp architecture."""

    name: str                    # llama.cpp's (general.architecture)
    gguf_arch: str               # gguf.MODEL_ARCH member: its tensor names
    rope_permute: bool           # q/k rows from transformers' rotary halves to llama.cpp's pairs
    norm_shift: float            # added to every norm weight (Gemma: x * (1 + w) in transformers)
    check: Callable[[dict], None]
    metadata: Callable[[Any, dict], None]


ARCHITECTURES = {
    "llama": Architecture("llama", "LLAMA", True, 0.0, _check_llama, _llama_metadata),
    "qwen2": Architecture("qwen2", "QWEN2", False, 0.0, _check_qwen2, _qwen2_metadata),
    "gemma3_text": Architecture("gemma3", "GEMMA3", False, 1.0, _check_gemma3, _gemma3_metadata),
}


def architecture(config: dict, where: object = "the model") -> Architecture:
    """The llama.cpp architecture of a model's config.json; one LuqError if luq does not export it."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        hint = " (export Gemma 3's text decoder, model_type gemma3_text)" if model_type == "gemma3" else ""
        raise LuqError(f"GGUF export supports {', '.join(ARCHITECTURES)} models (llama.cpp's "
                       f"{', '.join(a.name for a in ARCHITECTURES.values())}); {where} is {model_type!r}{hint}")
    arch.check(config)
    return arch


# ------------------------------------------------------------------------------------------- tensors

def _dense(t: torch.Tensor, shift: float = 0.0) -> Encoded:
    from gguf import GGMLQuantizationType as T

    if t.dim() == 1 or t.dtype not in (torch.float16, torch.float32) or shift:
        t = t.float()  # norms at f32 (what llama.cpp wants); bf16 -> f32 is exact
    if shift:
        t = t + shift
    return Encoded(T.F16 if t.dtype == torch.float16 else T.F32, t.contiguous().numpy(), tuple(t.shape))


def plan_tensors(folder: Path, config: dict) -> dict[str, Encoded]:
    """Every tensor of the GGUF file by llama.cpp name, encoded; one LuqError for the first
    linear that has no GGUF type (with how many more there are)."""
    import gguf

    arch = architecture(config, folder)
    qconfig = config.get("quantization_config") or {"modules": {}}   # none: an unquantized checkpoint
    stored = read_tensors(folder)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]} if arch.rope_permute else {}
    out: dict[str, Encoded] = {}
    refused: list[tuple[str, str]] = []

    def put(hf_name: str, encoded: Encoded) -> None:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LuqError(f"GGUF export: {hf_name} has no llama.cpp tensor name")
        module = hf_name.rpartition(".")[0].rpartition(".")[2]
        if module in heads:  # rotary layout: reorder the rows (of a weight's blocks too: a row is whole blocks)
            perm = rope_permutation(heads[module], encoded.data.shape[0]).numpy()
            encoded.data = encoded.data[perm]
        out[gguf_name] = encoded

    # packed embeddings too (a head tied to one is llama.cpp's default: no output tensor is written)
    for name, wconfig in {**qconfig.get("embeddings", {}), **qconfig["modules"]}.items():
        prefix = name + "."
        own = {k[len(prefix):]: stored.pop(k) for k in list(stored)
               if k.startswith(prefix) and "." not in k[len(prefix):] and k != prefix + "bias"}
        weight = weight_from_state_dict(own, wconfig)
        try:
            qtype, data = encode_weight(weight)
        except NoGgufType as why:
            refused.append((name, str(why)))
            continue
        put(prefix + "weight", Encoded(qtype, data, weight.shape))
    if refused:
        more = f" ({len(refused) - 1} more linears cannot be exported)" if len(refused) > 1 else ""
        raise LuqError(f"GGUF export refused: {refused[0][0]}: {refused[0][1]}{more}")
    for name, tensor in stored.items():
        shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
        put(name, _dense(tensor, shift))
    return out


# the file type llama.cpp reports for a file mostly of one ggml type
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL", "TQ1_0": "MOSTLY_TQ1_0",
               "TQ2_0": "MOSTLY_TQ2_0"}


def _file_type(tensors: dict[str, Encoded]):
    import gguf

    weights: dict[str, int] = {}
    for t in tensors.values():
        if t.qtype.name not in ("F16", "F32"):
            weights[t.qtype.name] = weights.get(t.qtype.name, 0) + int(np.prod(t.shape))
    main = max(weights, key=weights.get) if weights else None
    return gguf.LlamaFileType[_FILE_TYPES.get(main, "MOSTLY_F16")]


def _writer(path: Path, folder: Path, config: dict, tensors: dict[str, Encoded], with_data: bool):
    """A GGUFWriter at `path` holding the file's metadata and its tensors (their data, or with_data=False
    only their names, types and sizes)."""
    import gguf

    arch = architecture(config, folder)
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(Path(config.get("_name_or_path") or folder.name).name)   # a name, not a local path
    writer.add_file_type(_file_type(tensors))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch.metadata(writer, config)
    _tokenizer_writer(folder, config["vocab_size"])(writer)
    for name, t in tensors.items():
        raw_dtype = t.qtype if t.data.dtype == np.uint8 else None
        if with_data:
            writer.add_tensor(name, t.data, raw_dtype=raw_dtype)
        else:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=raw_dtype)
    return writer


def _summary(config: dict, folder: Path, tensors: dict[str, Encoded]) -> dict:
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return {"tensors": counts, "tensor_bytes": sum(t.data.nbytes for t in tensors.values()),
            "architecture": architecture(config, folder).name}


def gguf_size(artifact: Path | str) -> dict:
    """What `export_gguf` would write for the artifact folder `artifact`, without writing it: {"tensors":
    {gguf type: count}, "tensor_bytes", "bytes" (the whole file: metadata, tokenizer, tensor infos,
    alignment padding and tensors), "architecture"}. Raises LuqError where the export would refuse.
    The folder need not be verified yet (a run counts its artifact before the manifest is written)."""
    import gguf

    folder = Path(artifact)
    config = json.loads((folder / CONFIG).read_text())
    tensors = plan_tensors(folder, config)
    with tempfile.TemporaryDirectory() as tmp:
        writer = _writer(Path(tmp) / "head.gguf", folder, config, tensors, with_data=False)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.flush()
        head = writer.fout[0].tell()
        writer.close()
    align = writer.data_alignment
    data = sum(gguf.GGUFWriter.ggml_pad(t.data.nbytes, align) for t in tensors.values())
    return {**_summary(config, folder, tensors), "bytes": gguf.GGUFWriter.ggml_pad(head, align) + data}


def _checked_config(folder: Path) -> dict:
    """config.json of a verified luq artifact, or of a transformers checkpoint with no quantization."""
    if not (folder / CONFIG).is_file():
        raise LuqError(f"{folder} is not a luq artifact or a transformers checkpoint (no {CONFIG})")
    config = json.loads((folder / CONFIG).read_text())
    qconfig = config.get("quantization_config")
    if qconfig is None:
        return config
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise LuqError(f"{folder} is quantized by {qconfig.get('quant_method')!r}, not luq: luq exports its own "
                       "artifacts and unquantized checkpoints")
    verify_artifact(folder)
    return config


def export_gguf(artifact: Path | str, out: Path | str) -> dict:
    """Write the luq artifact (or unquantized checkpoint) at `artifact` as the GGUF file `out` (atomically); returns a summary
    {"tensors": {gguf type: count}, "tensor_bytes", "bytes": file size, "architecture": llama.cpp's name}."""
    from luq.store import atomic_write

    folder = Path(artifact)
    config = _checked_config(folder)
    tensors = plan_tensors(folder, config)

    def write(tmp: Path) -> None:
        writer = _writer(tmp, folder, config, tensors, with_data=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return {**_summary(config, folder, tensors), "bytes": out.stat().st_size}


def read_gguf(path: Path | str) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file by name, de-quantized by the `gguf` package to float32, in
    torch's [rows, cols] order (rows of q/k still in llama.cpp's rotary order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            .reshape(tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
