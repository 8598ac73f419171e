"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated before any model loads.

Every field has a docstring (the comment above it). Unknown keys are errors that name the key
and the closest valid one; values are checked against the field's type; choices are checked
by :meth:`Config.validate`. The resolved config is written to the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from diffalign.errors import UserError
from diffalign.train.bounds import check_bounds, check_finite

if TYPE_CHECKING:  # the registry is imported where the config is validated
    from diffalign.losses.registry import LossSpec


@dataclass
class ModelConfig:
    # local diffusers folder, a .safetensors file (then set `config`), or the Hub id of a model in the
    # local Hugging Face cache (stabilityai/stable-diffusion-xl-base-1.0; nothing is downloaded); for the
    # language-model objectives (lm_*), a transformers causal-LM folder (save_pretrained's layout)
    path: str = ""
    # weights variant of a diffusers folder, e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors
    # (when only those were downloaded); trained weights are fp32 either way
    variant: str | None = None
    # for a single-file `path`: the local diffusers folder giving its architecture
    config: str | None = None
    # a .safetensors file holding only the UNet/transformer, replacing the folder's
    denoiser_file: str | None = None
    # build from `path`'s configs with random weights (tests and benchmarks; no weights needed)
    random_init: bool = False
    # the guidance value a guidance-distilled denoiser (FLUX.1-dev) is given in its guidance embedding
    # while it trains and samples rounds (3.5, as diffusers' FLUX training scripts); others ignore it
    distilled_guidance: float = 3.5
    # attention kernel: "sdpa" (PyTorch, default) or "xformers" (optional CUDA extra)
    attention: str = "sdpa"
    # recompute activations in the backward pass: less memory, ~30% more compute
    gradient_checkpointing: bool = False
    # channels_last memory format for UNets (faster convolutions on tensor cores)
    channels_last: bool = False
    # torch.compile the denoiser's forward (in place: weights, LoRA and checkpoints keep their names);
    # on CPU it pays only for tiny models (a real SD1.5 UNet ran 0.71x; README, Speed)
    compile: bool = False


@dataclass
class ObjectiveConfig:
    # method, from diffalign.objectives.OBJECTIVES
    name: str = "diffusion_dpo"
    # core loss by registry name (`diffalign losses`): dpo, ipo, hinge, kto-style, ...
    loss: str = "dpo"
    # implicit-reward scale; Diffusion-DPO uses thousands because errors are per-pixel means (a language
    # model's default is 0.1, TRL's, as its scores are summed token log-probs)
    beta: float = 2500.0
    # extra keyword options of the core loss (label_smoothing, gamma, ...)
    loss_options: dict = field(default_factory=dict)
    # timestep sampler: uniform, logit_normal or mode
    timestep_sampler: str = "uniform"
    # fraction [lo, hi) of the noise schedule to train on (d3po: the sampler steps whose t / T is in it)
    t_range: list = field(default_factory=lambda: [0.0, 1.0])
    # weight of the squared error: uniform, min_snr (eps/v models), sigma_sqrt or cosmap (flow)
    weighting: str = "uniform"
    # inpo, smpo: DDIM inversion grid (points over the whole schedule), its stochastic term eta,
    # and ReNoise refinements per move; empty = the method's default (inpo: 10, 0.1, 0; smpo: 10, 0, 1)
    inversion_steps: int | None = None
    inversion_eta: float | None = None
    renoise_iterations: int | None = None
    # online objectives (d3po, grpo): the stochastic sampler of the rounds (DDIM eta or the flow SDE's
    # noise level), its steps and guidance scale; the guided prediction is the policy that is trained
    sample_steps: int = 20
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    # d3po: p_theta / p_ref, grpo: p_theta / p_sampler is clipped to [1 - ratio_clip, 1 + ratio_clip];
    # empty = the method's (d3po 0.1, grpo 1e-4)
    ratio_clip: float | None = None
    # grpo, nft: weight of the KL to the reference (Flow-GRPO's and DiffusionNFT's beta; empty = the
    # method's, grpo 0.01, nft 1e-4), advantages clipped to [-advantage_clip, advantage_clip], and the
    # standard deviation that scales them: of all the round's rewards (global) or of the prompt's group
    kl_coef: float | None = None
    advantage_clip: float = 5.0
    advantage_std: str = "global"
    # disco: the temperature of the robust log-mean-exp over a group's negatives, and the squared-hinge
    # penalty beta [KL - delta]_+^2 that holds the KL to the sampler below delta (the authors' log-L run)
    disco_tau: float = 10.0
    disco_beta: float = 1000.0
    disco_delta: float = 1.0e-4
    # nft: the guidance strength beta of the implicit positive and negative policies
    # (1 - beta) v_old + beta v and (1 + beta) v_old - beta v (DiffusionNFT's config.beta)
    nft_beta: float = 1.0
    # language-model rounds (lm_online_dpo, lm_sppo, lm_dno, lm_inpo): tokens sampled per completion and the
    # sampling temperature (plain sampling, no top-k or top-p)
    max_new_tokens: int = 64
    sample_temperature: float = 1.0
    # dno: a prompt's best-vs-worst pair is trained only when their rewards differ by at least this much
    # (DNO's large-margin filter; in the reward's units)
    min_reward_gap: float = 0.0
    # rso: Algorithm 1's beta, in the reward's units (each candidate accepted with probability
    # exp((r - r_max) / beta)), and how many of a prompt's candidates it accepts (paired in acceptance order)
    rso_beta: float = 0.5
    rso_accepted: int = 4
    # self_npo (truncated diffusion fine-tuning): the DDIM grid the teacher walks, the number of
    # teacher moves from the noised image, the teacher's guidance scale (diffusers convention:
    # 0 = the unconditional prediction, the authors' w = -1), the EMA rate of the teacher
    # (1.0 = the frozen base model) and the pseudo-Huber constant of objective.loss=huber
    truncation_grid: int = 25
    truncated_steps: int = 5
    teacher_guidance_scale: float = 0.0
    teacher_ema: float = 0.999
    huber_c: float = 0.001


