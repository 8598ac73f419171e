"""Image to video (issue 47): Wan2.1 I2V and Wan2.2 I2V A14B read a first frame as WanImageToVideoPipeline feeds it (the
frame's condition latents and mask beside the noisy latents, Wan2.1's CLIP image tokens before the text), HunyuanVideo
1.5 I2V as its pipeline does (the frame's latents and a mask channel, SigLIP image tokens); the first frame is an edit's
source (data.source_columns) cached by the clip length, and offline and online objectives train on clips that start
from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.diffusion import TensorCache, backbone_for, load_pipeline
from diffalign.errors import UserError
from diffalign.paths import ASSETS, CONFIGS

MODELS = ASSETS / "models"

pytest.importorskip("av")


def _frame(seed: int, size: int = 32) -> Image.Image:
    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).byte().numpy())


def _pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], as the pipeline's video processor reads an image of its own size."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1


def _first_guided_calls(pipe, **call) -> tuple[tuple[dict, torch.Tensor], dict]:
    """((keyword arguments, output) of the pipeline's first transformer call, the conditional one; the keyword
    arguments of its second, the unconditional one) of ``pipe(**call)``."""
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((dict(kwargs), output[0])), with_kwargs=True)
    pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    return calls[0], calls[1][0]


def _predict_is_the_call(backbone, kwargs: dict, output: torch.Tensor, cond, condition: torch.Tensor) -> None:
    """``predict`` on the call's noisy latents, given the first frame's ``condition``, equals the transformer's output
    there, and another first frame changes it."""
    cond.reference = condition[:, None]
    noisy = kwargs["hidden_states"][:, :backbone.latent_channels]
    with torch.no_grad():
        ours = backbone.predict(noisy, kwargs["timestep"].float(), cond)
        cond.reference = backbone.encode_sources(_pixels(_frame(1)))[:, None]
        other = backbone.predict(noisy, kwargs["timestep"].float(), cond)
    torch.testing.assert_close(ours, output)
    assert (ours - other).abs().max() > 1e-4


@pytest.mark.parametrize("model, expert", [("tiny-wan21-i2v", None), ("tiny-wan22-i2v", "high")])
def test_wan_i2v_predict_is_the_pipelines_own_call_on_the_first_frames_condition(model, expert):
    """The first guided call of WanImageToVideoPipeline (5 frames, 32 px): its latent input is the noisy latents, then
    a mask of 4 channels (ones on the first latent frame only), then the latents of the first frame followed by 4
    black frames; Wan2.1's image tokens are the CLIP encoder's second-to-last hidden states, and the unconditional
    branch reads the same condition and tokens. ``predict`` given the backbone's own condition and tokens equals the
    transformer's output there, and another first frame changes it."""
    pipe = load_pipeline(MODELS / model, random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5, expert=expert)
    frame = _frame(0)
    (kwargs, output), uncond_kwargs = _first_guided_calls(
        pipe, prompt="the ball rolls away", negative_prompt="", image=frame, height=32, width=32, num_frames=5,
        num_inference_steps=2, guidance_scale=4.0)
    c = backbone.latent_channels
    condition = backbone.encode_sources(_pixels(frame))
    assert condition.shape == (1, 4 + c, 2, 8, 8) == (1, *backbone.source_shape(backbone.latent_shape(32)))
    assert condition[:, :4, 0].eq(1).all() and condition[:, :4, 1:].eq(0).all()
    torch.testing.assert_close(kwargs["hidden_states"][:, c:], condition)
    torch.testing.assert_close(uncond_kwargs["hidden_states"], kwargs["hidden_states"])
    cond = backbone.encode_prompts(["the ball rolls away"], _pixels(frame)[None])
    if model == "tiny-wan21-i2v":
        assert backbone.prompt_reads_sources and cond.image_embeds.shape == (1, 65, 16)  # 8 x 8 patches and the class
        torch.testing.assert_close(cond.image_embeds, kwargs["encoder_hidden_states_image"])
        torch.testing.assert_close(uncond_kwargs["encoder_hidden_states_image"], cond.image_embeds)
    else:  # Wan2.2 I2V reads the frame through its latents only
        assert not backbone.prompt_reads_sources and cond.image_embeds is None
        assert kwargs["encoder_hidden_states_image"] is None
    _predict_is_the_call(backbone, kwargs, output, cond, condition)


