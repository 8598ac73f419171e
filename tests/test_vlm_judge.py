"""The VLM judge (VQAScore) on a tiny random LLaVA written to disk by the test: P(answer | image, question) by
hand, the same in a padded batch as alone, refusals that say what is wrong, and an online round scored by it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Yes", "No", "Does", "this", "figure",
         "show", "Please", "answer", "yes", "or", "no.", "a", "an", "red", "green", "blue", "circle", "square",
         "triangle", "small", "large", "image", "of"]
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:"
            "{% endif %}")
QUESTION = "Does this figure show {prompt} Please answer yes or no."


def tiny_llava(folder: Path, words: list[str] = WORDS) -> Path:
    """A random 2-layer LLaVA (CLIP vision tower, Llama text model) with a tokenizer of ``words`` (one token each)
    and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               chat_template=TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=words.index("<pad>")),
        image_token_index=words.index("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return tiny_llava(tmp_path_factory.mktemp("llava"))


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _by_hand(folder: Path, image: torch.Tensor, prompt: str, answer: list[str]) -> float:
    """P(answer | image, question) for one image, unpadded: the product of each answer word's softmax probability
    after the conversation and the answer words before it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    text = "USER: <image> " + QUESTION.format(prompt=prompt) + " ASSISTANT: " + " ".join(answer)
    pixels = Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    inputs = processor(images=[pixels], text=[text], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0].float().softmax(dim=-1)
    ids = inputs["input_ids"][0]
    n = len(answer)
    return float(np.prod([probs[len(ids) - n - 1 + i, ids[len(ids) - n + i]].item() for i in range(n)]))


def test_the_score_is_the_probability_of_yes_by_hand_alone_or_in_a_padded_batch(llava):
    judge = load_reward({"name": "vlm_judge", "path": str(llava), "question": QUESTION, "batch_size": 3})
    images = _images(4)
    prompts = ["a red circle", "a small green square of a large blue triangle", "an image", "a blue circle"]
    scores = judge(images, prompts)
    expected = [_by_hand(llava, images[i], prompts[i], ["Yes"]) for i in range(4)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)
    assert ((scores > 0) & (scores < 1)).all() and len(set(scores.tolist())) == 4
    alone = torch.cat([judge(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(scores, alone, rtol=1e-4, atol=1e-7)


def test_an_answer_of_several_tokens_is_their_product_under_teacher_forcing(llava):
    judge = load_reward({"name": "vlm_judge", "path": str(llava), "question": QUESTION, "answer": "Yes yes"})
    images = _images(2)
    scores = judge(images, ["a red circle", "a small square"])
    expected = [_by_hand(llava, images[0], "a red circle", ["Yes", "yes"]),
                _by_hand(llava, images[1], "a small square", ["Yes", "yes"])]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)


def test_the_judge_refuses_a_folder_it_cannot_use(llava, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_reward(f"vlm_judge:{tmp_path}")
    with pytest.raises(UserError, match="must contain"):
        load_reward({"name": "vlm_judge", "path": str(llava), "question": "Is it good?"})
    with pytest.raises(UserError, match="needs the path"):
        load_reward("vlm_judge")


def test_an_online_round_is_scored_by_the_judge(llava, tmp_path):
    config = load_config(ROOT / "configs/toy_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "online.groups_per_round=2", "online.group_size=4", "online.steps_per_round=2",
        "objective.sample_steps=4", "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=0",
        "validation.every=0", "validation.prompt_file=null", "train.log_every=1",
        f"online.reward={{name: vlm_judge, path: {llava}, question: '{QUESTION}'}}"])
    train(config)
    record = json.loads((tmp_path / "run/rounds/round-00000/groups.json").read_text())
    rewards = torch.tensor(record["rewards"])
    assert rewards.shape == (2, 4) and ((rewards > 0) & (rewards < 1)).all()
    logs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert logs[0]["train_reward"] == pytest.approx(rewards.mean().item(), rel=1e-5)
