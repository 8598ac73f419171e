"""Flow-GRPO's OCR reward (Liu et al. 2025, "Flow-GRPO", arXiv 2505.05470, Sec. 5.1 "Visual Text Rendering"):
how well the image spells the text its prompt quotes, read by a real OCR model.

The rule is Flow-GRPO's ``flow_grpo/ocr.py`` (``OcrScorer.__call__``): the target is the text between the
prompt's first pair of double quotes; the recognised lines are joined; spaces are removed and both are lower-cased;
the distance is 0 when the target occurs in the recognised text, else their Levenshtein distance, capped at the
target's length; the reward is ``1 - distance / len(target)``, in [0, 1]. A blank image reads as "" and scores 0.

The OCR model is PP-OCRv4 (text detection, then recognition; no angle classifier, as Flow-GRPO's
``use_angle_cls=False``), the family Flow-GRPO's PaddleOCR runs, through ``rapidocr-onnxruntime``, whose wheel ships
the ONNX files: nothing is downloaded at run time. Lines below the recogniser's confidence 0.5 are dropped, as
PaddleOCR's ``drop_score`` drops them. Detection resizes each image's shorter side to ``detect_side`` (736, PP-OCR's
default); small images read nearly as well with a smaller side, faster (the sign world's configs use 160). Unlike
Flow-GRPO, an OCR failure is not scored as a miss: it stops the run.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import to_pil

DETECT_SIDE = 736  # PP-OCR's det_limit_side_len: detection sees the image with its shorter side resized to this
INSTALL = "pip install 'diffalign[ocr]'  (rapidocr-onnxruntime: PP-OCRv4 in ONNX, inside the wheel)"


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first two double quotes (Flow-GRPO: ``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise UserError(f"ocr reward: the prompt {prompt!r} quotes no text; write the words to render between "
                        'double quotes, e.g. a sign that says "OPEN"')
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """The edit distance between two strings (insertions, deletions and substitutions, each costing 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's score of the recognised text against the target, in [0, 1] (see the module docstring)."""
    recognised = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        raise UserError("ocr reward: the prompt's quoted text is empty")
    distance = 0 if target in recognised else min(levenshtein(recognised, target), len(target))
    return 1 - distance / len(target)


class OcrAccuracy:
    """Scores each image by how closely PP-OCRv4 reads the text its prompt quotes (Flow-GRPO's OCR reward)."""

    name = "ocr"
    description = ('Flow-GRPO\'s OCR accuracy: 1 minus the normalised edit distance between the text PP-OCRv4 reads '
                   'in the image and the text the prompt quotes ("..."), in [0, 1]; higher is better.')

    def __init__(self, detect_side: int | str = DETECT_SIDE) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:  # the package, or a system library OpenCV needs (libGL, libglib)
            raise UserError(f"the ocr reward needs rapidocr-onnxruntime: {INSTALL}; on a server without a "
                            f"display, OpenCV also needs apt-get install libgl1 libglib2.0-0 ({error})") from error
        self.detect_side = int(detect_side)
        self.engine = RapidOCR(det_limit_side_len=self.detect_side)

    def read(self, images: torch.Tensor) -> list[str]:
        """The text read in each image in [0, 1] (N, 3, H, W): its lines joined, "" where none is found."""
        texts = []
        for image in to_pil(images):
            lines, _ = self.engine(image, use_det=True, use_cls=False, use_rec=True)
            texts.append("".join(line[1] for line in lines or ()))
        return texts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        targets = [quoted_text(p) for p in prompts]
        return torch.tensor([ocr_score(text, target) for text, target in zip(self.read(images), targets)])
