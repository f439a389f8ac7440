"""Ask tiny-vlm a few questions about real photos (and a few generated held-out images).

    OMP_WAIT_POLICY=PASSIVE python examples/tiny_vlm_demo.py [--threads 1] [--device cpu]

Prints a Markdown table: image, question, the model's answer. The photos are the ones
scikit-image and scikit-learn ship; the model never saw photos in training, so its
answers to them are out of distribution, whatever they are.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from luq.zoo import tinyvlm  # noqa: E402


@dataclass(frozen=True)
class Question:
    image_name: str
    image: Image.Image
    question: str
    reference: str = ""  # the generated answer, for generated images


def real_photos() -> dict[str, Image.Image]:
    """scikit-image's astronaut, chelsea, coffee, rocket, text and scikit-learn's two samples."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {f"skimage {name}": getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "text")}
    sample = load_sample_images()
    photos.update({f"sklearn {os.path.basename(name)}": array for name, array in zip(sample.filenames, sample.images)})
    return {name: Image.fromarray(np.asarray(array)).convert("RGB") for name, array in photos.items()}


PHOTO_QUESTIONS = {
    "skimage astronaut": ("What colour is the shape?", "Is there a red shape?", "How many shapes are there?"),
    "skimage chelsea": ("What colour is the shape?", "What shape is this?"),
    "skimage coffee": ("What colour is the shape?", "Is there a circle?", "Where is the shape?"),
    "skimage rocket": ("What shape is this?", "Is there a blue shape?"),
    "skimage text": ("What word is written?", "What number is written?"),
    "sklearn china.jpg": ("What colour is the shape?", "How many shapes are there?"),
    "sklearn flower.jpg": ("What colour is the shape?", "Is there a pink shape?"),
}


def questions(n_generated_per_kind: int, seed: int) -> list[Question]:
    photos = real_photos()
    asked = [Question(name, photos[name], q) for name, qs in PHOTO_QUESTIONS.items() for q in qs]
    generated = tinyvlm.make_samples(n_generated_per_kind, seed=seed)
    asked += [Question(f"generated {s.kind}", s.image, s.question, s.answer) for s in generated]
    return asked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generated-per-kind", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2024, help="seed of the generated images (not the training one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, processor = tinyvlm.load_tiny_vlm(device=args.device)
    asked = questions(args.generated_per_kind, args.seed)
    answers = tinyvlm.answer_questions(model, processor, [q.image for q in asked], [q.question for q in asked])
    print("| image | question | tiny-vlm's answer |")
    print("|---|---|---|")
    for q, answer in zip(asked, answers):
        shown = answer if not q.reference else f"{answer} ({'right' if tinyvlm.is_correct(answer, q.reference) else 'wrong'}: {q.reference})"
        print(f"| {q.image_name} | {q.question} | {shown} |")


if __name__ == "__main__":
    main()
