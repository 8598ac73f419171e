"""FSDP2 (diffalign/train/fsdp2.py): two CPU processes (torchrun, gloo), launched with the environment
`accelerate launch --config_file configs/accelerate/fsdp2.yaml` gives, each holding half of the denoiser,
train what one process trains at twice the batch; a sharded checkpoint resumes on one process and on two."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from fixtures import Started, launch_env, pickapic_parquet
from safetensors.torch import load_file

from diffalign.diffusion import load_pipeline
from diffalign.errors import UserError
from diffalign.objectives import OBJECTIVES
from diffalign.paths import ASSETS, CONFIGS, ROOT
from diffalign.train import load_config, train
from diffalign.train.fsdp2 import lockstep_share
from diffalign.train.sharding import check_sharding

TINY = ["model.random_init=true", "data.resolution=32", "train.checkpoint_every=0", "train.log_every=1",
        "train.lr_scheduler=constant", "train.warmup_steps=0", "validation.every=0",
        # rounding of another batch composition is not amplified: see test_train's two-process test
        "train.adam_epsilon=1e-3"]
ROUNDS = ["online.groups_per_round=2", "online.group_size=4", "online.steps_per_round=2", "objective.sample_steps=4"]
VALIDATION = ["validation.every=3", "validation.prompts=[a red circle, a blue square, a green triangle]",
              "validation.prompt_file=null", "validation.images_per_prompt=1", "validation.steps=2"]


def _runs(pairs: Path) -> dict[str, tuple[str, list[str]]]:
    """Name -> (config, overrides) at one process's batch; two processes run each at half of it."""
    sd3, flux = f"model.path={ASSETS / 'models/tiny-sd3'}", f"model.path={ASSETS / 'models/tiny-flux'}"
    dpo = [f"data.path={pairs}", "objective.beta=1.0", "train.learning_rate=0.05"]
    return {
        # LoRA (the reference: the base with adapters disabled), validation of 3 prompts on 2 processes (one pads),
        # a checkpoint at step 2 that the resume tests continue
        "dpo_lora": ("toy_diffusion_dpo.yaml", [sd3, *TINY, *dpo, "train.max_steps=3", "train.checkpoint_every=2",
                                                *VALIDATION]),
        # full fine-tune: a sharded frozen reference, an EMA of sharded weights
        "dpo_full": ("toy_diffusion_dpo.yaml", [flux, *TINY, *dpo, "train.max_steps=2", "train.lora_rank=0",
                                                "train.learning_rate=1e-3", "train.ema_decay=0.5"]),
        # online rounds: each process samples one group, in step with the other
        "grpo": ("toy_grpo.yaml", [sd3, *TINY, *ROUNDS, "train.max_steps=2", "train.learning_rate=1e-2"]),
        # second weight sets, copied into the shards: NFT's old policy beside the policy's pending backward, and
        # the self-play loop's pi_t, checkpointed at step 2 (resumed below)
        "nft": ("toy_nft.yaml", [sd3, *TINY, *ROUNDS, "train.max_steps=3", "train.learning_rate=1e-2"]),
        # (JPEG size as the reward: a random model's images differ in it, where the toy reward sees no colour; beta
        # 0.01, as the authors' 0.001, makes the target log-ratios large enough to move the weights)
        "sppo": ("toy_sppo.yaml", [sd3, *TINY, *ROUNDS, "train.max_steps=3", "train.learning_rate=1e-2",
                                   "train.checkpoint_every=2", "online.reward=jpeg_compressibility",
                                   "objective.beta=0.01"]),
        # a language model, full: its round sampled by both processes in step (synced generation), its tied
        # embedding and head saved once in the shards and whole in the final weights
        "lm_online_dpo": ("toy_lm_online_dpo.yaml", ["online.groups_per_round=4", "online.steps_per_round=2",
                                                     "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
                                                     "train.lora_rank=0", "train.learning_rate=1e-3",
                                                     "train.adam_epsilon=1e-3"]),
    }


