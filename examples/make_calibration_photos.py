"""Writes luq's bundled image+question calibration set (src/luq/data/calibration/).

Real photos from scikit-image's sample data, none of them used by the bundled
evaluation samples, downscaled to at most 336 px and stored as JPEG, with questions
(and short answers where the picture settles them) written by hand.

    python examples/make_calibration_photos.py
"""

import json
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "src" / "luq" / "data" / "calibration"

# name -> [(question, answer or None)]
QUESTIONS = {
    "hubble_deep_field": [("What is shown in this image?", "galaxies in deep space"),
                          ("Is this picture taken on Earth's surface?", "no"),
                          ("How would you describe the background colour?", "black")],
    "immunohistochemistry": [("What does this image show?", "stained tissue under a microscope"),
                             ("Which colours dominate the image?", "brown and blue")],
    "stereo_motorcycle": [("What vehicle is in the picture?", "a motorcycle"),
                          ("How many wheels does the vehicle have?", "two"),
                          ("Is the vehicle indoors or outdoors?", "indoors")],
    "retina": [("What part of the body is shown?", "the retina of an eye"),
               ("What colour is the background around the circle?", "black")],
    "clock": [("What object is shown?", "a clock"), ("Is the image in colour?", "no")],
    "moon": [("What is shown in this picture?", "the surface of the moon"),
             ("Are there craters?", "yes")],
    "brick": [("What material is shown?", "brick"), ("Is there a person in the image?", "no")],
    "grass": [("What does this texture show?", "grass"), ("Is this a drawing?", "no")],
    "gravel": [("What is on the ground?", "gravel"), ("Describe the texture.", None)],
    "colorwheel": [("What is shown in the image?", "a colour wheel"),
                   ("How many colours can you see?", None)],
    "logo": [("What does the logo show?", None), ("Is there text in the image?", "yes")],
    "cell": [("What kind of image is this?", "a microscope image of cells")],
    "text": [("Is there writing in this picture?", "yes"), ("What does the text say?", None)],
    "horse": [("What animal is this silhouette?", "a horse"), ("What colours is the image made of?", "black and white")],
}


def photo(name: str) -> Image.Image:
    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo pairs: the left view
        pixels = pixels[0]
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    image = Image.fromarray(pixels)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.split()[3])
        image = background
    image = image.convert("RGB")
    image.thumbnail((336, 336))
    return image


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, questions in QUESTIONS.items():
        photo(name).save(OUT / "images" / f"{name}.jpg", quality=85)
        for question, answer in questions:
            row = {"image": f"images/{name}.jpg", "question": question}
            if answer is not None:
                row["answer"] = answer
            lines.append(json.dumps(row))
    (OUT / "questions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} questions on {len(QUESTIONS)} photos to {OUT}")


if __name__ == "__main__":
    main()
