"""Context parallelism (``train.context_parallel``, :mod:`diffalign.train.context_parallel`): a clip's tokens split
over two CPU processes (gloo) train what one process trains on the whole clip, and what cannot be split is refused
before the first step, with the numbers."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fixtures import Started, launch_env
from run_configs import cpu_overrides, recipe_data
from safetensors.torch import load_file

from diffalign.diffusion import load_pipeline
from diffalign.errors import UserError
from diffalign.paths import ROOT
from diffalign.train import load_config, train
from diffalign.train.context_parallel import DataShare, _token_check, check_splittable, data_share

WAN = ROOT / "assets" / "models" / "tiny-wan"


def test_groups_of_consecutive_processes_share_the_data_as_one_process_each():
    assert [data_share(rank, 4, 2) for rank in range(4)] == [DataShare(0, 2, True), DataShare(0, 2, False),
                                                                DataShare(1, 2, True), DataShare(1, 2, False)]
    assert data_share(1, 2, 1) == DataShare(1, 2, True)  # off: one share per process
    with pytest.raises(UserError, match="3 processes must be a multiple of it"):
        data_share(0, 3, 2)


def _one_process_and_a_group_of_two(tmp_path, common: list[str], env: dict,
                                    stopped_at: int | None = None) -> tuple[dict, dict]:
    """Train ``common`` (a config, then its overrides) as two processes of one context-parallel group (``two``) and,
    beside it, as one process (``one``); the final LoRA weights of each. With ``stopped_at`` the group's run stops
    at that step's checkpoint and the same launch resumes it (``tests/launch_runs.py``)."""
    two = [*common[1:], f"output_dir={tmp_path / 'two'}", "train.context_parallel=2"]
    runs = [[common[0], two]]
    if stopped_at is not None:
        runs = [[common[0], [*two, f"train.max_steps={stopped_at}", f"train.checkpoint_every={stopped_at}"]],
                [common[0], [*two, "train.resume=latest"]]]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    two = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(ROOT / "tests" / "launch_runs.py"), str(tmp_path / "runs.json")], env=env)
    train(load_config(common[0], [*common[1:], f"output_dir={tmp_path / 'one'}"]))
    two = two.result()
    assert two.returncode == 0, two.stderr[-3000:]
    return tuple(load_file(tmp_path / run / "final" / "pytorch_lora_weights.safetensors") for run in ("one", "two"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp2"])
def test_two_processes_splitting_each_clip_train_and_validate_what_one_process_does(tmp_path, launcher):
    """The Wan2.1 recipe on the tiny Wan (12 tokens a clip), 2 clips a step, in fp32: one process, and two processes
    of one context-parallel group, under DDP or under FSDP2 (configs/accelerate/fsdp2.yaml's environment) (each attends with 1 of the 2 heads over all 12 tokens, and its gradients hold its 6
    tokens' part). Both read the same pairs and draw the same noise, so the LoRA weights agree to float rounding
    (the all-to-all and the gradients' all-reduce sum in another order) and the validation's clips, sampled by the
    group in step, score the same. As in tests/test_train.py's comparison of two processes with one, beta 1 instead
    of 2500 (which multiplies the rounding in the loss: at 2500 the runs drift 20% apart in 3 steps, the loss's
    sigmoid saturated). Adam's epsilon at 0.1, far above the gradients' scale, makes each update proportional to its
    gradient (as SGD's), so a gradient off by the group's factor shows as such instead of being normalised away."""
    common = [str(ROOT / "configs" / "wan21_dpo.yaml"), *cpu_overrides("wan21_dpo.yaml", recipe_data(tmp_path / "data")),
              "train.batch_size=2", "train.max_steps=3", "objective.beta=1.0", "train.log_every=1",
              "train.checkpoint_every=0", "train.learning_rate=1.0", "train.lr_scheduler=constant",
              "train.warmup_steps=0", "train.adam_epsilon=0.1", "train.mixed_precision=no",
              "train.report_to=none", "data.cache_dir=null", "data.precompute=false",
              "validation.prompts=[a red triangle moving, a green circle moving, a blue square moving]",
              "validation.every=3", "validation.images_per_prompt=1", "validation.steps=2",
              "validation.rewards=[toy_video_preference]"]
    env = launch_env(ROOT / "configs/accelerate/fsdp2.yaml") if launcher == "fsdp2" else \
        {**os.environ, "OMP_NUM_THREADS": "1"}
    one_w, two_w = _one_process_and_a_group_of_two(tmp_path, common, env)
    moved = max(v.abs().max().item() for k, v in one_w.items() if "lora.up" in k)
    # measured: 3.9e-3, the runs 1.7e-4 apart; without the loss scaled by the degree, 1.9e-3 apart (half the update)
    assert moved > 1e-3
    for k in one_w:
        torch.testing.assert_close(one_w[k], two_w[k], atol=moved * 0.1, rtol=0)
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [r["raw_model_loss"] for r in logs[1]] == pytest.approx([r["raw_model_loss"] for r in logs[0]], rel=1e-4)
    one_val, two_val = ([json.loads(line) for line in (tmp_path / run / "validation.jsonl").read_text().splitlines()]
                        for run in ("one", "two"))
    assert [v["step"] for v in two_val] == [0, 3]
    assert [v["val_toy_video_preference"] for v in two_val] == pytest.approx(
        [v["val_toy_video_preference"] for v in one_val], abs=1e-4)


@pytest.mark.slow
def test_a_group_of_two_processes_samples_and_trains_online_rounds_as_one_process(tmp_path):
    """Flow-GRPO on the tiny Wan2.2 (the Wan2.2 GRPO recipe's CPU overrides; 2 groups of 4 clips a round): one process,
    and two processes of one context-parallel group, which sample the round's groups together (each forward split
    over them, the part written by the group's first) and train on the same units (scored by the toy video world's
    preference, which tells the random model's clips apart). The rounds' clips and rewards agree to float rounding,
    and the LoRA weights after a round's 2 steps too, the group's run stopped after its first step and resumed (learning rate 1; the random model's policy gradients are about 1e-7, so Adam's epsilon
    is 1e-5 here, far above them, for updates proportional to them as above)."""
    common = [str(ROOT / "configs" / "wan22_grpo.yaml"), *cpu_overrides("wan22_grpo.yaml", recipe_data(tmp_path / "d")),
              "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=0", "train.learning_rate=1.0",
              "train.adam_epsilon=1.0e-5", "train.mixed_precision=no", "train.report_to=none",
              "objective.options.ratio_clip=0.5", "online.reward=toy_video_preference"]
    one_w, two_w = _one_process_and_a_group_of_two(tmp_path, common, {**os.environ, "OMP_NUM_THREADS": "1"},
                                                   stopped_at=1)
    assert (tmp_path / "two" / "checkpoints" / "step-0000001").is_dir()
    assert [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    rounds = [tmp_path / run / "rounds" / "round-00000" for run in ("one", "two")]
    records = [json.loads((folder / "groups.json").read_text()) for folder in rounds]
    assert records[1]["prompts"] == records[0]["prompts"]
    rewards = [torch.tensor(record["rewards"]) for record in records]
    assert rewards[0].std(dim=1).min() > 1e-3  # measured 1.4e-3: each group's clips differ, so advantages do
    torch.testing.assert_close(rewards[1], rewards[0], atol=1e-5, rtol=0)
    latents = [load_file(folder / "trajectories.safetensors")["latents"] for folder in rounds]
    torch.testing.assert_close(latents[1], latents[0], atol=1e-4, rtol=0)
    moved = max(v.abs().max().item() for k, v in one_w.items() if "lora.up" in k or "lora_B" in k)
    assert moved > 1e-3
    for k in one_w:
        torch.testing.assert_close(one_w[k], two_w[k], atol=moved * 0.1, rtol=0)


@pytest.mark.parametrize("config, keys, why", [
    ("toy_alignprop.yaml", [], "samples inside its loss, each process apart"),
    ("toy_lm_dpo.yaml", [], "a language model's sequences are not split"),
    ("wan21_dpo.yaml", ["model.compile=true"], "model.compile traces the transformer"),
])
def test_what_a_split_transformer_cannot_run_is_refused_with_the_config(config, keys, why):
    with pytest.raises(UserError, match=why):
        load_config(ROOT / "configs" / config, ["train.context_parallel=2", *keys])
    with pytest.raises(UserError, match="train.context_parallel must be >= 1"):
        load_config(ROOT / "configs" / config, ["train.context_parallel=0"])


def test_a_denoiser_diffusers_cannot_split_or_whose_heads_do_not_divide_is_refused():
    unet = load_pipeline(ROOT / "assets" / "models" / "tiny-sd15", random_init=True).unet
    with pytest.raises(UserError, match="UNet2DConditionModel does not"):
        check_splittable(unet, 2)
    wan = load_pipeline(WAN, random_init=True).transformer  # 2 heads
    check_splittable(wan, 2)
    with pytest.raises(UserError, match="1/4 of the attention heads, and WanTransformer3DModel has 2"):
        check_splittable(wan, 4)
    # the memory estimate refuses the same model rather than estimating it unsplit, and leaves no process group
    import torch.distributed as dist

    from diffalign.train.memory import training_step_memory

    config = load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml", [
        "model.path=" + str(ROOT / "assets" / "models" / "tiny-sdxl"), "train.context_parallel=2"])
    with pytest.raises(UserError, match="UNet2DConditionModel does not"):
        training_step_memory(config)
    assert not dist.is_initialized()


def test_tokens_that_do_not_split_evenly_are_named_before_the_transformer_runs():
    """A clip of 1 latent frame of 3 x 3 patches: 9 tokens, which 2 processes cannot share equally."""
    wan = load_pipeline(WAN, random_init=True).transformer
    first = wan.get_submodule("blocks.0")
    first.register_forward_pre_hook(_token_check(first, "blocks.0", type(wan)._cp_plan["blocks.0"], 2),
                                    with_kwargs=True)
    latents = torch.randn(1, wan.config.in_channels, 1, 6, 6)
    text = torch.randn(1, 4, wan.config.text_dim)
    with pytest.raises(UserError, match="blocks.0's hidden_states holds 9 tokens, which do not split into 2"):
        wan(latents, torch.tensor([500]), text)
    wan(torch.randn(1, wan.config.in_channels, 2, 6, 6), torch.tensor([500]), text)  # 18 tokens: fine



def test_the_memory_estimate_counts_one_process_s_share_of_the_tokens():
    """The estimate of scripts/bench_memory.py and --plan on one process of a group (a fake process group of 2,
    made and removed by the estimate): the same weights, fewer activations. Tiny Wan, 5 latent frames of 4 x 6
    patches: 0.66 of one process's activations (the text tokens, the timestep's and the gathered output stay
    whole); Wan2.1 1.3B at 81 frames of 832 x 480 over 4 processes: 3.5 instead of 13.6 GiB (docs/video.md)."""
    import torch.distributed as dist

    from diffalign.train.memory import training_step_memory

    rows = {degree: training_step_memory(load_config(ROOT / "configs" / "wan21_dpo.yaml", [
        f"model.path={WAN}", "model.random_init=true", "data.frames=17", "data.resolution=64", "data.width=96",
        "model.gradient_checkpointing=false", f"train.context_parallel={degree}"])) for degree in (1, 2)}
    assert not dist.is_initialized()
    assert rows[2]["weights_gb"] == rows[1]["weights_gb"] and rows[2]["grads_gb"] == rows[1]["grads_gb"]
    assert 0.5 < rows[2]["activations_gb"] / rows[1]["activations_gb"] < 0.7  # measured: 0.656


def test_the_plan_counts_a_group_s_samples_per_step():
    from diffalign.recipes.plan import plan_lines

    text = "\n".join(plan_lines(ROOT / "configs" / "wan21_dpo.yaml", ["train.context_parallel=4"], memory=False))
    assert "= 32 pairs per group of 4 GPUs per step (each splits every sample's tokens); with N groups" in text
