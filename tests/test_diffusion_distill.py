"""A diffusion model distilled from a teacher (diffusion_distill: BK-SDM's output KD, guidance distillation) and a
diffusion run's reference taken from another model (model.reference): the loss by hand, training that brings the
student to the teacher, the models loaded as the config names them, and the settings refused."""

import json

import pytest
import torch
from fixtures import images_parquet

from diffalign.diffusion import load_pipeline, noised_group, schedule_for
from diffalign.errors import UserError
from diffalign.objectives import OBJECTIVES
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train
from diffalign.train.models import build_models

TINY_SD3, TINY_SD15, TINY_WAN = ASSETS / "models/tiny-sd3", ASSETS / "models/tiny-sd15", ASSETS / "models/tiny-wan"
CONFIG = CONFIGS / "toy_diffusion_distill.yaml"


def saved_random(model, folder, seed):
    """A tiny pipeline with random weights (seed ``seed``) written as a diffusers folder, as a teacher or reference."""
    load_pipeline(model, random_init=True, seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {model.name: saved_random(model, root / model.name, seed=1) for model in (TINY_SD3, TINY_SD15, TINY_WAN)}


def _config(model, teacher, *extra):
    return load_config(CONFIG, [f"model.path={model}", "model.random_init=true", f"model.teacher={teacher}",
                                "train.report_to=none", *extra])


@pytest.mark.parametrize("scale, task_weight", [(1.0, 0.0), (4.0, 0.5)])
def test_the_loss_is_the_students_squared_distance_to_the_guided_teacher_plus_the_task_loss(teachers, scale,
                                                                                             task_weight):
    config = _config(TINY_SD3, teachers["tiny-sd3"], f"objective.options.teacher_guidance_scale={scale}",
                     f"objective.options.task_weight={task_weight}")
    backbone, _ = build_models(config, torch.device("cpu"), frozen_reference=False)
    objective = OBJECTIVES["diffusion_distill"].build(config, backbone)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 1, *backbone.latent_shape(32), generator=g)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    randomness = objective.draw(2, tuple(latents.shape[2:]), g)
    loss, metrics = objective(backbone, latents, cond, randomness, backbone.denoiser, None)

    group = noised_group(latents, cond, schedule_for(backbone.scheduler), timesteps=randomness["timesteps"],
                         noise=randomness["noise"])
    with torch.no_grad():
        student = backbone.predict(group.noisy, group.model_timesteps, cond).float()
        conditional = backbone.predict(group.noisy, group.model_timesteps, cond, denoiser=objective.teacher).float()
        empty = backbone.encode_prompts([""]).repeat_items(2)
        unconditional = backbone.predict(group.noisy, group.model_timesteps, empty, denoiser=objective.teacher).float()
    teacher = unconditional + scale * (conditional - unconditional) if scale != 1.0 else conditional
    by_hand = (student - teacher).pow(2).mean() + task_weight * (student - group.target).pow(2).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["output_kd"], (student - teacher).pow(2).mean(), rtol=1e-4, atol=1e-6)
    assert not torch.equal(conditional, student)  # the teacher is the other model, not the student


@pytest.mark.parametrize("model", [TINY_SD15, TINY_WAN])
def test_training_brings_the_student_to_its_teacher(model, teachers, tmp_path):
    """Eight steps on the same four images: the distance to the teacher falls, on an epsilon UNet and on a flow video
    DiT (the images as one-frame clips); the loss by hand above runs on the SD3 MMDiT."""
    data = images_parquet(tmp_path / "images.parquet", 4)
    run = tmp_path / "run"
    train(_config(model, teachers[model.name], f"data.path={data}", f"output_dir={run}", "train.batch_size=4",
                  "train.max_steps=8", "train.checkpoint_every=0", "train.log_every=1", "train.learning_rate=1e-3",
                  "train.lora_rank=0",
                  "objective.options.teacher_guidance_scale=1.0", "objective.timestep_sampler=uniform",
                  "objective.t_range=[0.5, 0.5001]"))
    distances = [json.loads(line)["output_kd"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert distances[-1] < 0.75 * distances[0], distances  # 0.49 and 0.72 of it


def test_the_teacher_and_the_reference_are_loaded_frozen_as_the_config_names_them(teachers):
    teacher = load_pipeline(teachers["tiny-sd3"]).transformer.state_dict()
    config = _config(TINY_SD3, teachers["tiny-sd3"])
    backbone, _ = build_models(config, torch.device("cpu"), frozen_reference=False)
    loaded = OBJECTIVES["diffusion_distill"].build(config, backbone).teacher
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.items())
    # model.reference of a diffusion DPO run, LoRA and full: the other model, frozen, in place of the base
    for lora in ("8", "0"):
        dpo = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
            f"model.path={TINY_SD3}", "model.random_init=true", f"model.reference={teachers['tiny-sd3']}",
            f"train.lora_rank={lora}", "train.report_to=none"])
        _, reference = build_models(dpo, torch.device("cpu"), frozen_reference=True)
        assert reference is not None and not any(p.requires_grad for p in reference.parameters())
        assert all(torch.equal(reference.state_dict()[k], v) for k, v in teacher.items())


