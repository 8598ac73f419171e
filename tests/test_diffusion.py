"""Backbones, schedules and the denoising-likelihood proxy on tiny random models of each family."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from diffalign.diffusion import (
    CachedEncoder,
    TensorCache,
    TimestepSampler,
    add_lora,
    backbone_for,
    configure_denoiser,
    denoising_scores,
    group_scores,
    has_lora,
    load_pipeline,
    noised_group,
    schedule_for,
)
from diffalign.diffusion.schedule import DiffusionSchedule
from diffalign.errors import UserError
from diffalign.paths import resolve_model_path

MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"
FAMILIES = ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2-klein", "tiny-zimage", "tiny-qwenimage", "tiny-pixart"]
PROMPTS = ["a red circle", "a small blue square"]


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request):
    return backbone_for(load_pipeline(MODELS / request.param, random_init=True, seed=0))


def pixels(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def latents_for(backbone, n_groups=2, k=2, seed=0):
    lat = backbone.encode_images(pixels(n_groups * k, seed))
    return lat.view(n_groups, k, *lat.shape[1:])


def test_forward_backward_reaches_every_trainable_block(backbone):
    backbone.denoiser.zero_grad()
    group = noised_group(
        latents_for(backbone), backbone.encode_prompts(PROMPTS), schedule_for(backbone.scheduler),
        generator=torch.Generator().manual_seed(0),
    )
    scores = denoising_scores(backbone, group)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    scores.sum().backward()
    # Qwen-Image's last block computes a text stream nothing reads (its queries, output and MLP): no gradient there
    blocks = len(getattr(backbone.denoiser, "transformer_blocks", []))
    unread = re.compile(rf"transformer_blocks\.{blocks - 1}\.(attn\.(add_q_proj|to_add_out|norm_added_q)|txt_mlp)\.")
    grads = [p.grad for n, p in backbone.denoiser.named_parameters()
             if p.requires_grad and not (backbone.family == "qwenimage" and unread.match(n))]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.9 * len(grads)


def test_score_equals_direct_computation(backbone):
    """-mean (f(x_t) - target)^2 with x_t and target from diffusers' own scheduler functions."""
    schedule = schedule_for(backbone.scheduler)
    lat = latents_for(backbone, n_groups=2, k=1)
    cond = backbone.encode_prompts(PROMPTS)
    t = torch.tensor([100, 700])
    noise = torch.randn(2, *lat.shape[2:], generator=torch.Generator().manual_seed(1))
    group = noised_group(lat, cond, schedule, timesteps=t, noise=noise)
    ours = denoising_scores(backbone, group).squeeze(1)

    x0 = lat[:, 0]
    if isinstance(backbone.scheduler, FlowMatchEulerDiscreteScheduler):  # the flow-matching families
        ref_sched = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler.config)
        model_t = ref_sched.timesteps[999 - t]  # diffusers indexes its grid from the noisy end; ours grows with noise
        noisy = ref_sched.scale_noise(x0, model_t, noise)
        target = noise - x0
    else:
        noisy = backbone.scheduler.add_noise(x0, noise, t)
        target = noise if backbone.scheduler.config.prediction_type == "epsilon" else x0
        model_t = t
    with torch.no_grad():
        pred = backbone.predict(noisy, model_t, cond)
    expected = -((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours.detach(), expected, atol=1e-5, rtol=1e-5)


def test_shared_noise_and_timestep_within_a_group(backbone):
    """Identical items of a group are noised identically; different groups are not."""
    one = latents_for(backbone, n_groups=2, k=1)
    lat = one.expand(2, 3, *one.shape[2:])  # every group: the same image three times
    group = noised_group(lat, backbone.encode_prompts(PROMPTS), schedule_for(backbone.scheduler),
                         generator=torch.Generator().manual_seed(0))
    noisy = group.noisy.view(2, 3, *one.shape[2:])
    assert torch.equal(noisy[:, 0], noisy[:, 1]) and torch.equal(noisy[:, 0], noisy[:, 2])
    assert not torch.equal(noisy[0, 0], noisy[1, 0])
    with torch.no_grad():
        scores = denoising_scores(backbone, group)
    torch.testing.assert_close(scores[:, 0], scores[:, 2])


def test_cached_and_uncached_scores_agree(backbone, tmp_path):
    images = pixels(4, seed=3)
    encoder = CachedEncoder(backbone, TensorCache(tmp_path / "cache"), model_id=backbone.family)
    ids = [f"img{i}" for i in range(4)]
    first = encoder.latents(ids, lambda idx: images[idx])
    encoder.prompts(PROMPTS)
    encoder.cache.flush()
    reopened = CachedEncoder(backbone, TensorCache(tmp_path / "cache"), model_id=backbone.family)
    cached_lat = reopened.latents(ids, lambda idx: pytest.fail("re-encoded a cached image"))
    cached_cond = reopened.prompts(PROMPTS)
    assert len(reopened.cache) == 4 + 2
    torch.testing.assert_close(cached_lat, first)

    fresh_lat = backbone.encode_images(images)
    fresh_cond = backbone.encode_prompts(PROMPTS)
    schedule = schedule_for(backbone.scheduler)
    t, noise = torch.tensor([10, 900]), torch.randn(2, *fresh_lat.shape[1:])
    with torch.no_grad():
        a = denoising_scores(backbone, noised_group(cached_lat.view(2, 2, *fresh_lat.shape[1:]), cached_cond,
                                                    schedule, timesteps=t, noise=noise))
        b = denoising_scores(backbone, noised_group(fresh_lat.view(2, 2, *fresh_lat.shape[1:]), fresh_cond,
                                                    schedule, timesteps=t, noise=noise))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reference_is_the_base_model(family):
    backbone = backbone_for(load_pipeline(MODELS / family, random_init=True))
    denoiser = backbone.denoiser
    group = noised_group(latents_for(backbone), backbone.encode_prompts(PROMPTS), schedule_for(backbone.scheduler),
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = denoising_scores(backbone, group)
    add_lora(denoiser, 4, adapter_name="t")
    policy, ref = group_scores(backbone, group)
    torch.testing.assert_close(policy.detach(), base)  # LoRA starts as the identity (B = 0)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    assert has_lora(denoiser)
    policy, ref = group_scores(backbone, group)
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(policy.detach(), base)
    assert policy.requires_grad and not ref.requires_grad
    # adapters are back on after the reference forward
    torch.testing.assert_close(denoising_scores(backbone, group).detach(), policy.detach())


def test_flow_target_is_the_sd3_schedulers_velocity():
    """An Euler step of the SD3 scheduler along our target lands on the next interpolant."""
    pipe = load_pipeline(MODELS / "tiny-sd3", random_init=True)
    schedule = schedule_for(pipe.scheduler)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    i = 3
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    x_t = (1 - sigma) * x0 + sigma * noise
    t = torch.tensor([0])
    velocity = schedule.target(x0, noise, t)
    stepped = sched.step(velocity, sched.timesteps[i], x_t).prev_sample
    torch.testing.assert_close(stepped, (1 - sigma_next) * x0 + sigma_next * noise, atol=1e-5, rtol=1e-5)
    # and the training grid is the scheduler's shifted sigmas, timestep = sigma * 1000
    torch.testing.assert_close(schedule.model_timesteps(torch.tensor([0, 999])) / 1000,
                               schedule.sigma(torch.tensor([0, 999])))


def test_v_prediction_target_and_min_snr_weights():
    pipe = load_pipeline(MODELS / "tiny-sd15", random_init=True)
    sched = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    schedule = DiffusionSchedule(sched)
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 995])
    torch.testing.assert_close(schedule.target(x0, noise, t), sched.get_velocity(x0, noise, t))
    snr = compute_snr(sched, t)
    torch.testing.assert_close(schedule.loss_weight(t, "min_snr"), snr.clamp(max=5.0) / (snr + 1))
    with pytest.raises(UserError, match="weighting"):
        schedule.loss_weight(t, "fancy")


