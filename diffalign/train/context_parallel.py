"""Context parallelism, ``train.context_parallel=N``: each sample's tokens split over N processes.

A video DiT's activations grow with its tokens (Wan2.1 at 480p and 81 frames: 32,760 per clip), and a process
that cannot hold one clip's activations cannot train at any batch size. DeepSpeed-Ulysses (Jacobs et al. 2023,
arXiv 2309.14509) splits the sequence over N processes: each computes its N-th of the tokens, and around
attention an all-to-all trades the sequence split for a split of the heads, so each process attends over the
whole sequence with 1/N of the heads. The transformer's output is gathered whole on every process of the group.
diffusers builds this for the transformers that declare where to split and gather (``_cp_plan``: Wan2.1/2.2,
FLUX.1, FLUX.2, Qwen-Image) through ``ModelMixin.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))``; this module fits it into training:

- the processes form groups of N consecutive ranks; every process of a group reads the same examples and draws
  the same noise and timesteps (they are functions of the example's position, :mod:`diffalign.data.order`), so
  ``world / N`` groups share the data as ``world / N`` data-parallel processes would (:func:`data_share`);
- each process's weight gradients hold what its own tokens contributed, so the true gradient is their sum over
  the group; DDP and FSDP2 average over every process, so the loss is multiplied by N before its backward
  (:class:`~diffalign.train.trainer.Trainer`), which makes their average over ``world`` the data-parallel mean;
- validation samples are drawn by every process of a group together, in step, and kept from its first.

Ring attention (``ring_degree``) needs the attention kernel's log-sum-exp, which PyTorch's SDPA on CPU does not
return, so only Ulysses is offered; its all-to-all needs the heads and the tokens divisible by N (the heads checked
when the model is built, the tokens at the first forward, each with the numbers).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from unittest import mock

import torch
from diffusers import ContextParallelConfig
from diffusers.models._modeling_parallel import ContextParallelInput
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from diffalign.errors import UserError


@dataclass(frozen=True)
class DataShare:
    """This process's place among the data-parallel groups: its group's ``index`` of ``count`` groups, and whether
    it is the group's ``first`` process (the one whose copy of what the group makes together is kept)."""

    index: int
    count: int
    first: bool


def data_share(process_index: int, num_processes: int, degree: int) -> DataShare:
    """Groups of ``degree`` consecutive ranks, as the device mesh ``(num_processes // degree, degree)`` has them."""
    if degree < 1 or num_processes % degree:
        raise UserError(f"train.context_parallel={degree} splits each sample over {degree} processes: the run's "
                        f"{num_processes} processes must be a multiple of it (launch {degree} x the data-parallel "
                        "processes you want)")
    return DataShare(process_index // degree, num_processes // degree, process_index % degree == 0)


def parallel_transformers(denoiser: nn.Module) -> list[nn.Module]:
    """The diffusers transformers in ``denoiser`` (itself, or a Wan2.2 pair of experts) that say where to split."""
    return [m for m in denoiser.modules() if getattr(type(m), "_cp_plan", None)]


def check_splittable(denoiser: nn.Module, degree: int) -> None:
    """Refuse a denoiser diffusers cannot split, or whose heads do not divide over ``degree`` processes."""
    transformers = parallel_transformers(denoiser)
    if not transformers:
        raise UserError(f"train.context_parallel={degree}: diffusers splits the tokens of the transformers that "
                        f"declare where (Wan2.1/2.2, FLUX.1, FLUX.2, Qwen-Image); {type(denoiser).__name__} does not. "
                        "Use train.context_parallel=1 (data parallelism and FSDP2 work on every model)")
    for model in transformers:
        heads = getattr(model.config, "num_attention_heads", None)
        if heads is not None and heads % degree:
            raise UserError(f"train.context_parallel={degree}: Ulysses gives each process 1/{degree} of the attention "
                            f"heads, and {type(model).__name__} has {heads}; choose a degree that divides {heads}")


def _token_check(module: nn.Module, module_name: str, splits: dict[str, ContextParallelInput], degree: int):
    """A forward pre-hook that names the token count when an input diffusers splits (``splits``: its name -> how;
    diffusers splits a tensor of the expected number of dimensions, and passes others whole) does not divide over
    the processes: the split would hand them unequal shares, and the all-to-all would fail far from the cause."""
    signature = inspect.signature(module.forward)

    def check(module, args, kwargs):
        given = signature.bind_partial(*args, **kwargs).arguments
        for name, split in splits.items():
            value, dim = given.get(name), split.split_dim
            if isinstance(value, torch.Tensor) and value.dim() == split.expected_dims and value.shape[dim] % degree:
                raise UserError(f"train.context_parallel={degree}: {module_name}'s {name} holds {value.shape[dim]} "
                                f"tokens, which do not split into {degree} equal shares; change data.resolution, "
                                "data.width or data.frames (or the prompt length) so that they divide by the degree")
    return check


@contextlib.contextmanager
def _device_count_on_cpu(device: torch.device):
    """diffusers places each process on accelerator ``rank % device_count``, which divides by zero on a machine
    without one; a CPU run (gloo) has one device, the CPU."""
    if device.type != "cpu":
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def _split_inputs(plan) -> dict[str, ContextParallelInput]:
    """The inputs one entry of a ``_cp_plan`` splits on their way in, by name (not outputs split on their way out,
    nor gathered ones)."""
    if not isinstance(plan, dict):
        return {}
    return {key: p for key, p in plan.items()
            if isinstance(key, str) and isinstance(p, ContextParallelInput) and not p.split_output}


def enable_context_parallel(backbone, reference: nn.Module | None, degree: int, num_processes: int,
                            device: torch.device) -> None:
    """Split each diffusers transformer the run calls over groups of ``degree`` processes, one device mesh
    ``(data, 1, degree)`` for all of them: the backbone's trained denoiser, the frozen ones it calls beside it (the
    other expert of a Wan2.2 run that trains one, which denoises the other steps:
    :meth:`~diffalign.diffusion.backbones.Backbone.companion_denoisers`) and a frozen ``reference`` copy (None, or not
    a module: a LoRA run's reference is the denoiser itself). A denoiser that cannot be split is refused first
    (:func:`check_splittable`)."""
    denoiser = backbone.denoiser
    check_splittable(denoiser, degree)
    mesh = init_device_mesh(device.type, (num_processes // degree, 1, degree),
                            mesh_dim_names=("data", "ring", "ulysses"))
    frozen = [reference, *backbone.companion_denoisers()]
    models = [denoiser] + [model for model in frozen if isinstance(model, nn.Module)]
    for transformer in (t for model in models for t in parallel_transformers(model)):
        for name, plan in transformer._cp_plan.items():
            splits = _split_inputs(plan)
            if splits and "*" not in name:  # (a pattern names every block: the first one's check covers them)
                module = transformer.get_submodule(name)
                module.register_forward_pre_hook(_token_check(module, name or "the transformer", splits, degree),
                                                 with_kwargs=True)
        with _device_count_on_cpu(device):
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))
