"""Peak memory of one training step, estimated on any machine: the models built on the meta device with fake
storage (shapes and dtypes, no data) and one real step of the configured objective run on them, counting the
bytes of every tensor storage alive at each moment.

Optimiser state is allocated as the optimiser allocates it: torch AdamW keeps two fp32 tensors per trained
tensor; bitsandbytes AdamW8bit (``train.adam_8bit``) two uint8 tensors plus one fp32 absmax per 256 values for
tensors of at least 4096 values, and fp32 states for smaller ones. Left out: the CUDA context and library
workspaces (about 0.5-1 GB), the caching allocator's rounding and fragmentation, and kernels whose scratch memory
differs between CPU and CUDA. Read the figure as a lower bound. Used by ``diffalign train CONFIG --plan`` and by
``scripts/bench_memory.py`` (which also measures on a GPU and searches the largest batch).
"""

from __future__ import annotations

import contextlib
import weakref
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256  # bitsandbytes Optimizer2State defaults


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storage alive while active, and their peak.

    Every op's outputs are looked at; a storage is counted once, from the first time it is
    seen until it is freed (a weakref finalizer), so views and in-place ops add nothing.
    Tensors made before the mode starts are counted after ``add``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._live:
                continue
            self._live[key] = storage.nbytes()
            self.current += self._live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out


