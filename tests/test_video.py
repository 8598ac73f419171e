"""Video (issue 47, first part): Wan2.1's adapter calls the transformer and the VAE as WanPipeline does and steps on the
pipeline's grid; clips are read from video files at the frames and frame rate a run sets, bad videos are bad rows; the
DPO family trains on video pairs, and the shipped Wan recipe runs as shipped on the tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.errors import UserError
from diffalign.paths import ASSETS

TINY_WAN = ASSETS / "models" / "tiny-wan"

av = pytest.importorskip("av")


def video_bytes(colours: list[tuple[int, int, int]], size: int = 48, fps: int = 8, codec: str = "mpeg4",
                container: str = "mp4") -> bytes:
    """An encoded video whose i-th frame is a flat ``colours[i]``, with a white bar whose place marks the frame."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i, colour in enumerate(colours):
            array = np.zeros((size, size, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
            array[: size // 8, (i * 4) % size: (i * 4) % size + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def wan():
    return load_pipeline(TINY_WAN, random_init=True, seed=0)


def test_wan22_ti2v_predict_gives_every_latent_token_its_timestep_as_the_pipeline_does():
    """Wan2.2 TI2V-5B (``expand_timesteps``): the transformer gets one timestep per latent token (frames x rows/2 x
    columns/2), as WanPipeline builds them from its all-ones mask for text-to-video; its VAE's 2x2 pixel patches
    make 32 px into 4 latent rows."""
    pipe = load_pipeline(ASSETS / "models" / "tiny-wan22-ti2v", random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5)
    assert backbone.latent_shape(32) == (8, 2, 4, 4)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(latents.shape)
    per_token = torch.stack([(mask[0][0][:, ::2, ::2] * t).flatten() for t in (500.0, 20.0)])
    with torch.no_grad():
        out = pipe.transformer(hidden_states=latents, timestep=per_token, encoder_hidden_states=cond.embeds,
                               return_dict=False)[0]
        torch.testing.assert_close(backbone.predict(latents, torch.tensor([500.0, 20.0]), cond), out)
        pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        assert backbone.decode_latents(backbone.encode_images(pixels)).shape == (1, 3, 5, 32, 32)


def test_wan_predict_is_the_pipelines_own_call_and_its_latents_the_vaes(wan):
    """WanBackbone.predict calls the transformer on (N, C, F, h, w) latents with the timestep and the prompts' UMT5
    embeddings padded to 512 tokens, as WanPipeline does; its latents are the VAE's, normalised per channel, and decode
    back as the pipeline decodes them; a clip of 5 frames has 2 latent frames, an image 1."""
    backbone = backbone_for(wan, frames=5)
    assert backbone.latent_shape(32) == (4, 2, 8, 8) and backbone_for(wan).latent_shape(32) == (4, 1, 8, 8)
    prompts = ["a red circle", "a small blue square on a green field"]
    cond = backbone.encode_prompts(prompts)
    embeds, _ = wan.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    assert cond.embeds.shape == (2, 512, 32)  # WanPipeline.__call__'s max_sequence_length
    torch.testing.assert_close(cond.embeds, embeds)
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = wan.transformer(hidden_states=latents, timestep=torch.tensor([500, 20]), encoder_hidden_states=embeds,
                              return_dict=False)[0]
        ours = backbone.predict(latents, torch.tensor([500.0, 20.0]), cond)
    torch.testing.assert_close(ours, out)
    # the VAE: a tiny random one with mean 0 and std 1, so set a real normalisation to see it applied
    wan.vae.register_to_config(latents_mean=[0.5, -0.5, 0.1, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    try:
        pixels = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            raw = wan.vae.encode(pixels).latent_dist.mean
            mean = torch.tensor([0.5, -0.5, 0.1, 0.0]).view(1, 4, 1, 1, 1)
            std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1, 1)
            latents = backbone.encode_images(pixels)
            torch.testing.assert_close(latents, (raw - mean) / std)
            # WanPipeline's decode: latents / (1 / std) + mean
            torch.testing.assert_close(backbone.decode_latents(latents),
                                       wan.vae.decode(latents / (1.0 / std) + mean).sample.clamp(-1, 1))
            assert backbone.encode_images(pixels[:, :, 0]).shape == (2, 4, 1, 8, 8)  # an image: one frame
    finally:
        wan.vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def test_wan_samples_on_the_pipelines_unipc_grid_and_trains_on_its_shifted_flow_sigmas(wan):
    """The online methods step on the grid WanPipeline samples on (UniPC's flow sigmas and timesteps); training noises
    on the flow-matching grid shifted by the pipeline's flow_shift (sigma = 3s / (1 + 2s))."""
    from diffalign.diffusion.schedule import schedule_for

    backbone = backbone_for(wan, frames=5)
    seen = []
    wan(prompt=["a red circle"], num_inference_steps=4, height=32, width=32, num_frames=5, output_type="latent",
        guidance_scale=1.0, callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or kwargs)
    grid = backbone.sampling_scheduler(4, backbone.latent_shape(32))
    assert grid.timesteps.tolist() == seen and grid.sigmas[-1] == 0 and len(grid.sigmas) == 5
    schedule = schedule_for(backbone.scheduler)
    s = torch.tensor([0.25, 0.5, 1.0])
    t = (s * 1000).long() - 1
    torch.testing.assert_close(schedule.sigma(t), 3 * s / (1 + 2 * s))


def test_a_video_model_refuses_clips_its_vae_cannot_read_and_an_image_model_refuses_frames(wan):
    with pytest.raises(UserError, match=r"4k \+ 1 frames \(e.g. 5 or 9\)"):
        backbone_for(wan, frames=6)
    sd15 = load_pipeline(ASSETS / "models" / "tiny-sd15", random_init=True)
    with pytest.raises(UserError, match="makes images"):
        backbone_for(sd15, frames=5)
    from diffalign.diffusion.sampling import generate

    with pytest.raises(UserError, match=r"makes images, not clips of 5 frames: leave --frames"):
        generate(sd15, ["a red circle"], [0], steps=1, resolution=32, frames=5)  # eval --frames on an image model


def test_a_clip_is_the_first_frames_or_the_frames_on_screen_at_the_run_s_frame_rate(tmp_path):
    """Without data.fps a clip is the file's first frames; with it, the frame on screen at each time k / fps (a clip at
    4 fps of an 8 fps video takes every other frame, at 16 fps each frame twice); frames are resized and cropped as
    images are. An animated WebP (FFmpeg reads none) is read by its frames' durations."""
    from diffalign.data.video import VideoClips, clip_pixels, decode_clip

    colours = [(40 * k, 255 - 40 * k, 128) for k in range(6)]
    raw = video_bytes(colours, fps=8)

    def reds(clip: VideoClips) -> list[int]:
        return [round(np.asarray(frame)[40:, :, 0].mean() / 40) for frame in decode_clip(raw, clip, 10**8)]

    assert reds(VideoClips(3)) == [0, 1, 2]
    assert reds(VideoClips(3, fps=4)) == [0, 2, 4]
    assert reds(VideoClips(5, fps=16)) == [0, 0, 1, 1, 2]
    assert reds(VideoClips(12, fps=16)) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # the last frame shows for 1/8 s
    pixels = clip_pixels(decode_clip(raw, VideoClips(3), 10**8), 32)
    assert pixels.shape == (3, 3, 32, 32) and -1 <= pixels.min() and pixels.max() <= 1
    # an animated WebP, as diffalign saves an evaluation's or a round's clips (16 fps), reads back frame for frame
    from diffalign.eval.saved import save_png

    clip = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    save_png(clip, tmp_path / "clip.webp")
    saved = tmp_path / "clip.webp"
    frames = decode_clip(saved.read_bytes(), VideoClips(4), 10**8)
    assert torch.equal(torch.stack([torch.from_numpy(np.array(f)) for f in frames]),
                       (clip * 255).round().byte().permute(1, 2, 3, 0))
    assert len(decode_clip(saved.read_bytes(), VideoClips(8, fps=32), 10**8)) == 8  # each frame twice


@pytest.mark.parametrize("codec, container", [("mpeg4", "mp4"), ("libvpx-vp9", "webm"), ("gif", "gif")])
def test_videos_of_the_common_containers_read_as_clips(codec, container):
    from diffalign.data.video import VideoClips, decode_clip

    raw = video_bytes([(200, 20, 20)] * 5, codec=codec, container=container)
    frames = decode_clip(raw, VideoClips(5), 10**8)
    assert len(frames) == 5 and np.asarray(frames[0])[40:, :, 0].mean() > 150


def test_short_corrupt_and_oversized_videos_are_bad_rows_said_with_their_reason(tmp_path, capsys):
    """A video too short for the clip, bytes that are no video and frames over the pixel limit are each a bad row with
    its reason (an image where a video belongs is a one-frame video, too short); a video in a run that reads images
    says to set data.frames."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.data.pairs import PairDataset
    from diffalign.data.video import VideoClips
    from diffalign.recipes.samples import png_bytes

    good = video_bytes([(200, 20, 20)] * 5)
    rows = {"caption": ["fine", "short", "corrupt", "large", "image"],
            "jpg_0": [good, video_bytes([(200, 20, 20)] * 3), b"no video at all", video_bytes([(9, 9, 9)] * 5, size=96),
                      png_bytes((200, 20, 20))],
            "jpg_1": [good] * 5, "label_0": [1.0] * 5}
    pq.write_table(pa.table(rows), tmp_path / "clips.parquet")
    data = PairDataset(tmp_path / "clips.parquet", resolution=32, video=VideoClips(5), max_image_pixels=64 * 64)
    examples = [data.example(i) for i in range(len(data))]
    assert examples[0].pixels.shape == (2, 3, 5, 32, 32) and examples[1:] == [None] * 4
    reasons = sorted(data.bad_rows.values())
    assert reasons[0].endswith("row 1, column 'jpg_0': video too short: the video gives 3 frame(s), and a clip is 5 "
                               "(data.frames)"), reasons
    assert reasons[1].endswith("row 2, column 'jpg_0': video cannot be decoded (Invalid data found when processing "
                               "input)"), reasons
    assert reasons[2].endswith("row 3, column 'jpg_0': video cannot be decoded (96x96 frames, more than the limit of "
                               "4,096 pixels (data.max_image_pixels))"), reasons
    assert reasons[3].endswith("row 4, column 'jpg_0': video too short: the video gives 1 frame(s), and a clip is 5 "
                               "(data.frames)"), reasons
    # the cache key covers the clip: the same file read as another clip is another entry
    other = PairDataset(tmp_path / "clips.parquet", resolution=32, video=VideoClips(5, fps=4))
    assert other.read(0, decode=False).image_ids != data.read(0, decode=False).image_ids
    index = tmp_path / "index.jsonl"
    (tmp_path / "a.mp4").write_bytes(good)
    index.write_text(json.dumps({"caption": "c", "jpg_0": "a.mp4", "jpg_1": "a.mp4", "label_0": 1}) + "\n")
    images = PairDataset(index, resolution=32)
    assert images.example(0) is None
    assert "a video, and this run reads images: set data.frames" in next(iter(images.bad_rows.values()))


def _wan_run(tmp_path: Path, data: Path, *extra: str) -> Path:
    from diffalign.train import load_config, train

    overrides = [f"model.path={TINY_WAN}", "model.random_init=true", f"data.path={data}", "data.resolution=32",
                 "data.width=null",  # square unless a test says (the recipe's 832 x 480 would be 32 x 832 here)
                 "train.batch_size=2", "train.gradient_accumulation=1", "train.max_steps=2", "train.warmup_steps=0",
                 "train.learning_rate=1e-3", "train.mixed_precision=no", "train.checkpoint_every=0",
                 "train.report_to=none", "data.precompute=false", "data.cache_dir=null",
                 f"output_dir={tmp_path / 'run'}", *extra]
    train(load_config(ASSETS.parent / "configs" / "wan21_dpo.yaml", overrides))
    return tmp_path / "run"


def test_dpo_trains_wan_on_video_pairs_and_on_images_as_one_frame_clips(tmp_path):
    """Diffusion-DPO on tiny Wan2.1: on pairs of 5-frame clips (2 latent frames) and on pairs of images (one-frame
    clips, data.frames 0), two steps each move the LoRA and log a finite loss that leaves log 2; validation samples
    clips through WanPipeline, scores them frame by frame and writes the first frames' grid and an animated one."""
    from safetensors.torch import load_file

    from diffalign.recipes.samples import pickapic_parquet

    for name, frames, width in (("clips", 5, 48), ("images", 0, 32)):  # the clips 32 x 48 (data.width), not square
        data = pickapic_parquet(tmp_path / f"{name}.parquet", 4, frames=frames)
        run = _wan_run(tmp_path / name, data, f"data.frames={frames}", "data.fps=0", "validation.every=2",
                       f"data.width={width}",
                       "validation.prompts=[a red circle, a blue square]", "validation.images_per_prompt=1",
                       "validation.steps=2", "validation.rewards=[jpeg_incompressibility]", "train.report_to=tensorboard")
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        validated = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
        assert [v["step"] for v in validated] == [0, 2] and validated[0]["val_jpeg_incompressibility"] > 0
        grid = Image.open(run / "samples" / "step-0000002.png")
        assert grid.size[0] >= 2 * width
        if frames:
            animated = Image.open(run / "samples" / "step-0000002.webp")
            assert animated.n_frames == 5 and animated.size == grid.size
        else:
            assert not (run / "samples" / "step-0000002.webp").exists()
        # tensorboard plays the clips' grid: an animated GIF in its image summary, as its add_video writes one
        events = EventAccumulator(str(run / "diffalign"), size_guidance={"images": 0}).Reload()
        logged_grid = Image.open(io.BytesIO(events.Images("validation/samples")[-1].encoded_image_string))
        assert logged_grid.format == ("GIF" if frames else "PNG") and logged_grid.size == grid.size
        assert getattr(logged_grid, "n_frames", 1) == (5 if frames else 1)
        assert logged[-1]["step"] == 2 and abs(logged[-1]["loss"] - 0.6931) > 1e-4, logged
        lora = load_file(run / "final" / "pytorch_lora_weights.safetensors")
        assert max(v.abs().max() for k, v in lora.items() if ".lora.up." in k) > 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Each layout of the sample data with 5-frame clips for images."""
    from diffalign.recipes.samples import images_parquet, pickapic_parquet, ranked_parquet

    root = tmp_path_factory.mktemp("clips")
    return {"pairs": pickapic_parquet(root / "pairs.parquet", 4, frames=5),
            "ranked": ranked_parquet(root / "ranked.parquet", frames=5),
            "images": images_parquet(root / "images.parquet", 4, frames=5),
            "labelled": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0], frames=5)}


def _objectives() -> list[str]:
    from test_every_backbone import DATA

    return sorted(DATA)


@pytest.mark.slow
@pytest.mark.parametrize("objective", _objectives())
def test_every_objective_trains_wan_on_clips(objective, clips, tmp_path):
    """Every objective's toy recipe on tiny Wan2.1 with 5-frame clips: the offline ones read video data, the online
    ones sample clips and score them frame by frame (their image rewards' mean over the frames)."""
    from test_every_backbone import _trains

    _trains(objective, "tiny-wan", clips, tmp_path, "data.frames=5")


def test_an_image_reward_scores_a_clip_by_the_mean_or_the_min_of_its_frames():
    """score_media scores every frame with the clip's prompt; ``frames=min`` in the spec takes the worst frame; an
    image batch passes through unchanged; an unknown reduction is refused."""
    from diffalign.rewards import load_reward
    from diffalign.rewards.video import score_media

    clips = torch.zeros(2, 3, 3, 8, 8)
    clips[0, :, 1] = 1.0  # clip 0: its middle frame white
    clips[1] = 0.5
    seen = []

    class Brightness:
        def __call__(self, images, prompts):
            seen.append(list(prompts))
            return images.mean(dim=(1, 2, 3))

    reward = Brightness()
    torch.testing.assert_close(score_media(reward, clips, ["a", "b"]), torch.tensor([1 / 3, 0.5]))
    assert seen[-1] == ["a", "a", "a", "b", "b", "b"]
    reward.frames_reduce = "min"
    torch.testing.assert_close(score_media(reward, clips, ["a", "b"]), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(score_media(reward, clips[:, :, 1], ["a", "b"]), torch.tensor([1.0, 0.5]))
    assert load_reward("jpeg_incompressibility:frames=min").frames_reduce == "min"
    assert load_reward("jpeg_incompressibility").frames_reduce == "mean"
    with pytest.raises(UserError, match="frames='median'"):
        load_reward("jpeg_incompressibility:frames=median")


def test_temporal_consistency_is_the_mean_clip_similarity_of_neighbouring_frames(tmp_path):
    """By hand on a tiny CLIP: the mean cosine of the normalised image embeddings of frames (0, 1), (1, 2); 1 for a
    still clip; images and one-frame clips are refused."""
    from fixtures import tiny_clip_folder

    from diffalign.rewards import load_reward

    reward = load_reward(f"temporal_consistency:{tiny_clip_folder(tmp_path / 'clip')}")
    clips = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clips[1] = clips[1, :, :1]  # a still clip
    scores = reward(clips, ["a", "b"])
    features = reward.embed(clips[0].transpose(0, 1))
    expected = (features[0] @ features[1] + features[1] @ features[2]) / 2
    torch.testing.assert_close(scores[0], expected)
    torch.testing.assert_close(scores[1], torch.tensor(1.0))
    assert scores[0] < 1
    with pytest.raises(UserError, match="clips of two frames or more"):
        reward(clips[:, :, 0], ["a", "b"])


@pytest.mark.slow
def test_eval_compares_wan_runs_on_clips_resumes_from_saved_clips_and_the_report_plays_them(tmp_path):
    """``diffalign eval --frames 5`` on a tiny Wan2.1 base (random weights saved as a diffusers folder) and a DPO run of
    it: every clip is scored frame by frame and saved as a lossless animated WebP; a rerun reads them back and gives
    the same figures; the report shows each clip as a looping video that Chromium decodes (it has 5 frames' duration)
    base beside aligned, and a still grid of first frames per prompt."""
    from browser import chromium

    from diffalign.cli import main
    from diffalign.eval.saved import load_png
    from diffalign.recipes.samples import pickapic_parquet

    base = tmp_path / "wan"
    load_pipeline(TINY_WAN, random_init=True, seed=0).save_pretrained(base)
    data = pickapic_parquet(tmp_path / "clips.parquet", 4, frames=5)
    run = _wan_run(tmp_path, data, f"model.path={base}", "model.random_init=false", "data.frames=5", "data.fps=0")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    command = ["eval", "--base", str(base), "--aligned", f"dpo={run}", "--prompts", str(tmp_path / "prompts.txt"),
               "--rewards", "jpeg_incompressibility", "--seeds", "2", "--steps", "2", "--resolution", "32",
               "--frames", "5", "--save-images", "--out", str(tmp_path / "eval")]
    assert main(command) == 0
    first = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    clip = load_png(tmp_path / "eval" / "images" / "dpo" / "000003.webp")
    assert clip.shape == (3, 5, 32, 32)
    made = {path: path.stat().st_mtime_ns for path in (tmp_path / "eval" / "images").rglob("*.webp")}
    assert main(command) == 0  # every clip read back, none made again
    assert {path: path.stat().st_mtime_ns for path in made} == made
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == first
    assert Image.open(tmp_path / "eval" / "grids" / "prompt-001.png").size[1] >= 2 * 32
    browser = chromium()
    try:
        browser.get((tmp_path / "eval" / "report.html").as_uri())
        videos = browser.execute_async_script("""const done = arguments[arguments.length - 1];
            const videos = [...document.querySelectorAll('section video')];
            Promise.all(videos.map(v => v.readyState >= 1 ? null :
                new Promise(r => { v.onloadedmetadata = r; v.onerror = r; }))).then(() => done(
                videos.map(v => [v.duration, v.videoWidth, v.loop, v.muted, v.closest('figure').querySelector('figcaption').innerText.split(' ')[0]])));""")
    finally:
        browser.quit()
    assert len(videos) == 8, videos  # 2 prompts x 2 seeds x 2 models
    assert all(abs(duration - 5 / 16) < 0.05 and width == 32 and loop and muted for duration, width, loop, muted, _ in
               videos), videos
    assert [model for *_, model in videos[:2]] == ["base", "dpo"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion_dpo", "grpo", "nft"])
def test_wan22_ti2v_trains_offline_and_online_on_clips(objective, clips, tmp_path):
    """Wan2.2 TI2V-5B's per-token timesteps in training and in the online rounds' sampling (Flow-GRPO's SDE steps,
    NFT's forward process), on 5-frame clips."""
    from test_every_backbone import _trains

    _trains(objective, "tiny-wan22-ti2v", clips, tmp_path, "data.frames=5")


@pytest.mark.parametrize("expert", ["high", "low"])
def test_each_wan22_expert_trains_on_its_own_timesteps_and_its_run_loads_into_its_transformer(expert, clips, tmp_path):
    """Wan2.2 A14B's two experts, switched at 0.875 x 1000 as WanPipeline switches them: predict sends each item to the
    expert of its timestep; a run of model.expert trains that expert's LoRA alone, drawing only its timesteps (the
    high-noise expert's share of the shift-12 grid is most of it), and the run loads into that pipeline component (the
    low-noise expert's LoRA through diffusers' load_into_transformer_2)."""
    from safetensors.torch import load_file

    from diffalign.diffusion.finetuned import load_finetuned

    pipe = load_pipeline(ASSETS / "models" / "tiny-wan22", random_init=True, seed=0)
    with pytest.raises(UserError, match="set model.expert=high"):
        backbone_for(pipe, frames=5)
    backbone = backbone_for(pipe, frames=5, expert=expert)
    assert backbone.boundary == 875.0
    cond = backbone.encode_prompts(["a", "b"])
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = backbone.predict(latents, torch.tensor([900.0, 500.0]), cond)
        for item, (module, t) in enumerate(((pipe.transformer, 900), (pipe.transformer_2, 500))):
            alone = module(hidden_states=latents[item:item + 1], timestep=torch.tensor([t]),
                           encoder_hidden_states=cond.embeds[item:item + 1], return_dict=False)[0]
            torch.testing.assert_close(mixed[item:item + 1], alone)
    lo, hi = backbone.timestep_share()
    split = 0.875 / (12 - 11 * 0.875)  # the unshifted level s whose shifted sigma 12 s / (1 + 11 s) is 0.875
    assert (lo, hi) == ((pytest.approx(split, abs=2e-3), 1.0) if expert == "high" else (0.0, pytest.approx(split, abs=2e-3)))
    schedule = backbone.scheduler.timesteps.flip(0)
    served = schedule[int(lo * 1000):int(hi * 1000)]
    assert bool(backbone.serves(served).all()) and not bool(backbone.serves(schedule).all())
    from diffalign.config import ObjectiveConfig
    from diffalign.objectives import OBJECTIVES

    assert OBJECTIVES["diffusion_dpo"](ObjectiveConfig(name="diffusion_dpo"), backbone).sampler.t_range == (lo, hi)

    base = tmp_path / "wan22"
    pipe.save_pretrained(base)
    run = _wan_run(tmp_path, clips["pairs"], f"model.path={base}", "model.random_init=false", "data.frames=5",
                   "data.fps=0", f"model.expert={expert}")
    lora = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert all(key.startswith("transformer.") for key in lora)  # diffusers' name for either expert's LoRA
    loaded = load_finetuned(run)
    trained, frozen = ("transformer", "transformer_2") if expert == "high" else ("transformer_2", "transformer")
    assert any("lora" in name for name, _ in getattr(loaded, trained).named_parameters())
    assert not any("lora" in name for name, _ in getattr(loaded, frozen).named_parameters())


@pytest.mark.slow
def test_grpo_trains_the_low_noise_expert_on_the_rounds_steps_it_denoises(clips, tmp_path):
    """Flow-GRPO on Wan2.2's low-noise expert: the rounds sample with both experts, and only the steps below the
    boundary are trained (on a shift-12 grid of 10 steps, the last few)."""
    from test_every_backbone import _trains

    _trains("grpo", "tiny-wan22", clips, tmp_path, "data.frames=5", "model.expert=low", "objective.sample_steps=10")


@pytest.fixture(scope="module")
def hunyuan():
    return load_pipeline(ASSETS / "models" / "tiny-hunyuanvideo15", random_init=True, seed=0)


def test_hunyuanvideo15_predict_is_the_pipelines_own_call_on_both_text_streams(hunyuan):
    """HunyuanVideo15Backbone.predict calls the transformer as HunyuanVideo15Pipeline does for text to video: the
    latents beside a zero condition and mask channel, zero image embeddings, both text streams with their masks; its
    latents are the VAE's times its scaling factor; its sampling grid is the pipeline's; its guider takes the scale."""
    from diffalign.diffusion.sampling import generate

    backbone = backbone_for(hunyuan, frames=5)
    assert backbone.latent_shape(32) == (4, 2, 8, 8)
    prompts = ["a red circle", 'a sign that says "hello"']
    cond = backbone.encode_prompts(prompts)
    embeds, mask, embeds_2, mask_2 = hunyuan.encode_prompt(prompts, device="cpu", batch_size=2)
    assert cond.mask_2[0].sum() == 0 < cond.mask_2[1].sum()  # only a quoted text reaches ByT5
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs = torch.cat([latents, torch.zeros_like(latents), torch.zeros(2, 1, 2, 8, 8)], dim=1)
        out = hunyuan.transformer(hidden_states=inputs, image_embeds=torch.zeros(2, 729, 12),
                                  timestep=torch.tensor([500.0, 20.0]), encoder_hidden_states=embeds,
                                  encoder_attention_mask=mask, encoder_hidden_states_2=embeds_2,
                                  encoder_attention_mask_2=mask_2, return_dict=False)[0]
        torch.testing.assert_close(backbone.predict(latents, torch.tensor([500.0, 20.0]), cond), out)
        pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        raw = hunyuan.vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(backbone.encode_images(pixels), raw * hunyuan.vae.config.scaling_factor)
    hunyuan(prompt=["a red circle"], num_inference_steps=4, height=32, width=32, num_frames=5, output_type="latent")
    grid = backbone.sampling_scheduler(4, backbone.latent_shape(32))  # the pipeline takes no step callback: its
    torch.testing.assert_close(grid.timesteps, hunyuan.scheduler.timesteps)  # scheduler keeps the grid it walked
    clips = generate(hunyuan, ["a red circle"], [0], steps=2, guidance_scale=3.0, resolution=32, frames=5)
    assert clips.shape == (1, 3, 5, 32, 32) and hunyuan.guider.guidance_scale == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion_dpo", "diffusion_kto", "rank_dpo", "grpo", "nft", "sppo", "draft"])
def test_hunyuanvideo15_trains_offline_and_online_on_clips(objective, clips, tmp_path):
    """HunyuanVideo 1.5 on 5-frame clips: the offline objectives read video data (its two text streams cached and
    batched as one conditioning), the online ones sample its clips."""
    from test_every_backbone import _trains

    _trains(objective, "tiny-hunyuanvideo15", clips, tmp_path, "data.frames=5")


def test_generate_ranked_makes_lists_of_clips_that_a_video_run_trains_on(tmp_path):
    """generate-ranked with frames: two tiny Wan2.1 generators make 5-frame clips (lossless animated WebP), every
    clip is scored frame by frame, and the lists and pairs are data a rank_dpo / DPO run reads with data.frames."""
    import pyarrow.parquet as pq

    from diffalign.data.open import open_dataset
    from diffalign.synth import GenerateConfig, generate_ranked
    from diffalign.train import load_config

    model = tmp_path / "wan"
    load_pipeline(TINY_WAN, random_init=True, seed=0).save_pretrained(model)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "ranked"
    config = load_config(ASSETS.parent / "configs/toy_generate_ranked.yaml", [
        f"prompts={tmp_path / 'prompts.txt'}", f"output_dir={out}", "frames=5",
        f"generators=[{{name: a, path: {model}, steps: 2, resolution: 32}}, "
        f"{{name: b, path: {model}, steps: 2, resolution: 32, guidance_scale: 1.0}}]",
        "rewards=[jpeg_incompressibility]"], schema=GenerateConfig)
    assert generate_ranked(config)["images_generated_now"] == 2 * 2 * 2
    rows = pq.read_table(out / "shard-00000.parquet").to_pylist()
    assert all(path.endswith(".webp") for row in rows for path in row["images"])
    for layout, path in (("ranked", out), ("pairs", out / "pairs.jsonl")):
        data = load_config(ASSETS.parent / "configs/toy_rank_dpo.yaml", [f"data.path={path}", "data.resolution=32",
                                                                           "data.frames=5"]).data
        assert open_dataset(data, layout).read(0).pixels.shape[1:] == (3, 5, 32, 32)
