"""HPSv3 (diffalign/rewards/hpsv3.py) on a tiny random Qwen2-VL: its checkpoint in the authors' layout (transformers
4.45's names, the reward head beside the model), the score at <|Reward|> against transformers' own forward, the
instruction as the authors wrote it, and a checkpoint of another model refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fixtures import tiny_qwen2vl
from safetensors.torch import save_file

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.hpsv3 import INSTRUCTION, REWARD_TOKEN, reward_head


# Qwen2-VL-Instruct's chat template in short: the default system turn, an image as its vision tokens, then the text
TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
            "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] "
            "== 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hpsv3(root: Path, hidden: int = 32) -> tuple[Path, Path]:
    """(the checkpoint file, the base folder): a random 2-layer Qwen2-VL with Qwen-Image-Edit's tiny processor, its
    embeddings resized for <|Reward|>, saved as the authors' ``HPSv3.safetensors`` is."""
    from transformers import Qwen2VLForConditionalGeneration

    base = root / "qwen2-vl"
    processor, config = tiny_qwen2vl(base, TEMPLATE, hidden=hidden)
    tokenizer = processor.tokenizer
    config.save_pretrained(base)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model.resize_token_embeddings(len(tokenizer))
    state = {re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", k)): v.contiguous()
             for k, v in model.state_dict().items()}
    head = reward_head(hidden)
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file(state, root / "HPSv3.safetensors")
    return root / "HPSv3.safetensors", base


@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_the_score_is_mu_at_the_reward_token_of_transformers_own_forward(hpsv3):
    """The reward equals rm_head(mu) at <|Reward|> of Qwen2VLForConditionalGeneration's own forward on the same
    inputs with in-order position ids on M-RoPE's three axes (the authors' forward passes none, and transformers
    4.45's text model counts the tokens in order); with the image-aware rope index instead it differs, so the test
    can tell the two apart."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    checkpoint, base = hpsv3
    reward = load_reward(f"hps_v3:{checkpoint}:base={base}:batch_size=1")
    images, prompts = _images(), ["a red fox in the snow", "a lighthouse"]
    scores = reward(images, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]
    state = load_file(checkpoint)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(base))
    model.resize_token_embeddings(len(reward.processor.tokenizer))
    model.load_state_dict({re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", k)): v
                           for k, v in state.items() if not k.startswith("rm_head.")})
    head = reward_head(32)
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")})
    model.eval(), head.eval()
    for i, prompt in enumerate(prompts):
        text = reward._conversation(prompt)
        assert INSTRUCTION.format(text_prompt=prompt) in text and text.count(REWARD_TOKEN) == 1
        assert "Textual prompt - " + prompt in text
        inputs = reward.processor(images=[reward_image(images[i])], text=[text], return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]  # 256 x 28 x 28 pixels: 448 x 448 patches of 14
        at = inputs["input_ids"][0] == reward.reward_id
        in_order = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
        with torch.no_grad():
            hidden = model(**inputs, position_ids=in_order, output_hidden_states=True).hidden_states[-1][0, at]
            rope = model(**inputs, output_hidden_states=True).hidden_states[-1][0, at]
            torch.testing.assert_close(scores[i], head(hidden)[0, 0])
            assert (rope - hidden).abs().max() > 1e-4  # the image-aware rope index reads the token otherwise (float noise: 1e-6)


def reward_image(image: torch.Tensor):
    from diffalign.rewards.clip_rewards import to_pil

    return to_pil(image[None])[0]


def test_a_checkpoint_of_another_model_is_refused_with_what_is_wrong(hpsv3, tmp_path):
    checkpoint, base = hpsv3
    other, _ = tiny_hpsv3(tmp_path, hidden=48)
    with pytest.raises(UserError, match="not an HPSv3 checkpoint for the Qwen2-VL in"):
        load_reward(f"hps_v3:{other}:base={base}")
    with pytest.raises(UserError, match="holds no config.json"):
        load_reward(f"hps_v3:{checkpoint}:base={tmp_path}")
