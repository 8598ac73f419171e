"""What a run whose weights are sharded across processes (FSDP, DeepSpeed ZeRO-3) can do.

Under FSDP2 (:mod:`diffalign.train.fsdp2`) the denoiser is sharded in place, so every caller of
the module gathers its weights block by block: LoRA runs (the reference is the base with its
adapters disabled), validation, the online rounds (each process sampling its share in step with
the others) and second weight sets (:class:`~diffalign.diffusion.shadow.ShadowWeights`, copied
into the shards for their forward) all run; fp16 loss scaling and rounds that cannot be split
evenly are refused.

Under FSDP1 or ZeRO-3 accelerate wraps the model, and whatever runs the bare module outside that
wrapper would see a shard: validation samples and online rounds, the LoRA reference and shadow
weights. Such runs are refused before any model loads, with the way out, instead of failing on a
shape mismatch or hanging in a collective.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from diffalign.errors import UserError
from diffalign.objectives.base import Objective
from diffalign.train.config import Config
from diffalign.train.fsdp2 import fsdp2_plugin


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP, or DeepSpeed with ZeRO stage 3 (stages 1-2 shard only optimiser state and gradients)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def fsdp2_conflicts(config: Config, objective: type[Objective], processes: int) -> list[str]:
    """The parts of ``config`` that FSDP2 does not run; empty when it runs them all."""
    conflicts = []
    if config.train.mixed_precision == "fp16":
        conflicts.append("train.mixed_precision=fp16 (its loss scaling is not built for sharded weights: use bf16)")
    # (a text round is sampled whole by every process: no share to split)
    if objective.dataset == "online" and not objective.samples_in_loss and objective.family != "lm" and \
            config.online.groups_per_round % processes:
        conflicts.append(f"online.groups_per_round={config.online.groups_per_round} is not a multiple of the "
                         f"{processes} processes (each samples as many groups as the others, in step)")
    return conflicts


def sharding_conflicts(config: Config, objective: type[Objective]) -> list[str]:
    """The parts of ``config`` that need the whole weights on a process under FSDP1 or ZeRO-3; empty when
    sharding is fine."""
    name, validation = config.objective.name, config.validation
    conflicts = []
    if config.train.lora_rank > 0:
        conflicts.append("train.lora_rank > 0 (the reference is the base run with its adapters disabled)")
    if validation.every > 0 and (validation.prompts or validation.prompt_file):
        conflicts.append("validation.every > 0 (validation samples on the main process alone)")
    if objective.dataset == "online":
        conflicts.append(f"objective.name={name} (its rounds are sampled on the main process alone)")
    if objective.shadow_weights:
        conflicts.append(f"objective.name={name} (it runs the denoiser with a second set of weights)")
    return conflicts


def check_sharding(accelerator: Accelerator, config: Config, objective: type[Objective]) -> None:
    """Raise a :class:`UserError` naming what a sharded run cannot do, and what to use instead."""
    if fsdp2_plugin(accelerator) is not None:
        conflicts = fsdp2_conflicts(config, objective, accelerator.num_processes)
        if conflicts:
            raise UserError(f"FSDP2 shards the denoiser across the processes, and this run has what it does not run "
                            f"yet: {'; '.join(conflicts)}. Launch it with DDP (configs/accelerate/ddp.yaml), which keeps "
                            "the whole weights on every GPU, or change those settings")
        return
    conflicts = sharding_conflicts(config, objective) if shards_parameters(accelerator) else []
    if conflicts:
        raise UserError(
            "FSDP and ZeRO-3 shard the weights across processes, so no process can run the whole denoiser on its "
            f"own, which this run needs: {'; '.join(conflicts)}. Launch it with DDP or ZeRO-2 instead "
            "(configs/accelerate/ddp.yaml, deepspeed_zero2.yaml), which keep the whole weights on every GPU. "
            "FSDP2 (configs/accelerate/fsdp2.yaml) runs them sharded."
        )
