"""Peak memory of one training step, estimated on any machine: the models built on the meta device with fake
storage (shapes and dtypes, no data) and one real step of the configured objective run on them, counting the
bytes of every tensor storage alive at each moment. Selections by a mask that holds real values (KTO's labels, a
prompt's attention mask) are sized by those values (:class:`RealAndFakeTensors`). For an online objective, one
batch of a round's sampling and decoding too (:func:`round_sampling`).

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


class RealAndFakeTensors(TorchDispatchMode):
    """Where the estimate's real tensors (data, masks, the schedule's tables) meet its fake ones, two rules.

    Boolean-mask indexing of a fake tensor by a mask that holds real values is sized by those values: fake tensors
    cannot size ``x[mask]`` (its length is the mask's count of True), so a step that selects by a mask (KTO's rows by
    their labels, HunyuanVideo 1.5's text and image tokens reordered by their attention masks, Qwen-Image's prompt
    tokens) would not be estimated. The selection is rewritten into the integer indices it means (``mask.nonzero()``,
    as PyTorch's own indexing does), which fake tensors size. A mask that is itself fake still raises
    ``DynamicOutputShapeException``: its values are not known.

    An op on real tensors alone whose output has ``large`` elements or more gives a fake tensor instead (once the
    step's fake tensors have shown their mode): HunyuanVideo 1.5 builds a (batch, 1, tokens, tokens) boolean
    attention mask from each sample's token mask in every block, billions of real values at 81 frames that only
    the attention reads. Its bytes are counted all the same; computing them kept the 81-frame estimate running for
    over 40 minutes.
    """

    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._unsafe_index_put.default)

    large = 2**24  # elements

    def __init__(self) -> None:
        super().__init__()
        self.fake_mode = None  # the step's, from the first fake tensor an op reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = next((t for t in tensors if isinstance(t, FakeTensor)), None)
        if fake is not None:
            self.fake_mode = fake.fake_mode
        if func in self.INDEXING and isinstance(args[0], FakeTensor):
            indices = []
            for index in args[1]:
                by_value = isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) \
                    and index.dtype in (torch.bool, torch.uint8)
                indices.extend(index.nonzero().unbind(1) if by_value else [index])
            args = (args[0], indices, *args[2:])
        elif fake is None and tensors and self.fake_mode is not None and not func._schema.is_mutable:
            shaped = self._shapes_only(func, args, kwargs)
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.large for t in tree_leaves(shaped)):
                return shaped
        return func(*args, **kwargs)

    def _shapes_only(self, func, args, kwargs):
        """The op's outputs on fake storage, or None where shapes alone cannot give them (a data-dependent op)."""
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        try:
            with self.fake_mode:
                return func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            return None


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
                tied = tied_parameters(module)
                module.to_empty(device="cpu")  # fake storage; dtypes and requires_grad kept
                for names in tied:  # to_empty gives each name of a tied weight its own storage: tie them again
                    for name in names[1:]:
                        owner, _, attr = name.rpartition(".")
                        setattr(module.get_submodule(owner), attr, module.get_parameter(names[0]))
        for module in modules:
            unregistered_tables_on_cpu(module)
    return modules


def tied_parameters(module: torch.nn.Module) -> list[list[str]]:
    """The names of each parameter registered under more than one name (a T5 encoder's shared embedding), grouped."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def unregistered_tables_on_cpu(module: torch.nn.Module) -> None:
    """Give plain tensor attributes left on the meta device (tables a module builds in ``__init__`` without
    registering them, as Qwen-Image's RoPE frequencies) real zeros of their shape: ``to_empty`` moves only
    parameters and buffers, and the estimate reads only their shapes."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(sub, name, torch.zeros_like(value, device="cpu"))


def offline_inputs(objective, config, latent_shape: tuple[int, ...], list_size: int):
    """(latents, randomness, targets) of one offline micro-batch: ``train.batch_size`` examples of the objective's
    group size (pairs, K-lists, images)."""
    from diffalign.data import example_generator

    tc = config.train
    k = group_size(objective, list_size)
    draws = [objective.draw(1, latent_shape, example_generator(tc.seed, p)) for p in range(tc.batch_size)]
    randomness = {key: torch.cat([d[key] for d in draws]) for key in draws[0]}
    targets = {"preference": torch.ones(tc.batch_size)}
    if objective.dataset == "ranked":
        targets["scores"] = torch.randn(tc.batch_size, k)
    return torch.randn(tc.batch_size, k, *latent_shape), randomness, targets


def synthetic_round(objective, config, latent_shape: tuple[int, ...], groups: int):
    """A round of ``groups`` groups as the round driver records it (:class:`diffalign.train.online.Round`), with
    random trajectories, log-probabilities and distinct rewards."""
    from diffalign.train.online import Round

    k = objective.round_group_size(config)
    steps = config.objective.sample_steps + 1 if objective.keeps_trajectories else 1
    rewards = torch.arange(groups * k, dtype=torch.float32).view(groups, k) % k
    return Round(prompts=["a prompt"] * groups, latents=torch.randn(groups, k, steps, *latent_shape),
                 log_probs=torch.randn(groups, k, config.objective.sample_steps), rewards=rewards,
                 winners=lambda: torch.zeros(groups, dtype=torch.long),
                 real=torch.randn(groups, *latent_shape) if objective.real_data else None,
                 generator=lambda i: torch.Generator().manual_seed(i))


def online_inputs(objective, config, latent_shape: tuple[int, ...]):
    """(latents, randomness, targets) of one online micro-batch: ``train.batch_size`` of the units the objective
    makes of a round (:meth:`~diffalign.objectives.base.OnlineObjective.training_units`), each at a middle step."""
    from diffalign.data import example_generator

    b = config.train.batch_size
    units = objective.training_units(synthetic_round(objective, config, latent_shape, 2 * b))
    if len(units["latents"]) < b:
        raise SystemExit(f"{config.objective.name} kept {len(units['latents'])} units of a synthetic round of "
                         f"{2 * b} groups, fewer than train.batch_size={b}")
    step = torch.full((b,), config.objective.sample_steps // 2, dtype=torch.long)
    randomness = {"step": step, **objective.draw(b, latent_shape, example_generator(config.train.seed, 0))}
    return units["latents"][:b], randomness, {name: value[:b] for name, value in units["targets"].items()}


class PixelMeanReward:
    """The stand-in for a differentiable reward in a reward-gradient method's estimate: each image's mean pixel, a
    function of every pixel (so the VAE's backward is whole) that holds nothing. The reward model's own weights and
    activations are left out, as every online estimate leaves its reward models out."""

    name = "pixel_mean"

    def score_with_gradient(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.flatten(1).mean(dim=1)


def prompt_inputs(objective, config, latent_shape: tuple[int, ...], prompt: str):
    """(latents, randomness, targets) of one micro-batch of a method that samples inside its loss, as
    :class:`~diffalign.train.prompt_batches.PromptBatches` makes it: each sample's starting noise, its sampler's step
    noise, what the method draws, and the prompts."""
    from diffalign.data import example_generator
    from diffalign.train.prompt_batches import draw_samples

    b = config.train.batch_size
    noise, step_noise, extra = draw_samples(objective, b, latent_shape, config.objective.sample_steps,
                                            example_generator(config.train.seed, 0))
    return noise[:, None], {"step_noise": step_noise, **extra}, {"prompts": [prompt] * b}


@contextlib.contextmanager
def first_and_last_steps_only(backbone, steps: int, every_step: bool = False):
    """Run the denoiser at the sampler's first and last steps only; between them ``backbone.predict`` returns a new
    tensor of its input's shape and the first output's dtype, without computing. The peak is unchanged: every step's forward
    holds the same activations (same shapes), on top of a trajectory that only grows, so the last step's forward
    is the highest (``tests/test_bench_memory.py`` compares with ``every_step``). A 1024 px round of 10 steps on a
    20B model then costs two fake forwards instead of ten."""
    if every_step or steps <= 2:
        yield
        return
    predict, calls, dtype = backbone.predict, [0], []

    def stand_in(latents, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1 or calls[0] == steps or not dtype:
            out = predict(latents, *args, **kwargs)
            if out.shape == latents.shape:  # a prediction in the latents' layout: the steps between can stand in
                dtype[:] = [out.dtype]
            return out
        return torch.empty_like(latents, dtype=dtype[0])  # made from the input: no output is held between steps

    with mock.patch.object(backbone, "predict", stand_in):
        yield


def round_sampling(objective, config, backbone, cond, uncond, every_step: bool = False) -> None:
    """One batch of a round's sampling and decoding, as the round driver runs it: ``online.sample_batch_size``
    groups of K from noise through the sampler's steps (both branches of classifier-free guidance against
    ``uncond``, or against ``cond``'s own negative; the denoiser computed at the first and last steps,
    :func:`first_and_last_steps_only`), then the VAE."""
    from diffalign.diffusion.logprob import sample_trajectories

    oc, obj = config.online, config.objective
    n = oc.sample_batch_size * objective.round_group_size(config)
    noise = torch.randn(n, *backbone.latent_shape(config.data.resolution, config.data.width))
    with torch.no_grad(), first_and_last_steps_only(backbone, obj.sample_steps, every_step):
        trajectory = sample_trajectories(backbone, noise, cond.repeat_items(n), steps=obj.sample_steps,
                                         eta=obj.sample_eta, guidance_scale=obj.sample_guidance_scale,
                                         uncond=None if uncond is None else uncond.repeat_items(n),
                                         denoiser=objective.sampling_denoiser())
        backbone.decode_latents(trajectory.final)


@contextlib.contextmanager
def one_of_a_context_parallel_group(degree: int):
    """Process 0 of a fake process group of ``degree`` processes (torch's FakeProcessGroup: its collectives return
    tensors of the right shapes and move no data), for the memory of one process of a context-parallel group
    (:mod:`diffalign.train.context_parallel`): its share of the tokens, the whole weights."""
    import torch.distributed as dist

    if degree == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("the estimate of a context-parallel run makes a process group of its own; run it in a "
                           "process without one")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", rank=0, world_size=degree, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def training_step_memory(config, list_size: int = 4, fake: bool = True, every_step: bool = False
                         ) -> dict[str, float]:
    """Peak bytes of one training step of ``config`` on one process and what the models and states hold; under
    ``train.context_parallel`` = N, on one process of a group that splits each sample's tokens N ways.

    With ``fake`` the models are built on the meta device and given fake storage; without,
    the step runs for real on the CPU (the tests compare the two on a tiny model). An online objective's
    figure also covers its rounds: one batch of sampling and decoding (``sampling_gb``), run with the optimiser's
    state already held, as every round after the first; ``peak_gb`` is the larger of the two. The reward models
    are not counted.
    """
    from diffalign.objectives import OBJECTIVES
    from diffalign.train.context_parallel import enable_context_parallel
    from diffalign.train.models import build_models

    tc = config.train
    objective_cls = OBJECTIVES[config.objective.name]
    if objective_cls.family == "lm":
        raise SystemExit(f"{config.objective.name} trains a language model; its memory is not estimated here")
    device = torch.device("meta" if fake else "cpu")
    with device:
        backbone, reference = build_models(config, device, frozen_reference=objective_cls.frozen_reference)
    modules = materialise(backbone, [reference] if reference is not None else [], fake)
    with one_of_a_context_parallel_group(tc.context_parallel), RealAndFakeTensors():
        if tc.context_parallel > 1:
            enable_context_parallel(backbone, reference, tc.context_parallel, tc.context_parallel, torch.device("cpu"))
        return _step_memory(config, objective_cls, backbone, reference, modules, list_size, every_step)


def _step_memory(config, objective_cls, backbone, reference, modules: list[torch.nn.Module], list_size: int,
                 every_step: bool) -> dict[str, float]:
    """:func:`training_step_memory` on models built and materialised."""
    from diffalign.diffusion import mixed_precision_dtype

    tc = config.train
    online = objective_cls.dataset == "online"
    autocast = torch.autocast("cpu", dtype=mixed_precision_dtype(tc.mixed_precision),
                              enabled=tc.mixed_precision != "no")
    latent_shape = backbone.latent_shape(config.data.resolution, config.data.width)
    prompt, sources = ["a photograph of an astronaut riding a horse"], len(config.data.source_columns)
    # Everything else runs outside the fake mode: ops on fake tensors stay fake (FakeTensor
    # dispatches itself), while real tensors (the schedule's tables, the random draws) keep
    # the values objectives read with .item() or nonzero.
    guided = online and config.objective.sample_guidance_scale != 1.0
    with torch.no_grad(), autocast:
        if objective_cls.samples_in_loss:  # its reward stands in (not counted): a reward model needs its weights
            objective = objective_cls(config.objective, backbone)
            objective.rewards = [(PixelMeanReward(), 1.0)]
        else:
            objective = objective_cls.build(config, backbone)
        if sources and backbone.prompt_reads_sources:  # its text encoder adds the sources' tokens to the prompt's
            pixels = torch.zeros(1, sources, 3, config.data.resolution, config.data.width or config.data.resolution)
            cond = backbone.encode_prompts(prompt, pixels)
            if guided and backbone.empty_prompt_reads_sources:  # the round driver's empty prompt reads them too
                cond = cond.with_negative(backbone.encode_prompts([""], pixels))
        else:
            cond = backbone.encode_prompts(prompt)
        uncond = backbone.empty_prompt() if guided else None
    if config.data.source_columns:  # an edit model reads its sources' tokens beside the target's
        cond.reference = torch.randn(1, len(config.data.source_columns), *backbone.source_shape(latent_shape))
    if objective_cls.samples_in_loss:
        latents, randomness, targets = prompt_inputs(objective, config, latent_shape, prompt[0])
    elif online:
        latents, randomness, targets = online_inputs(objective, config, latent_shape)
    else:
        latents, randomness, targets = offline_inputs(objective, config, latent_shape, list_size)
    batch_cond = cond.repeat_items(tc.batch_size)
    denoiser = backbone.denoiser
    # what the objective trains beside the model (SparsePO's region masks), as the trainer adds it
    extra = list(objective.trained_modules(denoiser).values())
    params = [p for m in (denoiser, *extra) for p in m.parameters() if p.requires_grad]
    # with data.precompute the text encoders and the VAE wait on the CPU during the steps
    # a distillation teacher (model.teacher, loaded as the run loads it) is held frozen beside the student
    teacher = [t for t in (getattr(objective, "teacher", None),) if isinstance(t, torch.nn.Module)]
    on_gpu = [backbone.denoiser, reference, *extra, *teacher] if config.data.precompute and not online \
        else [*modules, *extra, *teacher]
    weights = [t for m in on_gpu if m is not None for t in (*m.parameters(), *m.buffers())]
    tracker = LiveStorage()
    with tracker:
        tracker.add(*weights, *batch_cond.tensors().values(), latents, *randomness.values(),
                    *(t for t in targets.values() if isinstance(t, torch.Tensor)))
        states = optimizer_state(params, tc.adam_8bit)
        if tc.ema_decay > 0:
            states += [p.detach().clone() for p in params]
        states += [t for s in objective.attach(denoiser) for t in s.state_dict().values()
                   if isinstance(t, torch.Tensor)]
        at_rest = tracker.current
        sampling = None
        with cuda_autocast_norms():
            if online and not objective_cls.samples_in_loss:  # a reward-gradient method samples in its step
                with autocast:
                    round_sampling(objective, config, backbone, cond, uncond, every_step)
                sampling, tracker.peak = tracker.peak, tracker.current
            with autocast:
                loss, _ = objective(backbone, latents, batch_cond, randomness, denoiser, reference, **targets)
            loss.backward()
        grads = nbytes(p.grad for p in params if p.grad is not None)
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
    row = breakdown(tracker, at_rest, grads, weights, params, states)
    row.update(fsdp2_parts(denoiser, reference, tc.mixed_precision))
    if sampling is not None:
        row.update(sampling_gb=sampling / GIB, peak_gb=max(row["peak_gb"], sampling / GIB))
    return row


def fsdp2_parts(denoiser: torch.nn.Module, reference: torch.nn.Module | None, mixed_precision: str
                ) -> dict[str, float]:
    """What FSDP2 (:mod:`diffalign.train.fsdp2`) shards and gathers, in GiB: ``sharded_weights_gb``, the denoiser's
    parameters (frozen ones too: a LoRA's base) and a full fine-tune's frozen reference; ``gathered_gb``, what a
    process holds whole at once during a step: the root module's own parameters (kept gathered from forward to
    backward), two blocks (the one running and the next, prefetched) in the compute dtype, and one block's
    gradients before they are reduced."""
    from diffalign.train.fsdp2 import block_modules

    compute = 2 if mixed_precision in ("bf16", "fp16") else None
    whole = [m for m in (denoiser, reference) if isinstance(m, torch.nn.Module)]
    sharded = sum(nbytes(m.parameters()) for m in whole)
    blocks = block_modules(denoiser)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    as_computed = lambda params: sum(p.numel() * (compute or p.element_size()) for p in params)  # noqa: E731
    largest = max((as_computed(b.parameters()) for b in blocks), default=0)
    largest_grads = max((sum(p.numel() * 4 for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
    root = as_computed(p for p in denoiser.parameters() if id(p) not in in_blocks)
    return {"sharded_weights_gb": sharded / GIB, "gathered_gb": (root + 2 * largest + largest_grads) / GIB}


def sharded_per_gpu(row: dict[str, float], gpus: int) -> dict[str, float]:
    """Per-GPU GiB when N GPUs shard what each strategy shards (see the module docstring): ZeRO-1 the optimiser
    state, ZeRO-2 also the gradients; FSDP2 also every weight of the denoiser and of a full fine-tune's reference
    (:func:`fsdp2_parts`), plus what it gathers; with CPU offload FSDP2's shards, gradients and optimiser state live
    in host memory."""
    optimizer, grads = row["optimizer_and_ema_gb"], row["grads_gb"]
    # one process shards nothing (diffalign shards under FSDP2 from two processes on)
    sharded = 0.0 if gpus == 1 else optimizer + grads + row["sharded_weights_gb"]
    gathered = 0.0 if gpus == 1 else row["gathered_gb"]
    saved = {"DDP": 0.0, "ZeRO-1": (1 - 1 / gpus) * optimizer, "ZeRO-2": (1 - 1 / gpus) * (optimizer + grads),
             "FSDP2": (1 - 1 / gpus) * sharded - gathered, "FSDP2 + CPU offload": sharded - gathered}
    return {name: row["peak_gb"] - part for name, part in saved.items()}