def _batch(config: str, overrides: list[str], processes: int) -> str:
    one = load_config(CONFIGS / config, overrides).train.batch_size
    return f"train.batch_size={one // processes}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    files = list(final.glob("*.safetensors")) or list(final.glob("*/diffusion_pytorch_model.safetensors"))
    return {key: value for f in files for key, value in load_file(f).items()}


def _update_size(weights: dict[str, torch.Tensor], model: str) -> float:
    """How far training moved the weights: a LoRA's up/B matrices (zero at the start), or the whole denoiser from
    the random base it started at."""
    lora = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    if lora:
        return max(v.abs().max().item() for v in lora)
    if model == "lm":
        base = load_file(ASSETS / "models/toy-lm/model.safetensors")
        return max((weights[k] - v).abs().max().item() for k, v in base.items())
    base = load_pipeline(model.removeprefix("model.path="), random_init=True, seed=0).transformer.state_dict()
    return max((weights[k] - v).abs().max().item() for k, v in base.items())


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_what_one_process_does(tmp_path):
    """Diffusion-DPO (LoRA, with validation; full, with an EMA), Flow-GRPO, DiffusionNFT and SPPO on tiny SD3 and
    FLUX, and online DPO on the toy language model: two FSDP2 processes at half the batch end with the weights of one
    process (to float rounding, far below the updates) and log the same losses and validation scores. Their
    checkpoints (each process's shards as safetensors, no pickle of weights) resume: SPPO's, stopped at step 2 of 3,
    on the same two processes (its pi_t read back as shards), Diffusion-DPO's on one process."""
    pairs = pickapic_parquet(tmp_path / "pairs.parquet", 8)
    runs = _runs(pairs)
    launch = []
    for name, (config, overrides) in runs.items():
        two = [*overrides, _batch(config, overrides, 2), f"output_dir={tmp_path / name}_2"]
        if name == "sppo":  # stopped at its checkpoint, then resumed by the same launch
            launch.append([str(CONFIGS / config), [*two, "train.max_steps=2"]])
            two.append("train.resume=latest")
        launch.append([str(CONFIGS / config), two])
    (tmp_path / "runs.json").write_text(json.dumps(launch))
    torchrun = Started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests/launch_runs.py"), str(tmp_path / "runs.json")],
                       env=launch_env(ROOT / "configs/accelerate/fsdp2.yaml"))
    for name, (config, overrides) in runs.items():  # beside them
        train(load_config(CONFIGS / config, [*overrides, _batch(config, overrides, 1), f"output_dir={tmp_path / name}"]))
    done = torchrun.result(timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "dpo_lora_2/checkpoints/step-0000002/sharded_state").is_dir()
    for name in runs:
        one, sharded = _weights(tmp_path / name), _weights(tmp_path / f"{name}_2")
        assert one.keys() == sharded.keys()
        model = runs[name][1][0] if name != "lm_online_dpo" else "lm"
        assert _update_size(one, model) > 1e-3, name  # measured: 0.03 and more
        for key in one:
            torch.testing.assert_close(sharded[key], one[key], atol=2e-5, rtol=0, msg=f"{name} {key}")
        assert _losses(tmp_path / f"{name}_2") == pytest.approx(_losses(tmp_path / name), rel=1e-4, abs=1e-6)
    # each process sampled and scored every other group of a round, the main process joined them: the round one
    # process samples (each group draws from its own generator), its parts cleaned up; the bar shows its own share
    assert "round 0: sampling 1 groups of 4" in done.stderr and "sampling 2 groups" not in done.stderr
    one, two = (tmp_path / run / "rounds/round-00000" for run in ("grpo", "grpo_2"))
    a, b = (load_file(folder / "trajectories.safetensors") for folder in (one, two))
    assert a.keys() == b.keys() and a["latents"].shape[0] == 8
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-3)
    record = {run: json.loads((folder / "groups.json").read_text()) for run, folder in (("one", one), ("two", two))}
    assert record["one"]["prompts"] == record["two"]["prompts"]
    torch.testing.assert_close(torch.tensor(record["two"]["rewards"]), torch.tensor(record["one"]["rewards"]),
                               rtol=0, atol=1e-3)
    assert sorted(p.name for p in (two / "images").iterdir()) == [f"group{i:04d}-{j}.png" for i in range(2)
                                                                   for j in range(4)]
    assert not list(two.glob("part-*"))
    validated = [[json.loads(x) for x in (tmp_path / run / "validation.jsonl").read_text().splitlines()]
                 for run in ("dpo_lora", "dpo_lora_2")]
    assert [x["step"] for x in validated[1]] == [0, 3]
    for one, two_ in zip(*validated):
        assert two_["val_toy_preference"] == pytest.approx(one["val_toy_preference"], rel=1e-5, abs=1e-7)

    # Diffusion-DPO's two-process checkpoint at step 2 continued on one process, without sharding
    shutil.copytree(tmp_path / "dpo_lora_2/checkpoints", tmp_path / "dpo_lora_resumed/checkpoints")
    config, overrides = runs["dpo_lora"]
    train(load_config(CONFIGS / config, [*overrides, _batch(config, overrides, 1), "train.resume=latest",
                                         f"output_dir={tmp_path / 'dpo_lora_resumed'}"]))
    straight, resumed = _weights(tmp_path / "dpo_lora"), _weights(tmp_path / "dpo_lora_resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=2e-5, rtol=0, msg=key)

def test_lockstep_shares_pad_to_the_largest():
    """3 validation images on 2 processes: process 0 samples 0 and 2, process 1 samples 1 and a padding copy of
    image 0 that it drops; as many forwards on both, which sharded weights need."""
    assert lockstep_share(3, 0, 2) == ([0, 2], 2)
    assert lockstep_share(3, 1, 2) == ([1, 0], 1)
    assert lockstep_share(1, 1, 4) == ([0], 0)
    assert lockstep_share(8, 3, 4) == ([3, 7], 2)


def _launched(version: int, processes: int = 8) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version),
                                                 deepspeed_plugin=None))


