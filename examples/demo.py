"""The end of `make demo`: load a quantized artifact, check it against its report, let it
generate, and print the summary table.

    python examples/demo.py out/demo
"""

import json
import sys
import time
from pathlib import Path

import torch

import luq
from luq.report import format_summary


def main(path: str) -> None:
    path = Path(path)
    report = json.loads((path / "luq_report.json").read_text())
    t0 = time.perf_counter()
    model, processor, adapter = luq.load(path)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f} s (checksums verified)")
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"safetensors on disk: {on_disk:,} bytes; report total_bytes: {report['total_bytes']:,}")

    tokenizer = getattr(processor, "tokenizer", processor)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"\nQ: {messages[0]['content']}\nA: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}\n")
    print(format_summary(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
