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


def prompts(processor):
    """Questions for a text model, or image questions for a vision-language model."""
    if not hasattr(processor, "image_processor"):
        return [("What is the capital of France?", None), ("Name three primary colours.", None)]
    photos = Path(luq.__file__).parent / "data" / "calibration" / "images"
    return [("What vehicle is in the picture?", photos / "stereo_motorcycle.jpg"),
            ("What is shown in this image?", photos / "hubble_deep_field.jpg")]


@torch.no_grad()
def answer(model, processor, question: str, image: Path | None, max_new_tokens: int = 24) -> str:
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    if image is None:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(path: str) -> None:
    path = Path(path)
    report = json.loads((path / "luq_report.json").read_text())
    t0 = time.perf_counter()
    model, processor, adapter = luq.load(path)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f} s (checksums verified)")
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"safetensors on disk: {on_disk:,} bytes; report total_bytes: {report['total_bytes']:,}")

    for question, image in prompts(processor):
        print(f"\nQ: {question}" + (f"  [image: {image.name}]" if image else ""))
        print(f"A: {answer(model, processor, question, image)}")
    print()
    print(format_summary(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