def test_fsdp2_runs_what_fsdp1_refuses_and_names_what_it_cannot():
    """FSDP2 takes LoRA, validation, online rounds and second weight sets; it refuses fp16 (its loss scaling) and a
    round that 8 processes cannot split evenly, each named. FSDP1 still refuses what runs the bare module."""
    def config(name, *overrides):
        return load_config(CONFIGS / name, ["model.path=x", "data.path=y", *overrides])

    for name in ("tiny_sdxl_dpo.yaml", "toy_grpo.yaml", "toy_sppo.yaml", "toy_nft.yaml", "toy_self_npo.yaml"):
        cfg = config(name)
        check_sharding(_launched(2), cfg, OBJECTIVES[cfg.objective.name])
    lora = config("tiny_sdxl_dpo.yaml")
    with pytest.raises(UserError, match=r"shard the weights.*train.lora_rank > 0.*fsdp2.yaml"):
        check_sharding(_launched(1), lora, OBJECTIVES["diffusion_dpo"])
    with pytest.raises(UserError, match=r"FSDP2.*train.mixed_precision=fp16.*use bf16"):
        check_sharding(_launched(2), config("tiny_sdxl_dpo.yaml", "train.mixed_precision=fp16"),
                       OBJECTIVES["diffusion_dpo"])
    with pytest.raises(UserError, match=r"online.groups_per_round=12 is not a multiple of the 8 processes"):
        check_sharding(_launched(2), config("toy_grpo.yaml", "online.groups_per_round=12"), OBJECTIVES["grpo"])
    check_sharding(_launched(2, processes=4), config("toy_grpo.yaml", "online.groups_per_round=12"),
                   OBJECTIVES["grpo"])


def test_the_shipped_fsdp2_configs_launch_fsdp2_with_their_memory_options():
    """What each shipped accelerate config sets, read as accelerate launch reads it, and the plugin diffalign builds
    from it on a machine without GPUs."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    for name, offload, checkpointing in (("fsdp2", False, False), ("fsdp2_offload", True, False),
                                         ("fsdp2_checkpointing", False, True)):
        env = launch_env(ROOT / f"configs/accelerate/{name}.yaml")
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                if key.startswith(("FSDP_", "ACCELERATE_")):
                    patch.setenv(key, value)
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == offload, name
        assert plugin.activation_checkpointing == checkpointing, name
