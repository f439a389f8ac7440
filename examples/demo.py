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
    """(question, image or None, expected answer or None): questions for a text model; for a
    vision-language model, generated held-out questions (tiny-vlm's kind, answer known) and
    two real photos."""
    if not hasattr(processor, "image_processor"):
        return [("What is the capital of France?", None, None), ("Name three primary colours.", None, None)]
    from luq.zoo import tinyvlm

    generated = [(s.question, s.image, s.answer) for s in tinyvlm.make_samples(1, seed=123)]
    photos = Path(luq.__file__).parent / "data" / "calibration" / "images"
    return generated + [("What vehicle is in the picture?", photos / "stereo_motorcycle.jpg", None),
                        ("What is shown in this image?", photos / "hubble_deep_field.jpg", None)]


@torch.no_grad()
def answer(model, processor, question: str, image, max_new_tokens: int = 24) -> str:
    from PIL import Image

    tokenizer = getattr(processor, "tokenizer", processor)
    if image is None:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        picture = image if isinstance(image, Image.Image) else Image.open(image)
        inputs = processor(text=[prompt], images=[picture.convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def full_precision_answers(model_name: str | None, questions) -> list[str | None]:
    """The unquantized model's answers, beside the artifact's (None where it cannot be loaded)."""
    from luq.errors import LuqError
    from luq.models.loading import load_model

    try:
        model, processor, _ = load_model(model_name)
    except (LuqError, OSError, TypeError):
        return [None] * len(questions)
    return [answer(model, processor, q, image) for q, image, _ in questions]


def main(path: str) -> None:
    path = Path(path)
    report = json.loads((path / "luq_report.json").read_text())
    t0 = time.perf_counter()
    model, processor, adapter = luq.load(path)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f} s (checksums verified)")
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"safetensors on disk: {on_disk:,} bytes; report total_bytes: {report['total_bytes']:,}")

    questions = prompts(processor)
    quantized = [answer(model, processor, q, image) for q, image, _ in questions]
    original = full_precision_answers(report.get("model"), questions)
    for (question, image, expected), mine, theirs in zip(questions, quantized, original):
        where = "" if image is None else f"  [image: {image.name}]" if isinstance(image, Path) else "  [generated image]"
        print(f"\nQ: {question}{where}")
        print(f"A (luq, {report['avg_bits']:.2f} bits): {mine}" + (f"   (expected: {expected})" if expected else ""))
        if theirs is not None:
            print(f"A (full precision):   {theirs}")
    print()
    print(format_summary(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/demo")
