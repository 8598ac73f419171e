"""VideoAlign's VideoReward (diffalign/rewards/videoalign.py) on a tiny random Qwen2-VL, released as the authors release
it: a LoRA of the language model and the tensors trained in full over the base model, transformers 4.45's names. The
scores against transformers' and peft's own forward on the frames chosen by hand, the settings of model_config.json,
and what is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import tiny_qwen2vl
from safetensors.torch import save_file

from diffalign.errors import UserError
from diffalign.paths import ASSETS
from diffalign.rewards import load_reward
from diffalign.rewards.videoalign import SPECIAL_TOKENS, TEMPLATE

# Qwen2-VL-Instruct's chat template in short: the default system turn, a video as its vision tokens, then the text
CHAT = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] "
        "== 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}


def _old_name(key: str) -> str:
    """Today's transformers name -> transformers 4.45's, as the authors' checkpoints name tensors."""
    return re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", key))


def tiny_video_reward(root: Path, hidden: int = 32) -> tuple[Path, Path]:
    """(the VideoReward folder, the base folder): a random 2-layer Qwen2-VL saved as the base, and over it a LoRA of
    rank 4 (alpha 8) on the attention's q and v projections, a changed vision tower, resized embeddings and the
    reward head, saved as the authors' trainer saves them (checkpoint-10; an empty checkpoint-5 is older)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import Qwen2VLForConditionalGeneration

    base = root / "qwen2-vl"
    processor, config = tiny_qwen2vl(base, CHAT, max_positions=8192, special_tokens=("<|video_pad|>",))
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(base)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.startswith("model.visual.") or "embed_tokens" in name:
                weight.add_(0.1 * torch.randn_like(weight))
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.2)
    folder = root / "VideoReward"
    checkpoint = folder / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (folder / "checkpoint-5").mkdir()
    adapter = get_peft_model_state_dict(lora)
    save_file({f"base_model.model.{_old_name(k.removeprefix('base_model.model.'))}": v.contiguous()
               for k, v in adapter.items()}, checkpoint / "adapter_model.safetensors")
    (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": False}))
    full = {k: v for k, v in model.state_dict().items() if k.startswith("model.visual.") or "embed_tokens" in k}
    non_lora = {f"base_model.model.{_old_name(k)}": v.clone() for k, v in full.items()}
    non_lora["base_model.model.rm_head.weight"] = torch.randn(3, hidden)
    torch.save(non_lora, checkpoint / "non_lora_state_dict.pth")
    (folder / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200704, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": str(base), "output_dim": 3, "reward_token": "special",
                         "use_special_tokens": True},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
        "inference_config": STATS}))
    return folder, base


@pytest.fixture(scope="module")
def video_reward(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_video_reward(tmp_path_factory.mktemp("videoalign"))


def _clips() -> torch.Tensor:
    return torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0))


def test_the_scores_are_each_reward_tokens_head_output_of_transformers_and_peft_s_own_forward(video_reward):
    """The three scores of each clip equal rm_head at <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> (each token's own
    output) of Qwen2VLForConditionalGeneration with the LoRA applied by peft, the vision tower, embeddings and head
    loaded, in-order position ids, on the frames the authors' reader picks: 9 frames at 16 fps watched at 2 fps are 4
    (the fewest), frames 0, 3, 5, 8, each upscaled bicubically to 336 x 336 (the fewest 28-pixel blocks holding 128 x
    28 x 28 pixels); standardised by model_config.json's means and deviations; the reward is their sum."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize
    from transformers import Qwen2VLForConditionalGeneration

    folder, base = video_reward
    reward = load_reward(f"videoalign:{folder}:batch_size=1")
    clips, prompts = _clips(), ["a red fox runs in the snow", "waves break on a lighthouse"]
    scores = reward.dimensions(clips, prompts)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    torch.testing.assert_close(reward(clips, prompts), scores.sum(dim=1))
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(reward.processor.tokenizer))
    checkpoint = folder / "checkpoint-10"
    non_lora = torch.load(checkpoint / "non_lora_state_dict.pth", weights_only=True)
    renamed = {re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.",
                                                           k.removeprefix("base_model.model."))): v
               for k, v in non_lora.items()}
    head = renamed.pop("rm_head.weight")
    model.load_state_dict(renamed, strict=False)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    adapter = {re.sub(r"^base_model\.model\.", "", k): v for k, v in load_file(checkpoint / "adapter_model.safetensors").items()}
    set_peft_model_state_dict(lora, {"base_model.model." + re.sub(r"^visual\.", "model.visual.", re.sub(
        r"^model\.", "model.language_model.", k)): v for k, v in adapter.items()})
    for i, prompt in enumerate(prompts):
        frames = (clips[i][:, [0, 3, 5, 8]].transpose(0, 1) * 255).round().to(torch.uint8)
        frames = resize(frames, [336, 336], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
        text = reward._conversation(prompt)
        assert TEMPLATE.format(text_prompt=prompt) in text and "Textual prompt - " + prompt in text
        inputs = reward.processor(text=[text], videos=[frames], return_tensors="pt",
                                  videos_kwargs={"do_rescale": True, "cap_pixels_per_frame": False})
        assert inputs["video_grid_thw"].tolist() == [[2, 24, 24]]  # 4 frames in pairs, 336 / 14 patches a side
        in_order = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
        with torch.no_grad():
            hidden = lora(**inputs, position_ids=in_order, output_hidden_states=True).hidden_states[-1][0]
        at = [int((inputs["input_ids"][0] == reward.processor.tokenizer.convert_tokens_to_ids(t)).nonzero()) for t in SPECIAL_TOKENS]
        raw = torch.stack([hidden[at[d]] @ head[d] for d in range(3)])
        expected = (raw - torch.tensor([0.5, -1.0, 0.0])) / torch.tensor([2.0, 0.5, 4.0])
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-4)
    vq = load_reward(f"videoalign:{folder}:dimension=VQ:normalise=false")
    torch.testing.assert_close(vq(clips, prompts), scores[:, 0] * 2.0 + 0.5, rtol=1e-4, atol=1e-4)
    from diffalign.rewards.videoalign import frame_count

    assert frame_count(9, 16.0, 2.0, None) == 4 and frame_count(9, 16.0, 16.0, None) == 8  # all of it, in pairs
    assert frame_count(81, 16.0, 2.0, None) == 10 and frame_count(81, 16.0, 16.0, None) == 80
    every = load_reward(f"videoalign:{folder}:fps=16:batch_size=2")  # watching 8 frames of 9 scores otherwise
    assert (every.dimensions(clips, prompts) - scores).abs().max() > 1e-4


