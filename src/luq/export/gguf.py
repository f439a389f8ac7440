"""A luq artifact as a GGUF file that llama.cpp runs, with no re-quantization.

A stored weight goes to GGUF only where a GGUF block type holds the same numbers:

- GPTQ 4-bit, asymmetric, contiguous groups of a multiple of 32 columns -> Q4_1: per block of
  32 weights d = scale (the stored fp16, exact) and m = -scale * zero rounded once to fp16, so
  d * q + m = scale * (q - zero) up to that one rounding of m (half an fp16 ulp of |scale * zero|).
- GPTQ 4-bit symmetric (zero 8) -> Q4_0: d * (q - 8), exact.
- GPTQ 8-bit -> Q8_0 (d * q, q in int8), exact, when every code minus its zero fits int8: always for
  a symmetric grid (zero 128); for an asymmetric one only if the data happen to.
- Unquantized tensors as stored: 2-D at their stored float type (f16 or f32; bf16 -> f32,
  exact), 1-D (norms) at f32 as llama.cpp wants them.

Anything else is refused with one line naming the first such linear and why: binarized weights
(BiLLM, sign) and 2/3-bit grids with free fp16 scales have no GGUF type; act-order groups (`g_idx`)
are not contiguous; groups not a multiple of 32 columns cross GGUF's blocks.

The model must be a Llama (llama.cpp's `llama` architecture: SmolLM2, Llama 2/3, ...), with a
byte-level BPE tokenizer. Tensors take llama.cpp's names (the `gguf` package's tensor name map),
and the q and k projections' rows are reordered from transformers' rotary layout (halves) to
llama.cpp's (interleaved pairs), as llama.cpp's own converter does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from luq.errors import LuqError
from luq.quant import GPTQWeight, QuantizedWeight, weight_from_state_dict
from luq.quant.packing import unpack_bits
from luq.store import read_tensors, verify_artifact

BLOCK = 32  # weights per block of Q4_0, Q4_1 and Q8_0


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


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer of tokenizer.json, from its structure."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if spec and byte_level(spec):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"
    raise LuqError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(spec)[:80]} has no llama.cpp name "
                   "known to luq (byte-level BPE with the GPT-2 split, with or without single digits)")


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LuqError(f"GGUF export: {folder} has no tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE":
        raise LuqError(f"GGUF export: only byte-level BPE tokenizers are supported, not {spec['model'].get('type')}")
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
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _add_llama_metadata(writer, config: dict) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise LuqError(f"GGUF export: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _dense(t: torch.Tensor) -> Encoded:
    from gguf import GGMLQuantizationType as T

    if t.dim() == 1 or t.dtype not in (torch.float16, torch.float32):
        t = t.float()  # norms at f32 (what llama.cpp wants); bf16 -> f32 is exact
    return Encoded(T.F16 if t.dtype == torch.float16 else T.F32, t.contiguous().numpy(), tuple(t.shape))


def plan_tensors(folder: Path, config: dict) -> dict[str, Encoded]:
    """Every tensor of the GGUF file by llama.cpp name, encoded; one LuqError for the first
    linear that has no GGUF type (with how many more there are)."""
    import gguf

    qconfig = config["quantization_config"]
    stored = read_tensors(folder)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    out: dict[str, Encoded] = {}
    refused: list[tuple[str, str]] = []

    def put(hf_name: str, encoded: Encoded) -> None:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LuqError(f"GGUF export: {hf_name} has no llama.cpp tensor name")
        module = hf_name.rpartition(".")[0].rpartition(".")[2]
        if module in heads:  # rotary layout: reorder the rows
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
        put(name, _dense(tensor))
    return out


def export_gguf(artifact: Path | str, out: Path | str) -> dict:
    """Write the luq artifact at `artifact` as the GGUF file `out` (atomically); returns a summary
    {"tensors": {gguf type: count}, "bytes": file size}."""
    import gguf

    from luq.store import atomic_write

    folder = Path(artifact)
    verify_artifact(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise LuqError(f"GGUF export supports Llama models (llama.cpp's llama architecture); {folder} is "
                       f"{config.get('model_type')!r}")
    tensors = plan_tensors(folder, config)
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    quantized = [t for t in tensors.values() if t.qtype.name.startswith("Q")]
    file_types = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    main_type = max(quantized, key=lambda t: t.data.nbytes).qtype.name if quantized else None

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(config.get("_name_or_path") or folder.name)
        writer.add_file_type(file_types.get(main_type, gguf.LlamaFileType.MOSTLY_F16))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_llama_metadata(writer, config)
        _add_tokenizer(writer, folder, config["vocab_size"])
        for name, t in tensors.items():
            raw_dtype = t.qtype if t.data.dtype == np.uint8 else None
            writer.add_tensor(name, t.data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return {"tensors": counts, "bytes": out.stat().st_size}


def read_gguf(path: Path | str) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file by name, de-quantized by the `gguf` package to float32, in
    torch's [rows, cols] order (rows of q/k still in llama.cpp's rotary order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            .reshape(tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
