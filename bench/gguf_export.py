"""`luq export --format gguf` on the whole SmolLM2: export time, file sizes, the read-back check
(every tensor de-quantized by the gguf package against luq's), and perplexity of the same
held-out text in torch (luq) and in llama.cpp (the exported file), when a llama.cpp build is given.

Two perplexities, because the runtimes score differently:
- luq's held-out windows (as bench.budget): 16 windows of 256 tokens, every token after the first scored;
- llama.cpp's protocol (`llama-perplexity -c 256`): the windows' text, re-tokenized, cut in chunks of
  256 tokens, only the second half of each chunk scored. Computed here in torch the same way, so the
  luq and llama.cpp columns are the same measurement on the same text.
The SmolLM2 Q4_1 GGUF that luq's SmolLM2 was converted from is run by llama.cpp too: it holds the same
weights as the dense model (embeddings aside), so its row checks that the two protocols agree.

    python -m bench.gguf_export --llama-perplexity /path/to/llama.cpp/build/bin/llama-perplexity
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import luq
from luq.calibration import CalibrationConfig, text_token_ids, validation_windows
from luq.eval.perplexity import token_window_perplexity
from luq.export import export_gguf
from luq.export.gguf import read_gguf, rope_permutation
from luq.models.loading import load_model
from luq.quant.dense import dequantize_modules
from luq.quant.linear import QuantLinear
from luq.quant.packing import unpack_bits
from luq.zoo.smollm2 import smollm2_gguf_path

RESULTS = Path(__file__).parent / "results"


def llama_protocol_perplexity(model, ids: torch.Tensor, n_ctx: int, n_chunks: int) -> float:
    """llama-perplexity's scoring: chunks of n_ctx tokens, tokens n_ctx/2 + 1 .. n_ctx - 1 scored."""
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = ids[i * n_ctx:(i + 1) * n_ctx][None]
            logits = model(input_ids=chunk, use_cache=False).logits[0, first:-1].float()
            nll += F.cross_entropy(logits, chunk[0, first + 1:], reduction="sum").item()
            count += n_ctx - first - 1
    return float(np.exp(nll / count))


def run_llama_perplexity(binary: Path, gguf_file: Path, text_file: Path, n_ctx: int, n_chunks: int,
                         threads: int) -> tuple[float, int]:
    out = subprocess.run([str(binary), "-m", str(gguf_file), "-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx),
                          "--chunks", str(n_chunks), "-t", str(threads)], capture_output=True, text=True)
    log = out.stdout + out.stderr
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if out.returncode or not ppl:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}): {log[-800:]}")
    return float(ppl.group(1)), int(chunks.group(1))