def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    t = TimestepSampler("uniform", t_range=(0.2, 0.5)).sample(2000, 1000, g)
    assert t.min() >= 200 and t.max() <= 499
    mid = TimestepSampler("logit_normal").sample(4000, 1000, g)
    assert ((mid > 250) & (mid < 750)).float().mean() > 0.6  # logit-normal favours the middle
    with pytest.raises(UserError, match="sampler"):
        TimestepSampler("cosine")
    with pytest.raises(UserError, match="range"):
        TimestepSampler(t_range=(0.6, 0.4))


def test_gradient_checkpointing_gives_the_same_scores_and_grads():
    pipe = load_pipeline(MODELS / "tiny-sd15", random_init=True)
    bb = backbone_for(pipe)
    group = noised_group(latents_for(bb), bb.encode_prompts(PROMPTS), schedule_for(bb.scheduler),
                         generator=torch.Generator().manual_seed(0))

    def run():
        bb.denoiser.zero_grad()
        s = denoising_scores(bb, group)
        s.sum().backward()
        return s.detach(), bb.denoiser.conv_in.weight.grad.clone()

    plain = run()
    bb.denoiser.train()
    configure_denoiser(bb.denoiser, gradient_checkpointing=True, channels_last=True)
    checkpointed = run()
    torch.testing.assert_close(plain[0], checkpointed[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain[1], checkpointed[1], atol=1e-5, rtol=1e-4)


def test_attention_choices():
    pipe = load_pipeline(MODELS / "tiny-sd15", random_init=True)
    with pytest.raises(UserError, match="attention"):
        configure_denoiser(pipe.unet, attention="flash3")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers"):
            configure_denoiser(pipe.unet, attention="xformers")


def test_load_from_a_saved_local_folder(tmp_path):
    pipe = load_pipeline(MODELS / "tiny-sdxl", random_init=True, seed=7)
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = load_pipeline(tmp_path / "saved")
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    for a, b in zip(pipe.unet.state_dict().values(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "saved").rglob("*.bin"))


def test_denoiser_from_a_single_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    donor = load_pipeline(MODELS / "tiny-sd15", random_init=True, seed=3)
    save_file(donor.unet.state_dict(), tmp_path / "unet.safetensors")
    pipe = load_pipeline(MODELS / "tiny-sd15", random_init=True, seed=0, denoiser_file=tmp_path / "unet.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), donor.unet.state_dict().values()))
    with pytest.raises(UserError, match="safetensors"):
        load_pipeline(MODELS / "tiny-sd15", random_init=True, denoiser_file=tmp_path / "missing.ckpt")


def test_same_seed_same_random_weights():
    a = load_pipeline(MODELS / "tiny-sd3", random_init=True, seed=1).transformer
    b = load_pipeline(MODELS / "tiny-sd3", random_init=True, seed=1).transformer
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_hub_id_loads_the_copy_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from fixtures import hub_cache_with

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = hub_cache_with(tmp_path, "someone/tiny-sd3", MODELS / "tiny-sd3")
    assert resolve_model_path("someone/tiny-sd3") == snapshot
    a = load_pipeline("someone/tiny-sd3", random_init=True).transformer
    b = load_pipeline(MODELS / "tiny-sd3", random_init=True).transformer
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(UserError, match="names nothing in the local Hugging Face cache.*hf download other/model"):
        load_pipeline("other/model")
    assert resolve_model_path(MODELS / "tiny-sd3") == MODELS / "tiny-sd3"  # a local path wins


def test_a_missing_model_path_gets_advice_that_fits_it(tmp_path, monkeypatch):
    """configs/toy_*.yaml name assets/models/toy-base relative to the checkout; run from another folder,
    the error says where the shipped model is. A path that cannot be a Hub name gets no Hub advice."""
    from diffalign.paths import TOY_BASE

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"ships this one as {TOY_BASE}: run from") as error:
        resolve_model_path("assets/models/toy-base", what="model.path")
    assert "hf download" not in str(error.value)
    with pytest.raises(UserError, match="Give the path of an existing file or folder") as error:
        resolve_model_path(tmp_path / "nothing" / "here", what="model.path")  # no Hub name either
    assert "hf download" not in str(error.value)


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(tmp_path)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="never unpickles"):
        load_pipeline(ckpt)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(UserError, match="model.config"):
        load_pipeline(single)


