"""Both of Wan2.2 A14B's experts in one run (model.expert=both, issue 47): one module (ExpertPair) denoises each item
with the expert of its timestep, each expert trains its own LoRA, the run saves and loads them as diffusers keeps
Wan2.2 LoRAs (the low-noise one loaded into transformer_2), a checkpoint evaluates as the run left it, and two DDP
processes train when a process's batch reaches one expert only."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.experts import ExpertPair
from diffalign.paths import ASSETS, CONFIGS

ROOT = ASSETS.parent
TINY_WAN22 = ASSETS / "models" / "tiny-wan22"

pytest.importorskip("av")


def test_the_pair_sends_each_item_to_the_expert_of_its_timestep():
    """predict with model.expert=both: items at or above 875 go through transformer, the others through
    transformer_2, in their order; the trained module is the pair of both, and no expert is left among the frozen
    components (which a run casts and moves off the GPU)."""
    pipe = load_pipeline(TINY_WAN22, random_init=True, seed=0)
    backbone = backbone_for(pipe, frames=5, expert="both")
    assert isinstance(backbone.denoiser, ExpertPair) and backbone.boundary == 875.0
    assert backbone.timestep_share() == (0.0, 1.0) and bool(backbone.serves(torch.tensor([10.0, 990.0])).all())
    assert not {"transformer", "transformer_2"} & set(backbone.frozen_components())
    cond = backbone.encode_prompts(["a", "b", "c"])
    latents = torch.randn(3, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([500.0, 900.0, 875.0])
    with torch.no_grad():
        both = backbone.predict(latents, timesteps, cond)
        for item, module in enumerate((pipe.transformer_2, pipe.transformer, pipe.transformer)):
            alone = module(hidden_states=latents[item:item + 1], timestep=timesteps[item:item + 1],
                           encoder_hidden_states=cond.embeds[item:item + 1], return_dict=False)[0]
            torch.testing.assert_close(both[item:item + 1], alone)


def _run(tmp_path: Path, recipe: str, data: Path, *extra: str) -> Path:
    from diffalign.train import load_config, train

    base = tmp_path / "wan22"
    if not base.is_dir():
        load_pipeline(TINY_WAN22, random_init=True, seed=0).save_pretrained(base)
    train(load_config(CONFIGS / recipe, [
        f"model.path={base}", "model.random_init=false", "model.expert=both", f"data.path={data}",
        "data.resolution=32", "data.width=null", "data.frames=5", "data.fps=0", "train.batch_size=2",
        "train.gradient_accumulation=1", "train.max_steps=4", "train.warmup_steps=0", "train.learning_rate=1e-2",
        "train.checkpoint_every=2", "train.log_every=1", "train.report_to=none", "validation.every=0",
        "data.precompute=false",
        "data.cache_dir=null", f"output_dir={tmp_path / 'run'}", *extra]))
    return tmp_path / "run"


@pytest.mark.slow
def test_a_run_of_both_experts_trains_each_its_own_lora_and_loads_into_both(tmp_path):
    """Diffusion-DPO with model.expert=both on 5-frame clips: draws timesteps across the whole schedule, so both
    experts' LoRAs move; final/ holds the high-noise expert's LoRA and final/transformer_2/ the low-noise one's, each
    a transformer LoRA as diffusers saves Wan2.2 LoRAs; the run loads with each in its own expert, a checkpoint too;
    diffalign export --format lora writes both, from the run and from a checkpoint."""
    from diffalign.diffusion.finetuned import load_finetuned
    from diffalign.recipes.samples import pickapic_parquet
    from diffalign.train.export import export_run

    data = pickapic_parquet(tmp_path / "pairs.parquet", 8, frames=5)
    run = _run(tmp_path, "wan21_dpo.yaml", data)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    high = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    low = load_file(run / "final" / "transformer_2" / "pytorch_lora_weights.safetensors")
    for lora in (high, low):
        assert all(key.startswith("transformer.") for key in lora)
        assert max(v.abs().max() for k, v in lora.items() if "lora_B" in k or ".up." in k) > 0
    assert any(not torch.equal(high[k], low[k]) for k in high)
    loaded = load_finetuned(run)
    for attr, lora in (("transformer", high), ("transformer_2", low)):  # each expert has its own file's up weights
        loaded_up = sorted(float(p.detach().abs().sum()) for n, p in getattr(loaded, attr).named_parameters()
                           if "lora_B" in n)
        saved_up = sorted(float(v.abs().sum()) for k, v in lora.items() if "lora_B" in k or ".up." in k)
        assert loaded_up and loaded_up == pytest.approx(saved_up, rel=1e-5), attr
    step = load_finetuned(run / "checkpoints" / "step-0000004")  # the last step: the final weights, unfolded
    base = load_pipeline(tmp_path / "wan22")
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for attr in ("transformer", "transformer_2"):
            outputs = [getattr(pipe, attr)(hidden_states=latents, timestep=torch.tensor([500.0]),
                                           encoder_hidden_states=text, return_dict=False)[0]
                       for pipe in (loaded, step, base)]
            torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
            assert (outputs[0] - outputs[2]).abs().max() > 1e-4, attr  # the trained expert differs from its base
    exported = export_run(run, "lora", tmp_path / "export")
    assert exported.is_file() and (exported.parent / "transformer_2" / exported.name).is_file()
    at_step = export_run(run / "checkpoints" / "step-0000004", "lora", tmp_path / "export-step")  # written afresh
    for name in (at_step.name, f"transformer_2/{at_step.name}"):
        assert load_file(at_step.parent / name).keys() == load_file(exported.parent / name).keys()


@pytest.mark.slow
def test_grpo_trains_both_experts_on_every_step_of_its_rounds(tmp_path):
    """Flow-GRPO with model.expert=both: the rounds sample with both experts and every stochastic step trains, each
    through its own expert's LoRA."""
    run = _run(tmp_path, "toy_grpo.yaml", tmp_path / "unused", "train.max_steps=2", "online.groups_per_round=2",
               "online.sample_batch_size=2", "online.steps_per_round=2", "online.group_size=2",
               "objective.sample_steps=6", "online.reward=jpeg_incompressibility", "train.checkpoint_every=0",
               "data.path=''")
    for path in (run / "final" / "pytorch_lora_weights.safetensors",
                 run / "final" / "transformer_2" / "pytorch_lora_weights.safetensors"):
        lora = load_file(path)
        assert max(v.abs().max() for k, v in lora.items() if "lora_B" in k or ".up." in k) > 0, path