@dataclass
class DataConfig:
    # parquet file or folder of parquet files, a `datasets` folder saved to disk, a .jsonl index,
    # (captioned images) a folder of images with .txt captions, or the Hub id of a dataset in the
    # local Hugging Face cache (hf download yuvalkirstain/pickapic_v2 --repo-type dataset)
    path: str = ""
    # the split to read: of a saved DatasetDict, or the parquet shards of a folder (or cached Hub
    # dataset) that names them as the Hub does (data/train-00000-of-00645.parquet, or train/*.parquet)
    split: str = "train"
    # training resolution (square crops, pixels)
    resolution: int = 512
    # flip each image left-right with probability 1/2, as the Diffusion-DPO authors' train.py does
    # (each image on its own); decided by (seed, position), so resumes stay exact; a flipped image's
    # latents are cached as an image of their own
    random_flip: bool = False
    # a bad row (undecodable image, missing caption, label out of range, NaN label): "skip" (counted) or "raise"
    on_error: str = "skip"
    # an image of more pixels than this is a bad row, skipped before it is decoded (a decompression bomb: a few KB of
    # PNG that claim 20000 x 20000 pixels, 1.2 GB once decoded). The default is PIL's own warning threshold (9459^2);
    # PIL refuses anything above twice it whatever this says
    max_image_pixels: int = 89_478_485
    # tied pairs (label 0.5/0.5): "drop", or "soft" to keep them with preference 0.5
    ties: str = "drop"
    # folder for cached VAE latents and prompt embeddings (safetensors shards); none = encode each step
    cache_dir: str | None = None
    # dtype the cached latents are stored in: fp32 (as the VAE gives them), or bf16 for half the disk
    # (SDXL at 1024 px: 256 -> 128 KiB per image; SD3: 1 MiB -> 512 KiB); read back as fp32
    cache_latent_dtype: str = "fp32"
    # encode every example into cache_dir before the first step, then keep the text encoders and
    # the VAE off the GPU for the whole run (they come back only to sample validation images):
    # frees their memory (SDXL: 1.8 GiB; SD3 with T5: 11 GiB) and all encoding from the steps
    precompute: bool = False
    # threads that read and decode the next examples while the GPU trains on this one (per
    # process); 0 = read inside the training loop; none = 4 on a GPU, 0 on CPU (where the step's
    # own compute needs every core)
    workers: int | None = None
    # caption column
    caption_column: str = "caption"
    # the two image columns (JPEG/PNG bytes, or paths relative to a .jsonl index)
    image_columns: list = field(default_factory=lambda: ["jpg_0", "jpg_1"])
    # the label column of the first image (1 = first wins, 0 = second wins, 0.5 = tie); for
    # diffusion_kto the column of each image's binary label (1/true liked, 0/false not)
    label_column: str = "label_0"
    # diffusion_kto: the probability that an example is a liked image (drawn with replacement within its
    # class, as the authors' --positive_ratio, 0.8 in their example); none = the data's own mix, read
    # as a fresh permutation each epoch
    positive_ratio: float | None = None
    # smoothed preferences (smpo) in place of the label: per reward model the two columns holding
    # its scores of the pair's images, e.g. [[pickscore_0, pickscore_1], [hps_0, hps_1]]
    score_columns: list = field(default_factory=list)
    # the score scale of each of those models; empty = its max - min over the dataset
    score_scales: list = field(default_factory=list)
    # pairs: "score_gap" reads each epoch's pairs easy to hard, Curry-DPO's curriculum (Pattnaik et al. 2024):
    # the clearest win first, by the pair's smoothed preference from data.score_columns; "none": shuffled
    curriculum: str = "none"
    # pairs: a column holding each pair's weight (>= 0): its loss counts that many times in the batch mean
    # (per-pair weights such as MADPO's or DA-DPO's, computed beforehand); none = every pair 1
    weight_column: str | None = None
    # pairs: a column holding each pair's target margin, for objective.loss=dpo_margin (ODPO's per-pair
    # offset, Amini et al. 2024); none = the loss's fixed loss_options.margin
    margin_column: str | None = None
    # pairs: one reward model's (or scorer's) scores of the two images or completions, [first, second] (for text
    # pairs, [chosen score, rejected score]): each pair's reward gap, winner minus loser, for the losses that read it
    # (objective.loss=madpo: MADPO's w(h) per pair; da_dpo: DA-DPO's per-pair beta); the label still decides
    reward_columns: list = field(default_factory=list)
    # pairs: several reward models' scores of the two images, [[first, second], ...] per model, to judge the
    # labels by (the preference strength of Secrets of RLHF II, Wang et al. 2024); with ensemble=filter the
    # pairs whose labelled winner the ensemble scores lower on average are dropped (said and counted); with
    # ensemble=weight each pair's loss counts by the share of the models that back its label; with ensemble=soften each
    # pair's preference is the models' mean sigma(strength) for its label (soft-label losses)
    ensemble_columns: list = field(default_factory=list)
    ensemble: str = "none"
    # captioned images (self_npo): the column holding each row's image
    image_column: str = "image"
    # ranked lists (rank_dpo): the column holding each prompt's list of images
    images_column: str = "images"
    # ranked lists: the column holding one score per image (higher is better)
    scores_column: str = "scores"
    # language models (lm_dpo, lm_kto, lm_rank), TRL's formats: the prompt column (plain text or a list of
    # {"role", "content"} messages; without it, conversational chosen/rejected share their first messages)...
    prompt_column: str = "prompt"
    # ... the completions of a pair (chosen first) ...
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    # ... a labelled completion (lm_kto; its label in data.label_column, `label` for a language model) ...
    completion_column: str = "completion"
    # ... or a ranked list of completions (lm_rank; scores in data.scores_column, else the list is best first)
    completions_column: str = "completions"
    # tokens of prompt + completion kept per sequence (the start is kept, as TRL's default max_length 1024)
    max_length: int = 1024
    # language models: pack each micro-batch's sequences end to end into as few rows as fit the longest (position
    # ids restart per sequence, a block-diagonal causal mask keeps them apart), so the model runs on little or no
    # padding; losses are unchanged. Pays when lengths vary; the logged padding_share shows what it saves
    packing: bool = False
    # text pairs: UPO's reliable pairs (Wang et al. 2025): a local 2-label sequence classifier (label 0: "Response #1
    # is better") reads each pair, the winner first, estimator_passes times with its dropout on; pairs it votes against
    # are dropped as noise, and estimator_keep of the rest (at most 0.5, as the authors) are sampled by certainty
    # (1 - BALD). None: every pair
    estimator: str | None = None
    estimator_passes: int = 10
    estimator_keep: float = 0.5


