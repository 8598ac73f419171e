"""Generate with several models at the same prompts and seeds, score, and compare with the first."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from diffusers import DiffusionPipeline
from diffusers.training_utils import free_memory
from tqdm.auto import tqdm

from diffalign.diffusion.loading import process_state
from diffalign.diffusion.sampling import generate
from diffalign.eval.report import scaled_size
from diffalign.eval.saved import check_same_settings, load_saved, save_png, saved_suffix
from diffalign.eval.stats import mean_interval, win_rate
from diffalign.rewards import RewardModel
from diffalign.rewards.clip_rewards import to_pil
from diffalign.rewards.video import score_media

REPORT_PX = 256  # the longer side of the images an Evaluation keeps for its report


@dataclass
class Evaluation:
    """Everything one comparison produced: the images, every score, and the summary."""

    prompts: list[str]
    seeds: list[int]
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # model -> the kept (K, 3, h, w) in [0, 1]
    # edits: each prompt's (S, 3, h, w) source images in [0, 1], report-sized; its images are seeds_per_prompt in a row
    sources: torch.Tensor | None = None
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> reward -> (N,)
    texts: dict[str, list[str]] = field(default_factory=dict)  # model -> the (N,) completions (language models)
    # model -> (P,) 1 where it ranks a pair's chosen completion above its rejected one (language models, --pairs)
    rankings: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per model and reward: mean with 95% interval, and (after the first, the baseline) the
        paired win rate over the baseline with its Wilson interval; a language model's ranking accuracy on
        ``--pairs`` with its interval."""
        names = list(self.scores)
        base = names[0]
        table: dict[str, dict[str, float]] = {}
        for model in names:
            row: dict[str, float] = {}
            for reward, values in self.scores[model].items():
                row[f"{reward}"], row[f"{reward}_low"], row[f"{reward}_high"] = mean_interval(values)
                if model != base:
                    rate, low, high = win_rate(values, self.scores[base][reward])
                    row[f"{reward}_win_rate"], row[f"{reward}_win_low"], row[f"{reward}_win_high"] = rate, low, high
            if model in self.rankings:  # a share of pairs: its mean with the same interval as a reward's
                row["ranking_acc"], row["ranking_acc_low"], row["ranking_acc_high"] = mean_interval(self.rankings[model])
            table[model] = row
        return table