def test_wan22_ti2v_animates_a_first_frame_as_its_image_to_video_pipeline_calls_it():
    """Wan2.2 TI2V-5B's image mode: WanImageToVideoPipeline with ``expand_timesteps`` on the same components (what
    ``diffalign eval --sources`` samples with). Its first guided call reads the noisy latents with the first latent
    frame replaced by the frame's latents (the pipeline's own ``prepare_latents`` condition, which ``encode_sources``
    equals), the first frame's tokens at timestep 0 and the others at the step's; ``predict`` equals the transformer's
    output on every later frame, and on the first gives (x_t - c) / sigma, the velocity to the condition, whatever the
    network: the first frame is out of every loss and every ratio. Without a first frame it is text to video."""
    from diffalign.diffusion.backbones import WanTI2VBackbone

    pipe = load_pipeline(MODELS / "tiny-wan22-ti2v", random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5)
    assert isinstance(backbone, WanTI2VBackbone) and backbone.max_sources == 1 and backbone.min_sources == 0
    image_pipe = backbone.pipeline_with_sources(pipe)
    frame = _frame(0)
    (kwargs, output), uncond_kwargs = _first_guided_calls(
        image_pipe, prompt="the ball rolls away", negative_prompt="", image=frame, height=32, width=32,
        num_frames=5, num_inference_steps=2, guidance_scale=4.0)
    condition = backbone.encode_sources(_pixels(frame))
    assert condition.shape == (1, 8, 1, 4, 4) == (1, *backbone.source_shape(backbone.latent_shape(32)))
    _, by_pipeline, _ = image_pipe.prepare_latents(_pixels(frame), 1, 8, 32, 32, 5, torch.float32, "cpu", None)
    torch.testing.assert_close(condition, by_pipeline)
    torch.testing.assert_close(kwargs["hidden_states"][:, :, :1], condition)
    timestep = kwargs["timestep"]
    assert timestep.shape == (1, 2 * 2 * 2) and timestep[:, :4].eq(0).all() and timestep[:, 4:].gt(0).all()
    torch.testing.assert_close(uncond_kwargs["hidden_states"], kwargs["hidden_states"])
    cond = backbone.encode_prompts(["the ball rolls away"])
    cond.reference = condition[:, None]
    noisy = torch.cat([torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(1)),
                       kwargs["hidden_states"][:, :, 1:]], dim=2)  # the first frame's noise: anything
    t = timestep[:, -1].float()
    with torch.no_grad():
        ours = backbone.predict(noisy, t, cond)
        text_only = backbone.predict(noisy, t, backbone.encode_prompts(["the ball rolls away"]))
    torch.testing.assert_close(ours[:, :, 1:], output[:, :, 1:])
    torch.testing.assert_close(ours[:, :, :1], (noisy[:, :, :1] - condition) / (t / 1000).view(-1, 1, 1, 1, 1))
    assert (text_only[:, :, 1:] - ours[:, :, 1:]).abs().max() > 1e-4  # the frame read changes the others


