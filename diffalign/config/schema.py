"""The run configuration's schema: typed sections read from YAML and dotted ``key=value`` overrides.

Every field has its documentation in the comment above it (``diffalign methods`` and the config reference
read them from here). Unknown keys are errors that name the key and the closest valid one; values are
checked against the field's type and, for numbers, against their range (:mod:`diffalign.config.bounds`).
Choices and rules that need the objectives and losses are checked one layer up, by
:func:`diffalign.train.config.validate`. The resolved config is written to the run directory.

This module sits below the objectives: they import their types from here, and nothing here imports them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import UserError
from diffalign.config.bounds import check_finite

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
    # the reference of the objectives that compare with a fixed one, when it is not the base: for a language model a
    # causal-LM folder or a finished run with the same vocabulary (LLaVA-MoD's teacher as the DPO reference; a
    # previous stage's policy), for a diffusion model a diffusers folder or a finished run of the same architecture
    # (kept frozen in train.reference_dtype, LoRA runs too); unset: the base (a LoRA run: its base with adapters
    # disabled)
    reference: str | None = None
    # lm_distill: the teacher a student is distilled from, a causal-LM folder or a finished run with the student's
    # tokenizer (the student, `path`, may be a smaller architecture with random_init); diffusion_distill: a diffusers
    # folder or a finished run of the student's pipeline (its denoiser may differ in size; VAE and text encoders are
    # the student's)
    teacher: str | None = None
    # the guidance value a guidance-distilled denoiser (FLUX.1-dev) is given in its guidance embedding
    # while it trains and samples rounds (3.5, as diffusers' FLUX training scripts); others ignore it
    distilled_guidance: float = 3.5
    # the text encoder's sequence length: prompts padded or cut to this many tokens (SD3's T5, FLUX's T5, PixArt's
    # T5, Wan's UMT5, Qwen-Image's and FLUX.2's and Z-Image's LM encoders); unset: the pipeline's default (SD3 256).
    # Flow-GRPO's SD3 recipes encode 128, which is cheaper: the joint attention reads 205 text tokens, not 333.
    # SD1.5/SDXL (CLIP's fixed 77) and HunyuanVideo 1.5 refuse it
    prompt_tokens: int | None = None
    # a model of two experts switched at a timestep (Wan2.2 A14B: `transformer` denoises the steps at or above the
    # pipeline's boundary_ratio x 1000, the noisy ones, `transformer_2` the rest): the one this run trains, "high"
    # (`transformer`) or "low" (`transformer_2`), on the timesteps it serves, while the other denoises its own steps
    # frozen; "both": each its own LoRA (or weights), each item trained by the expert of its timestep. None for a
    # model of one denoiser
    expert: str | None = None
    # attention kernel: "sdpa" (PyTorch, default) or "xformers" (optional CUDA extra)
    attention: str = "sdpa"
    # recompute activations in the backward pass: less memory, ~30% more compute
    gradient_checkpointing: bool = False
    # channels_last memory format for UNets (faster convolutions on tensor cores)
    channels_last: bool = False
    # torch.compile the denoiser's forward (in place: weights, LoRA and checkpoints keep their names);
    # on CPU it pays only for tiny models (a real SD1.5 UNet ran 0.71x; docs/benchmarks.md)
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
    # the sampler of an online method's rounds (d3po, grpo, nft, ...): its steps, its stochasticity (DDIM eta, or the
    # flow SDE's noise level) and its guidance scale; the guided prediction is the policy that is trained
    sample_steps: int = 20
    sample_eta: float = 1.0
    sample_guidance_scale: float = 5.0
    # the stochastic step on flow models: sde (Flow-GRPO's SDE, Eq. 9) or cps (coefficients-preserving sampling,
    # flow_grpo's sde_type="cps": noise of std sigma_next sin(eta pi / 2), the step's x_0 and noise estimates
    # recombined at the next noise level's coefficients, so no excess noise is left in the samples)
    sampler: str = "sde"
    # the method's own settings, by name (diffalign methods NAME lists them with their defaults): e.g.
    # objective.options.kl_coef for grpo. Unset ones take the method's defaults
    options: Any = field(default_factory=dict)


@dataclass
class DataConfig:
    # parquet file or folder of parquet files, a `datasets` folder saved to disk, a .jsonl index,
    # (captioned images) a folder of images with .txt captions, or the Hub id of a dataset in the
    # local Hugging Face cache (hf download yuvalkirstain/pickapic_v2 --repo-type dataset)
    path: str = ""
    # the split to read: of a saved DatasetDict, or the parquet shards of a folder (or cached Hub
    # dataset) that names them as the Hub does (data/train-00000-of-00645.parquet, or train/*.parquet)
    split: str = "train"
    # training resolution (square crops, pixels); with data.width, the height
    resolution: int = 512
    # the width of training images and clips in pixels, for crops that are not square: data.resolution is then their
    # height (Wan's 832 x 480: data.resolution=480, data.width=832). Each image is resized to cover height x width and
    # centre-cropped; validation and online rounds sample at that size too. Unset: square, data.resolution wide
    width: int | None = None
    # video models (Wan): the frames of each clip, read from each row's video (mp4, webm, mov, mkv, avi, gif; bytes or
    # a path, as images) and trained at; Wan's VAE reads 4k + 1 frames (its pipelines make 81). 0 = the data holds
    # images, which a video model trains on as one-frame clips
    frames: int = 0
    # video data: the frame rate clips are read at (the frame on screen every 1/fps seconds; Wan2.1 was trained at
    # 16); 0 = each file's own frames in order
    fps: float = 0.0
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
    # preferences over edits: the columns of each row's source images (one, or several for Qwen-Image-Edit-Plus and
    # FLUX.2), which the edit model is conditioned on while the caption is the instruction; every item of the row
    # (both images of a pair, a list's K) is an edit of the same sources. Empty = text-to-image data
    source_columns: list = field(default_factory=list)
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
    # ranked text lists: a regular expression marking where each step of a completion begins (TPO's "\nStep \d+:"):
    # each completion token gets its step's number, for objective.options.adaptive_step_reward of lm_rank. A completion
    # it marks no step in is a bad row; steps past the fewest of a list fold into its last common one. Needs a fast
    # tokenizer. None: no steps
    step_pattern: str | None = None
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
    # what each reward model's scores train as: the scores, or each sample's win rate against the rest of its group
    # (Pref-GRPO: the ranking kept, the scale dropped; diffalign.rewards.win_rate)
    reward_as: str = "score"
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
    # under FSDP2 (configs/accelerate/fsdp2*.yaml): the dtype gradients are averaged over the processes in, fp32
    # or bf16 (half the traffic, coarser gradients); the weights are gathered for compute in mixed_precision's
    reduce_dtype: str = "fp32"
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
    # context parallelism (diffalign.train.context_parallel): each sample's tokens split over this many processes
    # (DeepSpeed-Ulysses through diffusers' ContextParallelConfig), for clips whose activations one GPU cannot hold;
    # the launched processes form groups of this many, each group one data-parallel share. 1 = off. Wan2.1/2.2,
    # FLUX.1, FLUX.2 and Qwen-Image; offline diffusion objectives
    context_parallel: int = 1
    # tensorboard, wandb or none
    report_to: str = "tensorboard"
    # exponential moving average of the trained weights (0 = off; e.g. 0.999). Final weights are the EMA's
    ema_decay: float = 0.0
    # update the EMA every N optimiser steps; its decay at step s is min(ema_decay, (1 + s) / (10 + s)) (Flow-GRPO:
    # ema_decay 0.9 every 8 steps)
    ema_every: int = 1


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
    # the largest change from step 0 (the base) allowed in an image statistic of the validation samples before the
    # run stops as gaming its reward, e.g. {dark_share: 0.15, high_frequency: 0.05}: dark_share, bright_share,
    # saturation, high_frequency, diversity (diffalign.eval.image_stats); the final weights are the last step's
    # within every limit
    drift_limits: dict = field(default_factory=dict)


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


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "dict": dict, "list": list})  # noqa: S307 - field annotations
    if annotation is Any:
        return True
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


# keys that moved, and where to: a config written for an earlier version gets told, not just refused
MOVED_KEYS = {
    "objective.refresh_every": "online.steps_per_round (DDO's self-play rounds run on the round driver)",
    "online.pairs_per_round": "online.groups_per_round (a pair is a group of 2)",
    # a method's own settings moved under objective.options (`diffalign methods NAME` lists them)
    **{f"objective.{old}": f"objective.options.{new} ({methods})" for old, new, methods in (
        ("inversion_steps", "inversion_steps", "inpo, smpo"), ("inversion_eta", "inversion_eta", "inpo, smpo"),
        ("renoise_iterations", "renoise_iterations", "inpo, smpo"), ("ratio_clip", "ratio_clip", "d3po, grpo"),
        ("kl_coef", "kl_coef", "grpo, nft"), ("advantage_clip", "advantage_clip", "grpo, nft"),
        ("advantage_std", "advantage_std", "grpo, nft"), ("disco_tau", "tau", "disco"),
        ("disco_beta", "kl_beta", "disco"), ("disco_delta", "kl_delta", "disco"), ("nft_beta", "beta", "nft"),
        ("max_new_tokens", "max_new_tokens", "lm_online_dpo, lm_sppo, lm_dno, lm_inpo"),
        ("sample_temperature", "sample_temperature", "lm_online_dpo, lm_sppo, lm_dno, lm_inpo"),
        ("min_reward_gap", "min_reward_gap", "dno, lm_dno"), ("rso_beta", "rejection_beta", "rso"),
        ("rso_accepted", "accepted", "rso"), ("truncation_grid", "truncation_grid", "self_npo"),
        ("truncated_steps", "truncated_steps", "self_npo"),
        ("teacher_guidance_scale", "teacher_guidance_scale", "self_npo"),
        ("teacher_ema", "teacher_ema", "self_npo"), ("huber_c", "huber_c", "self_npo"))},
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


def read_config(path: str | Path | None, overrides: list[str] | None = None, *, schema: type | None = None) -> Any:
    """Read a YAML config, apply overrides and build the typed config (``schema``, default :class:`Config`), not yet
    validated; ``given_keys`` on it says which keys the file and overrides set."""
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
    return config


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