def test_what_videoalign_cannot_read_is_refused_with_the_reason(video_reward, tmp_path):
    folder, base = video_reward
    reward = load_reward(f"videoalign:{folder}")
    with pytest.raises(UserError, match="scores clips"):
        reward(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(UserError, match="2 frames or more"):
        reward(torch.rand(1, 3, 1, 32, 32), ["a"])
    with pytest.raises(UserError, match="dimension=Motion"):
        load_reward(f"videoalign:{folder}:dimension=Motion")
    with pytest.raises(UserError, match="holds no readable model_config.json"):
        load_reward(f"videoalign:{base}")
    other, _ = tiny_video_reward(tmp_path, hidden=48)
    with pytest.raises(UserError, match="not a VideoReward checkpoint of this base model"):
        load_reward(f"videoalign:{other}:base={base}")
    settings = json.loads((folder / "model_config.json").read_text())
    settings["model_config"]["model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    (moved / "model_config.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="base model Qwen/Qwen2-VL-2B-Instruct is not on this machine.*hf download"):
        load_reward(f"videoalign:{moved}")


def test_a_grpo_round_on_wan_clips_trains_on_videoalign(video_reward, tmp_path):
    """Flow-GRPO on tiny Wan2.1's 5-frame clips with online.reward videoalign: the round's clips are scored whole (one
    score per clip, logged as the round's reward) and the LoRA moves."""
    from diffalign.paths import CONFIGS
    from diffalign.train import load_config, train

    folder, base = video_reward
    train(load_config(CONFIGS / "toy_grpo.yaml", [
        f"model.path={ASSETS / 'models' / 'tiny-wan'}", "model.random_init=true", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "data.frames=5", "train.batch_size=2", "train.max_steps=1", "validation.every=0",
        "online.groups_per_round=2", "online.sample_batch_size=2", "online.steps_per_round=1", "online.group_size=2",
        "objective.sample_steps=2", f"online.reward=videoalign:{folder}:base={base}"]))
    record = json.loads(next((tmp_path / "run").glob("rounds/round*/groups.json")).read_text())
    assert len(record["reward_parts"]["videoalign"]) == 2 and len(record["reward_parts"]["videoalign"][0]) == 2
    assert len(set(sum(record["reward_parts"]["videoalign"], []))) == 4  # four clips, four scores
