"""FSDP2: the denoiser's weights, gradients and optimiser state sharded across processes.

``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` asks for it (``fsdp_version: 2``).
diffalign shards the denoiser itself with torch's ``fully_shard`` (each transformer or UNet block
named in the model's ``_no_split_modules``, then the whole model), the same on GPUs and on CPUs
with gloo: accelerate turns its FSDP plugin on only when it sees GPUs, and a CPU test of
accelerate's own path would not test this one. ``fully_shard`` changes the module in place, so
every caller of the denoiser (the objective's forwards, the LoRA reference with its adapters
disabled, the online rounds' sampler, validation) calls the sharded module, whose forward gathers
each block's weights just before the block runs and frees them after: no process ever holds the
whole model. Every process must therefore run the denoiser the same number of times
(:func:`lockstep_share`, :func:`diffalign.sharded.most_over_processes`).

Checkpoints hold each process's shard of the trained weights and of AdamW's moments through torch's
distributed checkpoint (DCP) as safetensors (``HuggingFaceStorageWriter``): no pickle, and a run
resumes on another number of processes (DCP reshards on load). The final weights are gathered into
the usual files on the main process.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from diffalign.diffusion.experts import ExpertPair
from diffalign.errors import UserError
from diffalign.sharded import SHARDED_STATE

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp2_plugin(accelerator: Accelerator) -> FullyShardedDataParallelPlugin | None:
    """The FSDP2 settings this launch asked for, or None when it asked for no FSDP2.

    On GPUs accelerate builds the plugin from ``accelerate launch``'s environment; on CPUs it ignores
    that environment, and the same plugin is built here from it. An FSDP1 launch (``fsdp_version: 1``)
    gives None: accelerate wraps the model itself then (:mod:`diffalign.train.sharding`)."""
    if accelerator.num_processes < 2:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    else:
        return None
    return plugin if plugin.fsdp_version == 2 else None


def block_modules(module: nn.Module, names: list[str] | None = None) -> list[nn.Module]:
    """The submodules sharded one by one (classes named ``names``, else the model's ``_no_split_modules``),
    innermost first: a block's weights are gathered just for its own forward."""
    names = set(names or getattr(module, "_no_split_modules", None) or [])
    found = [m for m in module.modules() if type(m).__name__ in names and m is not module]
    return list(reversed(found))  # reversed pre-order: every module after the modules inside it


def shard(module: nn.Module, plugin: FullyShardedDataParallelPlugin, mixed_precision: str,
          reduce_dtype: str = "fp32", called_apart: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Shard ``module`` in place across the processes (its blocks, then the rest); returns it. ``called_apart``:
    submodules that are called on their own, not inside ``module``'s forward (an objective's trained modules, such
    as SparsePO's mask model), each sharded as a unit of its own so that its call gathers its weights.

    Under bf16/fp16 the weights are gathered in that dtype for compute (FSDP2's ``MixedPrecisionPolicy``),
    gradients averaged in ``reduce_dtype`` (``train.reduce_dtype``; accelerate's own FSDP2 policy reduces in the
    compute dtype, which diffalign does not take as a default: preference losses train on small differences).
    The plugin's CPU offload (``fsdp_offload_params``) keeps the shards, their gradients and AdamW's state in
    host memory; its activation checkpointing (``fsdp_activation_checkpointing``) recomputes each block in the
    backward pass (diffusers' gradient checkpointing, per block)."""
    if isinstance(module, ExpertPair):  # an expert no item of a process's batch reaches would skip its gathers
        raise UserError("model.expert=both under FSDP2 is not built: train each expert in its own run "
                        "(model.expert=high, then low), or both under DDP")
    dtype = _COMPUTE_DTYPES.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=_COMPUTE_DTYPES.get(reduce_dtype, torch.float32))
    settings = {"mp_policy": policy, "reshard_after_forward": plugin.reshard_after_forward}
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        settings["offload_policy"] = plugin.cpu_offload
    blocks = block_modules(module, plugin.transformer_cls_names_to_wrap)
    if not blocks:
        raise UserError(f"{type(module).__name__} names no blocks to shard (_no_split_modules), so FSDP2 would gather "
                        "the whole model for every forward; set fsdp_transformer_layer_cls_to_wrap in the accelerate "
                        "config to its block classes")
    if plugin.activation_checkpointing and getattr(module, "enable_gradient_checkpointing", None):
        module.enable_gradient_checkpointing()
    for block in [*blocks, *called_apart]:
        fully_shard(block, **settings)
    # a peft wrapper holds no weights of its own and is bypassed by generate(): its base model is the root, so every
    # call path gathers the root's weights
    fully_shard(module.get_base_model() if hasattr(module, "get_base_model") else module, **settings)
    return module


def lockstep_share(count: int, process: int, processes: int) -> tuple[list[int], int]:
    """This process's items of ``count`` (every N-th), padded with repeats of item 0 to as many as any process has,
    and how many of them are its own: under sharding every forward gathers weights from every process, so each
    must run the denoiser as often as the others (the padding's outputs are dropped)."""
    mine = list(range(process, count, processes))
    longest = -(-count // processes)
    return mine + [0] * (longest - len(mine)), len(mine)


# --- checkpoints -------------------------------------------------------------------------
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Each second name of a tied parameter (a language model's output head tied to its embedding) -> its first."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def _flat_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights (a tied one once, under its first name) and their AdamW state as one flat dict of
    (sharded) tensors, and the optimiser's state dict whose tensors they are."""
    model_state, optim_state = get_state_dict(module, optimizer, options=_OPTIONS)
    aliases = _tied_aliases(module)
    flat = {f"model.{name}": value for name, value in model_state.items() if name not in aliases}
    for name, slots in optim_state["state"].items():
        flat.update({f"optim.{name}.{slot}": value for slot, value in slots.items()})
    return flat, optim_state


def save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of the trained weights and AdamW's state into ``folder/sharded_state``
    (safetensors, one file a process); all processes must call it."""
    flat, _ = _flat_state(module, optimizer)
    dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / SHARDED_STATE), save_distributed=True))


def load_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read ``folder/sharded_state`` into the trained weights and AdamW's state, resharded to this run's
    processes (a checkpoint of 8 processes resumes on 4, of 2 on 1); all processes must call it."""
    path = folder / SHARDED_STATE
    if not path.is_dir():
        raise UserError(f"{folder} holds no {SHARDED_STATE}/: it was written by a run that did not shard its weights "
                        "(FSDP2), and this one does; resume it with the launch that wrote it")
    flat, optim_state = _flat_state(module, optimizer)
    with warnings.catch_warnings():  # one process without a process group reads the whole of every tensor, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    model_state = {name[len("model."):]: value for name, value in flat.items() if name.startswith("model.")}
    for name, slots in optim_state["state"].items():
        for slot in slots:
            slots[slot] = flat[f"optim.{name}.{slot}"]
    # the frozen weights are not in it (the base loads them); every trained one is, or dcp.load has said which lacks
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded ``module`` on the main process's CPU ({} on the others), gathered one
    tensor at a time; all processes must call it. Tied weights (a language model's embedding and output head) are
    one tensor again under each of their names, as in an unsharded state dict, so a save dedups them as it would."""
    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for alias, owner in _tied_aliases(module).items():
        if owner in whole and alias in whole:
            whole[alias] = whole[owner]
    return whole


def gathered(value):
    """``value`` (a state dict's nesting of dicts, lists and tensors) with every DTensor gathered whole; all processes
    must call it."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {key: gathered(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gathered(item) for item in value)
    return value


def sharded_like(value, template):
    """``value`` (read from a checkpoint, whole tensors) sharded as ``template`` (the live state dict) is wherever the
    template holds a DTensor."""
    if isinstance(template, DTensor):
        # every process read the whole tensor: each keeps its own part, no communication
        return distribute_tensor(value.to(template.dtype), template.device_mesh, template.placements,
                                 src_data_rank=None)
    if isinstance(template, dict) and isinstance(value, dict):
        return {key: sharded_like(item, template[key]) if key in template else item for key, item in value.items()}
    if isinstance(template, (list, tuple)) and isinstance(value, (list, tuple)) and len(value) == len(template):
        return type(value)(sharded_like(v, t) for v, t in zip(value, template))
    return value
