"""GenEval's rules (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", NeurIPS D&B, Sec. 3): whether an image shows what its prompt's metadata asks, judged from the objects an
instance segmenter found in it. Pure functions over detections; the models that find them live in
:mod:`diffalign.rewards.geneval`.

A prompt's metadata (one line of GenEval's ``evaluation_metadata.jsonl``) has a ``tag`` (the task), ``include``
clauses (a class, a count, optionally a colour, or a position relative to an earlier clause) and ``exclude`` clauses
(a class and a count it must stay below). Two rules read it:

- **official** (GenEval's ``evaluate_images.py``, ``evaluate``): every include clause holds among the clause's
  ``count`` most confident objects of its class (at least ``count`` found; that many of them the asked colour; each
  of them in the asked relation to every object of the target clause), and no exclude clause is met. This is the
  number the papers print.
- **strict** (Flow-GRPO's GenEval reward, ``reward_server/gen_eval.py``, ``evaluate_reward``): the count must be
  exact, colours are read on every object found, and exclude clauses are not read (an exact count implies them). Its
  **partial** credit, the reward Flow-GRPO trains on, is the mean of one term per check: ``1 - |count - found| /
  count`` for the count, the same with the colour's count, 1 or 0 for a position, 0 for a colour or position that
  could not be checked because the count was wrong. Flow-GRPO's code also adds a 1 after a failed position check;
  here a failed position counts 0 and nothing else, as its own comment and the strict rule intend.

Detections are kept as GenEval keeps them (``evaluate_image``): above a confidence of 0.3 (0.9 for the counting
task), the 16 most confident per class, no suppression of overlaps (GenEval's ``max_overlap`` 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from diffalign.errors import UserError

THRESHOLD = 0.3  # confidence a detection needs (GenEval's --options threshold)
COUNTING_THRESHOLD = 0.9  # ... on the counting task, where a spurious extra object fails the prompt
MAX_OBJECTS = 16  # most confident detections kept per class
NMS_THRESHOLD = 1.0  # IoU above which a less confident box of the same class is dropped; 1.0 keeps every box
POSITION_THRESHOLD = 0.1  # how far (in box sizes) centres must be apart before a relation is read
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RULES = ("official", "strict", "partial")

# The 80 COCO classes in GenEval's spelling (its object_names.txt), in the COCO detectors' label order.
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class Detection:
    """One object an instance segmenter found: its box, its confidence, and its mask (H, W) of bools if any."""

    box: Box
    score: float
    mask: Any = None


@dataclass(frozen=True)
class Verdict:
    """A rule's judgement of one image: whether it shows the prompt, the partial credit (the strict rule's; 1 or 0
    under the official rule), and what failed, in words."""

    correct: bool
    credit: float
    reasons: tuple[str, ...] = ()


# reads the colour of each object of a class (its name, its detections) in the image being judged
ColourReader = Callable[[str, Sequence[Detection]], list[str]]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, counting pixels inclusively as GenEval's ``compute_iou`` does."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(found: Mapping[str, Sequence[Detection]], tag: str) -> dict[str, list[Detection]]:
    """The detections GenEval judges: per class, those above the task's confidence, most confident first, at most
    ``MAX_OBJECTS``, each dropping the later ones it overlaps by ``NMS_THRESHOLD`` or more (none at 1.0)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept: dict[str, list[Detection]] = {}
    for name, detections in found.items():
        queue = sorted((d for d in detections if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        chosen = []
        while queue:
            best = queue.pop(0)
            chosen.append(best)
            queue = [d for d in queue if NMS_THRESHOLD == 1 or iou(best.box, d.box) < NMS_THRESHOLD]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a: Box, b: Box) -> set[str]:
    """Where box ``a`` lies relative to box ``b``: a subset of :data:`POSITIONS` (GenEval's ``relative_position``).
    The centres' offset is shrunk on each axis by ``POSITION_THRESHOLD`` times the two boxes' summed size on it;
    what remains, divided by the offset's length, names a direction where it exceeds 0.5 (image y points down)."""
    centre_a = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    centre_b = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    offset = (centre_a[0] - centre_b[0], centre_a[1] - centre_b[1])
    sizes = (abs(a[2] - a[0]) + abs(b[2] - b[0]), abs(a[3] - a[1]) + abs(b[3] - b[1]))
    revised = [math.copysign(max(abs(o) - POSITION_THRESHOLD * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    length = math.hypot(*offset)
    dx, dy = revised[0] / length, revised[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _position_problem(name: str, found: Sequence[Detection], groups: list[list[Detection] | None],
                      position: Sequence[Any]) -> str | None:
    """Why the objects ``found`` are not all in the relation ``position`` (relation, index of the target clause) to
    every object of the target clause; None when they are."""
    expected, target = position
    if groups[target] is None:
        return f"no target for {name} to be {expected}"
    for obj in found:
        for target_obj in groups[target]:
            relations = relative_position(obj.box, target_obj.box)
            if expected not in relations:
                return f"expected {name} {expected} target, found {' and '.join(sorted(relations)) or 'no relation'}"
    return None


def official_verdict(detected: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any],
                     colours_of: ColourReader) -> Verdict:
    """GenEval's own judgement (see the module docstring): correct or not, credit 1 or 0."""
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    correct = True
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detected.get(name, []))[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if matched and "color" in clause:
            colours = colours_of(name, found)
            if colours.count(clause["color"]) < count:
                matched = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found {', '.join(colours)}")
        if matched and "position" in clause:
            problem = _position_problem(name, found, groups, clause["position"])
            if problem:
                matched = False
                reasons.append(problem)
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        found = detected.get(clause["class"], [])
        if len(found) >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {len(found)}")
    return Verdict(correct, float(correct), tuple(reasons))


def strict_verdict(detected: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any],
                   colours_of: ColourReader) -> Verdict:
    """Flow-GRPO's strict judgement and its partial credit (see the module docstring)."""
    reasons: list[str] = []
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    correct = True
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detected.get(name, []))
        credits.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            reasons.append(f"expected {name}=={count}, found {len(found)}")
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        if matched and "color" in clause:
            right = colours_of(name, found).count(clause["color"])
            credits.append(1 - abs(count - right) / count)
            if right != count:
                matched = False
                reasons.append(f"expected {clause['color']} {name}=={count}, found {right}")
        if matched and "position" in clause:
            problem = _position_problem(name, found, groups, clause["position"])
            credits.append(0.0 if problem else 1.0)
            if problem:
                matched = False
                reasons.append(problem)
        correct = correct and matched
        groups.append(found if matched else None)
    return Verdict(correct, sum(credits) / len(credits) if credits else 0.0, tuple(reasons))


def score(verdict: Verdict, rule: str) -> float:
    """The reward a rule gives: 1 or 0 for ``official`` and ``strict``, the partial credit for ``partial``."""
    return verdict.credit if rule == "partial" else float(verdict.correct)


def judge(detected: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], colours_of: ColourReader,
          rule: str) -> Verdict:
    """The verdict of ``rule`` (``official``, or ``strict``/``partial``, Flow-GRPO's) on the kept detections."""
    return (official_verdict if rule == "official" else strict_verdict)(detected, metadata, colours_of)


def check_metadata(metadata: Any, where: str) -> dict[str, Any]:
    """``metadata`` if it is a GenEval prompt's metadata this module can judge, else a UserError saying what is
    wrong with it and where it came from."""
    def fail(why: str) -> UserError:
        return UserError(f"{where}: not GenEval metadata ({why})")

    if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
        raise fail("expected an object with a prompt, a tag and include clauses")
    if metadata.get("tag") not in TAGS:
        raise fail(f"tag {metadata.get('tag')!r} is not one of {', '.join(TAGS)}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise fail("it has no include clauses")
    for index, clause in enumerate(include + list(metadata.get("exclude", []))):
        if not isinstance(clause, dict) or clause.get("class") not in CLASSES:
            raise fail(f"clause {clause!r} names no COCO class GenEval knows")
        if not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise fail(f"clause {clause!r} needs a count of at least 1")
        if "color" in clause and clause["color"] not in COLORS:
            raise fail(f"colour {clause['color']!r} is not one of {', '.join(COLORS)}")
        if "position" in clause:
            position = clause["position"]
            if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in POSITIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < min(index, len(include))):
                raise fail(f"position {position!r} must be [relation, index of an earlier include clause]")
    return metadata