def test_full_size_configs_describe_the_real_architectures():
    """Parameter counts of the shipped real-size denoisers, built on the meta device."""
    from accelerate import init_empty_weights

    expected = {"sd15": 859.5e6, "sdxl": 2567.5e6, "sd3-medium": 2028.3e6, "pixart-alpha-1024": 610.9e6}
    import json

    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    classes = {"UNet2DConditionModel": UNet2DConditionModel, "SD3Transformer2DModel": SD3Transformer2DModel,
               "PixArtTransformer2DModel": PixArtTransformer2DModel}
    for name, count in expected.items():
        sub = "unet" if (MODELS / name / "unet").exists() else "transformer"
        config = json.loads((MODELS / name / sub / "config.json").read_text())
        cls = classes[config["_class_name"]]
        with init_empty_weights():
            model = cls.from_config(cls.load_config(MODELS / name / sub))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.01, (name, n)


def test_a_weights_variant_loads_when_asked_for_and_is_named_when_not(tmp_path):
    pipe = load_pipeline(MODELS / "tiny-sd15", random_init=True)
    pipe.save_pretrained(tmp_path / "fp16-only", variant="fp16")  # as `hf download --include "*fp16*"` leaves it
    loaded = load_pipeline(tmp_path / "fp16-only", variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.parameters(), pipe.unet.parameters()))
    with pytest.raises(UserError, match="holds fp16 weights: load them with model.variant=fp16"):
        load_pipeline(tmp_path / "fp16-only")
    from diffalign.train import load_config
    from diffalign.train.models import build_models

    config = load_config(MODELS.parent.parent / "configs/tiny_sdxl_dpo.yaml",
                         [f"model.path={tmp_path / 'fp16-only'}", "model.random_init=false", "model.variant=fp16",
                          "train.lora_rank=0"])
    backbone, _ = build_models(config, torch.device("cpu"), frozen_reference=False)
    assert all(torch.equal(a, b) for a, b in zip(backbone.denoiser.parameters(), pipe.unet.parameters()))


