"""Z-Image (Tongyi-MAI's single-stream DiT on Qwen3): the adapter calls the transformer as ZImagePipeline does, samples
on its grid, and a run's exports load in ZImagePipeline (every objective's two-step run on it is
tests/test_every_backbone.py; the flow-model checks are tests/test_flow_methods.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImagePipeline
from fixtures import pickapic_parquet

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train
from diffalign.train.export import export_run

TINY = ASSETS / "models" / "tiny-zimage"


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
    seen = []
    pipe(prompts[:1], num_inference_steps=4, height=32, width=32, guidance_scale=0.0, output_type="latent",
         callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or kwargs)
    torch.testing.assert_close(backbone.sampling_scheduler(4, backbone.latent_shape(32)).timesteps.tolist(), seen)
    assert isinstance(pipe, ZImagePipeline)


def test_a_z_image_runs_lora_loads_in_z_image_pipeline_and_equals_its_merged_export(tmp_path: Path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    train(load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        f"model.path={TINY}", "model.random_init=true", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=2", "train.learning_rate=1e-2",
        "train.warmup_steps=0", "validation.every=0"]))
    lora = export_run(tmp_path / "run", "lora", tmp_path / "lora", dtype="fp32")
    merged = export_run(tmp_path / "run", "diffusers", tmp_path / "merged", dtype="fp32")
    settings = dict(num_inference_steps=2, height=32, width=32, guidance_scale=0.0, output_type="pt")

    def image(pipe):
        return pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **settings).images

    pipe = load_pipeline(TINY, random_init=True)
    before = image(pipe)
    pipe.load_lora_weights(lora.parent)
    with_lora = image(pipe)
    assert (with_lora - before).abs().max() > 1e-3  # the LoRA changes what the pipeline draws
    torch.testing.assert_close(image(ZImagePipeline.from_pretrained(merged)), with_lora, atol=1e-5, rtol=1e-5)