@dataclass
class OnlineConfig:
    # online objectives: prompts sampled in rounds (a .txt/.jsonl file or a shipped set such as toy_train)
    prompts: str = ""
    # prompts sampled per round, each as a group of group_size trajectories (d3po: pairs sharing their
    # starting noise)
    groups_per_round: int = 32
    # trajectories per prompt; empty = the objective's (d3po: 2, a pair; grpo: 8)
    group_size: int | None = None
    # a group's trajectories start from one noise; empty = the objective's (d3po: yes; grpo: no, as
    # Flow-GRPO; true gives DanceGRPO's shared initial noise)
    shared_noise: bool | None = None
    # groups each process samples in one batch (x group_size trajectories, x 2 again with guidance): bounds
    # the sampler's memory whatever groups_per_round is; a group's samples do not depend on it
    sample_batch_size: int = 8
    # optimiser steps trained on each round's pairs before the next round is sampled
    steps_per_round: int = 10
    # who prefers: a reward model spec (see diffalign.rewards), or a list of them whose per-prompt
    # z-scores are summed with reward_weights (1 each when empty; diffalign.rewards.weighted) ...
    reward: str | dict | list | None = None
    reward_weights: list | None = None
    # ... or a JSON-lines file of human labels {"round": r, "pair": i, "winner": 0 or 1}; a round
    # without labels writes its images and to_label.jsonl, checkpoints and stops until they exist
    labels: str | None = None
    # MixGRPO's sliding SDE window (Flow-GRPO-Fast is a fixed one): only sde_window consecutive sampler
    # steps draw noise (and are trained), from step sde_window_start; the others take the deterministic
    # step. Every sde_window_shift_every rounds the window moves sde_window_stride steps towards the clean
    # end, where it stays. sde_window 0: every step is stochastic
    sde_window: int = 0
    sde_window_start: int = 0
    sde_window_shift_every: int = 0
    sde_window_stride: int = 1


