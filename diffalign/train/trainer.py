"""The trainer: config -> models -> data -> objective(batch, policy, reference) -> core loss.

It knows nothing of any objective's maths; it owns devices, precision, LoRA or full
fine-tuning, the optimiser, checkpoints, resume, logging and failure handling.

Exact resume: the data order and each example's timestep/noise are pure functions of
(seed, position in the run) (:mod:`diffalign.data.order`), and a checkpoint holds the
weights, optimiser and LR-scheduler state and the step. Resuming from step s therefore
replays the same computation as an uninterrupted run. The same rule makes N processes at
batch B compute what one process at batch N*B computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageSequence
from torch import nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffalign.data import (
    CaptionedImageDataset,
    ClassRatioOrder,
    CurriculumOrder,
    DeterministicOrder,
    PairDataset,
    RankedListDataset,
    example_generator,
)
from diffalign.data.augment import RandomFlip
from diffalign.data.open import open_dataset
from diffalign.data.order import RunOrder
from diffalign.data.reader import ExampleReader
from diffalign.diffusion import DTYPES, CachedEncoder, TensorCache
from diffalign.diffusion.cache import example_cached
from diffalign.diffusion.distilled import distilled_warning
from diffalign.diffusion.finetuned import is_finished_run
from diffalign.diffusion.sampling import CLIP_FPS
from diffalign.paths import resolve_model_path, with_usual_permissions
from diffalign.errors import PausedRound, UserError
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.base import data_layout
from diffalign.sharded import SHARDED_STATE, local
from diffalign.train.config import Config, save_config, to_dict
from diffalign.train.ema import ema_step
from diffalign.train.models import build_models
from diffalign.train.gold import DriftWatch, GoldWatch
from diffalign.train.prompt_batches import PromptBatches
from diffalign.train.online import NeedsLabels, OnlineRounds
from diffalign.train.run_folder import RunLock, is_rank_zero, is_write_failure, write_failure
from diffalign.train.run_state import ExtraState, all_finite, json_safe, refuse_pickles
from diffalign.train.context_parallel import data_share, enable_context_parallel
from diffalign.train.fsdp2 import (
    fsdp2_plugin,
    full_weights,
    load_sharded,
    save_sharded,
    shard,
)
from diffalign.train.sharding import check_sharding
from diffalign.train.tracking import flat_hyperparameters, log_animation, log_image
from diffalign.train.validation import Validator
from diffalign.trained_weights import keep_trained_weights_only, load_trained_weights
from diffalign.train.weights import save_final_weights

CHECKPOINTS = "checkpoints"


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")),
                  key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(config: Config) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start."""
    resume = config.train.resume
    if resume is None:
        return None
    if resume == "latest":
        out = Path(config.output_dir)
        if not out.is_dir():
            raise UserError(f"train.resume=latest, but output_dir {out} does not exist (a typo?), so there is no run "
                            "to continue; give the run's folder, or leave train.resume unset to start a new run")
        found = _checkpoint_dirs(out)
        if not found and is_finished_run(out):
            raise UserError(f"train.resume=latest, but {out} holds a finished run (its final weights) and no checkpoint "
                            "to continue from: it is done. Start a new run in another output_dir to train more")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"train.resume={resume} is not a diffalign checkpoint (no trainer_state.json inside)")
    return path


def _unreadable_checkpoint(checkpoint: Path, err: Exception) -> UserError:
    """The error for a checkpoint that cannot be read back: it names the earlier checkpoints to resume from."""
    earlier = [str(p) for p in _checkpoint_dirs(checkpoint.parent.parent) if p.name < checkpoint.name]
    way_out = (f"Resume from an earlier one with train.resume=PATH: {', '.join(earlier[-3:])}" if earlier
               else "There is no earlier checkpoint of this run to resume from")
    return UserError(f"checkpoint {checkpoint} cannot be read ({type(err).__name__}: {str(err)[:200]}); a file in "
                     f"it was damaged or cut short after it was written. {way_out}.")


