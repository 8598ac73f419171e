"""SparsePO on latents (diffusion_sparse_po): the location scores add up to the denoising score, all-ones masks give
Diffusion-DPO exactly, and a toy run trains its mask model, checkpoints it and leaves it out of the LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import pickapic_parquet, toy_policy_and_reference
from safetensors.torch import load_file

from diffalign.diffusion import denoising_scores, location_scores, noised_group, schedule_for
from diffalign.diffusion.region_masks import RegionMaskModel
from diffalign.errors import UserError
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.train import load_config, train


def _batch(backbone, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 2, 4, 4, 4, generator=g)
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    randomness = {"timesteps": torch.tensor([100, 500, 900]), "noise": torch.randn(3, 4, 4, 4, generator=g)}
    return latents, cond, randomness


def test_the_location_scores_add_up_to_the_denoising_score():
    backbone, _ = toy_policy_and_reference()
    latents, cond, randomness = _batch(backbone)
    group = noised_group(latents, cond, schedule_for(backbone.scheduler), timesteps=randomness["timesteps"],
                         noise=randomness["noise"])
    with torch.no_grad():
        per_location, prediction = location_scores(backbone, group)
        whole = denoising_scores(backbone, group)
    assert per_location.shape == (6, 4, 4) and prediction.shape == (6, 4, 4, 4)
    torch.testing.assert_close(per_location.sum((1, 2)).view(3, 2), whole, rtol=1e-5, atol=1e-7)


class _Ones(torch.nn.Module):
    def forward(self, noisy, prediction):
        return torch.ones(noisy.shape[0], *noisy.shape[2:])


def test_with_every_mask_one_it_is_diffusion_dpo():
    backbone, reference = toy_policy_and_reference()
    base = [f"model.path={TOY_BASE}", "data.path=unused"]
    sparse = OBJECTIVES["diffusion_sparse_po"](load_config(CONFIGS / "toy_diffusion_sparse_po.yaml", base).objective,
                                               backbone)
    dpo = OBJECTIVES["diffusion_dpo"](load_config(CONFIGS / "toy_diffusion_dpo.yaml", base).objective, backbone)
    sparse.masks = _Ones()
    latents, cond, randomness = _batch(backbone, 1)
    masked, metrics = sparse(backbone, latents, cond, randomness, backbone.denoiser, reference)
    plain, _ = dpo(backbone, latents, cond, randomness, backbone.denoiser, reference)
    torch.testing.assert_close(masked, plain, rtol=1e-4, atol=1e-6)
    assert "implicit_acc" in metrics and metrics["mask/region_mean"] == 1.0


def test_the_region_masks_start_small_alive_and_non_negative():
    torch.manual_seed(0)
    model = RegionMaskModel(channels=4)
    masks = model(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))
    assert masks.shape == (2, 8, 8) and (masks >= 0).all() and 0 < masks.mean() < 0.1 and (masks > 0).all()


def test_a_toy_run_trains_its_masks_checkpoints_them_and_saves_the_lora_alone(tmp_path):
    data = pickapic_parquet(tmp_path / "p.parquet", 4)
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_diffusion_sparse_po.yaml", [
        f"model.path={TOY_BASE}", f"data.path={data}", f"output_dir={run}", "train.max_steps=2", "train.batch_size=2",
        "train.checkpoint_every=1", "validation.every=0", "train.log_every=1", "objective.loss_options={l1_reward: 0.001}"]))
    saved = load_file(run / "checkpoints" / "step-0000002" / "model.safetensors")
    mix = saved["sparse_po_region_masks.mix.weight"]
    assert not torch.allclose(mix, torch.full_like(mix, 1 / 32))  # the mask model trained
    lora = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert lora and not any("sparse_po" in key for key in lora)
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in losses)


def test_l1_kl_is_refused_for_latents_with_the_config():
    with pytest.raises(UserError, match="no KL term"):
        load_config(CONFIGS / "toy_diffusion_sparse_po.yaml", [f"model.path={TOY_BASE}", "data.path=unused",
                                                               "objective.loss_options={l1_kl: 0.1}"])