def test_wan22_ti2v_samples_end_on_the_first_frame_and_train_nothing_through_it():
    """The flow sampler's deterministic steps end on the condition in the first frame (to within UniPC's integer
    timesteps: measured 4e-3 at most), and with SDE noise the rounds put it back as the pipeline does; a clip whose first frame is the condition has no denoising error there, and the score's
    gradient does not reach the transformer's first-frame output."""
    from diffalign.diffusion.likelihood import denoising_scores, noised_group
    from diffalign.diffusion.logprob import sample_trajectories
    from diffalign.diffusion.schedule import schedule_for

    pipe = load_pipeline(MODELS / "tiny-wan22-ti2v", random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5)
    cond = backbone.encode_prompts(["the ball rolls away", "a cat sits"])
    cond.reference = backbone.encode_sources(torch.cat([_pixels(_frame(0)), _pixels(_frame(1))]))[:, None]
    noise = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    final = sample_trajectories(backbone, noise, cond, steps=4, eta=0.0).final
    torch.testing.assert_close(final[:, :, :1], cond.reference[:, 0], atol=1e-2, rtol=0)
    assert (final[:, :, :1] - noise[:, :, :1]).abs().max() > 1  # it moved there from the noise
    noisy = sample_trajectories(backbone, noise, cond, steps=4, eta=0.7, generator=torch.Generator().manual_seed(0))
    assert noisy.latents.abs().max() < 10  # the first step's noise finite on UniPC's grid, which starts below 1
    finished = backbone.finish_sample(noisy.final, cond)
    assert finished[:, :, :1].equal(cond.reference[:, 0]) and finished[:, :, 1:].equal(noisy.final[:, :, 1:])
    clips = torch.cat([cond.reference[:, 0], torch.randn(2, 8, 1, 4, 4)], dim=2)  # (2, C, 2, h, w)
    group = noised_group(clips[:, None], cond, schedule_for(backbone.scheduler), timesteps=torch.tensor([300, 700]),
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction = backbone.predict(group.noisy, group.model_timesteps, group.cond)
    torch.testing.assert_close(prediction[:, :, :1], group.target[:, :, :1], atol=1e-4, rtol=0)
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, kwargs, out: outputs.append(out[0]),
                                                    with_kwargs=True)
    scores = denoising_scores(backbone, group)
    handle.remove()
    outputs[0].retain_grad()
    scores.sum().backward()
    assert outputs[0].grad[:, :, :1].abs().max() == 0 and outputs[0].grad[:, :, 1:].abs().max() > 0


def test_hunyuanvideo15_i2v_predict_is_the_pipelines_own_call_on_the_first_frames_condition():
    """HunyuanVideo15ImageToVideoPipeline's first call (5 frames, a 32 px frame, its own size bucket 32 x 32): its latent
    input is the noisy latents, the frame's latents on the first latent frame and zeros after, then a mask channel of
    ones on that frame; its image tokens are SigLIP's last hidden states, in both guidance branches. ``predict`` given
    the backbone's condition and tokens equals the transformer's output; another frame changes it; a size other than
    the pipeline's bucket is refused before sampling."""
    from diffalign.diffusion.sampling import generate

    pipe = load_pipeline(MODELS / "tiny-hunyuanvideo15-i2v", random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5)
    frame = _frame(0)
    (kwargs, output), uncond_kwargs = _first_guided_calls(pipe, image=frame, prompt="the ball rolls away",
                                                          num_frames=5, num_inference_steps=2)
    c = backbone.latent_channels
    condition = backbone.encode_sources(_pixels(frame))
    assert condition.shape == (1, c + 1, 2, 8, 8) == (1, *backbone.source_shape(backbone.latent_shape(32)))
    assert condition[:, c:, 0].eq(1).all() and condition[:, c:, 1:].eq(0).all() and condition[:, :c, 1:].eq(0).all()
    torch.testing.assert_close(kwargs["hidden_states"][:, c:], condition)
    cond = backbone.encode_prompts(["the ball rolls away"], _pixels(frame)[None])
    torch.testing.assert_close(cond.image_embeds, kwargs["image_embeds"])
    torch.testing.assert_close(uncond_kwargs["image_embeds"], kwargs["image_embeds"])
    _predict_is_the_call(backbone, kwargs, output, cond, condition)
    with pytest.raises(UserError, match=r"samples at the size bucket nearest its first frame's aspect, 32 x 32 px"):
        generate(pipe, ["a"], [0], steps=1, resolution=32, width=36, frames=5, sources=[[_frame(0)]])


def test_wan_i2v_refuses_what_its_pipeline_cannot_read():
    """Wan2.1 I2V's attention splits the image tokens from the text at 512 text tokens, so another prompt length is
    refused; a run without a first-frame column, or with text-only validation, stops before training."""
    from diffalign.diffusion.backbones import check_sources

    pipe = load_pipeline(MODELS / "tiny-wan21-i2v", random_init=True, seed=0)
    with pytest.raises(UserError, match="at 512 text tokens"):
        backbone_for(pipe, frames=5, prompt_tokens=128)
    backbone = backbone_for(pipe, frames=5)
    with pytest.raises(UserError, match="starts each clip from a first-frame image and cannot sample from text alone"):
        check_sources(backbone, [])
    with pytest.raises(UserError, match="validation.every=0"):
        check_sources(backbone, ["source"], validation_every=10)