def test_a_dtype_cast_of_a_model_that_keeps_nothing_in_fp32_logs_no_warning():
    """diffusers 0.42 warns "should be kept in float32: []" on every dtype cast; diffalign drops that empty
    case only, so the warning still shows for a model that does keep modules in fp32 (diffusers before 0.42
    logs neither, so that case is logged here in 0.42's words)."""
    import logging

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' own handler writes to the stderr of its import
    try:
        vae = load_pipeline(MODELS / "tiny-sd15", random_init=True).vae
        vae.to(dtype=torch.bfloat16)
        assert not [m for m in logged if "should be kept in float32" in m]
        for kept in ([], ["encoder"]):
            logging.getLogger("diffusers.models.modeling_utils").warning(
                f"There are modules in AutoencoderKL that should be kept in float32: {kept}. Casting directly with "
                "`to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead.")
        assert [m for m in logged if "should be kept in float32" in m] == [
            m for m in logged if "should be kept in float32: ['encoder']" in m] != []
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


def test_random_weights_keep_the_pipeline_settings_of_the_model_index(tmp_path):
    """A model index's settings (SDXL's force_zeros_for_empty_prompt, SD's requires_safety_checker) reach the
    random pipeline as written; they used to arrive as None, which reads as False."""
    import json
    import shutil

    folder = tmp_path / "sdxl"
    shutil.copytree(MODELS / "tiny-sdxl", folder)
    index = json.loads((folder / "model_index.json").read_text())
    for value in (True, False):
        (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": value}))
        assert load_pipeline(folder, random_init=True).config.force_zeros_for_empty_prompt is value
    assert load_pipeline(MODELS / "tiny-sd15", random_init=True).config.requires_safety_checker is False


def test_prompt_tokens_sets_the_text_sequence_length_and_salts_the_prompt_cache(tmp_path):
    """model.prompt_tokens: SD3's T5 prompts padded to that many tokens (Flow-GRPO's 128; the pipeline's own
    encode_prompt with that max_sequence_length), cached apart from the default length's entries; a CLIP-only model
    refuses it."""
    pipe = load_pipeline(MODELS / "tiny-sd3", random_init=True, seed=0)
    usual, short = backbone_for(pipe), backbone_for(pipe, prompt_tokens=128)
    clip_tokens = usual.encode_prompts(PROMPTS).embeds.shape[1] - pipe.tokenizer_3.model_max_length
    cond = short.encode_prompts(PROMPTS)
    assert cond.embeds.shape[1] == clip_tokens + 128
    expected, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                max_sequence_length=128)
    torch.testing.assert_close(cond.embeds, expected)
    torch.testing.assert_close(cond.pooled, pooled)
    cache = TensorCache(tmp_path / "cache")
    CachedEncoder(usual, cache, model_id="m").prompts(PROMPTS)
    cached = CachedEncoder(short, cache, model_id="m").prompts(PROMPTS)  # not the default length's entries
    assert len(cache) == 4 and cached.embeds.shape[1] == clip_tokens + 128
    with pytest.raises(UserError, match="model.prompt_tokens=64: StableDiffusionPipeline"):
        backbone_for(load_pipeline(MODELS / "tiny-sd15", random_init=True, seed=0), prompt_tokens=64)