@dataclass
class TrainConfig:
    # pairs per process per optimiser step (before gradient accumulation)
    batch_size: int = 1
    # micro-batches accumulated per optimiser step
    gradient_accumulation: int = 1
    # optimiser steps in total
    max_steps: int = 1000
    # peak learning rate
    learning_rate: float = 1e-5
    # learning-rate schedule (diffusers.optimization.get_scheduler names): constant, linear, cosine, ...
    lr_scheduler: str = "constant_with_warmup"
    # warm-up steps of the schedule
    warmup_steps: int = 0
    # LoRA rank; 0 = full fine-tune with a frozen reference copy
    lora_rank: int = 0
    # LoRA alpha (scale alpha/rank); default = rank
    lora_alpha: float | None = None
    # modules that get LoRA adapters (names or name suffixes, as peft's target_modules): the attention
    # projections, as diffusers' DPO example; SD3's context stream adds add_q_proj, add_k_proj,
    # add_v_proj and to_add_out (diffusers' SD3 LoRA default). A language model's default is [all-linear],
    # peft's every linear layer but the output head
    lora_targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # seed of weights init, data order, timesteps and noise
    seed: int = 0
    # write a checkpoint every N steps (0 = only at the end)
    checkpoint_every: int = 500
    # keep only the newest N checkpoints
    checkpoints_keep: int = 2
    # resume from "latest" or a checkpoint folder; none = start fresh
    resume: str | None = None
    # no, fp16 or bf16 (accelerate's mixed precision)
    mixed_precision: str = "no"
    # frozen reference copy in a full fine-tune: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16
    reference_dtype: str = "auto"
    # gradient clipping by global norm (0 = off)
    max_grad_norm: float = 1.0
    # AdamW weight decay
    weight_decay: float = 0.0
    # AdamW betas and epsilon (torch's defaults, as diffusers' DPO example's --adam_beta1/2, --adam_epsilon)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # bitsandbytes 8-bit AdamW (CUDA)
    adam_8bit: bool = False
    # stop the run after this many steps with a NaN/inf loss (each is skipped and logged)
    max_bad_steps: int = 5
    # log metrics every N steps
    log_every: int = 10
    # seconds a process may wait in a collective before the run fails (torch's NCCL default: 600). The other
    # GPUs wait while the main process alone saves the final weights (a full SDXL: gathered, then 5-10 GB
    # written), or while the slowest process finishes its share of the validation samples
    distributed_timeout_s: int = 1800
    # tensorboard, wandb or none
    report_to: str = "tensorboard"
    # exponential moving average of the trained weights (0 = off; e.g. 0.999). Final weights are the EMA's
    ema_decay: float = 0.0


