"""Reward models loaded from tiny random checkpoints written here (same architectures, no
downloads): each score against its formula computed by hand, the ensemble's normalisations,
and the errors for missing or mismatched checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures import tiny_clip_folder, tiny_open_clip

from diffalign.errors import UserError
from diffalign.rewards import (
    Aesthetic,
    ClipScore,
    HPSv2,
    PickScore,
    RewardSpec,
    ensemble,
    load_reward,
    normalise_per_prompt,
)
from diffalign.rewards.clip_rewards import mlp_head

ROOT = Path(__file__).resolve().parent.parent
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _as_8bit(images: torch.Tensor) -> torch.Tensor:
    """What the processors see: the images quantised to 8 bits, back in [0, 1]."""
    return (images * 255).round() / 255


def _clip_normalised(images: torch.Tensor) -> torch.Tensor:
    return (_as_8bit(images) - OPENAI_MEAN) / OPENAI_STD  # 32 px in, 32 px model: resize and crop are no-ops


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("pickscore"))


def test_image_similarity_is_the_cosine_of_clip_image_embeddings_by_hand(pickscore_dir):
    """An edit scored against its sources: the cosine of the two CLIP image embeddings, averaged over the sources;
    an unchanged image scores 1; without sources it says what it needs."""
    from transformers import CLIPModel

    reward = load_reward(f"image_similarity:{pickscore_dir}:batch_size=2")
    images = _images()
    sources = torch.stack([images.flip(0), images.flip(-1)], dim=1)  # two sources per image
    model = CLIPModel.from_pretrained(pickscore_dir).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model(pixel_values=_clip_normalised(x)).pooler_output)
    with torch.no_grad():
        edited = embed(images)
        expected = torch.stack([F.cosine_similarity(edited, embed(sources[:, s]), dim=-1) for s in range(2)]).mean(0)
    torch.testing.assert_close(reward(images, PROMPTS, sources), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward(images, PROMPTS, images[:, None]), torch.ones(3), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="source images"):
        reward(images, PROMPTS)


def test_pickscore_without_a_processor_names_the_file_it_needs(tmp_path, pickscore_dir):
    from transformers import CLIPModel

    CLIPModel.from_pretrained(pickscore_dir).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"preprocessor_config.json not found.*processor="):
        PickScore(tmp_path)


def _hand_features(model, images: torch.Tensor, prompts: list[str], arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    with torch.no_grad():
        image = F.normalize(model.encode_image(_clip_normalised(images)), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(prompts)), dim=-1)
    return image, text


def test_hps_and_clip_score_are_cosines_of_open_clip_embeddings_by_hand(tmp_path):
    config, model = tiny_open_clip(tmp_path, embed_dim=32)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)  # HPS's own layout
    image, text = _hand_features(model, _images(), PROMPTS, config.stem)
    cosine = (image * text).sum(dim=-1)

    hps = load_reward({"name": "hps_v2.1", "path": str(checkpoint), "arch": str(config)})
    assert isinstance(hps, HPSv2) and hps.name == "hps_v2.1"
    torch.testing.assert_close(hps(_images(), PROMPTS), cosine, rtol=1e-4, atol=1e-5)
    clip_score = ClipScore(checkpoint, arch=config)
    torch.testing.assert_close(clip_score(_images(), PROMPTS), 100 * cosine.clamp(min=0), rtol=1e-4, atol=1e-3)


def test_aesthetic_is_the_mlp_over_normalised_clip_image_embeddings_by_hand(tmp_path):
    config, model = tiny_open_clip(tmp_path, embed_dim=768)
    clip_file = tmp_path / "ViT-L-14.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_file))
    torch.manual_seed(1)
    head = mlp_head(768).eval()
    mlp_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, mlp_file)  # the published key names

    reward = load_reward(f"aesthetic:{mlp_file}:clip={clip_file}:arch={config}")
    assert isinstance(reward, Aesthetic)
    image, _ = _hand_features(model, _images(), PROMPTS, config.stem)
    with torch.no_grad():
        expected = head(image).squeeze(-1)
    torch.testing.assert_close(reward(_images(), PROMPTS), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(reward(_images(), ["x", "y", "z"]), reward(_images(), PROMPTS))  # the prompt is not used


def test_reward_files_may_be_named_by_their_place_in_the_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from fixtures import hub_cache_with
    from safetensors.torch import save_file

    config, model = tiny_open_clip(tmp_path, embed_dim=768)
    files = tmp_path / "repo"
    files.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files / "ViT-L-14.safetensors"))
    torch.save({f"layers.{k}": v for k, v in mlp_head(768).state_dict().items()}, files / "aesthetic.pth")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache_with(tmp_path / "hub", "someone/aesthetic", files)

    local = load_reward(f"aesthetic:{files / 'aesthetic.pth'}:clip={files / 'ViT-L-14.safetensors'}:arch={config}")
    cached = load_reward(f"aesthetic:someone/aesthetic/aesthetic.pth:clip=someone/aesthetic/ViT-L-14.safetensors"
                         f":arch={config}")
    assert torch.equal(cached(_images(), PROMPTS), local(_images(), PROMPTS))
    with pytest.raises(UserError, match="reward aesthetic: someone/aesthetic/missing.pth does not exist, and it names "
                       "nothing in the local Hugging Face cache.*hf download someone/aesthetic"):
        load_reward(f"aesthetic:someone/aesthetic/missing.pth:clip={files / 'ViT-L-14.safetensors'}:arch={config}")


def test_a_mismatched_or_missing_checkpoint_names_the_file_and_what_was_expected(tmp_path):
    config, _ = tiny_open_clip(tmp_path, embed_dim=32)
    _, wider = tiny_open_clip(tmp_path, embed_dim=32, width=96)
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save(wider.state_dict(), checkpoint)
    with pytest.raises(UserError, match=rf"{checkpoint.name} does not match open_clip {config.stem}: .*shape mismatch"):
        HPSv2(checkpoint, arch=config)
    with pytest.raises(UserError, match=r"checkpoint file .*nothing.pt does not exist"):
        HPSv2(tmp_path / "nothing.pt", arch=config)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read .*garbage.pt"):
        HPSv2(tmp_path / "garbage.pt", arch=config)


def test_reward_specs_parse_paths_and_options_and_reject_unknown_names():
    spec = RewardSpec.parse("aesthetic:/m/aes.pth:clip=/m/clip.pt:batch_size=8")
    assert (spec.name, spec.path, spec.options) == ("aesthetic", "/m/aes.pth", {"clip": "/m/clip.pt", "batch_size": "8"})
    assert RewardSpec.parse("toy_preference") == RewardSpec("toy_preference")
    with pytest.raises(UserError, match="did you mean 'pickscore'"):
        RewardSpec.parse("pickscroe:/m")
    with pytest.raises(UserError, match="hps_v2 needs the path"):
        RewardSpec.parse("hps_v2")


def test_ensemble_normalises_each_model_per_prompt_before_averaging():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    pick = torch.tensor([21.0, 20.0, 22.0, 19.0, 19.0, 18.0])
    aes = torch.tensor([5.0, 6.0, 7.0, 4.0, 4.0, 4.0])
    z_pick_0 = [(21 - 21) / (2 / 3) ** 0.5, (20 - 21) / (2 / 3) ** 0.5, (22 - 21) / (2 / 3) ** 0.5]
    mean_1, std_1 = 56 / 3, (2 * (1 / 3) ** 2 + (2 / 3) ** 2) ** 0.5 / 3 ** 0.5
    z_pick_1 = [(19 - mean_1) / std_1, (19 - mean_1) / std_1, (18 - mean_1) / std_1]
    z_aes = [-(1.5 ** 0.5), 0.0, 1.5 ** 0.5]  # 5, 6, 7: mean 6, std sqrt(2/3)
    torch.testing.assert_close(normalise_per_prompt(pick, groups), torch.tensor(z_pick_0 + z_pick_1, dtype=torch.float64))
    torch.testing.assert_close(normalise_per_prompt(aes, groups), torch.tensor(z_aes + [0.0] * 3, dtype=torch.float64))
    ranks = normalise_per_prompt(pick, groups, "rank")  # 0 worst .. 1 best; the tie shares ranks 1 and 2
    assert ranks.tolist() == [0.5, 0.0, 1.0, 0.75, 0.75, 0.0]
    averaged = ensemble({"pick": pick, "aes": aes}, groups, "rank")
    assert averaged.tolist() == [(0.5 + 0.0) / 2, (0.0 + 0.5) / 2, 1.0, 0.75 / 2 + 0.25, 0.75 / 2 + 0.25, 0.25]


def _blip_checkpoint(folder: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    """A tiny ImageReward.pt in BLIP's own key layout: ViT width 128 (2 heads), BERT width 64 (1 head)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state = {f"{v}cls_token": r(1, 1, 128), f"{v}pos_embed": r(1, 17, 128), f"{v}patch_embed.proj.weight": r(128, 3, 8, 8),
             f"{v}patch_embed.proj.bias": r(128), f"{v}norm.weight": 1 + r(128), f"{v}norm.bias": r(128),
             f"{t}embeddings.word_embeddings.weight": r(vocab_size, 64), f"{t}embeddings.position_embeddings.weight": r(40, 64),
             f"{t}embeddings.LayerNorm.weight": 1 + r(64), f"{t}embeddings.LayerNorm.bias": r(64),
             f"{t}embeddings.position_ids": torch.arange(40)[None], "blip.vision_proj.weight": r(16, 128)}
    for i in range(2):
        b = f"{v}blocks.{i}."
        state |= {f"{b}norm1.weight": 1 + r(128), f"{b}norm1.bias": r(128), f"{b}attn.qkv.weight": r(384, 128),
                  f"{b}attn.qkv.bias": r(384), f"{b}attn.proj.weight": r(128, 128), f"{b}attn.proj.bias": r(128),
                  f"{b}norm2.weight": 1 + r(128), f"{b}norm2.bias": r(128), f"{b}mlp.fc1.weight": r(256, 128),
                  f"{b}mlp.fc1.bias": r(256), f"{b}mlp.fc2.weight": r(128, 256), f"{b}mlp.fc2.bias": r(128)}
        b = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", 64), ("crossattention", 128)):
            state |= {f"{b}{block}.self.query.weight": r(64, 64), f"{b}{block}.self.query.bias": r(64),
                      f"{b}{block}.self.key.weight": r(64, kv_width), f"{b}{block}.self.key.bias": r(64),
                      f"{b}{block}.self.value.weight": r(64, kv_width), f"{b}{block}.self.value.bias": r(64),
                      f"{b}{block}.output.dense.weight": r(64, 64), f"{b}{block}.output.dense.bias": r(64),
                      f"{b}{block}.output.LayerNorm.weight": 1 + r(64), f"{b}{block}.output.LayerNorm.bias": r(64)}
        state |= {f"{b}intermediate.dense.weight": r(128, 64), f"{b}intermediate.dense.bias": r(128),
                  f"{b}output.dense.weight": r(64, 128), f"{b}output.dense.bias": r(64),
                  f"{b}output.LayerNorm.weight": 1 + r(64), f"{b}output.LayerNorm.bias": r(64)}
    for k, tensor in mlp_head(64).state_dict().items():
        state[f"mlp.layers.{k}"] = r(*tensor.shape)
    torch.save(state, folder / "ImageReward.pt")
    return state


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / 64 ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    out = scores.softmax(-1) @ split(v)
    return out.transpose(1, 2).reshape(q.shape)


