"""Make the small offline sample of the nine VQA benchmarks bundled with luq.

Real photos come from scikit-image (astronaut, chelsea, coffee, rocket, coins, camera,
page), scikit-learn (china, flower) and matplotlib (grace_hopper.jpg); charts, documents,
signs and counting pictures are drawn here. Every question and answer below was written by
hand while looking at the pictures. Photos are downscaled to 336 px on the long side and
everything is stored as JPEG, so the whole sample stays small.

    python examples/make_eval_samples.py [--out src/luq/data/eval_samples]

The layout is the one ``luq.eval.datasets`` documents: ``<task>/samples.jsonl`` per
benchmark, the images in a shared ``images/`` folder referenced as ``../images/NAME.jpg``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LONG_SIDE = 336
JPEG_QUALITY = 85
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "luq" / "data" / "eval_samples"


# --------------------------------------------------------------------------- pictures


def photos() -> dict[str, Image.Image]:
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {name: Image.fromarray(getattr(skimage.data, name)())
             for name in ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera", "page")}
    china, flower = load_sample_images().images
    found["china"], found["flower"] = Image.fromarray(china), Image.fromarray(flower)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        found["grace_hopper"] = Image.open(f).convert("RGB")
    return {name: img.convert("RGB") for name, img in found.items()}


def _font(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _figure_to_image(fig) -> Image.Image:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def sign(text: str, background: str, color: str, size=(336, 168), font_size=56) -> Image.Image:
    img = Image.new("RGB", size, "lightgray")
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([12, 12, size[0] - 12, size[1] - 12], radius=16, fill=background, outline="black", width=4)
    draw.text((size[0] / 2, size[1] / 2), text, fill=color, font=_font(font_size), anchor="mm")
    return img


def document(lines: list[tuple[str, int]], size=(336, 420)) -> Image.Image:
    """A white page with lines of (text, font size), top to bottom."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    y = 20
    for text, font_size in lines:
        draw.text((20, y), text, fill="black", font=_font(font_size))
        y += int(font_size * 1.6)
    return img