def _i2v_run(tmp_path: Path, model: str, recipe: str, data: Path, *extra: str) -> Path:
    from diffalign.train import load_config, train

    train(load_config(CONFIGS / recipe, [
        f"model.path={MODELS / model}", "model.random_init=true", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "data.width=null", "data.frames=5", "data.fps=0", "train.batch_size=2",
        "train.gradient_accumulation=1", "train.max_steps=2", "train.warmup_steps=0", "train.learning_rate=1e-3",
        "train.checkpoint_every=0", "train.report_to=none", "validation.every=0", "data.source_columns=[source]",
        *extra]))
    return tmp_path / "run"


@pytest.mark.parametrize("model, extra", [("tiny-wan21-i2v", ()), ("tiny-wan22-i2v", ("model.expert=low",)),
                                          ("tiny-hunyuanvideo15-i2v", ()), ("tiny-wan22-ti2v", ())])
def test_dpo_trains_wan_i2v_on_clip_pairs_from_their_first_frame_with_the_conditions_cached(model, extra, tmp_path):
    """Diffusion-DPO from configs/wan21_dpo.yaml on pairs of 5-frame clips with a first-frame column: two steps move the
    LoRA and log a finite loss; with data.cache_dir each first frame is cached as its condition for 5-frame clips
    (beside the clips' latents and the prompts), and a run of 9-frame clips encodes its own conditions (Wan2.2 TI2V's
    is the frame's own latents, whatever the clip length: the 5-frame run's serve)."""
    from safetensors.torch import load_file

    from diffalign.recipes.samples import pickapic_parquet

    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, frames=5, sources=("source",))
    cache = tmp_path / "cache"
    run = _i2v_run(tmp_path, model, "wan21_dpo.yaml", data, f"data.cache_dir={cache}", *extra)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(loss) for loss in losses) and abs(losses[-1] - math.log(2)) > 1e-5
    lora = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max() for k, v in lora.items() if ".lora.up." in k) > 0
    entries = len(TensorCache(cache))
    assert entries == 4 * 2 + 4 + 4  # two steps of two pairs: their clips, first frames and prompts
    nine = pickapic_parquet(tmp_path / "nine.parquet", 4, frames=9, sources=("source",))
    _i2v_run(tmp_path / "nine", model, "wan21_dpo.yaml", nine, f"data.cache_dir={cache}", "data.frames=9",
             "train.max_steps=1", *extra)
    conditions = 0 if model == "tiny-wan22-ti2v" else 2
    assert len(TensorCache(cache)) == entries + 2 * 2 + conditions  # new clips (and conditions); the prompts were cached


@pytest.mark.parametrize("model", ["tiny-wan21-i2v", "tiny-wan22-i2v", "tiny-hunyuanvideo15-i2v", "tiny-wan22-ti2v"])
def test_guided_grpo_rounds_animate_each_rows_first_frame_and_train_on_what_they_sampled_with(model, tmp_path):
    """Flow-GRPO on a table of prompts with a first frame each, guidance 4: every group samples clips from its row's
    frame (saved beside them), the round keeps the frames' conditions, and the first step's policy ratio, before any
    update, is 1 for every unit: training re-reads the condition and image tokens the sampler read, in both branches."""
    from safetensors.torch import load_file

    from diffalign.recipes.samples import pickapic_parquet

    table = pickapic_parquet(tmp_path / "prompts.parquet", 4, sources=("source",))
    extra = ["model.expert=high"] if model == "tiny-wan22-i2v" else []
    run = _i2v_run(tmp_path, model, "toy_grpo.yaml", table, f"online.prompts={table}", "online.groups_per_round=2",
                   "online.sample_batch_size=2", "online.steps_per_round=1", "online.group_size=2",
                   "objective.sample_steps=2", "objective.sample_guidance_scale=4.0",
                   "online.reward=jpeg_incompressibility", "train.max_steps=1", *extra)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    round_dir = next(run.glob("rounds/round*"))
    assert sorted(p.name for p in (round_dir / "images").glob("*source*")) == ["group0000-source0.png",
                                                                                  "group0001-source0.png"]
    shape = {"tiny-hunyuanvideo15-i2v": (5, 2, 8, 8),  # its condition: 4 latent channels and the mask
             "tiny-wan22-ti2v": (8, 1, 4, 4)}.get(model, (8, 2, 8, 8))  # TI2V's: the frame's own latents
    assert load_file(str(round_dir / "trajectories.safetensors"))["reference"].shape == (2, 1, *shape)