def _hand_image_reward(s: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BLIP's ViT (pre-norm, timm layout) and med.py BERT (post-norm, cross-attention) written out."""
    lin = lambda x, p: F.linear(x, s[f"{p}.weight"], s[f"{p}.bias"])  # noqa: E731
    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"], eps)  # noqa: E731
    v, t = "blip.visual_encoder", "blip.text_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=8)
    x = torch.cat([s[f"{v}.cls_token"].expand(len(x), 1, 128), x.flatten(2).transpose(1, 2)], 1) + s[f"{v}.pos_embed"]
    for i in range(2):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val, 2), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = ln(x, f"{v}.norm", 1e-6)
    h = ln(s[f"{t}.embeddings.word_embeddings.weight"][ids] + s[f"{t}.embeddings.position_embeddings.weight"][:ids.shape[1]],
           f"{t}.embeddings.LayerNorm", 1e-12)
    for i in range(2):
        b = f"{t}.encoder.layer.{i}"
        for block, context, context_mask in (("attention", None, mask), ("crossattention", image, None)):
            c = h if context is None else context
            a = _attention(lin(h, f"{b}.{block}.self.query"), lin(c, f"{b}.{block}.self.key"),
                           lin(c, f"{b}.{block}.self.value"), 1, context_mask)
            h = ln(h + lin(a, f"{b}.{block}.output.dense"), f"{b}.{block}.output.LayerNorm", 1e-12)
        h = ln(h + lin(F.gelu(lin(h, f"{b}.intermediate.dense")), f"{b}.output.dense"), f"{b}.output.LayerNorm", 1e-12)
    head = mlp_head(64)
    head.load_state_dict({k.removeprefix("mlp.layers."): w for k, w in s.items() if k.startswith("mlp.layers.")})
    return ((head.eval()(h[:, 0]).squeeze(-1)) - 0.16717362830052426) / 1.0333394966054072