def _run_order(config: Config, dataset: PairDataset | RankedListDataset | CaptionedImageDataset) -> RunOrder:
    """Which example each position of the run reads: a permutation per epoch, with ``data.curriculum``
    the pairs easy to hard, or with ``data.positive_ratio`` liked and other images in that ratio."""
    ratio = config.data.positive_ratio
    if config.data.curriculum == "score_gap":  # easy to hard: the strength |p - 1/2| of each usable pair
        return CurriculumOrder(dataset.ease(), config.train.seed)
    if ratio is None:
        return DeterministicOrder(len(dataset), config.train.seed)
    liked, other = dataset.positions_by_label()
    if not liked or not other:
        raise UserError(f"data.positive_ratio={ratio} needs both liked and other images, but {config.data.path} "
                        f"has {len(liked)} liked and {len(other)} other usable rows")
    return ClassRatioOrder([liked, other], [ratio, 1.0 - ratio], config.train.seed)


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the step's end."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked, for the exit status (128 + it)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class PreferenceTrainer:
    """Trains a diffusion backbone on preference data with one objective; see the module docstring. The setup
    methods a model family changes are grouped below (:class:`~diffalign.train.lm_trainer.LanguageModelTrainer`
    overrides them for causal language models); the loop, checkpoints and resume are shared."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.resume_from = resolve_resume(config)
        tc = config.train
        # accelerate keeps one mixed precision per process: a second run in the same process (a notebook, the
        # README's commands run one after another) with another precision would be refused. The process
        # group (PartialState) stays; only the precision and its autocast settings start afresh.
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            # on a machine without CUDA, torchrun processes join one gloo group (accelerate's MULTI_CPU)
            cpu=not torch.cuda.is_available(),
            mixed_precision=tc.mixed_precision,
            gradient_accumulation_steps=tc.gradient_accumulation,
            # the schedule counts optimiser steps: accelerate's default steps it once per process instead,
            # so on N GPUs the warm-up and decay would run N times too fast (diffusers' scripts multiply
            # their step counts by N to make up for it; resuming on another number of GPUs would then shift it)
            step_scheduler_with_optimizer=False,
            log_with=None if tc.report_to == "none" else tc.report_to,
            project_dir=str(self.output_dir),
            # DDP's gradients become views of its all-reduce buckets instead of a second copy
            # (saves one gradient-sized buffer per GPU: 9.6 GiB for a full SDXL fine-tune)
            kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                             InitProcessGroupKwargs(timeout=timedelta(seconds=tc.distributed_timeout_s))],
        )
        self.share = data_share(self.accelerator.process_index, self.accelerator.num_processes, tc.context_parallel)
        if tc.resume == "latest" and self.resume_from is None:
            self.accelerator.print(f"train.resume=latest: {self.output_dir} holds no checkpoint yet; starting at step 0")
        # the model's folder; for a Hub id, the cached snapshot, whose name is the revision
        self.model_folder = resolve_model_path(config.model.path).resolve()
        # the checkpoint's own state, read once; checked before any model loads
        self._resumed_state = None
        if self.resume_from is not None:
            try:
                self._resumed_state = json.loads((self.resume_from / "trainer_state.json").read_text())
            except (OSError, ValueError) as err:
                raise _unreadable_checkpoint(self.resume_from, err) from err
        if self._resumed_state is not None:
            self._check_same_run(self._resumed_state.get("run", {}))
        # bad rows met while reading before the checkpoint, as (row, column): the resumed run may meet them again
        self._bad_before_resume = {(i, c) for i, c in (self._resumed_state or {}).get("bad_rows_read", [])}
        set_seed(tc.seed)
        objective_cls = OBJECTIVES[config.objective.name]
        check_sharding(self.accelerator, config, objective_cls)
        self.online = objective_cls.dataset == "online"
        reads_data = not self.online or objective_cls.real_data  # DDO's rounds pair real images with samples
        if reads_data:
            self.dataset = self._load_dataset(data_layout(objective_cls))
        self._build_models(frozen_reference=objective_cls.frozen_reference)
        self.objective = self._make_objective(objective_cls)
        # what the objective trains beside the model (SparsePO's masks) joins the trained module before the
        # optimiser and DDP see it
        self._objective_modules = self.objective.trained_modules(self.module)
        for name, extra in self._objective_modules.items():
            self.module.add_module(name, extra.to(self.accelerator.device))
            self.params += list(extra.parameters())
        self.reader = None
        if reads_data:  # examples whose latents are cached are only hashed, not decoded
            workers = config.data.workers
            if workers is None:
                workers = 4 if self.accelerator.device.type == "cuda" else 0
            self.reader = ExampleReader(self.dataset, _run_order(config, self.dataset), workers,
                                        is_cached=None if self.encoder is None else
                                        example_cached(self.encoder, self.backbone.prompt_reads_sources,
                                                       self.objective.guides
                                                       and self.backbone.empty_prompt_reads_sources),
                                        augment=RandomFlip(tc.seed) if config.data.random_flip else None)
        if not reads_data:
            self.dataset = None  # no table: no rows to go bad
        if self.online:  # batches come from rounds of on-policy samples instead of a dataset
            self.rounds = self._make_rounds(reads_data)
        # rows dropped while loading the table: every process loaded it, so they are counted once
        self._bad_on_load = set(self._bad_rows())
        # closes over the accelerator, not the trainer: a trainer -> objective -> trainer cycle would keep the
        # DDP wrapper, and with it the process group, alive until the interpreter exits, whose teardown
        # then aborts a finished torchrun worker now and then ("terminate called without an active exception")
        accelerator = self.accelerator
        self.objective.mean_over_processes = lambda value: accelerator.reduce(value.reshape(1), "mean")[0]
        self._shard()  # under FSDP2: before the optimiser, which takes the sharded parameters
        self._build_optimizer()
        # objectives with state of their own (Self-NPO's EMA teacher) keep it in every checkpoint
        for i, stateful in enumerate(self.objective.attach(self.module)):
            self.extra_state.register(f"objective_{i}", stateful)
        self.validator = Validator(config.validation, self.output_dir, config.data.resolution, config.data.frames,
                                   config.data.width, config.model.prompt_tokens)
        vc = config.validation
        self.gold = None if vc.gold is None else GoldWatch(vc.gold, vc.gold_patience)
        self.drift = DriftWatch(dict(vc.drift_limits)) if vc.drift_limits else None
        self._best_weights: dict[int, list[torch.Tensor]] = {}  # a watch's best step -> the trained weights then
        if self.dataset is not None:  # what the objective learns from the data before the first step (BCO's UDM)
            self._fit_objective_to_data()

    # --- setup: the model family's parts (a subclass per family overrides these) --------------
    def _fit_objective_to_data(self) -> None:
        """Give the objective the data and the family's prompt embeddings (the text encoders' conditioning)."""
        fit = getattr(self.objective, "fit_to_data", None)
        if fit is not None:
            fit(self.dataset, self._embed_captions, self.config.train.seed)

    @torch.no_grad()
    def _embed_captions(self, captions: list[str]) -> torch.Tensor:
        """(N, D) one embedding per caption, through the cache if any: the conditioning's pooled embedding, else its
        token embeddings averaged over the prompt's tokens."""
        cond = self.backbone.encode_prompts(captions) if self.encoder is None else self.encoder.prompts(captions)
        return cond.prompt_embedding().cpu()

    def _load_dataset(self, layout: str) -> Any:
        return open_dataset(self.config.data, layout)

    def _make_objective(self, objective_cls: type) -> Any:
        return objective_cls.build(self.config, self.backbone)

    def _make_rounds(self, reads_data: bool) -> Any:
        """The online objectives' batch source: the round driver, or prompts alone for the methods that sample
        inside the loss."""
        if self.objective.samples_in_loss:
            return PromptBatches(self.config, self.backbone, self.accelerator, self.objective)
        return OnlineRounds(self.config, self.backbone, self.output_dir, self.accelerator, self.objective,
                            real=self._real_examples if reads_data else None)

    def _build_models(self, frozen_reference: bool) -> None:
        """Sets ``module`` (the trained module), ``reference`` (a frozen copy or None), ``params`` (the trained
        parameters) and ``encoder`` (the latent cache or None)."""
        said = distilled_warning(self.config.model.path)
        if said and self.accelerator.is_main_process:
            print(said, file=sys.stderr, flush=True)
        self.backbone, self.reference = build_models(self.config, self.accelerator.device, frozen_reference)
        self.module = self.backbone.denoiser
        degree = self.config.train.context_parallel
        if degree > 1:
            enable_context_parallel(self.backbone, self.reference, degree, self.accelerator.num_processes,
                                    self.accelerator.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        cache_dir = self.config.data.cache_dir
        # the key covers model and resolution: the same image at another size has other latents
        dc = self.config.data
        model_id = f"{self.model_folder}@{dc.resolution}px" + ("" if dc.width is None else f"x{dc.width}")
        self.encoder = None if cache_dir is None else CachedEncoder(
            self.backbone, TensorCache(cache_dir), model_id, latent_dtype=DTYPES[self.config.data.cache_latent_dtype])

    def _adamw_settings(self) -> dict[str, Any]:
        """The optimiser's hyperparameters from the config (at its start, and again on resume)."""
        tc = self.config.train
        return {"lr": tc.learning_rate, "betas": (tc.adam_beta1, tc.adam_beta2), "eps": tc.adam_epsilon,
                "weight_decay": tc.weight_decay}

    def _shard(self) -> None:
        """Under FSDP2 (:mod:`diffalign.train.fsdp2`), shard the trained module and a full fine-tune's frozen
        reference across the processes; ``params`` become the sharded parameters."""
        self.fsdp2 = fsdp2_plugin(self.accelerator)
        if self.fsdp2 is None:
            return
        tc = self.config.train
        shard(self.module, self.fsdp2, tc.mixed_precision, tc.reduce_dtype,
              called_apart=tuple(self._objective_modules.values()))
        if isinstance(self.reference, nn.Module):  # a frozen copy (a LoRA run's reference is its own base)
            shard(self.reference, self.fsdp2, tc.mixed_precision, tc.reduce_dtype)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def _build_optimizer(self) -> None:
        tc = self.config.train
        if tc.adam_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise UserError('train.adam_8bit=true needs bitsandbytes (CUDA): '
                                'pip install -e ".[adam8bit]"') from None
            optimizer = bnb.optim.AdamW8bit(self.params, **self._adamw_settings())
        else:
            # one fused kernel over all trained tensors instead of a dozen foreach ops; on CPU too (a full
            # fine-tune of the tiny SD1.5 UNet, 1 M parameters: 6.8 instead of 32 ms per optimiser step)
            fused = self.accelerator.device.type in ("cuda", "cpu")
            optimizer = torch.optim.AdamW(self.params, **self._adamw_settings(), fused=fused)
        scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                  num_training_steps=tc.max_steps)
        if self.fsdp2 is not None:  # sharded in place: no DDP wrapper, and the optimiser state is saved by DCP
            self.trained, self.optimizer = self.module, optimizer
            self.lr_scheduler = self.accelerator.prepare(scheduler)
        else:  # self.trained: the prepared (possibly DDP-wrapped) module
            self.trained, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.module, optimizer, scheduler)
        # a checkpoint keeps the trained weights, not a LoRA run's frozen base (which the resumed run loads)
        self.accelerator.register_save_state_pre_hook(keep_trained_weights_only)
        self.accelerator.register_load_state_pre_hook(load_trained_weights)
        self.ema = None
        # diffalign's own state in every checkpoint, as safetensors (accelerate's custom state would be a pickle)
        self.extra_state = ExtraState()
        if tc.ema_decay > 0:
            self.ema = EMAModel(self.params, decay=tc.ema_decay)
            self.extra_state.register("ema", self.ema)

    # --- data ----------------------------------------------------------------------------
    def _positions(self, step: int, micro: int) -> range:
        """Positions in the run's order of this process's share of the global micro-batch (step, micro): its
        data-parallel group's (one process, or a context-parallel group's every process)."""
        tc = self.config.train
        global_batch = tc.batch_size * self.share.count
        first = (step * tc.gradient_accumulation + micro) * global_batch + self.share.index * tc.batch_size
        return range(first, first + tc.batch_size)

    def _examples(self, step: int, micro: int) -> list[tuple[int, Any]]:
        """(position, example) of this process's share of micro-batch (step, micro); the next ones start reading."""
        tc = self.config.train
        ahead, later, last = [], step * tc.gradient_accumulation + micro + 1, tc.max_steps * tc.gradient_accumulation
        while self.reader.workers and len(ahead) < 2 * max(tc.batch_size, self.reader.workers) and later < last:
            ahead.extend(self._positions(*divmod(later, tc.gradient_accumulation)))  # the following micro-batches
            later += 1
        positions = self._positions(step, micro)
        self.reader.prefetch([*positions, *ahead])
        return [(p, self.reader.take(p)) for p in positions]

    def _micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's share of the global micro-batch (step, micro), encoded."""
        if self.online:
            return self.rounds.micro_batch(step, micro)
        tc = self.config.train
        examples = self._examples(step, micro)
        items = len(examples[0][1].image_ids)  # 2 for pairs, K for ranked lists
        latents, cond = self._encode([e for _, e in examples])
        latents = latents.view(len(examples), items, *latents.shape[1:])
        draws = [self.objective.draw(1, tuple(latents.shape[2:]), example_generator(tc.seed, p)) for p, _ in examples]
        device = self.accelerator.device
        targets = {"preference": torch.tensor([e.preference for _, e in examples], device=device)}
        if examples[0][1].scores is not None:
            targets["scores"] = torch.stack([e.scores for _, e in examples]).to(device)
        if self.config.data.weight_column is not None or self.config.data.ensemble == "weight":
            targets["weight"] = torch.tensor([e.weight for _, e in examples], device=device)
        if self.config.data.margin_column is not None:
            targets["margin"] = torch.tensor([e.margin for _, e in examples], device=device)
        if self.config.data.reward_columns:
            targets["reward_gap"] = torch.tensor([e.reward_gap for _, e in examples], device=device)
        return {
            "latents": latents.to(device),
            "cond": cond.to(device),
            "randomness": {k: torch.cat([d[k] for d in draws]).to(device) for k in draws[0]},
            "targets": targets,
        }

    def _real_examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        """Latents (on the CPU) and captions of the examples at ``positions`` of the run's order: an online
        objective's real images (DDO), read, replaced when bad, cached and encoded as offline examples are."""
        self.reader.prefetch(positions)
        examples = [self.reader.take(p) for p in positions]
        return self._encode_images(examples).cpu().contiguous(), [e.caption for e in examples]

    def _encode(self, examples: list) -> tuple[torch.Tensor, Any]:
        """Latents (all images of the examples, in order) and prompt embeddings, through the cache if any; an
        edit's prompt embeddings carry its source images' latents (``Conditioning.reference``)."""
        captions = [e.caption for e in examples]
        if self.backbone.prompt_reads_sources and examples[0].source_ids:  # the text encoder reads the sources too
            def pixels(indices: list[int]) -> torch.Tensor:
                return torch.stack([examples[i].sources for i in indices])
            def encode(texts: list[str]):
                return self.backbone.encode_prompts(texts, pixels(range(len(examples)))) if self.encoder is None \
                    else self.encoder.prompts(texts, [e.source_ids for e in examples], pixels)
            prompts = encode(captions)
            # its guidance's empty prompt, read with each example's sources where the text encoder reads them
            if self.objective.guides and self.backbone.empty_prompt_reads_sources:
                prompts = prompts.with_negative(encode([""] * len(examples)))
        else:
            prompts = self.backbone.encode_prompts(captions) if self.encoder is None else self.encoder.prompts(captions)
        if examples[0].source_ids:
            sources = self._encode_images(examples, "sources")
            prompts = dataclasses.replace(prompts, reference=sources.view(len(examples), -1, *sources.shape[1:]))
        return self._encode_images(examples), prompts

    def _encode_images(self, examples: list, which: str = "pixels") -> torch.Tensor:
        """Latents of all images of the examples, in order, through the cache if any: their items (``which`` =
        "pixels") or their edit sources ("sources")."""
        ids = [i for e in examples for i in (e.image_ids if which == "pixels" else e.source_ids)]
        sources = which == "sources"  # what the denoiser reads of a source (Backbone.encode_sources)
        if self.encoder is None:
            pixels = torch.cat([getattr(e, which) for e in examples])
            return self.backbone.encode_sources(pixels) if sources else self.backbone.encode_images(pixels)
        per_example = len(ids) // len(examples)
        images = [getattr(e, which)[k] if getattr(e, which) is not None else None
                  for e in examples for k in range(per_example)]
        return self.encoder.latents(ids, lambda idx: torch.stack([images[i] for i in idx]), sources=sources)

    def _precompute(self, first_step: int) -> None:
        """``data.precompute``: cache what the rest of the run reads, then move the encoders off the GPU.

        The run's examples are known in advance (a pure function of seed and position, bad
        rows replaced as in training), so exactly those are encoded, by the process that will
        read them; examples cached already are only hashed. After this no step needs the text
        encoders or the VAE (objectives that guide with an empty prompt encoded it when they
        were built), so they wait on the CPU.
        """
        tc = self.config.train
        met = dict(self.dataset.bad_rows)  # this pass does not count toward the run's skipped rows
        for step in tqdm(range(first_step, tc.max_steps), desc="data.precompute: encoding the latents and prompts of each step", unit="step",
                         disable=not self.accelerator.is_local_main_process):
            for micro in range(tc.gradient_accumulation):
                examples = [e for _, e in self._examples(step, micro)]
                decoded = [e for e in examples if e.pixels is not None]  # what of them is not cached yet
                if decoded:
                    self._encode(decoded)
        self.dataset.bad_rows.clear()
        self.dataset.bad_rows.update(met)
        self._publish_cache()
        self._encoders_to(torch.device("cpu"))

    def _publish_cache(self) -> None:
        """Write out what this process has cached but not yet published (at checkpoints and at the end)."""
        if self.encoder is not None:
            self.encoder.cache.flush()

    def _encoders_to(self, device: torch.device) -> None:
        for module in self.backbone.frozen_components().values():
            module.to(device)

    # --- checkpoints ---------------------------------------------------------------------
    def _trained_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def _check_room(self, needed: int, what: str, last_checkpoint: str | None) -> None:
        """A clear stop, agreed by every process, before writing ``needed`` bytes that the disk of output_dir
        has no room for: a disk that fills up mid-write fails in torch's or safetensors' own words, after
        minutes of writing, with whatever the processes had written left behind."""
        free = shutil.disk_usage(self.output_dir).free
        short = torch.tensor([float(needed > free)], device=self.accelerator.device)
        if self.accelerator.reduce(short, "sum").item() == 0:
            return
        resume = (f"The last complete checkpoint is {last_checkpoint}: free some space and resume with "
                  "train.resume=latest." if last_checkpoint else "The run has no checkpoint yet.")
        raise UserError(f"{what} would take about {needed / 2**30:.2f} GiB, and the disk of {self.output_dir} has "
                        f"{free / 2**30:.2f} GiB free, so diffalign stopped before writing it. {resume}")

    def _first_checkpoint_bytes(self) -> int:
        """About how large the run's first checkpoint is: the trained weights, AdamW's two moments, each state kept
        beside them (an EMA, shadow weights: counted as a copy of the weights each) and 16 MiB for the rest."""
        return self._trained_bytes() * (3 + len(self.extra_state.objects)) + 16 * 2**20

    def _refuse_non_finite_weights(self, what: str, state: dict[str, Any]) -> None:
        """Stop, agreed by every process, rather than write weights holding NaN or inf as ``what``."""
        bad = (~all_finite(self.params)).float().reshape(1).to(self.accelerator.device)
        if self.accelerator.reduce(bad, "sum").item() == 0:
            return
        last = state["last_good_checkpoint"]
        raise UserError(f"the trained weights hold NaN or inf values, so {what} was not written and the run failed. "
                        + (f"The last good checkpoint is {last}; resume it with a lower train.learning_rate or "
                           "objective.beta (train.resume=PATH)." if last else "The run has no good checkpoint; lower "
                           "train.learning_rate or objective.beta and start again."))

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        root = self.output_dir / CHECKPOINTS
        final = root / f"step-{step:07d}"
        tmp = root / (final.name + ".tmp")
        latest = _checkpoint_dirs(self.output_dir)[-1:]
        # as large as the last one; the first: the trained weights and AdamW's two moments (and an EMA copy)
        needed = sum(f.stat().st_size for f in latest[0].rglob("*") if f.is_file()) if latest else \
            self._first_checkpoint_bytes()
        self._check_room(needed, f"checkpoint {final.name} (written before the oldest of train.checkpoints_keep "
                                 "is removed)", state["last_good_checkpoint"])
        self._refuse_non_finite_weights(f"checkpoint {final.name}", state)
        self._publish_cache()  # a resumed run then reads, not re-encodes, what this one encoded
        state = {**state, "step": step, "bad_rows_read": sorted(self._bad_read_by_all_processes()),
                 "run": self._run_identity()}
        try:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            if self.fsdp2 is not None:  # every process writes its shard
                save_sharded(tmp, self.module, self.optimizer)
            self.extra_state.save(tmp, write=self.accelerator.is_main_process)
            # every process writes its own random state into tmp: all must be done before it is renamed
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps(json_safe(state)[0]))
                with_usual_permissions(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)  # a checkpoint is complete or absent, never half-written
        except Exception as err:
            if not is_write_failure(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failure(err, root, f"checkpoint {final.name}", needed, state["last_good_checkpoint"]) from None
        if self.accelerator.is_main_process:
            for old in _checkpoint_dirs(self.output_dir)[: -self.config.train.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _load_checkpoint(self) -> dict[str, Any]:
        refuse_pickles(self.resume_from)
        try:
            sharded = (self.resume_from / SHARDED_STATE).is_dir()
            if sharded and self.fsdp2 is None:
                # written under FSDP2, resumed on whole weights (fewer processes): accelerate reads the schedule and
                # the random states, DCP the weights and AdamW's state
                optimizers, self.accelerator._optimizers = self.accelerator._optimizers, []
                try:
                    self.accelerator.load_state(str(self.resume_from))
                finally:
                    self.accelerator._optimizers = optimizers
            else:
                self.accelerator.load_state(str(self.resume_from))
            if sharded or self.fsdp2 is not None:
                load_sharded(self.resume_from, self.module, getattr(self.optimizer, "optimizer", self.optimizer))
            self.extra_state.load(self.resume_from)
        except UserError:
            raise
        except Exception as err:  # a truncated or damaged file, in safetensors', torch's or pickle's own words
            raise _unreadable_checkpoint(self.resume_from, err) from err
        self._settings_from_config()
        return self._resumed_state

    def _settings_from_config(self) -> None:
        """Train on with this config's learning rate, AdamW settings and EMA decay, not the checkpoint's.

        Loading the optimiser's state also restores its hyperparameters, the scheduler's its base
        learning rate and the EMA's its decay, so a run resumed with a lower ``train.learning_rate``
        (the advice after a NaN stop) would silently keep the old one. The schedule's shape (warm-up,
        decay) already follows the config; the current rate is recomputed from it at the resumed step.
        """
        tc = self.config.train
        scheduler = self.lr_scheduler.scheduler
        scheduler.base_lrs = [tc.learning_rate] * len(scheduler.base_lrs)
        for group, scale in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group.update(self._adamw_settings(), initial_lr=tc.learning_rate,
                         lr=tc.learning_rate * scale(scheduler.last_epoch))
        if self.ema is not None:
            self.ema.decay = tc.ema_decay

    def _run_identity(self) -> dict[str, Any]:
        """The settings that decide which examples, timesteps and noise each step sees, and what is trained.

        A resumed run must keep them (learning rate, beta, max_steps and the like may change).
        """
        c = self.config
        return {
            "model.path": str(self.model_folder),
            "objective.name": c.objective.name,
            "train.lora_rank": c.train.lora_rank,
            "train.lora_targets": list(c.train.lora_targets) if c.train.lora_rank > 0 else None,
            "train.seed": c.train.seed,
            "train.gradient_accumulation": c.train.gradient_accumulation,
            "train.batch_size x processes": c.train.batch_size * self.share.count,
            # a local path as an absolute one; a Hub dataset id as given
            "data.path": str(Path(c.data.path).resolve()) if c.data.path and Path(c.data.path).exists()
            else c.data.path,
            "data.split": c.data.split,
            "data.resolution": c.data.resolution,
            "data.width": c.data.width,
            "model.prompt_tokens": c.model.prompt_tokens,
            "data.random_flip": c.data.random_flip,
            "data.ties": c.data.ties,
            "data.positive_ratio": c.data.positive_ratio,
            "data.weight_column": c.data.weight_column,
            "data.curriculum": c.data.curriculum,
            "data.margin_column": c.data.margin_column,
            "data.ensemble": c.data.ensemble,
            "data.ensemble_columns": c.data.ensemble_columns,
            "data.reward_columns": c.data.reward_columns,
            "data.step_pattern": c.data.step_pattern,
            "data.estimator": [c.data.estimator, c.data.estimator_passes, c.data.estimator_keep],
            "data columns": [c.data.caption_column, *c.data.image_columns, c.data.label_column, *c.data.score_columns,
                             c.data.image_column, c.data.images_column, c.data.scores_column],
            "text columns": [c.data.prompt_column, c.data.chosen_column, c.data.rejected_column,
                             c.data.completion_column, c.data.completions_column, c.data.max_length],
        }

    def _check_same_run(self, saved: dict[str, Any]) -> None:
        changed = [f"{key} was {saved[key]!r}, now {value!r}" for key, value in self._run_identity().items()
                   if key in saved and saved[key] != value]
        if changed:
            raise UserError(
                f"{self.resume_from} belongs to a run with other settings ({'; '.join(changed)}), so resuming it would "
                "not continue that run: the steps would read other examples or train other weights. Resume with "
                "the checkpoint's values (its run's config.yaml has them), or start a new run in another output_dir."
            )

    # --- the loop ------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        finally:
            if self.reader is not None:
                self.reader.close()

    def _train(self) -> dict[str, Any]:
        tc, acc = self.config.train, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            save_config(self.config, self.output_dir / "config.yaml")
        if acc.log_with:
            acc.init_trackers("diffalign", config=flat_hyperparameters(to_dict(self.config)))
        state = {"step": 0, "bad_steps": 0, "last_good_checkpoint": None}
        if self.resume_from is not None:  # its state names the checkpoint before it as the last good one
            state = {**self._load_checkpoint(), "last_good_checkpoint": str(self.resume_from)}
        if self.gold is not None:
            self.gold.load(state.get("gold", []))
        if self.drift is not None:
            self.drift.load(state.get("drift", []))
        metrics_path = self.output_dir / "metrics.jsonl"
        step = state["step"]
        if self.config.data.precompute:
            self._precompute(step)
        bar = tqdm(total=tc.max_steps, initial=step, disable=not acc.is_local_main_process, desc="train")
        history: list[dict[str, float]] = []
        interrupted = False
        started, pairs_done = time.perf_counter(), 0
        self._validation_s = 0.0  # this process's time in validations, which train_s leaves out
        if step == 0:  # the watches' baseline; one validation cannot show a fall
            self._watch(step, self._validate(step, started), history, state)
        with _StopSignal() as stop:
            while step < tc.max_steps:
                try:
                    logs, finite = self._optimizer_step(step)
                except PausedRound as paused:  # labels to give, a reward server down: nothing of this step ran
                    checkpoint = self._save_checkpoint(step, state)
                    if isinstance(paused, NeedsLabels):  # its message says how to go on
                        raise UserError(str(paused)) from None
                    raise UserError(f"{paused}. The run is checkpointed at step {step} ({checkpoint}); once that is "
                                    "fixed, the same command with train.resume=latest samples the round again") from None
                if not finite:
                    state["bad_steps"] += 1
                    acc.print(f"step {step}: non-finite loss or gradients; step skipped "
                              f"({state['bad_steps']}/{tc.max_bad_steps} allowed)")
                    if state["bad_steps"] > tc.max_bad_steps:
                        raise UserError(
                            f"the loss or its gradients were NaN/inf on {state['bad_steps']} steps (train.max_bad_steps="
                            f"{tc.max_bad_steps}); stopped at step {step}. The last good checkpoint is "
                            f"{state['last_good_checkpoint']}. Lower the learning rate or beta, or check the data."
                        )
                step += 1
                pairs_done += logs.pop("pairs", 0)
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    logs = self._mean_over_processes(logs)
                    elapsed = time.perf_counter() - started  # since this process began training: rounds, steps,
                    logs.update(step=step, lr=self.lr_scheduler.get_last_lr()[0], elapsed_s=elapsed,  # validations
                                train_s=elapsed - self._validation_s,  # the same without validations
                                pairs_per_s=pairs_done / max(elapsed, 1e-9),
                                skipped_rows=len(self._bad_on_load | self._bad_read_by_all_processes()))
                    history.append(logs)
                    shown = {"loss": f"{logs.get('loss', float('nan')):.4f}", "pairs_s": f"{logs['pairs_per_s']:.2f}"}
                    if "implicit_acc" in logs:  # preference objectives; Self-NPO has none
                        shown["acc"] = f"{logs['implicit_acc']:.2f}"
                    bar.set_postfix(**shown)
                    if acc.is_main_process:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(json_safe(logs)[0]) + "\n")
                    acc.log(logs, step=step)
                gamed = self._watch(step, self._validate(step, started), history, state)
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stop.requested or gamed:
                    state["last_good_checkpoint"] = str(self._save_checkpoint(step, state))
                if stop.requested:
                    interrupted = True
                    break
                if gamed:
                    state["stopped_early"] = gamed = self._restore_best(gamed, state)
                    acc.print(gamed)
                    break
        bar.close()
        summary = self._finish(step, state, history, interrupted, stop.signum)
        # A barrier is the last collective before teardown. Under gloo, a worker thread destroys a
        # finished all-gather (its tensors are Python-owned, so that takes the GIL), while freeing the
        # DDP wrapper joins those threads with the GIL held: a process that went from _finish's
        # gather_object straight to teardown was seen to hang there (torch 2.11; pytorch/pytorch#56297).
        # The barrier waits with the GIL released, so those destructors have run when it returns.
        acc.wait_for_everyone()
        acc.end_training()
        return summary

    def _mean_over_processes(self, logs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each logged figure's mean over the processes that have it, in one all-reduce and one host sync. A process
        can lack a figure another has (KTO's rejected-side log-prob when its micro-batch holds only desirable rows),
        so the names are agreed first; a figure no process has this step is not logged."""
        acc = self.accelerator
        names = sorted(set().union(*gather_object([sorted(logs)]))) if acc.num_processes > 1 else sorted(logs)
        values = [logs[k].float().reshape(()).to(acc.device) if k in logs else torch.zeros((), device=acc.device)
                  for k in names]
        present = [torch.ones((), device=acc.device) if k in logs else torch.zeros((), device=acc.device) for k in names]
        sums, counts = acc.reduce(torch.stack([torch.stack(values), torch.stack(present)]), "sum").tolist()
        return {k: total / count for k, total, count in zip(names, sums, counts) if count}

    def _optimizer_step(self, step: int) -> tuple[dict[str, Any], bool]:
        tc, acc = self.config.train, self.accelerator
        totals: dict[str, Any] = {}
        finite = torch.ones((), dtype=torch.bool, device=acc.device)
        for micro in range(tc.gradient_accumulation):
            batch = self._micro_batch(step, micro)
            with acc.accumulate(self.trained):
                with acc.autocast():
                    loss, metrics = self._objective_loss(batch)
                finite = finite & torch.isfinite(loss.detach())
                # under context parallelism each process's gradients are its tokens' part of the group's sum, which
                # DDP and FSDP2 average over every process: times the degree, that average is the data-parallel mean
                acc.backward(loss * tc.context_parallel if tc.context_parallel > 1 else loss)
                # the batch's own figures (an online round's mean reward) are logged beside the objective's
                for k, v in {"loss": loss.detach(), **metrics, **batch.get("logged", {})}.items():
                    totals[k] = totals.get(k, 0.0) + v.detach() / tc.gradient_accumulation
        if tc.mixed_precision != "fp16":  # under fp16 the GradScaler skips overflowing steps itself, as it should
            # a finite loss can still give inf/NaN gradients (an overflow), and with them NaN weights
            finite = finite & all_finite([p.grad for p in self.params if p.grad is not None]).to(acc.device)
        # NaN guard, agreed by all processes (one boolean read per step): all step or none do
        ok = bool(acc.gather(finite.reshape(1)).all().item())
        if ok:
            if tc.max_grad_norm > 0 and acc.sync_gradients:
                acc.clip_grad_norm_(self.params, tc.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                ema_step(self.ema, self.params, step, tc.ema_every)
            self.objective.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["pairs"] = tc.batch_size * self.share.count * tc.gradient_accumulation
        return totals, ok

    def _write_final(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """The final weights into ``final/``, written whole or not at all (through ``final.tmp``)."""
        final, tmp = self.output_dir / "final", self.output_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._save_final_weights(weights, tmp)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_write_failure(err):
                raise
            raise write_failure(err, self.output_dir, "the final weights", self._trained_bytes(),
                                state["last_good_checkpoint"]) from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def _objective_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss and metrics on this process's micro-batch."""
        return self.objective(self.backbone, batch["latents"], batch["cond"], batch["randomness"],
                              self.trained, self.reference, **batch["targets"])

    def _save_final_weights(self, weights: dict[str, torch.Tensor], folder: Path) -> Path:
        """Write the final weights (the complete state dict of the trained module) on the main process."""
        return save_final_weights(self.backbone, self.accelerator.unwrap_model(self.trained), weights, folder,
                                  lora=self.config.train.lora_rank > 0)

    def _validate(self, step: int, started: float) -> dict[str, float] | None:
        """Sample the validation prompts when due, each process its share; the scores on the main process, {} on
        the others, None when no validation was due. ``started`` is when this process began training: the log
        gets the training time until now without the validations (``train_s``, what reward-against-time curves
        plot), and the validation's own time is added to the validations' total."""
        if not self.validator.due(step, self.config.train.max_steps):
            return None
        began = time.perf_counter()
        train_s = began - started - self._validation_s
        if self.config.data.precompute:  # the encoders wait on the CPU between validations
            self._encoders_to(self.accelerator.device)
        with self.accelerator.autocast():
            scores = self.validator.run(self.backbone.pipe, step, self.accelerator.state, train_s=train_s,
                                        lockstep=self.fsdp2 is not None, group=self.config.train.context_parallel)
        if self.config.data.precompute:
            self._encoders_to(torch.device("cpu"))
        self._validation_s += time.perf_counter() - began
        if scores:
            self.accelerator.log(scores, step=step)
        grid = self.validator.grid_path(step)
        animated = grid.with_suffix(".webp")
        if self.accelerator.is_main_process and self.accelerator.trackers and animated.is_file():  # a video run's
            with Image.open(animated) as image:
                frames = [frame.copy() for frame in ImageSequence.Iterator(image)]
            log_animation(self.accelerator.trackers, "validation/samples", frames, step, CLIP_FPS)
        elif self.accelerator.is_main_process and self.accelerator.trackers and grid.is_file():
            with Image.open(grid) as image:
                log_image(self.accelerator.trackers, "validation/samples", image, step)
        return scores

    def _watch(self, step: int, scores: dict[str, float] | None, history: list[dict[str, float]],
               state: dict[str, Any]) -> tuple[str, int | None] | None:
        """After a validation, whether a watch says to stop, as (why, the step it calls best): the gold reward
        (:class:`GoldWatch`) or the images' drift (:class:`DriftWatch`). The main process decides, every process
        gets its answer, and each keeps a copy of the trained weights at every step a watch calls its best, to end
        the run with if it stops (:meth:`_restore_best`)."""
        watches = [w for w in (self.gold, self.drift) if w is not None]
        if not watches or scores is None:
            return None
        decision: list[Any] = [None, []]
        if self.accelerator.is_main_process:
            verdicts = []
            if self.gold is not None:
                since = [logs["train_reward"] for logs in history if "train_reward" in logs
                         and logs["step"] > (self.gold.seen[-1][0] if self.gold.seen else -1)]
                train_reward = sum(since) / len(since) if since else None
                verdicts.append((self.gold.observe(step, scores[f"val_{self.gold.reward}"], train_reward), self.gold))
            if self.drift is not None:
                stats = {name[len("stat_"):]: value for name, value in scores.items() if name.startswith("stat_")}
                verdicts.append((self.drift.observe(step, stats), self.drift))
            decision = [next(((why, w.best_step) for why, w in verdicts if why), None), [w.best_step for w in watches]]
            state["gold"] = self.gold.state() if self.gold is not None else []
            state["drift"] = self.drift.state() if self.drift is not None else []
        stop, best_steps = broadcast_object_list(decision)
        if step in best_steps:
            self._best_weights[step] = [local(p).detach().to("cpu", copy=True) for p in self.params]
        self._best_weights = {s: w for s, w in self._best_weights.items() if s in best_steps}
        return stop

    def _restore_best(self, stop: tuple[str, int | None], state: dict[str, Any]) -> str:
        """A watch stopped the run: its final weights become those of the step the watch calls best, when this
        process kept them (from the step it saw them: not for a best step before a resume). The message, saying
        which weights the run ends with."""
        why, best = stop
        kept = self._best_weights.get(best)
        if kept is None:
            note = "" if best is None else f" (step {best}'s were not kept: the run resumed after it)"
            return f"{why} The final weights are this step's{note}."
        with torch.no_grad():
            for param, value in zip(self.params, kept, strict=True):
                local(param).copy_(value.to(local(param).device))
        state["final_from_step"] = best
        return f"{why} The final weights are step {best}'s."

    def _gpu_peak_gib(self) -> float | None:
        """The largest ``torch.cuda.max_memory_allocated`` of any process over the run, in GiB (what
        scripts/gpu_fsdp2.sh reads to measure a sharded run); None without CUDA. Every process takes part."""
        if self.accelerator.device.type != "cuda":
            return None
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30],
                            device=self.accelerator.device)
        return float(self.accelerator.gather(peak).max())

    def _bad_rows(self) -> dict[tuple[int, str], str]:
        """The bad rows the run's table has met, by (row, column); none for a run that reads no table."""
        return {} if self.dataset is None else self.dataset.bad_rows

    def _bad_read_by_all_processes(self) -> set[tuple[int, str]]:
        """Bad rows, as (row, column), that any process met while reading since the run began (before a
        resume too); a row met by two processes, or in two epochs, is one bad row."""
        mine = [key for key in self._bad_rows() if key not in self._bad_on_load]
        return self._bad_before_resume.union(*(set(keys) for keys in gather_object([mine])))

    def _skipped_rows_of_all_processes(self) -> dict[str, int]:
        """Bad rows of the run, per column: those dropped on load and those met while reading, each once."""
        return dict(Counter(column for _, column in self._bad_on_load | self._bad_read_by_all_processes()))

    def _finish(self, step: int, state: dict[str, Any], history: list[dict[str, float]], interrupted: bool,
                signum: int | None = None):
        acc = self.accelerator
        self._publish_cache()
        acc.wait_for_everyone()
        final_dir = None
        if self.ema is not None and not interrupted and "final_from_step" not in state:
            self.ema.copy_to(self.params)  # the final weights are the averaged ones (a watch's best step's: live)
        if not interrupted:
            if step > 0 and state["bad_steps"] >= step:
                raise UserError(f"every one of the run's {step} steps was skipped (non-finite loss or gradients), so "
                                "nothing was trained and no final weights were written. Lower train.learning_rate or "
                                "objective.beta, or check the data's labels and scores")
            self._refuse_non_finite_weights("the final weights", state)
            self._check_room(self._trained_bytes(), "the final weights", state["last_good_checkpoint"])
            # every process takes part: under FSDP / ZeRO-3 this gathers the shards onto the main process
            whole = full_weights(self.module) if self.fsdp2 is not None else acc.get_state_dict(self.trained)
            weights = {key: value for key, value in whole.items()
                       if key.split(".", 1)[0] not in self._objective_modules}  # the model's own weights
            if acc.is_main_process:
                final_dir = self._write_final(weights, state)
        summary = {
            "steps": step,
            "interrupted": interrupted,
            "signal": signum if interrupted else None,  # SIGINT (2) or SIGTERM (15) that stopped the run
            "bad_steps": state["bad_steps"],
            "stopped_early": state.get("stopped_early"),  # a watch's reason, when one stopped the run
            "final_from_step": state.get("final_from_step"),  # the best step whose weights the run ended with
            "skipped_rows": self._skipped_rows_of_all_processes(),
            "gpu_peak_gib": self._gpu_peak_gib(),  # the most any process's GPU held (None on CPUs)
            "final": None if final_dir is None else str(final_dir),
            "last": history[-1] if history else {},
        }
        if acc.is_main_process:
            written, non_finite = json_safe(summary)
            if non_finite:  # JSON has no NaN: such values are null, and named
                written["non_finite"] = {"keys": non_finite, "note": "these values were NaN or inf; written as null"}
            (self.output_dir / "metrics.json").write_text(json.dumps(written, indent=2) + "\n")
            if summary["skipped_rows"]:
                columns = ", ".join(f"{c}: {n}" for c, n in sorted(summary["skipped_rows"].items()))
                count = sum(summary["skipped_rows"].values())
                print(f"skipped {count} bad row{'s' if count != 1 else ''} ({columns}); see "
                      f"{self.output_dir / 'metrics.json'}", file=sys.stderr)
        return summary


def train(config: Config) -> dict[str, Any]:
    """Run a training job described by a validated :class:`Config`; returns the summary. One run at a time holds
    its output_dir (:class:`~diffalign.train.run_folder.RunLock`)."""
    if config.train.resume == "latest":  # names a typo of output_dir before the lock creates that folder
        resolve_resume(config)
    with RunLock(Path(config.output_dir)):
        _remove_half_written(Path(config.output_dir))
        return _train_locked(config)


def _remove_half_written(out: Path) -> None:
    """A checkpoint or final folder left as ``.tmp`` by a run that died while writing it (a full disk, a kill):
    never complete, so removed, and said."""
    if not is_rank_zero():
        return
    for tmp in [*(out / CHECKPOINTS).glob("*.tmp"), *out.glob("final.tmp")]:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}, left half-written by an earlier run", file=sys.stderr)


def _train_locked(config: Config) -> dict[str, Any]:
    out = Path(config.output_dir)
    if config.train.resume is None and _checkpoint_dirs(out):
        raise UserError(
            f"{config.output_dir} already holds checkpoints; continue with train.resume=latest, or choose "
            "another output_dir"
        )
    if config.train.resume is None and ((out / "final").exists() or (out / "metrics.jsonl").exists()):
        raise UserError(f"{config.output_dir} already holds a run (its final weights or its metrics), which a new "
                        "one would overwrite and mix its logs into; choose another output_dir, or delete that one "
                        "to start over")
    if OBJECTIVES[config.objective.name].family == "lm":
        from diffalign.train.lm_trainer import LanguageModelTrainer

        return LanguageModelTrainer(config).train()
    return PreferenceTrainer(config).train()