def evaluate_models(
    models: Mapping[str, DiffusionPipeline | Callable[[], DiffusionPipeline]],
    prompts: Sequence[str],
    rewards: Sequence[RewardModel],
    *,
    seeds_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    keep_images: int | None = None,
    images_dir: Path | None = None,
    model_settings: Mapping[str, dict] | None = None,
    progress: bool = False,
    sources: torch.Tensor | None = None,
    **generate_kwargs,
) -> Evaluation:
    """Generate ``seeds_per_prompt`` images per prompt with every model (the same seeds for all
    models) and score each with every reward model. The first model is the baseline.

    Images are generated, scored and let go one batch at a time, so memory does not grow with
    the prompt set (a thousand prompts at 1024 px are 50 GB of float images per model).
    ``Evaluation.images`` keeps the first ``keep_images`` images per model (whole prompts in
    order; None: all), with the longer side at most ``REPORT_PX``, for grids and reports.

    ``images_dir`` receives every image at full size as ``<model>/<index>.png``, and makes the
    evaluation resumable: a batch whose images are all there already is read back, not generated
    (a model whose images are all there is not even loaded), and every image is scored as saved
    (8-bit), so a stopped and rerun evaluation gives the same scores as one that ran through.
    Each model's folder records the prompts, seeds and sampling settings, with what made the
    model (``model_settings[name]``: its source, dtype, ...), and a rerun with other ones is
    refused before anything is generated; a model added to the rerun is generated alone.

    A model may be given as a loader, a function returning its pipeline (on its device). It is
    called when the model's turn comes and its pipeline let go before the next, so comparing N
    SDXL or SD3 models needs the memory of one (``diffalign eval`` passes loaders).

    Under ``accelerate launch`` or ``torchrun`` each process makes and scores every N-th batch on its
    own GPU, and every process gets the whole result, as one process would have made it.

    Edits: ``sources`` (P, S, 3, H, W) in [0, 1] holds each prompt's source images; every image of the prompt
    edits them, a reward that compares an edit with its sources (``reads_sources``) gets them, and the report
    shows them.
    """
    expanded = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [seed + i for i in range(len(expanded))]
    result = Evaluation(prompts=expanded, seeds=seeds,
                        sources=None if sources is None else torch.stack([report_size(s) for s in sources]))
    edits = None if sources is None else sources.repeat_interleave(seeds_per_prompt, dim=0)
    keep = len(expanded) if keep_images is None else keep_images
    state = process_state()
    if images_dir is not None:
        prompts_sha = hashlib.sha256("\n".join(expanded).encode()
                                     + (b"" if sources is None else sources.numpy().tobytes())).hexdigest()
        with state.main_process_first():  # the main process records the settings; the others compare
            for name in models:
                settings = {"prompts_sha256": prompts_sha, "images": len(expanded), "first_seed": seed,
                            **generate_kwargs, **(model_settings or {}).get(name, {})}
                check_same_settings(images_dir / name / "settings.yaml", settings, what=f"images of {name}",
                                    fix="use another folder (eval: --out), or the same settings to resume")
    starts = range(0, len(expanded), batch_size)[state.process_index::state.num_processes]
    for name, model in models.items():
        pipe, done = None, []  # (start, scores per reward, kept images or None) of this process's batches
        bar = f"eval: generating and scoring {len(expanded)} images of {name}"
        for start in tqdm(starts, desc=bar, unit="batch", disable=not (progress and state.is_local_main_process)):
            chunk = slice(start, start + batch_size)
            suffix = saved_suffix(bool(generate_kwargs.get("frames")))
            saved = None if images_dir is None else \
                [images_dir / name / f"{i:06d}{suffix}" for i in range(start, min(start + batch_size, len(expanded)))]
            images = None if saved is None else load_saved(saved)  # made by an earlier, stopped run
            if images is None:
                if pipe is None:
                    pipe = model if isinstance(model, DiffusionPipeline) else model()
                images = generate(pipe, expanded[chunk], seeds[chunk], batch_size=batch_size,
                                  sources=None if edits is None else [to_pil(e) for e in edits[chunk]],
                                  **generate_kwargs)
                if saved is not None:  # scored as saved, so a resumed run scores the same
                    for image, path in zip(images, saved, strict=True):
                        save_png(image, path)
                    images = load_saved(saved)
            done.append((start, {reward.name: reward(images, expanded[chunk], edits[chunk])
                                 if getattr(reward, "reads_sources", False)
                                 else score_media(reward, images, expanded[chunk]) for reward in rewards},
                         report_size(images[: keep - start]) if start < keep else None))
        done = sorted(gather_object(done), key=lambda batch: batch[0])  # every process's batches, in order
        kept = [images for _, _, images in done if images is not None]
        result.images[name] = torch.cat(kept) if kept else torch.empty(0)
        result.scores[name] = {r.name: torch.cat([scores[r.name] for _, scores, _ in done]) for r in rewards}
        if pipe is not None and not isinstance(model, DiffusionPipeline):  # loaded here: freed before the next
            del pipe
            free_memory()
    return result


def report_size(images: torch.Tensor) -> torch.Tensor:
    """The images (or clips, frame by frame) shrunk (never enlarged) so the longer side is at most ``REPORT_PX``."""
    factor = REPORT_PX / max(images.shape[-2:])
    if factor >= 1:
        return images
    if images.dim() == 5:  # clips (N, 3, F, H, W)
        n, channels, f = images.shape[:3]
        frames = report_size(images.transpose(1, 2).reshape(n * f, channels, *images.shape[3:]))
        return frames.view(n, f, channels, *frames.shape[2:]).transpose(1, 2)
    return F.interpolate(images, size=scaled_size(*images.shape[-2:], factor), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)