@dataclass
class ValidationConfig:
    # prompts sampled at intervals (a list); or `prompt_file`, a .txt (one per line) or .jsonl file
    prompts: list = field(default_factory=list)
    prompt_file: str | None = None
    # sample every N optimiser steps, at step 0 and at the end (0 = never)
    every: int = 0
    # images per prompt; the seeds are the same at every interval, so grids compare across steps
    images_per_prompt: int = 2
    # sampler steps and classifier-free guidance scale
    steps: int = 20
    guidance_scale: float = 5.0
    # reward models scoring the samples, logged as val_<name> (diffalign.rewards names)
    rewards: list = field(default_factory=list)
    # online objectives: one of `rewards` held out from training as the "gold" reward; the run stops when
    # it falls at gold_patience validations in a row while the training reward rises (reward hacking)
    gold: str | None = None
    gold_patience: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    # run directory: resolved config, metrics, checkpoints, samples, final weights
    output_dir: str = "runs/diffalign"

    def validate(self) -> "Config":
        """Check choices and cross-field rules; raises :class:`UserError` naming the key."""
        from diffalign import losses
        from diffalign.objectives import OBJECTIVES

        def choose(key: str, value: Any, choices) -> None:
            if value not in choices:
                raise UserError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")

        check_bounds(self)
        choose("objective.name", self.objective.name, sorted(OBJECTIVES))
        objective = OBJECTIVES[self.objective.name]
        if objective.family == "lm":
            self._language_model_defaults()
        own = getattr(objective, "own_losses", None)  # objectives whose losses are not preference losses
        if own:
            choose("objective.loss", self.objective.loss, own)
            kind = objective.loss_kinds[0]
        else:
            try:
                kind = losses.spec(self.objective.loss).kind
            except losses.UnknownLossError as err:
                raise UserError(f"objective.loss: {err}") from None
        accepted = objective.loss_kinds
        if kind not in accepted:
            names = [s.name for s in losses.specs() if s.kind in accepted]
            raise UserError(f"objective.loss={self.objective.loss} is a {kind} loss; {self.objective.name} takes "
                            f"{' or '.join(accepted)} losses: {', '.join(names)}")
        if not own and "logits" in inspect.signature(losses.spec(self.objective.loss).fn).parameters:
            raise UserError(f"objective.loss={self.objective.loss} is a function of a model's logits (add it in your "
                            f"own loop: diffalign.losses.get({self.objective.loss!r})(logits, mask)); {self.objective.name} "
                            "trains losses of sequence or denoising scores")
        _check_loss_options(self.objective, None if own else losses.spec(self.objective.loss), objective.own_options)
        if not own:
            self._check_loss_inputs(objective, losses.spec(self.objective.loss))
        if self.data.precompute and (self.data.cache_dir is None or objective.dataset == "online"):
            raise UserError("data.precompute=true needs data.cache_dir (where the encodings go) and an objective "
                            f"that reads a dataset; {self.objective.name} with cache_dir={self.data.cache_dir!r}")
        choose("data.on_error", self.data.on_error, ("skip", "raise"))
        choose("data.ties", self.data.ties, ("drop", "soft"))
        choose("data.cache_latent_dtype", self.data.cache_latent_dtype, ("fp32", "bf16"))
        choose("train.mixed_precision", self.train.mixed_precision, ("no", "fp16", "bf16"))
        choose("train.reference_dtype", self.train.reference_dtype, ("auto", "fp32", "bf16", "fp16"))
        choose("train.report_to", self.train.report_to, ("tensorboard", "wandb", "none"))
        choose("model.attention", self.model.attention, ("sdpa", "xformers"))
        for key, value in (("train.batch_size", self.train.batch_size), ("train.max_steps", self.train.max_steps),
                           ("train.gradient_accumulation", self.train.gradient_accumulation),
                           ("data.resolution", self.data.resolution),
                           ("train.distributed_timeout_s", self.train.distributed_timeout_s)):
            if value < 1:
                raise UserError(f"{key} must be >= 1, got {value}")
        if objective.family != "lm":
            self._check_resolution()
        if self.data.workers is not None and self.data.workers < 0:
            raise UserError(f"data.workers must be >= 0 (0 = read in the training loop), got {self.data.workers}")
        if self.train.lora_rank < 0:
            raise UserError(f"train.lora_rank must be >= 0 (0 = full fine-tune), got {self.train.lora_rank}")
        if not self.train.lora_targets or not all(isinstance(t, str) and t for t in self.train.lora_targets):
            raise UserError(f"train.lora_targets must list module names, got {self.train.lora_targets!r}")
        if not self.model.path:
            raise UserError("model.path is empty: set it to a local diffusers folder or .safetensors file, "
                            "or the Hub id of a model in the local Hugging Face cache")
        online = OBJECTIVES[self.objective.name].dataset == "online"
        if online:
            self._validate_online()
        elif not self.data.path:
            raise UserError("data.path is empty: set it to a parquet file/folder, a datasets folder, a .jsonl index "
                            "or (captioned images) a folder of images with .txt captions")
        if len(self.data.image_columns) != 2:
            raise UserError("data.image_columns must name exactly two columns (the pair's images)")
        for key in ("score_columns", "ensemble_columns"):
            for pair in getattr(self.data, key):
                if not _column_pair(pair):
                    raise UserError(f"data.{key} holds one [first, second] column pair per reward model; got {pair!r}")
        choose("data.ensemble", self.data.ensemble, ("none", "filter", "weight", "soften"))
        if self.data.ensemble != "none" and (objective.dataset != "pairs" or not self.data.ensemble_columns):
            raise UserError(f"data.ensemble={self.data.ensemble} judges each pair's label by reward models' scores: it "
                            f"needs a pairs objective and data.ensemble_columns; {self.objective.name} with ensemble_columns="
                            f"{self.data.ensemble_columns!r}")
        if self.data.score_scales and (len(self.data.score_scales) != len(self.data.score_columns)
                                       or min(self.data.score_scales) <= 0):
            raise UserError("data.score_scales needs one positive scale per data.score_columns pair, or none")
        choose("data.curriculum", self.data.curriculum, ("none", "score_gap"))
        if self.data.curriculum == "score_gap" and (objective.dataset != "pairs" or not self.data.score_columns):
            raise UserError("data.curriculum=score_gap orders pairs by the gap between their reward scores: it needs "
                            f"a pairs objective and data.score_columns; {self.objective.name} with score_columns="
                            f"{self.data.score_columns!r}")
        if self.data.reward_columns and not _column_pair(self.data.reward_columns):
            raise UserError(f"data.reward_columns names one reward model's two score columns, [first, second]; got "
                            f"{self.data.reward_columns!r}")
        for key in ("weight_column", "margin_column", "reward_columns"):
            if getattr(self.data, key) and objective.dataset not in ("pairs", "text_pairs"):
                raise UserError(f"data.{key} gives each pair its own number; {self.objective.name} reads "
                                f"{objective.dataset}, not pairs")
        spec = None if own else losses.spec(self.objective.loss)
        if self.data.margin_column is not None and (spec is None or "margin" not in spec.options):
            margins = [s.name for s in losses.specs() if "margin" in s.options]
            raise UserError(f"data.margin_column sets each pair's margin, which objective.loss={self.objective.loss} "
                            f"does not take; use a loss with a margin: {', '.join(margins)}")
        if self.data.reward_columns and (spec is None or "reward_gap" not in spec.inputs):
            readers = [s.name for s in losses.specs() if "reward_gap" in s.inputs]
            raise UserError(f"data.reward_columns gives each pair its reward gap, which objective.loss={self.objective.loss} "
                            f"does not read; use a loss that weighs pairs by it: {', '.join(readers)}")
        if self.data.ensemble == "soften" and kind != "soft-label":
            raise UserError("data.ensemble=soften trains on each pair's ensemble preference for its label, which needs "
                            "a soft-label loss (objective.loss=soft_dpo, smpo or bt_wide_ties)")
        if self.data.ties == "soft" and kind != "soft-label":
            raise UserError("data.ties=soft keeps ties as preference 0.5, which needs a soft-label loss "
                            "(objective.loss=bt_wide_ties, soft_dpo or smpo); use data.ties=drop otherwise")
        if self.data.positive_ratio is not None:
            if objective.dataset != "labelled_images":
                raise UserError(f"data.positive_ratio sets the share of liked images among labelled ones "
                                f"(diffusion_kto); {self.objective.name} reads {objective.dataset}")
            if not 0.0 < self.data.positive_ratio < 1.0:
                raise UserError(f"data.positive_ratio must be in (0, 1), got {self.data.positive_ratio}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        for key, beta in (("train.adam_beta1", self.train.adam_beta1), ("train.adam_beta2", self.train.adam_beta2)):
            if not 0.0 <= beta < 1.0:
                raise UserError(f"{key} must be in [0, 1), got {beta}")
        if self.train.adam_epsilon <= 0:
            raise UserError(f"train.adam_epsilon must be > 0, got {self.train.adam_epsilon}")
        if kind == "regression":  # self_npo's truncated fine-tuning
            self._validate_truncation()
        from diffalign.rewards import RewardSpec

        for spec in self.validation.rewards:
            RewardSpec.parse(spec)
        self._validate_gold(objective)
        if objective.family == "lm":
            self._validate_language_model(objective)
        elif self.data.packing:
            raise UserError(f"data.packing packs a language model's token sequences; {self.objective.name} trains "
                            "a diffusion model: remove it")
        return self

    def _check_resolution(self) -> None:
        """``data.resolution`` must give whole latent tokens: a multiple of the VAE's factor times the denoiser's patch
        (SD1.5/SDXL 8, SD3 and FLUX.1 16), read from the model folder's configs when it is local."""
        from diffalign.diffusion.backbones import pixel_multiple
        from diffalign.paths import find_locally

        folder = find_locally(self.model.config or self.model.path)
        multiple = None if folder is None or not folder.is_dir() else pixel_multiple(folder)
        if multiple and self.data.resolution % multiple:
            below = self.data.resolution // multiple * multiple
            raise UserError(f"data.resolution={self.data.resolution} must be a multiple of {multiple} for "
                            f"{folder.name} (its VAE's factor times its denoiser's patch); try {below or multiple} or "
                            f"{below + multiple}")

    def _language_model_defaults(self) -> None:
        """The keys a language-model config leaves unset take the LM's defaults (``LM_DEFAULTS``) instead of the
        diffusion ones; the resolved config in the run's folder shows them."""
        given = getattr(self, "given_keys", frozenset())
        for dotted, value in LM_DEFAULTS.items():
            section, key = dotted.split(".")
            part = getattr(self, section)
            default = next(f for f in dataclasses.fields(part) if f.name == key)
            default = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
            if dotted not in given and getattr(part, key) == default:
                setattr(part, key, copy.deepcopy(value))

    def _validate_language_model(self, objective) -> None:
        """What a language-model run cannot do, said before any model loads."""
        dc = self.data
        if dc.estimator is not None:
            if objective.dataset != "text_pairs":
                raise UserError(f"data.estimator picks reliable text pairs; {self.objective.name} reads {objective.dataset}")
            if not 0.0 < dc.estimator_keep <= 0.5 or dc.estimator_passes < 1:
                raise UserError(f"data.estimator_keep must be in (0, 0.5] (UPO's bald_rate) and data.estimator_passes "
                                f">= 1; got {dc.estimator_keep} and {dc.estimator_passes}")
        if dc.packing and not objective.reads_packed:
            raise UserError(f"data.packing: {self.objective.name} reads every token's distribution from the padded "
                            "rows, not packed ones; remove it")
        image_only = [(key, bad) for key, bad in (
            ("data.cache_dir", dc.cache_dir is not None), ("data.precompute", dc.precompute),
            ("data.random_flip", dc.random_flip), ("data.score_columns", bool(dc.score_columns)),
            ("data.curriculum", dc.curriculum != "none"), ("data.positive_ratio", dc.positive_ratio is not None),
            ("data.ties", dc.ties != "drop"), ("model.denoiser_file", self.model.denoiser_file is not None),
            ("model.config", self.model.config is not None)) if bad]
        if image_only:
            raise UserError(f"{', '.join(k for k, _ in image_only)}: set for {self.objective.name}, a language-model "
                            "objective, which has no use for it (it belongs to the image datasets and pipelines); "
                            "remove it")
        if self.validation.every > 0:
            raise UserError(f"validation.every={self.validation.every}: a language-model run samples no validation "
                            "during training; compare the final model with the base after it: `diffalign eval --base MODEL "
                            "--aligned RUN --prompts PROMPTS --out OUT` (a causal-LM --base compares language models)")
        if dc.max_length < 2:
            raise UserError(f"data.max_length must be >= 2 (a prompt token and a completion token), got {dc.max_length}")

    def _check_loss_inputs(self, objective, spec: LossSpec) -> None:
        """A self-play objective takes the losses that read what it estimates (``loss_names``); a loss with per-pair
        inputs (SPPO's win-rates) needs an objective that supplies them."""
        from diffalign.objectives import OBJECTIVES

        named = objective.loss_names
        if named is not None and spec.name not in named:
            raise UserError(f"objective.loss={spec.name}: {self.objective.name} trains {' or '.join(named)}")
        from_data = ("reward_gap",) if self.data.reward_columns else ()
        missing = [name for name in spec.inputs if name not in (*objective.supplies, *from_data)]
        if missing:
            suppliers = [n for n, cls in OBJECTIVES.items()
                         if set(spec.inputs) <= set(cls.supplies) and cls.family == objective.family]
            fix = (f"use objective.name={' or '.join(suppliers)}" if suppliers else
                   "a pair's reward gap comes from data.reward_columns (one reward model's scores of the pair), its "
                   "own weight or margin from data.weight_column or data.margin_column")
            raise UserError(f"objective.loss={spec.name} reads per-pair {', '.join(missing)}, which "
                            f"{self.objective.name} does not estimate; {fix}")

    def _validate_gold(self, objective) -> None:
        from diffalign.rewards import RewardSpec

        vc = self.validation
        if vc.gold is None:
            return
        names = [RewardSpec.parse(spec).name for spec in vc.rewards]
        if vc.gold not in names or vc.every < 1 or objective.dataset != "online":
            raise UserError(f"validation.gold={vc.gold} watches a validation reward while an online objective "
                            f"trains: it must be one of validation.rewards ({', '.join(names) or 'none'}), with "
                            f"validation.every > 0 and an online objective (not {self.objective.name})")
        if vc.gold in self._online_reward_names():
            raise UserError(f"validation.gold={vc.gold} is the reward the run trains on (online.reward); the gold "
                            "reward must be one the run does not see")
        if vc.gold_patience < 1:
            raise UserError(f"validation.gold_patience must be >= 1, got {vc.gold_patience}")


    def _online_reward_names(self) -> list[str]:
        """The names of the reward models of ``online.reward`` (none, one, or a list)."""
        from diffalign.rewards import RewardSpec
        from diffalign.rewards.weighted import reward_specs

        return [RewardSpec.parse(spec).name for spec in reward_specs(self.online.reward)]

    def _validate_truncation(self) -> None:
        oc = self.objective
        if oc.truncation_grid < 1 or oc.truncated_steps < 1:
            raise UserError("objective.truncation_grid and objective.truncated_steps must be >= 1")
        if not 0.0 <= oc.teacher_ema <= 1.0:
            raise UserError(f"objective.teacher_ema must be in [0, 1] (1 = frozen base teacher), got {oc.teacher_ema}")
        if oc.huber_c <= 0:
            raise UserError(f"objective.huber_c must be > 0, got {oc.huber_c}")

    def _validate_online(self) -> None:
        from diffalign.objectives import OBJECTIVES

        oc, method = self.online, OBJECTIVES[self.objective.name]
        if method.real_data and not self.data.path:
            raise UserError(f"{self.objective.name} pairs real images with its samples: set data.path to a table "
                            "of captioned images")
        if not method.real_data and not oc.prompts:
            raise UserError(f"{self.objective.name} samples in rounds: set online.prompts to a prompt file or set")
        if not method.scored and (oc.reward is not None or oc.labels is not None):
            raise UserError(f"{self.objective.name} needs no reward or label (its real images are the positives, its "
                            "samples the negatives): remove online.reward and online.labels")
        if method.scored and (oc.reward is None) == (oc.labels is None):
            raise UserError("online objectives need exactly one source of preferences: online.reward (a reward "
                            "model spec) or online.labels (a JSON-lines file of human labels)")
        if oc.reward == []:
            raise UserError("online.reward is an empty list: name at least one reward model")
        if oc.labels is not None and not method.takes_labels:
            raise UserError(f"{self.objective.name} needs a reward for every sample (online.reward); human labels "
                            "of pairs give no group-relative advantages")
        if method.group_size_fixed and oc.group_size not in (None, method.group_size):
            raise UserError(f"{self.objective.name} is defined for groups of {method.group_size}: online.group_size "
                            f"must be {method.group_size} (or empty), got {oc.group_size}")
        if oc.group_size is not None and oc.group_size < 2:
            raise UserError(f"online.group_size must be >= 2 (a group compares its samples), got {oc.group_size}")
        method.check_config(self)
        if method.family == "lm":  # scored by a text reward; no sampler of images to check
            from diffalign.rewards.text import TEXT_REWARDS, is_text_reward

            if not is_text_reward(oc.reward):
                raise UserError(f"online.reward={oc.reward!r}: {self.objective.name} scores its completions with one "
                                f"text reward: {', '.join(TEXT_REWARDS)} or classifier:PATH")
            if self.objective.max_new_tokens < 1 or self.objective.sample_temperature <= 0:
                raise UserError("objective.max_new_tokens must be >= 1 and objective.sample_temperature > 0")
            return
        for key in ("groups_per_round", "steps_per_round", "sample_batch_size", "sde_window_stride"):
            if getattr(oc, key) < 1:
                raise UserError(f"online.{key} must be >= 1, got {getattr(oc, key)}")
        steps = self.objective.sample_steps
        if oc.sde_window < 0 or oc.sde_window_shift_every < 0 or not 0 <= oc.sde_window_start < steps \
                or oc.sde_window_start + oc.sde_window > steps:
            raise UserError(f"online.sde_window={oc.sde_window} from online.sde_window_start={oc.sde_window_start} "
                            f"must fit in the sampler's {steps} steps (objective.sample_steps), and "
                            f"online.sde_window_shift_every={oc.sde_window_shift_every} must be >= 0")
        from diffalign.rewards.weighted import parse_weights

        names = self._online_reward_names()
        if len(set(names)) != len(names):
            raise UserError(f"online.reward names a reward model twice ({', '.join(names)})")
        parse_weights(len(names), oc.reward_weights)
        if self.objective.sample_eta <= 0:
            raise UserError("objective.sample_eta must be > 0: a deterministic sampler has no step log-probabilities")
        if self.objective.ratio_clip is not None and not 0 < self.objective.ratio_clip < 1:
            raise UserError(f"objective.ratio_clip must be in (0, 1), got {self.objective.ratio_clip}")
        if self.objective.advantage_std not in ("global", "group"):
            raise UserError(f"objective.advantage_std={self.objective.advantage_std!r} is not valid; choose one of "
                            "global, group")


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "dict": dict, "list": list})  # noqa: S307 - field annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def _column_pair(value: Any) -> bool:
    """A [first, second] pair of column names, as each reward model's scores of a pair are given."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(c, str) for c in value)


def _check_loss_options(objective: ObjectiveConfig, spec: LossSpec | None, own: dict[str, Any]) -> None:
    """Each ``objective.loss_options`` key must be an option of the chosen loss (``spec``; None for an
    objective's own loss, which takes none) or of the objective itself (``own``: SparsePO's mask settings),
    of its default's type, and one of its values for an option with a fixed set.

    Checked with the config, so a misspelt option stops the run before any model loads, not
    at its first step.
    """
    options = {**({} if spec is None else spec.options), **own}
    choices = {} if spec is None else spec.option_choices
    for key, value in objective.loss_options.items():
        dotted = f"objective.loss_options.{key}"
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(f"{k} (default {v})" for k, v in options.items()) or "none"
            raise UserError(f"{dotted}: loss {objective.loss!r} has no option {key!r}{hint}. Its options: {valid}")
        default = options[key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if numeric else \
            isinstance(value, type(default))
        if not ok:
            raise UserError(f"{dotted}={value!r} should be a {type(default).__name__} like its default {default!r}")
        if key in choices and value not in choices[key]:
            raise UserError(f"{dotted}={value!r} is not valid; choose one of {', '.join(map(str, choices[key]))}")


# what a language-model config's unset keys mean instead of the diffusion defaults: TRL's beta, peft's every
# linear layer for LoRA, and TRL's unpaired `label` column
LM_DEFAULTS = {"objective.beta": 0.1, "train.lora_targets": ["all-linear"], "data.label_column": "label"}

# keys that moved, and where to: a config written for an earlier version gets told, not just refused
MOVED_KEYS = {
    "objective.refresh_every": "online.steps_per_round (DDO's self-play rounds run on the round driver)",
    "online.pairs_per_round": "online.groups_per_round (a pair is a group of 2)",
}


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        where = f"config section '{prefix.rstrip('.')}'" if prefix else "the config"
        raise UserError(f"{where} must be a mapping of keys, got {type(data).__name__} {data!r:.60}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED_KEYS:
            raise UserError(f"config key '{dotted}' is now {MOVED_KEYS[dotted]}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise UserError(f"unknown config key '{dotted}'{hint} Valid keys here: {', '.join(known)}")
        f = known[key]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[key] = _build(f.default_factory, value or {}, dotted + ".")
            continue
        if isinstance(value, str) and "float" in str(f.type):
            try:  # YAML 1.1 reads "1e-3" as a string; a float field takes it as the number it is
                value = float(value)
            except ValueError:
                pass
        if dotted == "train.mixed_precision" and value is False:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        if isinstance(value, bool) and not _type_ok(value, f.type) and _type_ok("", f.type):
            raise UserError(f"config key '{dotted}' got {value!r}: YAML reads yes/no/on/off as true/false; "
                            f"quote the word, e.g. {dotted}='no'")
        if not _type_ok(value, f.type):
            raise UserError(f"config key '{dotted}' expects {f.type}, got {value!r}")
        check_finite(dotted, value)
        kwargs[key] = float(value) if f.type == "float" and isinstance(value, int) else value
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, schema: type = None) -> Any:
    """Read a YAML config, apply overrides, build and validate the typed config (``schema``, default :class:`Config`)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; the recipes live in configs/")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {err}") from None
    data = apply_overrides(data, overrides or [])
    config = _build(schema or Config, data, "")
    config.given_keys = frozenset(_dotted_keys(data))  # which defaults the file left to the model family
    return config.validate()


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and prefix == "":
            keys.extend(_dotted_keys(value, f"{key}."))
    return keys


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
