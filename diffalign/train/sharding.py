"""What a run whose weights are sharded across processes (FSDP, DeepSpeed ZeRO-3) can do.

Under FSDP or ZeRO-3 no process holds the whole denoiser: each keeps a shard and gathers the
rest inside the wrapper's forward. Whatever runs the bare module outside that wrapper would see
a shard: validation samples and online rounds (each process its share, through the bare
module), the LoRA reference (the base with adapters disabled) and shadow weights
(Self-NPO's EMA teacher, DDO's round snapshot). Such runs are refused before any model loads,
with the way out, instead of failing on a shape mismatch or hanging in a collective.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from diffalign.errors import UserError
from diffalign.objectives.base import Objective
from diffalign.train.config import Config


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP, or DeepSpeed with ZeRO stage 3 (stages 1-2 shard only optimiser state and gradients)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def sharding_conflicts(config: Config, objective: type[Objective]) -> list[str]:
    """The parts of ``config`` that need the whole weights on a process; empty when sharding is fine."""
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
    conflicts = sharding_conflicts(config, objective) if shards_parameters(accelerator) else []
    if conflicts:
        raise UserError(
            "FSDP and ZeRO-3 shard the weights across processes, so no process can run the whole denoiser on its "
            f"own, which this run needs: {'; '.join(conflicts)}. Launch it with DDP or ZeRO-2 instead "
            "(configs/accelerate/ddp.yaml, deepspeed_zero2.yaml), which keep the whole weights on every GPU. "
            "FSDP suits full fine-tunes of the offline objectives (configs/sdxl_dpo_full.yaml): set "
            "validation.every=0 and evaluate the final weights with `diffalign eval`."
        )