@pytest.mark.slow
def test_two_processes_train_both_experts_when_a_process_batch_reaches_one(tmp_path):
    """Under DDP on two processes, one pair each: each pair's timestep reaches one expert, so the other expert's
    LoRA has no gradient on that process; the pair joins it with zeros, DDP does not wait on it, and the run keeps
    in step with the one-process run of the same pairs (the gradients are averaged alike); both experts train."""
    from fixtures import run_together

    from diffalign.recipes.samples import pickapic_parquet

    data = pickapic_parquet(tmp_path / "pairs.parquet", 8, frames=5)
    base = tmp_path / "wan22"
    load_pipeline(TINY_WAN22, random_init=True, seed=0).save_pretrained(base)
    command = ["-m", "diffalign", "train", str(CONFIGS / "wan21_dpo.yaml"), f"model.path={base}",
               "model.random_init=false", "model.expert=both", f"data.path={data}", "data.resolution=32",
               "data.width=null", "data.frames=5", "data.fps=0", "train.gradient_accumulation=1", "train.max_steps=4",
               "train.warmup_steps=0", "train.checkpoint_every=0", "train.report_to=none", "validation.every=0",
               "data.precompute=false", "data.cache_dir=null", "train.mixed_precision=no", "train.log_every=1"]
    launches = {"one": [sys.executable, *command, "train.batch_size=2", f"output_dir={tmp_path / 'one'}"],
                "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *command, "train.batch_size=1", f"output_dir={tmp_path / 'two'}"]}
    done = run_together(launches, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    for name, result in done.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in launches}
    # the first step's losses agree to rounding; after one AdamW step, whose first update is nearly the sign of each
    # gradient, the rounding of another batch split shows in the fourth digit (as it does for one expert alone)
    assert losses["one"][0] == pytest.approx(losses["two"][0], rel=1e-6)
    assert losses["one"][1:] == pytest.approx(losses["two"][1:], rel=1e-2)
    for path in (tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors",
                 tmp_path / "two" / "final" / "transformer_2" / "pytorch_lora_weights.safetensors"):
        assert max(v.abs().max() for k, v in load_file(path).items() if "lora_B" in k or ".up." in k) > 0, path


def test_saving_both_experts_from_a_state_dict_without_their_names_fails_loudly(tmp_path):
    """The final weights of a run of both experts are split by their names in the pair (high.*, low.*); a state dict
    named otherwise is refused rather than saved as an empty expert."""
    from diffalign.train.weights import save_final_weights

    backbone = backbone_for(load_pipeline(TINY_WAN22, random_init=True, seed=0), frames=5, expert="both")
    unnamed = backbone.denoiser.high.state_dict()
    with pytest.raises(ValueError, match="no weights of the high-noise expert"):
        save_final_weights(backbone, backbone.denoiser, unnamed, tmp_path / "final", lora=False)
    save_final_weights(backbone, backbone.denoiser, backbone.denoiser.state_dict(), tmp_path / "final", lora=False)
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["transformer", "transformer_2"]
