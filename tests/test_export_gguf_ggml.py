"""`luq export --format gguf` of artifacts whose linears are llama.cpp's own block formats (luq.quant.ggml),
for each architecture luq exports: a tiny Llama and a tiny Qwen2 (SmolLM2's real tokenizer) and a tiny
Gemma 3 (a SentencePiece-style tokenizer trained here on Wikipedia text), every ggml type among their linears
and packed embeddings. The artifacts are built from luq's lower-level pieces (a format's solver per linear,
QuantLinear / QuantEmbedding, write_artifact), not through luq.quantize.

Checked: each tensor's GGUF type is the planned one and `gguf.quants.dequantize` of it equals luq's
dequantize() of the stored weight bit for bit (Llama's q/k rows in llama.cpp's rotary order); dense tensors
exact (Gemma's norms as 1 + w); the metadata keys llama.cpp reads for the architecture; the tokenizer; the
chat template; one-line refusals. Where llama.cpp's tools are built, each file is run by llama.cpp."""

import json
import math
import os
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from luq.zoo.smollm2 import smollm2_dir, wikipedia_text
from luq.cli import main
from luq.errors import LuqError
from luq.export import export_gguf
from luq.export.gguf import _pre_tokenizer, architecture, rope_permutation
from luq.quant import BiLLM, QuantLinear, get_format
from luq.quant.embedding import QuantEmbedding, TiedQuantHead
from luq.quant.linear import replace_linears
from luq.artifact import read_tensors, write_artifact

HIDDEN, FFN = 256, 512   # multiples of 256: every ggml type (K-quants and tq* have blocks of 256 columns)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
ALL_TYPES = ("q4_k", "q6_k", "q8_0", "q4_0", "q5_k", "q3_k", "q2_k", "iq4_nl", "q5_0", "q5_1", "q4_1", "tq2_0",
             "tq1_0")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                  "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def layer_plan(types, layers=2):
    """{linear name: ggml type}: the 7 decoder linears of each layer in turn take the next types."""
    return {f"model.layers.{i}.{p}": types[(7 * i + j) % len(types)] for i in range(layers) for j, p in enumerate(PROJ)}


