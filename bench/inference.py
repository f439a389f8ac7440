"""Inference speed and resident memory of luq artifacts against the dense model they came from.

    python -m bench.inference [--models smollm2,tiny-vlm] [--threads 2] [--repeats 3]

For each model: dense float32, dense bfloat16, and four artifacts made with the public API
(`luq.quantize`): uniform GPTQ-4 g128, uniform GPTQ-3 g128, and the paper's mix with 10
BiLLM layers (`--allocate entropy --n-low-layers 10`, the rest GPTQ-4 g128), the same with compact
BiLLM (`--low billm-k5g64r`). Artifacts are made once into --artifacts (default
out/bench-inference) and reused.

Measured in ONE process at --threads threads, the variants alternating inside every repeat
(the median of the repeats is reported):
- prefill: one forward over a 128-token prompt (tiny-vlm: one image + a question), tokens/s;
- decode: greedy decoding after that prompt (`generate`, no sampling): the time of 64 new
  tokens minus that of 1, per token (so the prompt's forward cancels), tokens/s;
- x: speed over dense float32's, by wall clock, and by this process's CPU time (the machine
  may be shared: CPU time is what the variant costs, wall time what a user waits);
- resident: bytes held by the loaded model: every parameter and buffer, plus what each
  QuantLinear's fast kernel holds (`QuantLinear.resident_nbytes`), beside the stored bytes;
  transient: the largest weight tile a prompt's forward expands for one linear (freed after it).
Then one synthetic Llama decoder layer of width 4096 (random weights, GPTQ-4 g128 with a
random Hessian: the speed does not depend on the values), one token and a 128-token prompt:
its time with float32 linears against QuantLinear GPTQ-4 linears.

Prints a table per model and writes --json (default bench/results/inference.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import luq
from bench.common import is_vlm
from luq.calibration import CalibrationConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 128
NEW_TOKENS = 64

# the variant caches warm on this machine: 16 sequences of 256 tokens (tiny-vlm: alpha 0.5, as `make demo`)
CALIBRATION = {"smollm2": CalibrationConfig(samples=16, seq_len=256, alpha=0.0),
               "tiny-vlm": CalibrationConfig(samples=16, seq_len=256, alpha=0.5)}


def artifact_configs(model: str) -> dict[str, luq.LUQConfig]:
    cal = CALIBRATION[model]
    return {
        "gptq4-g128": luq.LUQConfig(calibration=cal, formats=("gptq4-g128",), kmeans_clusters=100),
        "gptq3-g128": luq.LUQConfig(calibration=cal, formats=("gptq3-g128",), kmeans_clusters=100),
        "mix-10-billm": luq.LUQConfig(calibration=cal, allocate="entropy", n_low_layers=10, high="gptq4-g128",
                                      low="billm", kmeans_clusters=100),
        "mix-10-k5g64r": luq.LUQConfig(calibration=cal, allocate="entropy", n_low_layers=10, high="gptq4-g128",
                                       low="billm-k5g64r", kmeans_clusters=100),
    }


def make_artifacts(model: str, root: Path, variants: list[str] | None = None) -> dict[str, Path]:
    """The artifacts of `model` under root (made with luq.quantize when missing): all, or `variants`."""
    out = {}
    for name, config in artifact_configs(model).items():
        if variants and name not in variants:
            continue
        path = root / f"{model}-{name}"
        if not (path / "luq_report.json").is_file():
            t0 = time.perf_counter()
            luq.quantize(model, path, config, progress=False, log=lambda s: None)
            print(f"made {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = path
    return out


def prompt_inputs(model_name: str, processor) -> dict:
    """The prompt: 128 tokens of Wikipedia text (smollm2); one generated image and its question
    in the chat template (tiny-vlm)."""
    if is_vlm(model_name):
        from luq.zoo import tinyvlm
        sample = tinyvlm.make_samples(1, seed=123)[0]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return dict(processor(text=[text], images=[sample.image.convert("RGB")], return_tensors="pt"))
    from luq.zoo.smollm2 import wikipedia_text
    ids = processor(wikipedia_text(max_chars=4000), return_tensors="pt")["input_ids"][:, :PROMPT_TOKENS]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dense_model(model_name: str, dtype: torch.dtype):
    from luq.zoo.smollm2 import load_smollm2
    from luq.zoo.tinyvlm import load_tiny_vlm
    return (load_smollm2 if model_name == "smollm2" else load_tiny_vlm)(dtype=dtype)


def transient_bytes(model: torch.nn.Module) -> int:
    """The largest transient weight tile one QuantLinear's forward expands (its kernel built)."""
    from luq.quant import QuantLinear
    return max((m.kernel.transient_nbytes for m in model.modules() if isinstance(m, QuantLinear)), default=0)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once: tied weights count once), plus
    what the fast kernels of QuantLinear modules transcoded."""
    from luq.quant import QuantLinear
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.resident_nbytes - sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return total


@torch.inference_mode()
def time_once(model, inputs: dict) -> tuple[float, ...]:
    """Prefill (one forward over the prompt) and decode (greedy `generate` of NEW_TOKENS tokens
    minus that of one token, per token), each as (wall seconds, this process's CPU seconds)."""
    def clocks(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c

    def generate(n):
        return clocks(lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False))
    pre_w, pre_c = clocks(lambda: model(**inputs))
    (g64_w, g64_c), (g1_w, g1_c) = generate(NEW_TOKENS), generate(1)
    return pre_w, pre_c, (g64_w - g1_w) / (NEW_TOKENS - 1), (g64_c - g1_c) / (NEW_TOKENS - 1)


def bench_model(model_name: str, artifacts: dict[str, Path], repeats: int) -> list[dict]:
    variants, stored = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        variants[f"dense {str(dtype)[6:]}"], processor = dense_model(model_name, dtype)
    for name, path in artifacts.items():
        variants[f"luq {name}"] = luq.load(path, dtype=torch.float32, verify=False)[0]
        stored[f"luq {name}"] = json.loads((path / "luq_report.json").read_text())["total_bytes"]
    inputs = prompt_inputs(model_name, processor)
    n_prompt = int(inputs["input_ids"].shape[1])
    with torch.inference_mode():
        for model in variants.values():  # warm-up: builds the kernels, first-call allocations
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    times = {name: [] for name in variants}
    for _ in range(repeats):  # alternating: every variant once per repeat
        for name, model in variants.items():
            times[name].append(time_once(model, inputs))
    rows = []
    for name, model in variants.items():
        pre_w, pre_c, step_w, step_c = (sorted(t[i] for t in times[name])[len(times[name]) // 2] for i in range(4))
        rows.append({"model": model_name, "variant": name, "prompt_tokens": n_prompt,
                     "prefill_ms": 1e3 * pre_w, "prefill_tok_s": n_prompt / pre_w, "prefill_cpu_ms": 1e3 * pre_c,
                     "decode_tok_s": 1 / max(step_w, 1e-9), "decode_cpu_ms_per_tok": 1e3 * step_c,
                     "resident_bytes": resident_bytes(model), "stored_bytes": stored.get(name),
                     "transient_bytes": transient_bytes(model)})
    base = rows[0]
    for r in rows:
        r["prefill_x"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_x"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_cpu_x"] = base["prefill_cpu_ms"] / r["prefill_cpu_ms"]
        r["decode_cpu_x"] = base["decode_cpu_ms_per_tok"] / r["decode_cpu_ms_per_tok"]
    return rows


def synthetic_layer(repeats: int, width: int = 4096, inter: int = 11008) -> dict:
    """One Llama decoder layer of `width` (a 7B model's shape), one token, no cache: float32
    linears against GPTQ-4 g128 QuantLinears (RTN codes: the same stored form and kernel)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from luq.quant import RTN, QuantLinear
    config = LlamaConfig(hidden_size=width, intermediate_size=inter, num_attention_heads=width // 128,
                         num_key_value_heads=width // 128, head_dim=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dense = LlamaDecoderLayer(config, layer_idx=0).eval()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    quant = LlamaDecoderLayer(config, layer_idx=0).eval()
    quant.load_state_dict(dense.state_dict())
    for name, mod in list(quant.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            owner, _, attr = name.rpartition(".")
            setattr(quant.get_submodule(owner), attr,
                    QuantLinear.from_linear(mod, RTN(bits=4, group_size=128).quantize(mod.weight.data)))
    rope = LlamaRotaryEmbedding(config)

    def run(layer, x, pos, calls):  # (wall, CPU) seconds per call
        with torch.inference_mode():
            w, c = time.perf_counter(), time.process_time()
            for _ in range(calls):
                layer(x, position_embeddings=pos)
            return (time.perf_counter() - w) / calls, (time.process_time() - c) / calls

    out = {"width": width, "intermediate": inter}
    for tokens, calls, prefix in ((1, 5, ""), (PROMPT_TOKENS, 1, "prompt_")):
        x = torch.randn(1, tokens, width)
        pos = rope(x, torch.arange(tokens)[None])
        run(dense, x, pos, 1), run(quant, x, pos, 1)
        times = {"float32": [], "gptq4-g128": []}
        for _ in range(3 * repeats):
            times["float32"].append(run(dense, x, pos, calls))
            times["gptq4-g128"].append(run(quant, x, pos, calls))
        med = {k: [sorted(t[i] for t in v)[len(v) // 2] for i in range(2)] for k, v in times.items()}
        out |= {f"{prefix}float32_ms": 1e3 * med["float32"][0], f"{prefix}gptq4_ms": 1e3 * med["gptq4-g128"][0],
                f"{prefix}ratio": med["gptq4-g128"][0] / med["float32"][0],
                f"{prefix}float32_cpu_ms": 1e3 * med["float32"][1], f"{prefix}gptq4_cpu_ms": 1e3 * med["gptq4-g128"][1],
                f"{prefix}cpu_ratio": med["gptq4-g128"][1] / med["float32"][1]}
    return out | {"float32_bytes": sum(p.numel() * p.element_size() for p in dense.parameters()),
                  "gptq4_bytes": sum(m.resident_nbytes for m in quant.modules() if isinstance(m, QuantLinear))
                  + sum(p.numel() * p.element_size() for p in quant.parameters()),
                  "gptq4_transient_bytes": transient_bytes(quant)}


def print_table(rows: list[dict]) -> None:
    print("| model | variant | prefill tok/s | x | decode tok/s | x | x by CPU time: prefill | decode "
          "| resident MB | stored MB | transient MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        stored = "" if r["stored_bytes"] is None else f"{r['stored_bytes'] / 1e6:.1f}"
        transient = f"{r['transient_bytes'] / 1e6:.1f}" if r["transient_bytes"] else ""
        print(f"| {r['model']} ({r['prompt_tokens']} tok) | {r['variant']} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_x']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_x']:.2f} | {r['prefill_cpu_x']:.2f} | "
              f"{r['decode_cpu_x']:.2f} | {r['resident_bytes'] / 1e6:.1f} | {stored} | {transient} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,tiny-vlm")
    p.add_argument("--artifacts", type=Path, default=ROOT / "out" / "bench-inference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--make-only", action="store_true", help="make the artifacts and stop")
    p.add_argument("--variants", default="", help="the artifacts to measure, comma-separated (default: all four)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    artifacts = {m: make_artifacts(m, args.artifacts, variants) for m in models}
    if args.make_only:
        return
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "repeats": args.repeats, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    for m in models:
        rows = bench_model(m, artifacts[m], args.repeats)
        print_table(rows)
        result["rows"] += rows
    if not args.no_synthetic:
        layer = synthetic_layer(args.repeats)
        for prefix, what in (("", "one token"), ("prompt_", f"{PROMPT_TOKENS} tokens")):
            print(f"synthetic Llama decoder layer, width {layer['width']}, {what}: float32 "
                  f"{layer[prefix + 'float32_ms']:.1f} ms, GPTQ-4 g128 {layer[prefix + 'gptq4_ms']:.1f} ms "
                  f"({layer[prefix + 'ratio']:.2f}x of the time; by CPU time {layer[prefix + 'float32_cpu_ms']:.1f} vs "
                  f"{layer[prefix + 'gptq4_cpu_ms']:.1f} ms, {layer[prefix + 'cpu_ratio']:.2f}x)")
        print(f"resident {layer['float32_bytes'] / 1e6:.0f} vs {layer['gptq4_bytes'] / 1e6:.0f} MB; GPTQ-4 transient "
              f"tile {layer['gptq4_transient_bytes'] / 1e6:.1f} MB")
        result["synthetic_layer"] = layer
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
