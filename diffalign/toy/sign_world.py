"""The text-rendering toy world: 32x32 signs that spell a short word, the field's OCR task in miniature.

Flow-GRPO's visual-text-rendering task prompts for text in quotes (``a sign that says "OPEN"``) and scores the image
with an OCR model (:mod:`diffalign.rewards.ocr`). Here every prompt is ``a sign that says "WORD"`` over 48
three-letter words; a sign is a light board with the word in dark letters, its colours, letter size and position
free (what the prompt leaves open). The shipped base model (``assets/models/toy-sign``, trained by
``python scripts/train_toy_base.py --world signs``) saw every word in pre-training and spells imperfectly; alignment
trains on the 40 training words and is measured on the 8 held-out ones, as Flow-GRPO splits its OCR prompts into
train and test sets. Rendering depends only on the sign; the font is the one Pillow ships (Aileron Regular).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
TRAIN_WORDS = ("CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "PEN", "KEY", "BUS", "CAR", "MAP", "OWL", "FOX", "BEE",
               "EGG", "ICE", "JAR", "LOG", "MUD", "NET", "OAK", "PIG", "RAT", "SKY", "TOP", "VAN", "WEB", "YAK",
               "ZIP", "ANT", "BAT", "COW", "ELK", "FIG", "GUM", "HUT", "INK", "JET", "LIP", "RUG")
HELDOUT_WORDS = ("BED", "ARM", "TOE", "MOP", "WIG", "LEG", "NUT", "TEA")  # never in an alignment run's prompts
BOARDS = ((240, 240, 240), (250, 235, 200), (215, 235, 250), (225, 245, 215))  # light sign colours
INKS = ((20, 20, 20), (30, 40, 120), (120, 20, 20))  # dark letter colours
FONT_SIZES = (11, 12, 13)
JITTER = 2  # pixels the word's centre may move from the sign's centre


@dataclass(frozen=True)
class Sign:
    word: str
    board: tuple[int, int, int]
    ink: tuple[int, int, int]
    font_size: int
    dx: int
    dy: int

    @property
    def caption(self) -> str:
        return sign_prompt(self.word)


def sign_prompt(word: str) -> str:
    """The prompt for a sign spelling ``word``; :func:`diffalign.rewards.ocr.quoted_text` reads the word back."""
    return f'a sign that says "{word}"'


def prompts(split: str = "all") -> list[str]:
    """Sign prompts: ``train`` (alignment runs), ``heldout`` (evaluation) or ``all`` (the base's pre-training)."""
    words = {"train": TRAIN_WORDS, "heldout": HELDOUT_WORDS, "all": TRAIN_WORDS + HELDOUT_WORDS}.get(split)
    if words is None:
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    return [sign_prompt(w) for w in words]


def random_sign(rng: random.Random, word: str | None = None) -> Sign:
    """A sign of ``word`` (else a word of the whole vocabulary) with uniform colours, letter size and offset."""
    return Sign(word or rng.choice(TRAIN_WORDS + HELDOUT_WORDS), rng.choice(BOARDS), rng.choice(INKS),
                rng.choice(FONT_SIZES), rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER))


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_sign(sign: Sign, size: int = SIZE) -> np.ndarray:
    """The sign as an RGB uint8 array (size, size, 3): the word centred (plus the offset) on the board."""
    image = Image.new("RGB", (size, size), sign.board)
    draw = ImageDraw.Draw(image)
    font = _font(sign.font_size)
    left, top, right, bottom = draw.textbbox((0, 0), sign.word, font=font)
    x = (size - (right - left)) / 2 - left + sign.dx
    y = (size - (bottom - top)) / 2 - top + sign.dy
    draw.text((x, y), sign.word, fill=sign.ink, font=font)
    return np.asarray(image)
