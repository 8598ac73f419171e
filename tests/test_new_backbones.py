"""Z-Image (Tongyi-MAI's single-stream DiT on Qwen3), Qwen-Image (an MMDiT on Qwen2.5-VL with its own video VAE) and
FLUX.2 klein (an MMDiT on three hidden layers of Qwen3, batch-normalised patchified latents):
each adapter calls the transformer as its pipeline does and samples on the pipeline's grid, and a run's exports load
in the pipeline (every objective's two-step run on each is tests/test_every_backbone.py; the flow-model checks are
tests/test_flow_methods.py)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import pytest
from diffusers import Flux2KleinPipeline, Flux2Pipeline, QwenImagePipeline, ZImagePipeline
from fixtures import pickapic_parquet
from safetensors.torch import load_file

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train
from diffalign.train.export import export_run

MODELS = ASSETS / "models"
TINY = MODELS / "tiny-zimage"


def test_z_image_predict_is_the_pipelines_own_call_and_its_grid_the_pipelines():
    """ZImageBackbone.predict calls the transformer as ZImagePipeline does (a list of (C, 1, h, w) latents, each
    prompt's unpadded embeddings, the timestep 1 - sigma, the output negated), on prompts of different lengths;
    its sampling grid is the pipeline's own timesteps."""
    pipe = load_pipeline(TINY, random_init=True)
    backbone = backbone_for(pipe)
    prompts = ["a red circle", "a small blue square on a green field"]
    cond = backbone.encode_prompts(prompts)
    assert cond.mask.sum(1).tolist()[0] < cond.mask.sum(1).tolist()[1] == cond.embeds.shape[1]  # padded, masked
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    captions = pipe._encode_prompt(prompts, device="cpu", max_sequence_length=512)
    with torch.no_grad():
        out = pipe.transformer(list(latents.unsqueeze(2).unbind(0)), torch.tensor([0.5, 0.98]), captions,
                               return_dict=False)[0]
        ours = backbone.predict(latents, torch.tensor([500.0, 20.0]), cond)
    torch.testing.assert_close(ours, -torch.stack(out).squeeze(2))
    _grid_of(pipe, backbone, guidance_scale=0.0)
    assert isinstance(pipe, ZImagePipeline)


def _grid_of(pipe, backbone, steps: int = 4, **call) -> None:
    """The pipeline's own timesteps for a 32-pixel image equal the adapter's sampling grid."""
    seen = []
    pipe(prompt=["a red circle"], num_inference_steps=steps, height=32, width=32, output_type="latent",
         callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or kwargs, **call)
    torch.testing.assert_close(backbone.sampling_scheduler(steps, backbone.latent_shape(32)).timesteps.tolist(), seen)


def test_qwen_image_predict_is_the_pipelines_own_packed_call_and_its_latents_the_vaes():
    """QwenImageBackbone.predict packs 2x2, gives each image's patch grid, sigma and the prompts' mask as
    QwenImagePipeline does; its latents are the VAE's one-frame latents normalised per channel, decoded back as the
    pipeline decodes them; its grid is the pipeline's dynamically shifted one."""
    pipe = load_pipeline(MODELS / "tiny-qwenimage", random_init=True)
    backbone = backbone_for(pipe)
    prompts = ["a red circle", "a small blue square on a green field"]
    cond = backbone.encode_prompts(prompts)
    embeds, mask = pipe.encode_prompt(prompts, device="cpu")
    latents = torch.randn(2, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.transformer(hidden_states=QwenImagePipeline._pack_latents(latents, 2, 4, 8, 8),
                               timestep=torch.tensor([0.5, 0.02]), encoder_hidden_states_mask=mask,
                               encoder_hidden_states=embeds, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
        ours = backbone.predict(latents, torch.tensor([500.0, 20.0]), cond)
    torch.testing.assert_close(ours, QwenImagePipeline._unpack_latents(out, 32, 32, 4)[:, :, 0])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        frame = pipe.vae.encode(pixels[:, :, None]).latent_dist.mean  # latents_mean 0, latents_std 1 here
        torch.testing.assert_close(backbone.encode_images(pixels), frame[:, :, 0])
        torch.testing.assert_close(backbone.decode_latents(frame[:, :, 0]),
                                   pipe.vae.decode(frame).sample[:, :, 0].clamp(-1, 1))
    _grid_of(pipe, backbone)


def test_flux2_klein_predict_is_the_pipelines_own_call_on_its_normalised_patchified_latents():
    """Flux2Backbone: the latents are the VAE's patchified 2x2 and normalised by its batch-norm statistics, as
    Flux2KleinPipeline encodes a reference image and decodes its result; predict packs them with the pipeline's
    position ids and text ids; the grid is the pipeline's (empirical mu of tokens and steps)."""
    pipe = load_pipeline(MODELS / "tiny-flux2-klein", random_init=True)
    with torch.no_grad():  # statistics other than (0, 1), so that the normalisation is seen
        pipe.vae.bn.running_mean.uniform_(-0.5, 0.5)
        pipe.vae.bn.running_var.uniform_(0.5, 2.0)
    backbone = backbone_for(pipe)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = backbone.encode_images(pixels)
        expected = pipe._encode_vae_image(pixels, generator=None)  # the pipeline's own: argmax, patchify, normalise
        torch.testing.assert_close(latents, expected)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    embeds, text_ids = pipe.encode_prompt(["a red circle", "a blue square"], device="cpu")
    with torch.no_grad():
        out = pipe.transformer(hidden_states=pipe._pack_latents(latents), timestep=torch.tensor([0.5, 0.02]),
                               guidance=None, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=pipe._prepare_latent_ids(latents), return_dict=False)[0]
        ours = backbone.predict(latents, torch.tensor([500.0, 20.0]), cond)
    torch.testing.assert_close(ours, pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(latents)))
    _grid_of(pipe, backbone)


def test_flux2_dev_predict_is_the_pipelines_own_guided_call_on_mistral_embeddings():
    """FLUX.2 dev (Flux2Pipeline) shares klein's adapter: prompts are three stacked hidden layers (10, 20, 30) of Mistral
    Small 3 through the pipeline's chat template, and its guidance-distilled transformer gets the guidance value
    in its embedding (``model.distilled_guidance``, 4 as the pipeline's default). predict equals the pipeline's own
    first transformer call; its grid is the pipeline's."""
    pipe = load_pipeline(MODELS / "tiny-flux2-dev", random_init=True)
    backbone = backbone_for(pipe, distilled_guidance=4.0)
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", dict(kwargs))
        seen.setdefault("output", output[0])
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs, (c, h, w) = seen["kwargs"], backbone.latent_shape(32)
    torch.testing.assert_close(kwargs["guidance"], torch.tensor([4.0]))
    noisy = kwargs["hidden_states"].permute(0, 2, 1).reshape(1, c, h, w)
    cond = backbone.encode_prompts(["a red circle"])
    torch.testing.assert_close(cond.embeds, kwargs["encoder_hidden_states"])
    with torch.no_grad():
        ours = backbone.predict(noisy, kwargs["timestep"] * 1000, cond)
    torch.testing.assert_close(ours, seen["output"].permute(0, 2, 1).reshape(1, c, h, w))
    _grid_of(pipe, backbone)


@pytest.mark.parametrize("model, pipeline, learning_rate", [
    ("tiny-zimage", ZImagePipeline, 1e-2), ("tiny-qwenimage", QwenImagePipeline, 1e-2),
    ("tiny-flux2-klein", Flux2KleinPipeline, 1e-2),
    # the toy recipe's LoRA reaches one block of tiny FLUX.2 dev (its single blocks fuse their projections), whose
    # images then move by 3e-4 in two steps at 1e-2
    ("tiny-flux2-dev", Flux2Pipeline, 5e-2)])
def test_a_runs_lora_loads_in_the_pipeline_and_equals_its_merged_export(model, pipeline, learning_rate,
                                                                          tmp_path: Path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    train(load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        f"model.path={MODELS / model}", "model.random_init=true", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=2", f"train.learning_rate={learning_rate}",
        "train.warmup_steps=0", "validation.every=0"]))
    lora = export_run(tmp_path / "run", "lora", tmp_path / "lora", dtype="fp32")
    merged = export_run(tmp_path / "run", "diffusers", tmp_path / "merged", dtype="fp32")
    settings = dict(num_inference_steps=2, height=32, width=32, output_type="pt")

    def image(pipe):
        return pipe(prompt=["a red circle"], generator=torch.Generator().manual_seed(0), **settings).images

    pipe = load_pipeline(MODELS / model, random_init=True)
    # ComfyUI's LoRA loader reads "transformer." + a diffusers module's name, .lora.down/.lora.up (comfy/lora.py)
    linear = {name for name, module in pipe.transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    keys = load_file(lora).keys()
    assert keys and all(re.fullmatch(r"transformer\.(.+)\.lora\.(down|up)\.weight", k)[1] in linear for k in keys)
    before = image(pipe)
    pipe.load_lora_weights(lora.parent)
    with_lora = image(pipe)
    assert (with_lora - before).abs().max() > 1e-3  # the LoRA changes what the pipeline draws
    merged_pipe = pipeline.from_pretrained(merged)
    torch.testing.assert_close(image(merged_pipe), with_lora, atol=1e-5, rtol=1e-5)
    # the transformer as its release ships it (FLUX.2: BFL's fused names), read back by diffusers' own converter
    single = export_run(tmp_path / "run", "single-file", tmp_path / "transformer.safetensors", dtype="fp32")
    read = type(merged_pipe.transformer).from_single_file(str(single), config=str(MODELS / model),
                                                          subfolder="transformer", local_files_only=True)
    expected = merged_pipe.transformer.state_dict()
    assert read.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in read.state_dict().items())
    if model.startswith("tiny-flux2"):
        assert "double_blocks.0.img_attn.qkv.weight" in load_file(single)


def test_qwen_image_samples_guided_with_its_true_cfg_in_eval_and_generation():
    """The Qwen-Image pipelines guide with ``true_cfg_scale`` and a negative prompt (their ``guidance_scale`` only
    feeds a guidance-distilled model): ``generate``'s guidance scale reaches them so, against the empty prompt as
    training's guided sampler, and changes the image; a scale of 1 is the unguided pipeline."""
    from diffalign.diffusion.sampling import generate

    pipe = load_pipeline(MODELS / "tiny-qwenimage", random_init=True)
    settings = dict(num_inference_steps=2, height=32, width=32, output_type="pt")
    ours = generate(pipe, ["a red circle", "a blue square"], [0, 1], steps=2, guidance_scale=4.0, resolution=32)
    theirs = pipe(prompt=["a red circle", "a blue square"], true_cfg_scale=4.0, negative_prompt=["", ""],
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **settings).images
    torch.testing.assert_close(ours, theirs)
    unguided = generate(pipe, ["a red circle", "a blue square"], [0, 1], steps=2, guidance_scale=1.0, resolution=32)
    assert (ours - unguided).abs().max() > 1e-4


def test_a_weight_flux2_does_not_have_is_refused_by_name_in_the_single_file_layout():
    from diffalign.train.flux2_keys import flux2_transformer_to_original

    for key in ("transformer_blocks.0.attn.to_q.lora_A.weight", "single_transformer_blocks.3.attn.to_k.weight",
                "pos_embed.weight"):
        with pytest.raises(ValueError, match=re.escape(key)):
            flux2_transformer_to_original({key: torch.zeros(1)})
    assert flux2_transformer_to_original({"proj_out.weight": torch.ones(1)}) == {"final_layer.linear.weight": torch.ones(1)}