def optimizer_state(params: list[torch.Tensor], adam_8bit: bool) -> list[torch.Tensor]:
    """The tensors AdamW keeps per trained tensor (see the module docstring for the 8-bit rule)."""
    state = []
    for p in params:
        if adam_8bit and p.numel() >= BNB_MIN_8BIT_SIZE:
            blocks = -(-p.numel() // BNB_BLOCK)
            state += [torch.empty_like(p, dtype=torch.uint8) for _ in range(2)]
            state += [torch.empty(blocks, dtype=torch.float32, device=p.device) for _ in range(2)]
        else:
            state += [torch.empty_like(p, dtype=torch.float32) for _ in range(2)]
    return state


@contextlib.contextmanager
def cuda_autocast_norms():
    """Run group_norm and layer_norm in fp32 under autocast, as CUDA autocast does (CPU's does not)."""

    def in_fp32(norm):
        def run(input, *args, **kwargs):
            if not torch.is_autocast_enabled(input.device.type):
                return norm(input, *args, **kwargs)
            to_fp32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            return norm(to_fp32(input), *map(to_fp32, args), **{k: to_fp32(v) for k, v in kwargs.items()})
        return run

    with mock.patch.object(F, "group_norm", in_fp32(F.group_norm)), \
            mock.patch.object(F, "layer_norm", in_fp32(F.layer_norm)):
        yield


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


def breakdown(tracker: LiveStorage, at_rest: int, grads: int, weights, params, states) -> dict[str, float]:
    """The step's peak and what holds it, in GiB."""
    return {
        "peak_gb": tracker.peak / GIB,
        "weights_gb": nbytes(weights) / GIB,
        "trained_weights_gb": nbytes(params) / GIB,
        "grads_gb": grads / GIB,
        "optimizer_and_ema_gb": nbytes(states) / GIB,
        "activations_gb": (tracker.peak - at_rest - grads) / GIB,  # and temporaries, at the peak
        "trained_params": sum(p.numel() for p in params),
    }


def group_size(objective, list_size: int) -> int:
    """Images per example the objective reads: 2 for pairs, K for ranked lists, 1 for images."""
    return {"pairs": 2, "ranked": list_size, "images": 1, "labelled_images": 1}[objective.dataset]


def materialise(backbone, extra: list[torch.nn.Module], fake: bool) -> list[torch.nn.Module]:
    """Give models built on the meta device fake storage; returns the pipeline's modules and ``extra``.

    The scheduler is rebuilt from its config so that its tables hold real values.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    pipe = backbone.pipe
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)] + extra
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for module in modules:
                module.to_empty(device="cpu")  # fake storage; dtypes and requires_grad kept
    return modules


def training_step_memory(config, list_size: int = 4, fake: bool = True) -> dict[str, float]:
    """Peak bytes of one training step of ``config`` and what the models and states hold.

    With ``fake`` the models are built on the meta device and given fake storage; without,
    the step runs for real on the CPU (the tests compare the two on a tiny model).
    """
    from diffalign.data import example_generator
    from diffalign.diffusion import mixed_precision_dtype
    from diffalign.objectives import OBJECTIVES
    from diffalign.train.models import build_models

    tc = config.train
    objective_cls = OBJECTIVES[config.objective.name]
    if objective_cls.dataset == "online":
        raise SystemExit(f"{config.objective.name} samples inside training; its memory is not estimated here")
    device = torch.device("meta" if fake else "cpu")
    with device:
        backbone, reference = build_models(config, device, frozen_reference=objective_cls.frozen_reference)
    modules = materialise(backbone, [reference] if reference is not None else [], fake)
    # Everything else runs outside the fake mode: ops on fake tensors stay fake (FakeTensor
    # dispatches itself), while real tensors (the schedule's tables, the random draws) keep
    # the values objectives read with .item() or nonzero.
    objective = objective_cls(config.objective, backbone)
    k = group_size(objective, list_size)
    latent_shape = backbone.latent_shape(config.data.resolution)
    draws = [objective.draw(1, latent_shape, example_generator(tc.seed, p)) for p in range(tc.batch_size)]
    randomness = {key: torch.cat([d[key] for d in draws]) for key in draws[0]}
    targets = {"preference": torch.ones(tc.batch_size)}
    if objective.dataset == "ranked":
        targets["scores"] = torch.randn(tc.batch_size, k)
    autocast = torch.autocast("cpu", dtype=mixed_precision_dtype(tc.mixed_precision),
                              enabled=tc.mixed_precision != "no")
    prompt, sources = ["a photograph of an astronaut riding a horse"], len(config.data.source_columns)
    with torch.no_grad(), autocast:  # a text encoder that reads the sources adds their tokens to the prompt's
        cond = backbone.encode_prompts(prompt, torch.zeros(1, sources, 3, config.data.resolution,
                                                           config.data.resolution)) \
            if sources and backbone.prompt_reads_sources else backbone.encode_prompts(prompt)
    if config.data.source_columns:  # an edit model reads its sources' tokens beside the target's
        cond.reference = torch.randn(1, len(config.data.source_columns), *latent_shape)
    cond = cond.repeat_items(tc.batch_size)
    latents = torch.randn(tc.batch_size, k, *latent_shape)
    denoiser = backbone.denoiser
    # what the objective trains beside the model (SparsePO's region masks), as the trainer adds it
    extra = list(objective.trained_modules(denoiser).values())
    params = [p for m in (denoiser, *extra) for p in m.parameters() if p.requires_grad]
    # with data.precompute the text encoders and the VAE wait on the CPU during the steps
    on_gpu = [backbone.denoiser, reference, *extra] if config.data.precompute else [*modules, *extra]
    weights = [t for m in on_gpu if m is not None for t in (*m.parameters(), *m.buffers())]
    tracker = LiveStorage()
    with tracker:
        tracker.add(*weights, *cond.tensors().values(), latents, *randomness.values(), *targets.values())
        states = optimizer_state(params, tc.adam_8bit)
        if tc.ema_decay > 0:
            states += [p.detach().clone() for p in params]
        states += [t for s in objective.attach(denoiser) for t in s.state_dict().values()
                   if isinstance(t, torch.Tensor)]
        at_rest = tracker.current
        with cuda_autocast_norms():
            with autocast:
                loss, _ = objective(backbone, latents, cond, randomness, denoiser, reference, **targets)
            loss.backward()
        grads = nbytes(p.grad for p in params if p.grad is not None)
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
    return breakdown(tracker, at_rest, grads, weights, params, states)


def sharded_per_gpu(row: dict[str, float], gpus: int) -> dict[str, float]:
    """Per-GPU GiB when N GPUs shard what each strategy shards (see the module docstring)."""
    optimizer, grads, weights = row["optimizer_and_ema_gb"], row["grads_gb"], row["trained_weights_gb"]
    saved = {"DDP": 0.0, "ZeRO-1": optimizer, "ZeRO-2": optimizer + grads,
             "ZeRO-3 / FSDP": optimizer + grads + weights}
    return {name: row["peak_gb"] - (1 - 1 / gpus) * part for name, part in saved.items()}