def hessian(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    return 2 * x.T @ x / x.shape[0]


def quantize_into(model, plan, embedding=None):
    """Every linear of `plan` (and the input embedding, at type `embedding`) replaced by luq's packed module
    of its ggml type; returns ({name: stored weight}, qconfig as luq.api writes it)."""
    weights = {}
    for k, (name, fmt) in enumerate(plan.items()):
        w = model.get_submodule(name).weight.detach().float()
        weights[name] = get_format(fmt).quantize(w, hessian(w.shape[1], k))
    replace_linears(model, weights)
    if embedding is not None:
        table = model.model.embed_tokens
        weights["model.embed_tokens"] = q = get_format(embedding).quantize(table.weight.detach().float(),
                                                                           hessian(HIDDEN, 99))
        packed = QuantEmbedding.from_embedding(table, q)
        model.model.embed_tokens = packed
        if model.config.tie_word_embeddings:
            model.lm_head = TiedQuantHead(packed)
    modules = dict(model.named_modules())
    formats = {**plan, **({"model.embed_tokens": embedding} if embedding else {})}
    qconfig = {"luq_version": "test", "storage_dtype": "float16", "allocate": "measured",
               "modules": {n: m.weight_config for n, m in modules.items() if isinstance(m, QuantLinear)},
               "embeddings": {n: m.weight_config for n, m in modules.items() if isinstance(m, QuantEmbedding)},
               "tied_heads": {n: next(e for e, x in modules.items() if x is m.embedding)
                              for n, m in modules.items() if isinstance(m, TiedQuantHead)},
               "plan": plan, "formats": {f: get_format(f).settings() for f in sorted(set(formats.values()))}}
    return weights, qconfig


def sharpen(model, seed):
    """Norm weights and biases random (transformers initialises them to constants: a norm written without
    Gemma's +1, or a bias left out, shows), attention peaked (q, k x3) and next-token distributions peaked
    (embedding and head x4): a rotary order or a norm written wrong moves the perplexity by far more than
    llama.cpp's roundings do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3)
        if model.config.model_type != "gemma3_text":  # Gemma scales its embedding by sqrt(hidden) already
            model.get_input_embeddings().weight.mul_(4)
            if not model.config.tie_word_embeddings:
                model.get_output_embeddings().weight.mul_(4)


def write(model, tokenizer, plan, out, embedding=None, seed=0):
    sharpen(model, seed)
    weights, qconfig = quantize_into(model, plan, embedding)
    write_artifact(out, model, tokenizer, qconfig, {}, torch.float16)
    planned = {**plan, **({"model.embed_tokens": embedding} if embedding else {})}
    return {"dir": out, "weights": weights, "plan": planned,
            "config": json.loads((out / "config.json").read_text()), "tokenizer": tokenizer}


def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


def llama_artifact(root):
    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.1)
    return write(LlamaForCausalLM(config).eval(), tok, layer_plan(ALL_TYPES), root / "llama")


def qwen2_artifact(root):
    """Untied head quantized as a linear (q4_k, fitted round-to-nearest: GPTQ on its 49152 rows takes a
    minute here); q/k/v biases."""
    tok = smollm2_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.1)
    plan = {**layer_plan(ALL_TYPES[5:] + ALL_TYPES[:5]), "lm_head": "rtn-q4_k"}
    return write(Qwen2ForCausalLM(config).eval(), tok, plan, root / "qwen2", seed=1)


def sentencepiece_style_tokenizer(folder, pieces=700):
    """A Gemma-style tokenizer (transformers' GemmaTokenizer: BPE with byte fallback, spaces as "▁", no
    prefix space) over a vocabulary trained here on Wikipedia text, laid out as Gemma's: specials, the 256
    byte tokens, characters, merged pieces. Its merges are made as transformers makes them from a
    SentencePiece model: every split of every piece into two pieces, in the pieces' score order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import AddedToken

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    text = wikipedia_text(max_chars=300_000)
    trainer_tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    merged = []
    for m in trained["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a + b not in merged:
            merged.append(a + b)
    chars = sorted((p for p in trained["vocab"] if len(p) == 1), key=trained["vocab"].get)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + chars + [p for p in merged if p not in chars]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(order))}
    merges = [(p[:k], p[k:]) for p in merged for k in sorted(range(1, len(p)), key=lambda k: (vocab.get(p[:k], 1e9),
                                                                                             vocab.get(p[k:], 1e9)))
              if p[:k] in vocab and p[k:] in vocab]
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[5:]], special_tokens=True)
    tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def gemma3_artifact(root):
    """Tied head on an embedding packed at q8_0; layer 0 sliding (window 16), layer 1 global (not llama.cpp's
    default pattern, so the pattern is written); linear rope scaling on the global layers."""
    tok = sentencepiece_style_tokenizer(root / "gemma-tokenizer")
    torch.manual_seed(2)
    config = Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, vocab_size=len(tok),
                              max_position_embeddings=512, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1_000_000.0},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, tie_word_embeddings=True, initializer_range=0.1)
    return write(Gemma3ForCausalLM(config).eval(), tok, layer_plan(ALL_TYPES[3:] + ALL_TYPES[:3]), root / "gemma3",
                 embedding="q8_0", seed=2)