def test_image_reward_equals_blip_written_out_by_hand_from_the_checkpoint(tmp_path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "triangle"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    state = _blip_checkpoint(tmp_path, vocab_size=len(words) + 2)  # BLIP adds [DEC] and [ENC]
    reward = load_reward(f"image_reward:{tmp_path / 'ImageReward.pt'}:batch_size=2")
    scores = reward(_images(), PROMPTS)

    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _hand_image_reward(state, _clip_normalised(_images()), tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.01  # the images and prompts really change the score

    torch.save({k: w for k, w in state.items() if not k.startswith("mlp.")}, tmp_path / "no_head.pt")
    with pytest.raises(UserError, match=r"no_head.pt is not an ImageReward checkpoint: it has no mlp weights"):
        load_reward(f"image_reward:{tmp_path / 'no_head.pt'}")


def test_jpeg_rewards_are_ddpo_s_kilobytes_at_quality_95():
    """DDPO's compressibility tasks: the JPEG size at quality 95 in kB, negated for compressibility; a flat image
    compresses better than noise."""
    import io

    from diffalign.eval.report import to_pil
    from diffalign.rewards import load_reward

    flat = torch.full((3, 32, 32), 0.5)
    noisy = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.stack([flat, noisy])
    by_hand = []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=95)
        by_hand.append(len(buffer.getvalue()) / 1000)
    incompressibility = load_reward("jpeg_incompressibility")(images, ["anything", "at all"])
    torch.testing.assert_close(incompressibility, torch.tensor(by_hand))
    compressibility = load_reward("jpeg_compressibility")(images, ["anything", "at all"])
    torch.testing.assert_close(compressibility, -incompressibility)
    assert compressibility[0] > compressibility[1]


def test_the_clip_rewards_scored_with_gradients_equal_their_scores_and_pass_gradients_to_the_images(tmp_path,
                                                                                                    pickscore_dir):
    """The tensor path the reward-gradient methods follow (resize, crop and normalise as torchvision tensor ops) gives
    the scoring path's scores (on 8-bit images, which that path quantises to) and a finite, nonzero image gradient."""
    config, model = tiny_open_clip(tmp_path, embed_dim=768)
    checkpoint = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    torch.manual_seed(1)
    mlp_file = tmp_path / "aesthetic.pth"
    torch.save({f"layers.{k}": v for k, v in mlp_head(768).state_dict().items()}, mlp_file)
    rewards = [PickScore(pickscore_dir), HPSv2(checkpoint, arch=config), ClipScore(checkpoint, arch=config),
               Aesthetic(mlp_file, clip=checkpoint, arch=config)]
    images = _as_8bit(_images())
    for reward in rewards:
        pixels = images.clone().requires_grad_()
        scores = reward.score_with_gradient(pixels, PROMPTS)
        torch.testing.assert_close(scores.detach(), reward(images, PROMPTS), rtol=1e-4, atol=1e-4)
        scores.sum().backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0, reward.name
        assert not any(p.requires_grad for p in reward.model.parameters())  # the reward's weights stay out of it
    # a larger image is resized on the way in, as the scoring path does (up to PIL's and torchvision's filters)
    large = torch.nn.functional.interpolate(images, size=64, mode="nearest")
    torch.testing.assert_close(rewards[1].score_with_gradient(large, PROMPTS), rewards[1](large, PROMPTS),
                               rtol=0.05, atol=0.05)


def test_the_soft_toy_preference_ranks_rendered_scenes_as_the_toy_preference_does():
    import random

    import numpy as np

    from diffalign.rewards import ToyPreferenceSoft
    from diffalign.toy.judge import preference_scores
    from diffalign.toy.world import COLOURS, caption, random_scene, render

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(120)]
    images = torch.tensor(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    names = list(COLOURS)  # every third prompt asks for the wrong colour
    prompts = [caption(s.colour if i % 3 else names[(names.index(s.colour) + 1) % len(names)], s.shape)
               for i, s in enumerate(scenes)]
    hard, soft = preference_scores(images, prompts), ToyPreferenceSoft()(images, prompts)
    ranks = lambda v: v.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([ranks(hard), ranks(soft)]))[0, 1] > 0.98
    pixels = images[:4].clone().requires_grad_()
    ToyPreferenceSoft().score_with_gradient(pixels, prompts[:4]).sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
