"""GenEval: each rule on hand-made detections against what GenEval's (and Flow-GRPO's) code decides, the geometry
by hand, the shipped metadata, and the whole reward on a tiny random Mask2Former and open_clip written here."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures import DOG, geneval_spec, tiny_geneval_models

from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.rewards import load_reward
from diffalign.rewards import geneval_rules as rules
from diffalign.rewards.geneval import METADATA, ColourClassifier, GenEval, mask_boxes, read_metadata
from diffalign.rewards.geneval_rules import Detection, iou, keep_detections, relative_position

SHIPPED = read_metadata(METADATA)


def box(x1: float, y1: float, x2: float, y2: float, score: float = 0.95) -> Detection:
    return Detection((x1, y1, x2, y2), score)


def colours(*read: str):
    """A colour reader that reads ``read`` for the objects, in order (what CLIP would say)."""
    return lambda name, objects: list(read[:len(objects)])


def no_colours(name, objects):
    raise AssertionError("this verdict needs no colour")


def test_the_shipped_metadata_is_geneval_s_553_prompts_by_task_and_a_prompt_set():
    assert len(SHIPPED) == 553
    assert collections.Counter(m["tag"] for m in SHIPPED.values()) == {
        "position": 100, "color_attr": 100, "two_object": 99, "colors": 94, "single_object": 80, "counting": 80}
    assert read_prompts("geneval") == list(SHIPPED)  # the same file, in order, is the prompt set "geneval"
    assert SHIPPED["a photo of two clocks"]["exclude"] == [{"class": "clock", "count": 3}]


def test_relative_position_and_iou_by_hand():
    # centres 20 apart on x, sizes 10 + 10: the offset shrinks by 0.1 * 20 = 2 -> dx = -18 / 20 = -0.9
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # diagonal: (-30, -30) shrinks to (-28, -28); / 42.43 = -0.66 on both axes (y points down: above)
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    assert relative_position((0, 40, 10, 50), (0, 0, 10, 10)) == {"below"}
    # centres 1 apart: the shrink (2) swallows the offset, no relation
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # GenEval counts pixels inclusively: 10 x 10 boxes overlapping on 5 x 5 -> 25 / 175
    assert iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)
    assert iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0


def test_detections_are_kept_above_the_task_s_confidence_most_confident_first_at_most_16(monkeypatch):
    found = {"dog": [box(0, 0, 5, 5, 0.5), box(0, 0, 9, 9, 0.95), box(1, 1, 3, 3, 0.2)], "cat": [box(0, 0, 5, 5, 0.1)]}
    kept = keep_detections(found, "two_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5] and "cat" not in kept  # 0.3 and above, sorted
    assert [d.score for d in keep_detections(found, "counting")["dog"]] == [0.95]  # counting needs 0.9
    many = {"cup": [box(i, 0, i + 5, 5, 0.4 + i / 100) for i in range(20)]}
    assert [d.score for d in keep_detections(many, "single_object")["cup"]] == [0.4 + i / 100 for i in range(19, 3, -1)]
    monkeypatch.setattr(rules, "NMS_THRESHOLD", 0.5)  # GenEval's max_overlap option: overlapping boxes suppressed
    overlapping = {"dog": [box(0, 0, 9, 9, 0.9), box(0, 0, 9, 8, 0.8), box(20, 20, 29, 29, 0.7)]}
    assert [d.score for d in keep_detections(overlapping, "two_object")["dog"]] == [0.9, 0.7]


def test_single_and_two_object_prompts_need_every_object():
    bench = SHIPPED["a photo of a bench"]
    assert rules.official_verdict({"bench": [box(0, 0, 9, 9)]}, bench, no_colours).correct
    missing = rules.official_verdict({"dog": [box(0, 0, 9, 9)]}, bench, no_colours)
    assert not missing.correct and missing.credit == 0 and missing.reasons == ("expected bench>=1, found 0",)
    two = next(m for m in SHIPPED.values() if m["tag"] == "two_object")
    a, b = (clause["class"] for clause in two["include"])
    assert rules.official_verdict({a: [box(0, 0, 9, 9)], b: [box(20, 0, 29, 9)]}, two, no_colours).correct
    assert not rules.official_verdict({a: [box(0, 0, 9, 9)]}, two, no_colours).correct
    # Flow-GRPO's partial credit: one term per clause, 1 - |1 - found| / 1
    assert rules.strict_verdict({a: [box(0, 0, 9, 9)]}, two, no_colours).credit == pytest.approx(0.5)


def test_counting_official_reads_at_least_and_the_exclusion_strict_reads_exactly():
    clocks = SHIPPED["a photo of two clocks"]
    found = {n: {"clock": [box(10 * i, 0, 10 * i + 9, 9) for i in range(n)]} for n in (1, 2, 3, 4)}
    assert [rules.official_verdict(found[n], clocks, no_colours).correct for n in (1, 2, 3)] == [False, True, False]
    assert rules.official_verdict(found[3], clocks, no_colours).reasons == ("expected clock<3, found 3",)
    assert [rules.strict_verdict(found[n], clocks, no_colours).correct for n in (1, 2, 3)] == [False, True, False]
    # partial credit 1 - |2 - found| / 2: 0.5, 1, 0.5, 0 (four clocks)
    assert [rules.strict_verdict(found[n], clocks, no_colours).credit for n in (1, 2, 3, 4)] == [0.5, 1.0, 0.5, 0.0]


def test_colours_are_read_on_the_most_confident_objects_officially_and_on_all_of_them_strictly():
    prompt = next(p for p, m in SHIPPED.items() if m["tag"] == "colors")
    meta = SHIPPED[prompt]
    name, colour = meta["include"][0]["class"], meta["include"][0]["color"]
    other = next(c for c in rules.COLORS if c != colour)
    one = {name: [box(0, 0, 9, 9)]}
    assert rules.official_verdict(one, meta, colours(colour)).correct
    wrong = rules.official_verdict(one, meta, colours(other))
    assert not wrong.correct and wrong.reasons == (f"expected {colour} {name}>=1, found {other}",)
    two = {name: [box(0, 0, 9, 9), box(20, 0, 29, 9, 0.9)]}
    # GenEval reads the one most confident object: correct; Flow-GRPO's strict rule wants exactly one
    assert rules.official_verdict(two, meta, colours(colour, other)).correct
    strict = rules.strict_verdict(two, meta, colours(colour, other))
    assert not strict.correct and strict.credit == pytest.approx((0 + 0) / 2)  # count term 1 - 1/1, colour unread: 0
    assert rules.strict_verdict(one, meta, colours(colour)).credit == 1.0


def test_position_needs_every_object_in_the_relation_to_every_target():
    meta = SHIPPED["a photo of a dog right of a teddy bear"]
    bear = [box(0, 0, 9, 9)]
    right = {"teddy bear": bear, "dog": [box(20, 0, 29, 9)]}
    left = {"teddy bear": bear, "dog": [box(-20, 0, -11, 9)]}
    assert rules.official_verdict(right, meta, no_colours).correct
    failed = rules.official_verdict(left, meta, no_colours)
    assert not failed.correct and failed.reasons == ("expected dog right of target, found left of",)
    no_target = rules.official_verdict({"dog": [box(20, 0, 29, 9)]}, meta, no_colours)
    assert no_target.reasons == ("expected teddy bear>=1, found 0", "no target for dog to be right of")
    # partial: bear count 1, dog count 1, position 0 (Flow-GRPO's code would add a stray 1 here) -> 2/3
    assert rules.strict_verdict(left, meta, no_colours).credit == pytest.approx(2 / 3)
    assert rules.strict_verdict(right, meta, no_colours).credit == 1.0


def test_colour_attribution_needs_both_colours():
    meta = SHIPPED["a photo of a purple wine glass and a black apple"]
    found = {"wine glass": [box(0, 0, 9, 9)], "apple": [box(20, 0, 29, 9)]}

    def reader(*by_class):
        return lambda name, objects: [dict(by_class)[name]] * len(objects)

    assert rules.official_verdict(found, meta, reader(("wine glass", "purple"), ("apple", "black"))).correct
    swapped = reader(("wine glass", "purple"), ("apple", "red"))
    assert not rules.official_verdict(found, meta, swapped).correct
    assert rules.strict_verdict(found, meta, swapped).credit == pytest.approx(3 / 4)  # counts 1, 1; colours 1, 0
    assert rules.score(rules.strict_verdict(found, meta, swapped), "partial") == pytest.approx(0.75)
    assert rules.score(rules.strict_verdict(found, meta, swapped), "strict") == 0.0


def test_bad_metadata_says_what_is_wrong_and_where(tmp_path):
    good = SHIPPED["a photo of a bench"]
    for bad, why in ((dict(good, tag="vibes"), "tag 'vibes'"),
                     (dict(good, include=[{"class": "unicorn", "count": 1}]), "names no COCO class"),
                     (dict(good, include=[{"class": "dog", "count": 0}]), "count of at least 1"),
                     (dict(good, include=[{"class": "dog", "count": 1, "position": ["left of", 0]}]),
                      "earlier include clause")):
        (tmp_path / "bad.jsonl").write_text(__import__("json").dumps(bad) + "\n")
        with pytest.raises(UserError, match=rf"bad.jsonl:1: not GenEval metadata \(.*{why}"):
            read_metadata(tmp_path / "bad.jsonl")


def test_mask_boxes_end_one_past_the_last_pixel_as_mmdetection_draws_them():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True  # rows 2..4, columns 3..7
    assert mask_boxes(masks).tolist() == [[3, 2, 8, 5], [0, 0, 0, 0]]


# --- the whole reward on tiny random models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_geneval(tmp_path_factory):
    return tiny_geneval_models(tmp_path_factory.mktemp("geneval"))


def _spec(tiny, **options) -> str:
    return geneval_spec(*tiny, **options)


def test_the_reward_scores_the_detector_s_objects_by_the_prompt_s_metadata(tiny_geneval):
    assert rules.CLASSES[DOG] == "dog"  # the label the tiny detector's class head says
    reward = load_reward(_spec(tiny_geneval))
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a dog", "a photo of a bench", "a photo of two clocks"]
    found = reward.detector([Image.fromarray(np.uint8(im.permute(1, 2, 0).numpy() * 255)) for im in images])
    dogs = found[0]["dog"]
    assert set(found[0]) == {"dog"} and dogs  # the class head says dog; each query with a mask is one
    for dog in dogs:
        assert dog.mask.shape == (48, 48) and dog.box == tuple(mask_boxes(torch.from_numpy(dog.mask)[None])[0].tolist())
        assert 0.5 <= dog.score <= 1  # class probability ~1 times the mean sigmoid over the mask's own pixels
    scores = reward(images, prompts)
    assert scores.tolist() == [1.0, 0.0, 0.0]  # a dog is found; no bench; no clock
    assert reward.verdicts(images[1:2], prompts[1:2])[0].reasons == ("expected bench>=1, found 0",)


def test_colours_are_clip_zero_shot_classifiers_over_geneval_s_templates_by_hand(tiny_geneval):
    import open_clip

    _, checkpoint, arch = tiny_geneval
    reader = ColourClassifier(checkpoint, arch, torch.device("cpu"))
    tokenizer = open_clip.get_tokenizer(arch.stem)
    with torch.no_grad():
        expected = []
        for c in rules.COLORS:
            texts = [f"a photo of a {c} dog", f"a photo of a {c}-colored dog", f"a photo of a {c} object"]
            embedded = F.normalize(reader.model.encode_text(tokenizer(texts)), dim=-1).mean(dim=0)
            expected.append(embedded / embedded.norm())
    torch.testing.assert_close(reader.classifier("dog"), torch.stack(expected, dim=1))
    image = Image.new("RGB", (20, 20), (200, 0, 0))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:15] = True
    mask[7, 7] = False
    crop = np.asarray(reader.crop(image, Detection((5, 5, 15, 10), 0.9, mask)))
    assert crop.shape == (5, 10, 3) and tuple(crop[0, 0]) == (200, 0, 0) and tuple(crop[2, 2]) == (153, 153, 153)
    with torch.no_grad():
        pixels = reader.preprocess(Image.fromarray(crop))[None]
        by_hand = rules.COLORS[int((F.normalize(reader.model.encode_image(pixels), dim=-1)
                                    @ reader.classifier("dog")).argmax())]
    assert reader(image, "dog", [Detection((5, 5, 15, 10), 0.9, mask)]) == [by_hand]


def test_specs_options_and_unknown_prompts_fail_before_any_image_is_read(tiny_geneval, tmp_path):
    partial = load_reward(_spec(tiny_geneval, rule="partial"))
    assert isinstance(partial, GenEval) and partial.rule == "partial"
    with pytest.raises(UserError, match="rule 'lenient' is not one of official, strict, partial"):
        load_reward(_spec(tiny_geneval, rule="lenient"))
    with pytest.raises(UserError, match="give clip= the CLIP ViT-L/14 checkpoint"):
        load_reward(f"geneval:{tiny_geneval[0]}")
    with pytest.raises(UserError, match="reward geneval has no option colour"):
        load_reward(_spec(tiny_geneval, colour="red"))
    with pytest.raises(UserError, match="config.json not found; expected a Mask2Former config"):
        load_reward(_spec((tmp_path, *tiny_geneval[1:])))
    with pytest.raises(UserError, match="no metadata for the prompt 'a photo of a unicorn'"):
        partial(torch.rand(1, 3, 48, 48), ["a photo of a unicorn"])
    own = tmp_path / "train_metadata.jsonl"  # Flow-GRPO's layout: the same lines, other prompts
    own.write_text('{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog, photo"}\n')
    assert load_reward(_spec(tiny_geneval, metadata=own))(torch.rand(1, 3, 48, 48), ["a dog, photo"]).tolist() == [1.0]


@pytest.mark.slow
def test_an_online_round_reads_each_prompt_s_metadata_from_the_prompt_file_it_samples(tiny_geneval, tmp_path):
    from diffalign.paths import ROOT
    from diffalign.train import load_config, train

    prompts = tmp_path / "dog.jsonl"  # a prompt file that is its own metadata, as Flow-GRPO's train_metadata.jsonl
    prompts.write_text('{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of '
                       'a dog"}\n')
    config = load_config(ROOT / "configs/toy_d3po.yaml", [
        f"output_dir={tmp_path / 'run'}", f"online.prompts={prompts}", "online.groups_per_round=2",
        "online.steps_per_round=1", "objective.sample_steps=2", "train.batch_size=1", "train.max_steps=1",
        "train.log_every=1", "validation.every=0", "validation.prompt_file=null"])
    config.online.reward = _spec(tiny_geneval, metadata=prompts)
    assert train(config)["last"]["train_reward"] == 1.0  # every sample shows the dog the tiny detector sees