BUILDERS = {"llama": llama_artifact, "qwen2": qwen2_artifact, "gemma3": gemma3_artifact}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{arch: artifact + its GGUF file}, built once for the module."""
    root = tmp_path_factory.mktemp("ggml-export")
    out = {}
    for arch, build in BUILDERS.items():
        art = build(root)
        art["gguf"] = root / f"{arch}.gguf"
        out[arch] = art
    return out


def export_with_cli(art, capsys):
    assert main(["export", str(art["dir"]), "--format", "gguf", "--out", str(art["gguf"])]) == 0
    return capsys.readouterr().out


_READERS = {}


def reader_of(path):
    """One GGUFReader per file as written (opening one with SmolLM2's 49k tokens and merges takes seconds)."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _READERS:
        _READERS[key] = gguf.GGUFReader(str(path))
    return _READERS[key]


def fields_of(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


# llama.cpp reads these for each architecture (src/models/<arch>.cpp, llama-model.cpp); general.* besides
REQUIRED = {
    "llama": ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
              "rope.dimension_count", "vocab_size"],
    "qwen2": ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base"],
    "gemma3": ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length",
               "attention.value_length", "rope.freq_base", "rope.freq_base_swa", "attention.sliding_window",
               "attention.sliding_window_pattern", "rope.scaling.type", "rope.scaling.factor"],
}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_tensor_is_its_planned_ggml_type_bit_for_bit(exported, arch, capsys):
    art = exported[arch]
    printed = export_with_cli(art, capsys)
    assert printed.startswith(f"wrote {art['gguf']}")
    config = art["config"]
    reader = reader_of(art["gguf"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    stored = read_tensors(art["dir"])
    packed = {name_map.get_name(n + ".weight", try_suffixes=(".weight",)): n for n in art["weights"]}
    dense = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in stored
             if n.rpartition(".")[0] not in art["weights"] or n.endswith(".bias")}
    assert None not in packed and None not in dense
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(packed) | set(dense)  # nothing missing, nothing else
    assert ("output.weight" in tensors) == (not config["tie_word_embeddings"])
    for name, t in tensors.items():
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:  # llama.cpp's rotary row order -> transformers'
            got = got[torch.argsort(rope_permutation(heads[kind], got.shape[0])).numpy()]
        if name in packed:
            hf = packed[name]
            assert t.tensor_type.name == art["plan"][hf].removeprefix("rtn-").upper(), name
            assert np.array_equal(got, art["weights"][hf].dequantize(torch.float32).numpy()), name
            continue
        value = stored[dense[name]].float()
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1  # Gemma3RMSNorm: x * (1 + w); llama.cpp: x * w
        assert t.tensor_type.name == ("F32" if value.dim() == 1 else "F16"), name
        assert np.array_equal(got, value.numpy()), name
    planned = {t.removeprefix("rtn-").upper() for t in art["plan"].values()}
    assert planned <= {t.tensor_type.name for t in reader.tensors}
    fields = fields_of(reader)
    assert fields["general.architecture"] == arch
    missing = [k for k in REQUIRED[arch] if f"{arch}.{k}" not in fields]
    assert not missing
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == HIDDEN
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    if arch == "gemma3":
        assert fields["gemma3.attention.sliding_window"] == 16
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
        assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
        assert fields["gemma3.attention.key_length"] == 64
    if arch == "llama":
        assert fields["llama.rope.dimension_count"] == HIDDEN // 4


def tokenizer_fields(path):
    reader = reader_of(path)
    return {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.") and k != "tokenizer.ggml.merges"}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_tokenizer_and_chat_template(exported, arch):
    art = exported[arch]
    if not art["gguf"].exists():
        export_gguf(art["dir"], art["gguf"])
    tok, config = art["tokenizer"], art["config"]
    fields = tokenizer_fields(art["gguf"])
    assert fields["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(config["vocab_size"])))
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    if arch != "gemma3":
        # luq's SmolLM2 tokenizer (rebuilt by transformers from the GGUF) splits as GPT-2 does
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
        assert len(reader_of(art["gguf"]).fields["tokenizer.ggml.merges"].data) > 40000
        return
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    types = fields["tokenizer.ggml.token_type"]
    ids = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    assert all(types[ids[f"<0x{b:02X}>"]] == gguf.TokenType.BYTE for b in range(256))
    assert types[ids["<end_of_turn>"]] == gguf.TokenType.CONTROL
    # scores follow the merges: a piece made by an earlier merge scores higher
    spec = json.loads((art["dir"] / "tokenizer.json").read_text())
    scores = fields["tokenizer.ggml.scores"]
    first = {}
    for r, m in enumerate(spec["model"]["merges"]):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        first.setdefault(a + b, r)
    made = sorted(first, key=first.get)
    assert all(scores[ids[p]] > scores[ids[q]] for p, q in zip(made, made[1:]))


def test_binarized_linear_is_refused_in_one_line(tmp_path, capsys):
    tok = smollm2_tokenizer()
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    weights, qconfig = quantize_into(model, {"model.layers.0.self_attn.q_proj": "q8_0"})
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    replace_linears(model, {"model.layers.0.mlp.down_proj": BiLLM(block_size=128).quantize(
        down.weight.detach().float(), hessian(128, 5))})
    qconfig["modules"]["model.layers.0.mlp.down_proj"] = model.model.layers[0].mlp.down_proj.weight_config
    write_artifact(tmp_path / "mix", model, tok, qconfig, {}, torch.float16)
    with pytest.raises(LuqError, match=r"^GGUF export refused: model\.layers\.0\.mlp\.down_proj: it is binarized "
                                       r"\(billm\): no GGUF type holds binarized weights$"):
        export_gguf(tmp_path / "mix", tmp_path / "mix.gguf")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "mix"), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "down_proj: it is binarized (billm)" in err[0]
    assert not out.exists()


def base_config(**kw):
    return {"model_type": "gemma3_text", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
            "head_dim": 64, "query_pre_attn_scalar": 64, "hidden_activation": "gelu_pytorch_tanh", **kw}


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "mistral"}, r"supports llama, qwen2, gemma3_text models .* is 'mistral'$"),
    ({"model_type": "gemma3"}, r"export Gemma 3's text decoder"),
    ({"model_type": "llama", "hidden_act": "silu", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     r"rope scaling 'llama3' is not supported"),
    ({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "use_sliding_window": True},
     r"qwen2 has no sliding-window"),
    (base_config(query_pre_attn_scalar=256), r"query_pre_attn_scalar=256\^-1/2; llama.cpp's gemma3 uses 64\^-1/2"),
    (base_config(attn_logit_softcapping=50.0), r"no attention logit softcapping"),
    (base_config(attention_bias=True), r"no attention biases"),
    (base_config(hidden_activation="gelu"), r"computes gelu_pytorch_tanh; this model's hidden_activation is 'gelu'"),
    (base_config(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}), r"global layers' rope"),
])
def test_what_llama_cpp_computes_differently_is_refused(config, reason):
    with pytest.raises(LuqError, match=reason) as e:
        architecture(config)
    assert "\n" not in str(e.value)