@pytest.mark.parametrize("name", ["tiny-wan21-i2v", "tiny-hunyuanvideo15-i2v", "tiny-wan22-ti2v"])
def test_eval_animates_each_rows_first_frame_and_the_report_shows_it_above_the_clips(name, tmp_path, capsys):
    """`diffalign eval --sources first_frame --frames 5` on Wan2.1 I2V, HunyuanVideo 1.5 I2V and Wan2.2 TI2V (its
    WanPipeline folder sampled through WanImageToVideoPipeline): every clip starts from its row's frame through the
    pipeline's ``image`` argument, and the report shows each row's frame, then plays its clips."""
    from diffalign.cli import main
    from diffalign.recipes.samples import pickapic_parquet

    model = tmp_path / name
    load_pipeline(MODELS / name, random_init=True, seed=0).save_pretrained(model)
    table = pickapic_parquet(tmp_path / "prompts.parquet", 2, sources=("first_frame",))
    assert main(["eval", "--base", str(model), "--prompts", str(table), "--sources", "first_frame", "--frames", "5",
                 "--rewards", "jpeg_incompressibility", "--seeds", "2", "--steps", "2", "--resolution", "32",
                 "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["base"]["jpeg_incompressibility"] > 0
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count("alt='source 1'") == 2 and report.count("<video") == 4  # 2 rows x 2 seeds


@pytest.fixture(scope="module")
def first_frames(tmp_path_factory) -> dict[str, Path]:
    """Every layout with 5-frame clips, each row with its first frame (column ``source``)."""
    from diffalign.recipes.samples import images_parquet, pickapic_parquet, ranked_parquet

    root, sources = tmp_path_factory.mktemp("i2v"), ("source",)
    return {"pairs": pickapic_parquet(root / "pairs.parquet", 4, frames=5, sources=sources),
            "ranked": ranked_parquet(root / "ranked.parquet", frames=5, sources=sources),
            "images": images_parquet(root / "images.parquet", 4, frames=5, sources=sources),
            "labelled": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0], frames=5, sources=sources)}


def _every_i2v_objective() -> list[str]:
    """The objectives that train edits (tests/test_every_backbone.py's edit tests): every one that reads a dataset but
    DDO and DRIFT (which pair samples with real images), every one that samples but AWM (NFT's rounds) and DRaFT
    (it samples inside its loss from text alone), and of those that meet a backbone only through another's code,
    GRPO-Guard."""
    from test_every_backbone import DATA, FEWER

    return sorted(o for o, kind in DATA.items() if o not in ("ddo", "drift", "awm", "draft")
                  and (kind is not None or o not in FEWER or o == "grpo_guard"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-wan21-i2v", "tiny-wan22-ti2v"])
@pytest.mark.parametrize("objective", _every_i2v_objective())
def test_every_objective_that_trains_edits_trains_i2v_on_clips_from_first_frames(objective, model, first_frames,
                                                                                 tmp_path):
    """Each objective's toy recipe on tiny Wan2.1 I2V and Wan2.2 TI2V's image mode: the offline ones on clips with their first frames, the online
    ones on rounds that animate each prompt's first frame. HunyuanVideo 1.5 I2V, whose condition and image tokens
    reach every objective through the same backbone calls, trains DPO and guided Flow-GRPO in the tests above."""
    from test_every_backbone import DATA, _trains

    online = [f"online.prompts={first_frames['images']}", "online.reward=jpeg_incompressibility"] \
        if DATA[objective] is None else []
    _trains(objective, model, first_frames, tmp_path, "data.frames=5", "data.source_columns=[source]", *online)