def read_back_check(artifact: Path, gguf_file: Path) -> dict:
    """Max |GGUF - luq| over every quantized weight, and its ratio to half an fp16 ulp of
    |scale * zero| (Q4_1's one rounding); dense tensors must be equal."""
    import gguf

    config = json.loads((artifact / "config.json").read_text())
    back = read_gguf(gguf_file)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    model, _, _ = luq.load(artifact, dtype=torch.float32)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    worst_diff, worst_ratio, dense_equal, n = 0.0, 0.0, True, 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        got = back.pop(names.get_name(name + ".weight", try_suffixes=(".weight",)))
        if name.rpartition(".")[2] in heads:
            got = got[torch.argsort(rope_permutation(heads[name.rpartition(".")[2]], got.shape[0])).numpy()]
        w = module.quantized_weight
        diff = np.abs(got - w.dequantize(torch.float32).numpy())
        groups = w.column_groups()
        sz = (w.scales.float()[:, groups] * unpack_bits(w.qzeros, w.bits, w.n_groups).float()[:, groups]).abs()
        bound = np.spacing(sz.numpy().astype(np.float16)).astype(np.float32) / 2 + 1e-6 * np.abs(got)
        worst_diff, worst_ratio = max(worst_diff, float(diff.max())), max(worst_ratio, float((diff / bound).max()))
        n += 1
    for name, p in model.named_parameters():
        got = back.pop(names.get_name(name, try_suffixes=(".weight",)))
        dense_equal &= np.array_equal(got, p.detach().numpy())
        n += 1
    return {"tensors_checked": n, "tensors_unmatched": len(back), "max_abs_diff": worst_diff,
            "max_diff_over_fp16_bound": worst_ratio, "dense_tensors_equal": bool(dense_equal)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, default=None, help="a SmolLM2 GPTQ-4 artifact (default: make one)")
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--llama-perplexity", type=Path, default=None, help="llama.cpp's llama-perplexity binary")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (when making the artifact)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows of --seq-len tokens")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len, seed=0)
    artifact = args.artifact
    if artifact is None:
        artifact = args.work / "gptq4-g128"
        if not (artifact / "luq_manifest.json").is_file():
            luq.quantize("smollm2", artifact, luq.LUQConfig(calibration=calibration, formats=("gptq4-g128",)),
                         log=lambda s: None)
    out = args.work / "smollm2-gptq4-g128.gguf"
    t0 = time.perf_counter()
    summary = export_gguf(artifact, out)
    export_s = time.perf_counter() - t0
    check = read_back_check(artifact, out)

    dense, tokenizer, _ = load_model("smollm2")
    quantized, _, _ = luq.load(artifact, dtype=torch.float32)
    dequantize_modules(quantized)  # the same weights as plain linears: scoring speed only
    windows = validation_windows(text_token_ids(tokenizer, None), args.eval_samples, args.seq_len, 0, args.samples)
    text = "".join(tokenizer.decode(w) for w in windows)
    text_file = args.work / "held-out.txt"
    text_file.write_text(text, encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    n_ctx = args.seq_len
    n_chunks = ids.numel() // n_ctx

    artifact_bytes = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    rows = [("SmolLM2 dense float32", "transformers", None, dense),
            ("luq GPTQ-4 g128 artifact", "luq.load (torch)", artifact_bytes, quantized)]
    table = []
    for name, runtime, size, model in rows:
        with torch.no_grad():
            held_out = token_window_perplexity(model, windows)
        table.append({"model": name, "runtime": runtime, "bytes": size, "held_out_ppl": held_out,
                      "llama_protocol_ppl": llama_protocol_perplexity(model, ids, n_ctx, n_chunks)})
    ggufs = [("luq export of that artifact (Q4_1)", out), ("SmolLM2 Q4_1 GGUF (its source)", smollm2_gguf_path())]
    for name, path in ggufs:
        row = {"model": name, "runtime": "llama.cpp", "bytes": Path(path).stat().st_size, "held_out_ppl": None,
               "llama_protocol_ppl": None}
        if args.llama_perplexity is not None:
            row["llama_protocol_ppl"], chunks = run_llama_perplexity(args.llama_perplexity, Path(path), text_file,
                                                                     n_ctx, n_chunks, args.threads)
            row["chunks"] = chunks
        table.append(row)

    print(f"export: {export_s:.1f} s, {summary['bytes']:,} bytes, tensors {summary['tensors']}")
    print(f"read back: {check}")
    print(f"text: {ids.numel():,} tokens (transformers' tokenizer), {n_chunks} chunks of {n_ctx}\n")
    print(f"| model | runtime | file MB | ppl, luq held-out windows | ppl, llama.cpp protocol ({n_chunks} x {n_ctx}) |")
    print("|---|---|---:|---:|---:|")
    for r in table:
        size = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        held = "" if r["held_out_ppl"] is None else f"{r['held_out_ppl']:.2f}"
        llama = "not run" if r["llama_protocol_ppl"] is None else f"{r['llama_protocol_ppl']:.2f}"
        print(f"| {r['model']} | {r['runtime']} | {size} | {held} | {llama} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_export.json").write_text(json.dumps(
        {"export_seconds": export_s, "summary": summary, "read_back": check, "tokens": ids.numel(),
         "n_ctx": n_ctx, "chunks": n_chunks, "rows": table, "artifact": str(artifact)}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