def test_data_width_crops_every_image_to_height_by_width_and_sizes_the_latents_so(tmp_path):
    """data.width: an image is resized to cover resolution x width (height x width) and centre-cropped, the latents
    are (C, h, w) of that size, FLUX refuses a side its 2x2 packing cannot split, and a width that gives no whole
    latent tokens is refused when the config loads, as data.resolution is."""
    from PIL import Image

    from diffalign.data.pairs import to_pixels
    from diffalign.paths import CONFIGS
    from diffalign.train import load_config

    wide = Image.new("RGB", (200, 50))
    wide.paste((255, 0, 0), (0, 0, 100, 50))  # left half red, right half black
    pixels = to_pixels(wide, 32, 64)  # 50 high -> 32: 128 x 32, the middle 64 columns kept
    assert pixels.shape == (3, 32, 64)
    assert pixels[0, :, :30].min() > 0.9 and pixels[0, :, 34:].max() < -0.9  # the red/black edge stays centred
    assert to_pixels(wide, 32).shape == (3, 32, 32)
    sd3 = backbone_for(load_pipeline(MODELS / "tiny-sd3", random_init=True, seed=0))
    f = sd3.vae_scale_factor
    assert sd3.latent_shape(32, 64) == (sd3.latent_channels, 32 // f, 64 // f)
    flux = backbone_for(load_pipeline(MODELS / "tiny-flux", random_init=True, seed=0))
    odd = 3 * flux.vae_scale_factor  # three latent columns: no whole 2x2 patches
    refused = f"height and width must be multiples of {2 * flux.vae_scale_factor}; got 32 x {odd}"
    with pytest.raises(UserError, match=refused):
        flux.latent_shape(32, odd)
    with pytest.raises(UserError, match="data.width=40 must be a multiple of 16"):
        load_config(CONFIGS / "sd3_dpo.yaml", [f"model.path={MODELS / 'sd35-medium'}", "data.width=40"])