def shapes(kind: str, count: int, color: str, seed: int, size=(336, 252)) -> Image.Image:
    """``count`` non-overlapping circles/triangles/squares at seeded places."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float]] = []
    radius = 24
    while len(placed) < count:
        x, y = rng.uniform(radius + 8, size[0] - radius - 8), rng.uniform(radius + 8, size[1] - radius - 8)
        if all((x - px) ** 2 + (y - py) ** 2 > (2.4 * radius) ** 2 for px, py in placed):
            placed.append((x, y))
    for x, y in placed:
        box = [x - radius, y - radius, x + radius, y + radius]
        if kind == "circle":
            draw.ellipse(box, fill=color, outline="black", width=2)
        elif kind == "square":
            draw.rectangle(box, fill=color, outline="black", width=2)
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=color,
                         outline="black")
    return img


def bar_chart(labels, values, title, ylabel) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    bars = ax.bar(labels, values, color=["tab:red", "tab:olive", "tab:purple", "tab:brown", "tab:blue"][:len(values)])
    ax.bar_label(bars)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return _figure_to_image(fig)


def line_chart(xs, ys, title, ylabel, labels=True) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.plot(xs, ys, marker="o")
    if labels:
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xticks(xs)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_to_image(fig)


def pie_chart(labels, shares, title) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.pie(shares, labels=labels, autopct="%d%%", colors=["tab:green", "tab:blue", "tab:orange"])
    ax.set_title(title)
    fig.tight_layout()
    return _figure_to_image(fig)


def right_triangle() -> Image.Image:
    img = Image.new("RGB", (336, 252), "white")
    draw = ImageDraw.Draw(img)
    a, b, c = (60, 200), (60, 50), (260, 200)
    draw.polygon([a, b, c], outline="black", width=3)
    draw.rectangle([60, 182, 78, 200], outline="black", width=2)
    font = _font(22)
    draw.text((36, 125), "3", fill="black", font=font, anchor="mm")
    draw.text((160, 222), "4", fill="black", font=font, anchor="mm")
    draw.text((180, 110), "?", fill="red", font=font, anchor="mm")
    return img


def arithmetic(text: str) -> Image.Image:
    img = Image.new("RGB", (336, 168), "white")
    ImageDraw.Draw(img).text((168, 84), text, fill="black", font=_font(54), anchor="mm")
    return img


def make_images() -> dict[str, Image.Image]:
    images = photos()
    images.update(
        sign_open=sign("OPEN", "darkgreen", "white"),
        sign_bakery=sign("BAKERY", "navy", "gold", font_size=50),
        plate=sign("LUQ 4821", "white", "black", size=(336, 120), font_size=48),
        street_sign=sign("MAIN ST", "forestgreen", "white", size=(336, 120), font_size=48),
        lemonade=sign("LEMONADE", "yellow", "darkblue", font_size=44),
        arithmetic=arithmetic("7 + 5 = ?"),
        invoice=document([("INVOICE", 28), ("Invoice No: INV-2041", 16), ("Date: March 3, 2024", 16),
                          ("Bill to: Acme Tools Ltd.", 16), ("", 10), ("Widgets x 50      $1,000.00", 16),
                          ("Shipping            $250.00", 16), ("", 10), ("Total due:  $1,250.00", 20)]),
        memo=document([("MEMORANDUM", 28), ("To: All Staff", 16), ("From: Dana Reyes, Facilities", 16),
                       ("Date: June 12, 2023", 16), ("Subject: Parking lot repaving", 16), ("", 10),
                       ("The north parking lot will be closed", 14), ("on Friday, June 16, for repaving.", 14),
                       ("Please use the south lot that day.", 14)]),
        fruit_chart=bar_chart(["Apples", "Bananas", "Cherries", "Dates"], [42, 35, 18, 27], "Fruit sold",
                              "Boxes"),
        revenue_chart=line_chart([2019, 2020, 2021, 2022, 2023], [12.5, 14.1, 9.8, 16.3, 18.0],
                                 "Annual revenue", "Million USD"),
        pie=pie_chart(["Green", "Blue", "Orange"], [50, 30, 20], "Favourite colour"),
        triangles=shapes("triangle", 3, "gold", seed=1),
        circles=shapes("circle", 7, "tomato", seed=2),
        squares=shapes("square", 4, "skyblue", seed=3),
        triangle_345=right_triangle(),
        slope=line_chart([0, 2, 4], [1, 6, 11], "y = f(x)", "y"),
        scores_chart=bar_chart(["Ann", "Ben", "Cy", "Dee"], [8, 13, 11, 6], "Points scored", "Points"),
    )
    return images


# --------------------------------------------------------------------------- questions (by hand)


def ten(*pairs: tuple[str, int]) -> list[str]:
    """Ten human answers from (answer, how many annotators gave it)."""
    answers = [a for a, n in pairs for _ in range(n)]
    assert len(answers) == 10, answers
    return answers


def img(name: str) -> str:
    return f"../images/{name}.jpg"


def mme_pairs(image: str, category: str, yes_question: str, no_question: str) -> list[dict]:
    suffix = " Please answer yes or no."
    return [{"id": f"{image}-yes", "image": img(image), "question": yes_question + suffix, "answer": "Yes",
             "category": category},
            {"id": f"{image}-no", "image": img(image), "question": no_question + suffix, "answer": "No",
             "category": category}]


SAMPLES: dict[str, list[dict]] = {
    "mme": [
        *mme_pairs("astronaut", "existence", "Is there a flag in this image?", "Is there a dog in this image?"),
        *mme_pairs("coins", "count", "Are there 24 coins in this image?", "Are there 10 coins in this image?"),
        *mme_pairs("flower", "color", "Is the flower in this image orange?", "Is the flower in this image purple?"),
        *mme_pairs("rocket", "position", "Is the rocket in the middle of the image?",
                   "Is the rocket at the left edge of the image?"),
        *mme_pairs("sign_open", "OCR", "Does the sign say OPEN?", "Does the sign say CLOSED?"),
        *mme_pairs("china", "scene", "Is this picture taken outdoors?", "Is this picture taken underwater?"),
        *mme_pairs("arithmetic", "numerical_calculation", "Is the answer to the arithmetic question in the image 12?",
                   "Is the answer to the arithmetic question in the image 15?"),
    ],
    "pope": [
        {"id": 1, "image": img("astronaut"), "question": "Is there a helmet in the image?", "answer": "yes",
         "category": "random"},
        {"id": 2, "image": img("astronaut"), "question": "Is there a bicycle in the image?", "answer": "no",
         "category": "random"},
        {"id": 3, "image": img("chelsea"), "question": "Is there a cat in the image?", "answer": "yes",
         "category": "adversarial"},
        {"id": 4, "image": img("chelsea"), "question": "Is there a dog in the image?", "answer": "no",
         "category": "adversarial"},
        {"id": 5, "image": img("coffee"), "question": "Is there a spoon in the image?", "answer": "yes",
         "category": "popular"},
        {"id": 6, "image": img("coffee"), "question": "Is there a fork in the image?", "answer": "no",
         "category": "popular"},
        {"id": 7, "image": img("camera"), "question": "Is there a tripod in the image?", "answer": "yes",
         "category": "random"},
        {"id": 8, "image": img("camera"), "question": "Is there a car in the image?", "answer": "no",
         "category": "random"},
    ],
    "vqav2": [
        {"id": 1, "image": img("chelsea"), "question": "What animal is this?",
         "answers": ten(("cat", 8), ("kitten", 1), ("tabby cat", 1))},
        {"id": 2, "image": img("coffee"), "question": "What drink is in the cup?",
         "answers": ten(("coffee", 7), ("espresso", 3))},
        {"id": 3, "image": img("astronaut"), "question": "What color is the suit?", "answers": ten(("orange", 10))},
        {"id": 4, "image": img("grace_hopper"), "question": "Is this person wearing glasses?",
         "answers": ten(("yes", 10))},
        {"id": 5, "image": img("coins"), "question": "How many coins are there?",
         "answers": ten(("24", 7), ("23", 1), ("25", 1), ("many", 1))},
        {"id": 6, "image": img("rocket"), "question": "What time of day is it?",
         "answers": ten(("dusk", 4), ("evening", 3), ("night", 2), ("dawn", 1))},
    ],
    "gqa": [
        {"id": 1, "image": img("coffee"), "question": "What is the cup sitting on?", "answer": "saucer"},
        {"id": 2, "image": img("coffee"), "question": "What is the spoon made of?", "answer": "metal"},
        {"id": 3, "image": img("china"), "question": "What is in front of the tower?", "answer": "trees"},
        {"id": 4, "image": img("camera"), "question": "What is the man looking through?", "answer": "camera"},
        {"id": 5, "image": img("astronaut"), "question": "Which side of the photo is the flag on?",
         "answer": "left"},
        {"id": 6, "image": img("flower"), "question": "What color is the flower?", "answer": "orange"},
    ],
    "textvqa": [
        {"id": 1, "image": img("page"), "question": "what is the title of the page?",
         "answers": ten(("region-based segmentation", 8), ("region based segmentation", 2))},
        {"id": 2, "image": img("sign_bakery"), "question": "what does the sign say?", "answers": ten(("bakery", 10))},
        {"id": 3, "image": img("plate"), "question": "what is written on the plate?",
         "answers": ten(("luq 4821", 8), ("luq4821", 2))},
        {"id": 4, "image": img("street_sign"), "question": "what street is this?",
         "answers": ten(("main st", 6), ("main street", 3), ("main", 1))},
        {"id": 5, "image": img("lemonade"), "question": "what drink is named on the sign?",
         "answers": ten(("lemonade", 10))},
    ],
    "docvqa": [
        {"id": 1, "image": img("invoice"), "question": "What is the invoice number?", "answers": ["INV-2041"]},
        {"id": 2, "image": img("invoice"), "question": "What is the total amount due?",
         "answers": ["$1,250.00", "1,250.00"]},
        {"id": 3, "image": img("invoice"), "question": "What is the date of the invoice?",
         "answers": ["March 3, 2024"]},
        {"id": 4, "image": img("memo"), "question": "To whom is the memo addressed?", "answers": ["All Staff"]},
        {"id": 5, "image": img("memo"), "question": "What is the subject of the memo?",
         "answers": ["Parking lot repaving"]},
        {"id": 6, "image": img("page"), "question": "What is the heading of the page?",
         "answers": ["Region-based segmentation"]},
    ],
    "chartqa": [
        {"id": 1, "image": img("fruit_chart"), "question": "How many boxes of Bananas were sold?", "answer": "35",
         "type": "human_test"},
        {"id": 2, "image": img("fruit_chart"), "question": "Which fruit sold the most boxes?", "answer": "Apples",
         "type": "human_test"},
        {"id": 3, "image": img("fruit_chart"), "question": "What is the difference between Apples and Cherries?",
         "answer": "24", "type": "augmented_test"},
        {"id": 4, "image": img("revenue_chart"), "question": "In which year was the revenue lowest?",
         "answer": "2021", "type": "human_test"},
        {"id": 5, "image": img("revenue_chart"), "question": "What was the revenue in 2023?", "answer": "18",
         "type": "augmented_test"},
        {"id": 6, "image": img("pie"), "question": "What percentage of people chose Blue?", "answer": "30",
         "type": "augmented_test"},
    ],
    "mmbench": [
        {"id": 1, "image": img("chelsea"), "question": "What animal is shown in the image?",
         "options": {"A": "Dog", "B": "Cat", "C": "Horse", "D": "Rabbit"}, "answer": "B",
         "category": "image_topic"},
        {"id": 2, "image": img("rocket"), "question": "What is the main object in the image?",
         "options": {"A": "A rocket", "B": "A ship", "C": "A bridge", "D": "A tree"}, "answer": "A",
         "category": "image_topic"},
        {"id": 3, "image": img("coffee"), "question": "What color is the saucer?",
         "options": {"A": "Blue", "B": "Green", "C": "Red", "D": "Yellow"}, "answer": "C",
         "category": "attribute_recognition"},
        {"id": 4, "image": img("china"), "question": "Which kind of building is shown?",
         "options": {"A": "Skyscraper", "B": "Pagoda", "C": "Lighthouse", "D": "Windmill"}, "answer": "B",
         "category": "image_scene"},
        {"id": 5, "image": img("triangles"), "question": "How many triangles are in the image?",
         "options": {"A": "2", "B": "3", "C": "4", "D": "5"}, "answer": "B", "category": "object_counting"},
        {"id": 6, "image": img("flower"), "hint": "The photo was taken in a garden.",
         "question": "What is in the center of the image?",
         "options": {"A": "A flower", "B": "A bird", "C": "A car"}, "answer": "A",
         "category": "object_localization"},
    ],
    "mathvista": [
        {"id": 1, "image": img("triangle_345"),
         "question": "The legs of the right triangle are 3 and 4. What is the length of the side marked '?'?",
         "answer": "5", "question_type": "free_form", "answer_type": "integer", "choices": None,
         "precision": None, "unit": None},
        {"id": 2, "image": img("circles"), "question": "How many circles are there in the image?", "answer": "7",
         "question_type": "free_form", "answer_type": "integer", "choices": None, "precision": None, "unit": None},
        {"id": 3, "image": img("slope"), "question": "What is the slope of the line?", "answer": "2.5",
         "question_type": "free_form", "answer_type": "float", "choices": None, "precision": 1, "unit": None},
        {"id": 4, "image": img("scores_chart"), "question": "What is the sum of the two largest bars?",
         "answer": "24", "question_type": "free_form", "answer_type": "integer", "choices": None,
         "precision": None, "unit": "points"},
        {"id": 5, "image": img("squares"), "question": "What shape are all the objects in the image?",
         "answer": "square", "question_type": "multi_choice", "answer_type": "text",
         "choices": ["circle", "square", "triangle", "star"], "precision": None, "unit": None},
        {"id": 6, "image": img("coins"), "question": "Are there more than 20 coins in the image?",
         "answer": "Yes", "question_type": "multi_choice", "answer_type": "text", "choices": ["Yes", "No"],
         "precision": None, "unit": None},
    ],
}


# --------------------------------------------------------------------------- writing


def downscale(image: Image.Image) -> Image.Image:
    scale = LONG_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    used = {Path(record["image"]).stem for records in SAMPLES.values() for record in records}
    images = make_images()
    missing = used - set(images)
    assert not missing, f"questions about pictures never made: {missing}"
    image_dir = args.out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("*.jpg"):
        old.unlink()
    for name in sorted(used):
        downscale(images[name]).save(image_dir / f"{name}.jpg", quality=JPEG_QUALITY, optimize=True)
    for task, records in SAMPLES.items():
        (args.out / task).mkdir(parents=True, exist_ok=True)
        with (args.out / task / "samples.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {sum(map(len, SAMPLES.values()))} questions about {len(used)} images to {args.out} "
          f"({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