def test_a_diffusion_dpo_run_trains_against_the_reference_it_is_given(teachers, tmp_path):
    """The run's logged reference loss is the given model's denoising loss, not the base's (which is the policy's at
    the first step)."""
    from fixtures import pickapic_parquet

    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    runs = {}
    for name, extra in (("base", []), ("other", [f"model.reference={teachers['tiny-sd3']}"])):
        runs[name] = tmp_path / name
        train(load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
            f"model.path={TINY_SD3}", "model.random_init=true", f"data.path={data}", "data.resolution=32",
            f"output_dir={runs[name]}", "train.batch_size=2", "train.max_steps=1", "train.checkpoint_every=0",
            "train.log_every=1", "validation.every=0", "train.report_to=none", *extra]))
    first = {name: json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for name, run in runs.items()}
    assert first["base"]["ref_loss"] == pytest.approx(first["base"]["raw_model_loss"], rel=1e-4)
    assert first["other"]["ref_loss"] != pytest.approx(first["other"]["raw_model_loss"], rel=1e-2)


def test_settings_the_runs_cannot_use_are_refused(teachers):
    with pytest.raises(UserError, match="set model.teacher"):
        load_config(CONFIG, ["model.teacher=null"])
    with pytest.raises(UserError, match="has no teacher"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.teacher={teachers['tiny-sd3']}"])
    with pytest.raises(UserError, match="no fixed reference"):
        load_config(CONFIGS / "toy_self_npo.yaml", [f"model.reference={teachers['tiny-sd3']}"])
    config = _config(TINY_SD3, teachers["tiny-sd15"])
    backbone, _ = build_models(config, torch.device("cpu"), frozen_reference=False)
    with pytest.raises(UserError, match="must share the latents"):
        OBJECTIVES["diffusion_distill"].build(config, backbone)
    other_size = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        "model.path=assets/models/toy-base", f"model.reference={teachers['tiny-sd15']}", "train.report_to=none"])
    with pytest.raises(UserError, match="with the same config"):
        build_models(other_size, torch.device("cpu"), frozen_reference=True)


def test_the_memory_estimate_counts_the_teacher_and_the_other_reference(teachers):
    """A run's plan holds the frozen teacher (diffusion_distill) and model.reference (a LoRA run keeps no copy of the
    base otherwise) beside the trained model: each adds one denoiser's weights in train.reference_dtype."""
    from diffalign.train.memory import training_step_memory

    denoiser_gb = sum(t.numel() * 4 for t in load_pipeline(teachers["tiny-sd3"]).transformer.state_dict().values()) / 2**30
    dpo = [f"model.path={TINY_SD3}", "model.random_init=true", "train.report_to=none", "train.batch_size=1",
           "data.resolution=32"]
    base = training_step_memory(load_config(CONFIGS / "toy_diffusion_dpo.yaml", dpo))["weights_gb"]
    other = training_step_memory(load_config(CONFIGS / "toy_diffusion_dpo.yaml", [
        *dpo, f"model.reference={teachers['tiny-sd3']}"]))["weights_gb"]
    assert other - base == pytest.approx(denoiser_gb, rel=0.05)
    student = training_step_memory(_config(TINY_SD3, teachers["tiny-sd3"], "train.batch_size=1", "train.lora_rank=8",
                                           "objective.options.teacher_guidance_scale=1.0"))["weights_gb"]
    assert student - base == pytest.approx(denoiser_gb, rel=0.05)