def test_qwen2_and_llama3_pre_tokenizers_are_named():
    def spec(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+")  # as Qwen2.5's tokenizer.json holds it
    assert _pre_tokenizer(spec(qwen2)) == "qwen2"
    assert _pre_tokenizer(spec(qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|"))) == "llama-bpe"
    with pytest.raises(LuqError, match="has no llama.cpp name"):
        _pre_tokenizer(spec(qwen2.replace("+", "*")))


# ------------------------------------------------------------------------------------ llama.cpp itself

def llama_tool(name):
    """A built llama.cpp tool (luq.export.llamacpp.llama_tool; without that module, the build `make llama`
    leaves in ~/.cache/luq/llama.cpp-11434/bin); None if it is not built."""
    try:
        from luq.export.llamacpp import llama_tool as find
    except ImportError:
        path = Path(os.environ.get("LUQ_CACHE") or Path.home() / ".cache" / "luq") / "llama.cpp-11434" / "bin" / name
        return path if path.is_file() else None
    try:
        return Path(find(name))
    except LuqError:
        return None


def hf_perplexity(model, tokens, n_ctx, n_chunk, bos):
    """llama-perplexity's number computed by transformers on the same tokens: per chunk of n_ctx tokens (the
    first replaced by BOS when the vocabulary adds one), the mean NLL of the last half's next tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunk):
            ids = torch.tensor(tokens[i * n_ctx:(i + 1) * n_ctx])
            if bos is not None:
                ids[0] = bos
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            first = n_ctx // 2
            targets = torch.tensor(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
            nll -= logp[first:n_ctx - 1].gather(1, targets[:, None]).sum().item()
            count += n_ctx - 1 - first
    return math.exp(nll / count)


@pytest.mark.filterwarnings("ignore::luq.errors.FallbackWarning")  # ggml weights: the tiled kernel, as intended
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_llama_cpp_runs_each_file_as_transformers_runs_the_artifact(exported, arch, tmp_path):
    """llama.cpp loads the file and computes what transformers computes from the artifact: the same
    tokens for the same text (llama.cpp's tokenizer from the GGUF against the artifact's tokenizer) and the
    same perplexity over them, up to llama.cpp's own roundings (activations quantized to 8 bits for the
    products with quantized weights, an f16 KV cache)."""
    import luq

    tool = llama_tool("llama-perplexity")
    if tool is None:
        pytest.skip("llama.cpp's llama-perplexity is not built here (`make llama` builds it)")
    art = exported[arch]
    if not art["gguf"].exists():
        export_gguf(art["dir"], art["gguf"])
    text = tmp_path / "text.txt"
    text.write_text(wikipedia_text(max_chars=6000))
    n_ctx, chunks = 64, 3
    saved = tmp_path / "logits.bin"
    run = subprocess.run([str(tool), "-m", str(art["gguf"]), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
                          "--chunks", str(chunks), "-t", "2", "--kl-divergence-base", str(saved), "-v"],
                         capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert re.search(rf"print_info: arch\s+= {arch}\n", log), log[-3000:]  # loaded as that architecture
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    assert ppl and math.isfinite(float(ppl.group(1))), log[-3000:]
    # the file llama-perplexity saves starts with the tokens it evaluated
    header = np.fromfile(saved, dtype=np.int32, count=5, offset=0)
    assert saved.read_bytes()[:8] == b"_logits_"
    got_ctx, n_vocab, n_chunk = (int(x) for x in header[2:5])
    assert (got_ctx, n_vocab, n_chunk) == (n_ctx, art["config"]["vocab_size"], chunks)
    tokens = np.fromfile(saved, dtype=np.int32, count=n_chunk * n_ctx, offset=20).tolist()
    tok = art["tokenizer"]
    bos = tok.bos_token_id if tokens[0] == tok.bos_token_id else None
    ours = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    theirs = tokens[1:] if bos is not None else tokens
    assert theirs == ours[:len(theirs)]
    model, _, _ = luq.load(art["dir"], dtype=torch.float32)
    expected = hf_perplexity(model, tokens, n_ctx, n_chunk, bos)
    # in mean NLL per token (~16 nats here): measured 0.002-0.012 apart; the q/k rows left in transformers'
    # rotary order moved llama.cpp's by 0.2 (llama), the rows reordered on a NEOX-rope model by 0.095 (qwen2),
    # Gemma's norms written without the +1 by 7 nats
    assert abs(math.log(float(ppl.group(1)) / expected)) < 0.03, (float(ppl.group(1)), expected)


def test_an_unquantized_checkpoint_exports_as_float_and_a_foreign_quantization_is_refused(tmp_path):
    """A transformers checkpoint luq did not quantize is the float GGUF llama-quantize starts from: every
    tensor at its stored float type (norms at f32), the file's bytes as gguf_size counted them."""
    from luq.export.gguf import gguf_size
    from tiny_models import tiny_llama_dir

    folder = Path(tiny_llama_dir(tmp_path / "model", layers=1, hidden=64))
    summary = export_gguf(folder, tmp_path / "base.gguf")
    reader = gguf.GGUFReader(tmp_path / "base.gguf")
    assert {t.tensor_type.name for t in reader.tensors} <= {"F32", "F16"}
    assert summary["bytes"] == (tmp_path / "base.gguf").stat().st_size == gguf_size(folder)["bytes"]
    assert summary["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "gptq"})))
    with pytest.raises(LuqError, match="quantized by 'gptq', not luq"):
        export_gguf(folder, tmp_path / "other.gguf")
