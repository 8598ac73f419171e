"""The round driver of the online objectives (D3PO, Flow-GRPO): sample, score, build, train, repeat.

Round r covers optimiser steps [r * S, (r + 1) * S) with S = ``online.steps_per_round``. At its
first step the current policy (the backbone's denoiser, LoRA enabled) samples
``online.groups_per_round`` groups of K trajectories without gradients, K being the objective's
``group_size`` (``online.group_size`` overrides it: D3PO's pairs are groups of 2, GRPO's groups
are larger); prompts cycle through ``online.prompts``, one per group, and a group's trajectories
start from one shared noise when the objective asks for it (D3PO's pairs; DanceGRPO's option).
A reward model scores each final image (several: a weighted sum of their per-prompt z-scores,
:mod:`diffalign.rewards.weighted`), or a person says which image of a pair is better, and the
round is written to ``run/rounds/round-NNNNN/``: the trajectories and log-probabilities
(safetensors), the images (PNG, ``images/groupGGGG-K.png``), and ``groups.json`` (prompts, the
training reward and each model's raw scores). On N processes each samples and scores every N-th
group; a batch is scored on a second thread while the next one samples, so scoring does not stall
the sampler (batches of ``online.sample_batch_size`` groups). The round's mean raw reward (and each
model's) is logged with every step trained on it, as ``train_reward`` (``train_reward/NAME``), with the share of
groups whose samples all scored alike (``flat_groups``: reward saturation) and the round's image statistics
(``round_dark_share`` and the others of :mod:`diffalign.eval.image_stats`), where reward hacking shows first.
Everything in a round is a pure function of (seed, r) and the weights at its start (each group has
its own generator), and a resumed run reads the round from disk instead of sampling it again, so
resume stays exact.

Objectives that set ``real_data`` (DDO) take their prompts from real images instead: group i of round
r is the example at position r G + i of the run's order of ``data.path`` (read, checked, cached and
encoded as offline examples are), its caption the group's prompt and its latent kept with the round.

With ``online.sde_window`` set, only a window of the sampler's steps draws noise (MixGRPO, Li et al.
2025, arXiv 2507.21802; Flow-GRPO-Fast is the fixed window), the others taking the deterministic
step; only the window's steps are trained, and the window may slide towards the clean end every few
rounds (:func:`sde_window`).

The objective turns a round into training units (:meth:`OnlineObjective.training_units`: D3PO's
winner-first pairs, GRPO's trajectories with their group-normalised advantages); each optimiser
step trains random units, each at one random denoising step among those whose noise level t / T
lies in ``objective.t_range`` (all by default), or whole groups where the objective compares a group's
units within a batch (:meth:`OnlineObjective.choose_units`: DGPO).

Human labels (pairs only): with ``online.labels`` set, a round whose pairs are not all labelled in
that file raises :class:`NeedsLabels` after writing ``to_label.jsonl``; the trainer checkpoints and
stops, and ``train.resume=latest`` continues once the labels are there (``diffalign label RUN``
serves them as a page). A later line for a pair replaces an earlier one, and ``"winner": null``
withdraws the pair's label (an undo, a tie or a skip on the page).
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffalign.data import example_generator
from diffalign.data.edit_prompts import EditPrompts
from diffalign.diffusion import Backbone, Conditioning
from diffalign.diffusion.logprob import StepRule, sample_trajectories, step_log_prob
from diffalign.errors import PausedRound, UserError
from diffalign.eval.image_stats import image_statistics
from diffalign.eval.prompts import read_prompts
from diffalign.diffusion.sampling import save_media, shown_media, to_pil
from diffalign.rewards import RewardSpec, load_reward
from diffalign.rewards.pairwise_judge import pairwise_win_rates
from diffalign.rewards.win_rate import group_win_rates
from diffalign.rewards.video import score_media
from diffalign.rewards.weighted import combine_rewards, parse_weights, reward_specs, weighted_raw_mean
from diffalign.label.store import round_pair_winners
from diffalign.train.config import Config
from diffalign.train.context_parallel import data_share
from diffalign.train.rounds import RoundDriver

Tensor = torch.Tensor


class NeedsLabels(PausedRound):
    """A round waits for human labels; the message says where to put them."""


def sde_window(config: Config, r: int) -> Tensor:
    """(steps,) bool: the sampler steps of round r that draw noise. All of them without ``online.sde_window``;
    else ``sde_window`` steps from ``sde_window_start``, moved ``sde_window_stride`` steps every
    ``sde_window_shift_every`` rounds and stopped at the last step (MixGRPO's progressive window). Never the last
    step of ``objective.sampler=cps``, which lands on noise level 0 with no noise."""
    oc, steps = config.online, config.objective.sample_steps
    window = torch.zeros(steps, dtype=torch.bool)
    if oc.sde_window == 0:
        window[:] = True
    else:
        shifts = r // oc.sde_window_shift_every if oc.sde_window_shift_every else 0
        start = min(oc.sde_window_start + shifts * oc.sde_window_stride, steps - oc.sde_window)
        window[start:start + oc.sde_window] = True
    if config.objective.sampler == "cps":
        window[-1] = False
    return window


@dataclass
class Round:
    """One round as sampled: G groups of K trajectories of one prompt each.

    Attributes:
        latents: (G, K, T + 1, C, h, w) trajectories, x_0 (noise) ... x_T (the clean latent); (G, K, 1, C, h, w),
            the clean latents alone, for objectives that do not keep trajectories.
        log_probs: (G, K, T) each step's log-probability under the policy that sampled it.
        means: (G, K, T, C, h, w) each step's Gaussian mean under that policy, for objectives that keep them
            (``keeps_step_means``); else None.
        rewards: (G, K) the reward of each final image, or None when people judge the pairs (or nobody does).
        winners: () -> (G,) the preferred trajectory (0 or 1) of each pair, from the rewards or the human
            labels; a call, since human labels may not be there yet (it raises :class:`NeedsLabels`).
        real: (G, C, h, w) the latent of each group's real image, whose caption is the group's prompt, for
            objectives that set ``real_data`` (DDO); else None.
        generator: i -> a generator of group i's own, for objectives that draw at random when they build the
            round's units (RSO's rejection sampling): a pure function of (seed, round, group).
    """

    prompts: list[str]
    latents: Tensor
    log_probs: Tensor
    rewards: Tensor | None
    winners: Callable[[], Tensor]
    real: Tensor | None = None
    generator: Callable[[int], torch.Generator] | None = None
    means: Tensor | None = None


RealExamples = Callable[[list[int]], tuple[Tensor, list[str]]]


class OnlineRounds(RoundDriver):
    """The online objectives' batch source; see the module docstring."""

    def __init__(self, config: Config, backbone: Backbone, output_dir: Path, accelerator, objective,
                 real: RealExamples | None = None) -> None:
        """``real`` reads the latents and captions of the examples at some positions of the run's order of
        ``data.path``: the real images of objectives that set ``real_data`` (round r reads positions r G ...).

        Under context parallelism (``train.context_parallel=N``) a group of N processes is one sampler and one
        trainer: its processes sample the same groups in step (each forward split over them) and draw the same
        units, and the group's first process writes its part of the round (:func:`~diffalign.train.
        context_parallel.data_share`)."""
        super().__init__(config, output_dir, accelerator)
        self.backbone, self.objective = backbone, objective
        self.share = data_share(accelerator.process_index, accelerator.num_processes, config.train.context_parallel)
        self.group_size = objective.round_group_size(config)
        shared = config.online.shared_noise
        self.shared_noise = objective.shared_noise if shared is None else shared
        self.real = real
        self.edits = None  # an edit model's prompts: each with its source images (data.source_columns)
        if config.data.source_columns:
            if real is not None:
                raise UserError(f"{config.objective.name} pairs its samples with real images, and edit rounds "
                                "(data.source_columns) are not built for it; train edits with an objective that samples")
            dc = config.data
            self.edits = EditPrompts(config.online.prompts, resolution=dc.resolution, width=dc.width,
                                     caption_column=dc.caption_column,
                                     source_columns=dc.source_columns, on_error=dc.on_error, split=dc.split,
                                     max_image_pixels=dc.max_image_pixels)
            self.prompts = self.edits.captions
        else:
            self.prompts = None if real is not None else read_prompts(config.online.prompts)
        # the reward models, on the processes that score (a context-parallel group's first: its others hold None)
        self.rewards = {RewardSpec.parse(spec).name: load_reward(spec) if self.share.first else None
                        for spec in reward_specs(config.online.reward)}
        comparing = [name for name, model in self.rewards.items() if getattr(model, "reads_sources", False)]
        if comparing and self.edits is None:
            raise UserError(f"online.reward {', '.join(comparing)} compares each edit with its source image, and this "
                            "run samples from text alone: give online.prompts as a table of instructions with their "
                            "source images, named in data.source_columns")
        self.reward_weights = parse_weights(len(self.rewards), config.online.reward_weights)

    # --- one round -----------------------------------------------------------------------
    def sample_part(self, r: int, folder: Path) -> None:
        """Every process (every context-parallel group) samples and scores every N-th group of round r on its own
        GPU (the main process joins their parts)."""
        mine = list(range(self.share.index, self.config.online.groups_per_round, self.share.count))
        if mine:  # the main process always has group 0, so the round always has its images/ folder
            if self.share.first:
                (folder / "images").mkdir(exist_ok=True)
            self._sample_groups_of(r, mine, folder)

    def _sample_groups_of(self, r: int, groups: list[int], tmp: Path) -> None:
        """Round r's groups ``groups``: their trajectories, log-probabilities, rewards (and real images) into
        ``part-<share>.safetensors``, their prompts into ``part-<share>.json``, their images into
        ``images/``, ``online.sample_batch_size`` groups at a time. A context-parallel group's other processes
        sample with its first (their forwards are one split forward) and neither score nor write."""
        acc, n, k = self.accelerator, self.config.online.sample_batch_size, self.group_size
        g = self.config.online.groups_per_round
        part = {"groups": torch.tensor(groups)}
        if self.real is not None:  # group i of round r is the example at position r G + i of the run's order
            part["real"], prompts = self.real([r * g + i for i in groups])
        else:
            prompts = [self.prompts[(r * g + i) % len(self.prompts)] for i in groups]
        reference = sources = None
        if self.edits is not None:  # each group edits its row's sources: their latents, kept for training
            sources = torch.stack(self._sources(r, groups))
            reference = torch.stack([self.backbone.encode_sources(s.to(acc.device)).cpu() for s in sources])
            part["reference"] = reference
            for group, images in zip(groups, sources if self.share.first else []):
                for s, image in enumerate(images):
                    to_pil(image.add(1).div(2)).save(tmp / "images" / f"group{group:04d}-source{s}.png")
        label = f"round {r}: sampling {len(groups)} groups of {k}" if acc.is_local_main_process else None
        stochastic = self.stochastic(r)  # the round's noisy steps, the same for every batch
        batches, scored = [], []
        with ThreadPoolExecutor(max_workers=1) as scorer:  # batch i is scored while batch i + 1 samples
            for i in range(0, len(groups), n):
                batch = self._sample_groups(r, groups[i:i + n], prompts[i:i + n], label, stochastic,
                                            None if reference is None else reference[i:i + n],
                                            None if sources is None else sources[i:i + n], check_ratio=i == 0)
                batches.append(batch)
                if self.rewards and self.share.first:  # each image with its group's prompt (and sources, in [0, 1])
                    scored.append(scorer.submit(
                        self._score, batch[2], [p for p in prompts[i:i + n] for _ in range(k)],
                        None if sources is None else sources[i:i + n].add(1).div(2).repeat_interleave(k, dim=0)))
            parts = [future.result() for future in scored]
        if not self.share.first:
            return
        latents, log_probs, images = (torch.cat([batch[j] for batch in batches]) for j in range(3))
        for j, image in enumerate(images):
            save_media(image, tmp / "images" / f"group{groups[j // k]:04d}-{j % k}")
        if not self.objective.keeps_trajectories:
            latents = latents[:, -1:].contiguous()
        part.update(latents=latents, log_probs=log_probs, timesteps=batches[0][3], stochastic=stochastic)
        if self.objective.keeps_step_means:
            part["means"] = torch.cat([batch[4] for batch in batches])
        if batches[0][5] is not None:
            part["ratio_error"] = batches[0][5].reshape(1)
        for name in self.rewards:
            part[f"reward/{name}"] = torch.cat([scores[name] for scores in parts]).view(-1, k)
        save_file(part, str(tmp / f"part-{self.share.index}.safetensors"))
        (tmp / f"part-{self.share.index}.json").write_text(json.dumps(prompts))

    def _score(self, images: Tensor, prompts: list[str], sources: Tensor | None) -> dict[str, Tensor]:
        """Each reward model's (N,) raw scores of N images (whole groups, group-major); a model that compares edits
        with their sources (``reads_sources``) is also given those, and a pairwise judge's scores are each image's
        win rate over the other images of its group (:func:`~diffalign.rewards.pairwise_judge.pairwise_win_rates`)."""
        return {name: (pairwise_win_rates(model, images, prompts, self.group_size) if getattr(model, "pairwise", False)
                       else model(images, prompts, sources) if getattr(model, "reads_sources", False)
                       else score_media(model, images, prompts)).float() for name, model in self.rewards.items()}

    def _sources(self, r: int, groups) -> list[Tensor]:
        """The (S, 3, H, W) source pixels of round r's ``groups`` (edit rounds): group i edits row r G + i."""
        g = self.config.online.groups_per_round
        return [self.edits.read((r * g + int(i)) % len(self.prompts)).sources for i in groups]

    def _encode(self, prompts: list[str], reference: Tensor | None, sources: Tensor | None) -> Conditioning:
        """The prompts' conditioning; an edit's carries its sources' latents (``reference``, (N, S, C, h, w)), and
        where the text encoder reads the sources too, the prompts and the guided sampler's empty prompt are
        encoded with their ``sources`` pixels (N, S, 3, H, W)."""
        backbone = self.backbone
        if sources is None or not backbone.prompt_reads_sources:
            cond = backbone.encode_prompts(prompts)
        else:
            cond = backbone.encode_prompts(prompts, sources)
            if self.config.objective.sample_guidance_scale != 1.0 and backbone.empty_prompt_reads_sources:
                cond = cond.with_negative(backbone.encode_prompts([""] * len(prompts), sources))
        return cond if reference is None else dataclasses.replace(cond, reference=reference.to(cond.embeds.device))

    def _sample_groups(self, r: int, groups: list[int], prompts: list[str], label: str | None, stochastic: Tensor,
                       reference: Tensor | None = None, sources: Tensor | None = None, check_ratio: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """One batch of groups, sampled with noise at the round's ``stochastic`` steps (:meth:`stochastic`):
        (latents, log-probabilities, images in [0, 1], timesteps, step means or None when
        the objective keeps none, the sampler's ratio error (:meth:`_ratio_error`, with ``check_ratio``: the first
        batch of a process's share) or None), on the CPU. Each
        group draws its starting noise and step noise from its own generator, so a group is the same
        whichever process, and whichever batch, samples it. ``reference``: (G, S, C, h, w) latents of each group's
        source images, for an edit model, and ``sources`` their pixels."""
        obj, acc, backbone, k = self.config.objective, self.accelerator, self.backbone, self.group_size
        shape = backbone.latent_shape(self.config.data.resolution, self.config.data.width)
        generators = [example_generator(self.config.train.seed, r, 1, i) for i in groups]
        noises = 1 if self.shared_noise else self.objective.starting_noises(k)  # each shared by k / noises samples
        noise = torch.cat([torch.randn((noises, *shape), generator=g).repeat_interleave(k // noises, dim=0)
                           for g in generators])
        step_noise = torch.cat([torch.randn((k, obj.sample_steps, *shape), generator=g) for g in generators])
        cond = self._encode(prompts, reference, sources).repeat_items(k)
        uncond = backbone.empty_prompt() if obj.sample_guidance_scale != 1.0 else None
        uncond = None if uncond is None else uncond.repeat_items(k * len(groups))
        with torch.no_grad(), acc.autocast():
            trajectory = sample_trajectories(backbone, noise.to(acc.device), cond, steps=obj.sample_steps,
                                             eta=obj.sample_eta, guidance_scale=obj.sample_guidance_scale,
                                             uncond=uncond, step_noise=step_noise, progress=label,
                                             denoiser=self.objective.sampling_denoiser(),
                                             stochastic=stochastic, sampler=obj.sampler,
                                             record_means=self.objective.keeps_step_means)
            final = backbone.finish_sample(trajectory.final.to(acc.device), cond)
            images = backbone.decode_latents(final).float().cpu().add(1).div(2)
            error = self._ratio_error(trajectory, cond, uncond) if check_ratio and self.objective.keeps_trajectories \
                else None
        means = None if trajectory.means is None else trajectory.means.cpu().contiguous()
        return (trajectory.latents.cpu().contiguous(), trajectory.log_probs.cpu().contiguous(), images,
                trajectory.timesteps.float().cpu(), means, error)

    def stochastic(self, r: int) -> Tensor:
        """(steps,) bool: the sampler steps of round r that draw noise: the objective's choice among the steps it may
        train (:meth:`OnlineObjective.stochastic_steps`), else :func:`sde_window`'s."""
        obj = self.config.objective
        shape = self.backbone.latent_shape(self.config.data.resolution, self.config.data.width)
        timesteps = StepRule(self.backbone, obj.sample_steps, obj.sample_eta, shape, sampler=obj.sampler).timesteps
        candidates = self._trained_steps(timesteps.float(), torch.ones(obj.sample_steps, dtype=torch.bool))
        chosen = self.objective.stochastic_steps(r, candidates, obj.sample_steps)
        return sde_window(self.config, r) if chosen is None else chosen

    def _ratio_error(self, trajectory, cond: Conditioning, uncond: Conditioning | None) -> Tensor | None:
        """The largest |log rho| of the batch's first trajectory (one a round and process: a forward of T rows, not
        one per batch), its stochastic steps re-scored by the sampler
        itself in one batch of another shape: how far rounding alone (the forward's precision, the batch's
        composition) moves an importance ratio before any update, to set against the clip range (Flow-GRPO's
        1e-4; flow_grpo #211 asks why its ratios sit at 1). Logged as ``round_ratio_error``; None when the round
        has no stochastic step. The log-probabilities and ratios themselves are always computed in fp32 from the
        model's output, whatever ``train.mixed_precision`` the forward runs in."""
        obj = self.config.objective
        steps = (trajectory.log_probs[0] != 0).nonzero().squeeze(1)  # deterministic steps record exactly 0
        if len(steps) == 0:
            return None
        n = len(steps)
        rescored = step_log_prob(self.backbone, trajectory.latents[:1].expand(n, *trajectory.latents.shape[1:]),
                                 steps, cond[0:1].repeat_items(n), eta=obj.sample_eta,
                                 guidance_scale=obj.sample_guidance_scale,
                                 uncond=None if uncond is None else uncond[0:1].repeat_items(n),
                                 denoiser=self.objective.sampling_denoiser(), sampler=obj.sampler)
        return (rescored.float() - trajectory.log_probs[0, steps].float()).abs().max().cpu()

    def join(self, r: int, tmp: Path) -> None:
        """The processes' parts as the round's ``trajectories.safetensors`` and ``groups.json``, in group order."""
        files = sorted(tmp.glob("part-*.safetensors"))
        parts = [load_file(str(f)) for f in files]
        order = torch.argsort(torch.cat([part["groups"] for part in parts]))
        joined = [prompt for f in files for prompt in json.loads(f.with_suffix(".json").read_text())]
        prompts = [joined[i] for i in order]
        k = self.group_size

        def by_group(key: str) -> Tensor:  # rows come K per group (group-major) in each part
            return torch.cat([part[key].view(-1, k, *part[key].shape[1:]) for part in parts])[order]

        tensors = {"latents": by_group("latents").flatten(0, 1), "timesteps": parts[0]["timesteps"],
                   "log_probs": by_group("log_probs").flatten(0, 1), "stochastic": parts[0]["stochastic"]}
        if "means" in parts[0]:
            tensors["means"] = by_group("means").flatten(0, 1)
        for key in ("real", "reference"):  # DDO's real images; an edit round's sources
            if key in parts[0]:
                tensors[key] = torch.cat([part[key] for part in parts])[order]
        save_file(tensors, str(tmp / "trajectories.safetensors"))
        raw = {name: torch.cat([part[f"reward/{name}"] for part in parts])[order] for name in self.rewards}
        rewards = None
        if raw:
            as_win_rates = self.config.online.reward_as == "win_rate"  # a pairwise judge's scores are win rates
            trained = {name: group_win_rates(scores) if as_win_rates and not getattr(self.rewards[name], "pairwise",
                                                                                     False) else scores
                       for name, scores in raw.items()}
            flat = {name: scores.reshape(-1) for name, scores in trained.items()}
            rewards = combine_rewards(flat, self.reward_weights, [p for p in prompts for _ in range(k)]).view(-1, k)
        record = {"prompts": prompts, "group_size": k, "rewards": None if rewards is None else rewards.tolist(),
                  "reward_weights": self.reward_weights, "reward_parts": {n: v.tolist() for n, v in raw.items()},
                  "image_stats": self._image_stats(tmp / "images", prompts)}
        errors = [part["ratio_error"] for part in parts if "ratio_error" in part]
        if errors:
            record["ratio_error"] = float(torch.cat(errors).max())
        (tmp / "groups.json").write_text(json.dumps(record))
        for f in files:
            f.unlink()
            f.with_suffix(".json").unlink()

    def _image_stats(self, images: Path, prompts: list[str]) -> dict[str, float]:
        """The round's image statistics (:func:`diffalign.eval.image_stats.image_statistics`, diversity within each
        group), read from its PNGs (a clip's first frame): logged as ``round_<statistic>`` with every step trained on the round."""
        k = self.group_size
        pixels = [torch.from_numpy(np.asarray(Image.open(images / f"group{g:04d}-{j}.png").convert("RGB")).copy())
                  for g in range(len(prompts)) for j in range(k)]
        batch = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
        return image_statistics(batch, [p for p in prompts for _ in range(k)])

    def winners(self, r: int, record: dict) -> list[int]:
        """Index (0 or 1) of the preferred trajectory of each pair: the higher reward, or the human label."""
        if record["rewards"] is not None:
            return [0 if a >= b else 1 for a, b in record["rewards"]]
        labels_path = Path(self.config.online.labels)
        labels = round_pair_winners(labels_path)
        missing = [i for i in range(len(record["prompts"])) if (r, i) not in labels]
        if missing:
            folder = self.round_dir(r)
            if self.accelerator.is_main_process:  # every process stops here; one writes what to label
                (folder / "to_label.jsonl").write_text("".join(
                    json.dumps({"round": r, "pair": i, "prompt": record["prompts"][i],
                                "images": [f"images/{shown_media(folder / 'images' / f'group{i:04d}-{j}').name}"
                                           for j in (0, 1)],
                                **({"sources": [f"images/group{i:04d}-source{s}.png"
                                                for s in range(len(self.config.data.source_columns))]}
                                   if self.edits is not None else {}),
                                "winner": None}) + "\n"
                    for i in missing))
            raise NeedsLabels(f"round {r} waits for {len(missing)} human labels: see {folder / 'to_label.jsonl'}, "
                              f"append lines {{\"round\": {r}, \"pair\": i, \"winner\": 0 or 1}} to {labels_path}, "
                              "then run again with train.resume=latest")
        bad = [i for i in range(len(record["prompts"])) if labels[(r, i)] not in (0, 1)]
        if bad:
            raise UserError(f"{labels_path}: round {r} pairs {bad} have a winner other than 0 or 1")
        return [labels[(r, i)] for i in range(len(record["prompts"]))]

    def load(self, r: int, folder: Path) -> dict[str, Any]:
        """Round r's training units, from its folder."""
        tensors = load_file(str(folder / "trajectories.safetensors"))
        record = json.loads((folder / "groups.json").read_text())
        g, k = len(record["prompts"]), record["group_size"]
        round_ = Round(prompts=record["prompts"],
                       latents=tensors["latents"].view(g, k, *tensors["latents"].shape[1:]),
                       log_probs=tensors["log_probs"].view(g, k, -1),
                       rewards=None if record["rewards"] is None else torch.tensor(record["rewards"]),
                       winners=lambda: torch.tensor(self.winners(r, record)), real=tensors.get("real"),
                       generator=lambda i: example_generator(self.config.train.seed, r, 3, i, 0),
                       means=tensors["means"].view(g, k, *tensors["means"].shape[1:]) if "means" in tensors else None)
        stochastic = tensors.get("stochastic", torch.ones(len(tensors["timesteps"]), dtype=torch.bool))
        units = self.objective.training_units(round_)
        # what the objective says of its units (the pairs a self-play rule kept) is logged with the rewards
        logged = {**self._logged_rewards(record), **units.pop("logged", {}),
                  **{f"round_{name}": torch.tensor(value) for name, value in record.get("image_stats", {}).items()},
                  **({"round_ratio_error": torch.tensor(record["ratio_error"])} if "ratio_error" in record else {})}
        return {**units, "round": r, "prompts": record["prompts"], "reference": tensors.get("reference"),
                "trained_steps": self._trained_steps(tensors["timesteps"], stochastic.bool()), "logged": logged}

    def _trained_steps(self, timesteps: Tensor, stochastic: Tensor) -> Tensor:
        """Indices of the stochastic denoising steps whose noise level t / T lies in ``objective.t_range`` (both
        ends kept) and that the trained denoiser takes (a two-expert model's trained expert: its own steps only,
        since the other's, frozen, would give no gradient)."""
        lo, hi = self.config.objective.t_range
        level = timesteps.float() / self.backbone.scheduler.config.num_train_timesteps
        served = self.backbone.serves(timesteps.float())
        steps = ((level >= lo) & (level <= hi) & stochastic & served).nonzero().squeeze(1)
        if len(steps) == 0:
            expert = f" and model.expert={self.config.model.expert}'s" if self.config.model.expert else ""
            raise UserError(f"objective.t_range={[lo, hi]}{expert} keeps none of the stochastic steps' noise levels "
                            f"{[round(v, 3) for v, s in zip(level.tolist(), stochastic.tolist()) if s]}")
        return steps

    @staticmethod
    def _logged_rewards(record: dict) -> dict[str, Tensor]:
        """The round's mean raw reward, ``train_reward`` (the weighted sum of each model's mean), and each model's
        as ``train_reward/NAME`` when there are several; nothing for a round that people judge."""
        parts = {name: torch.tensor(scores) for name, scores in record.get("reward_parts", {}).items()}
        if not parts and record["rewards"] is not None:  # a round written before reward_parts existed
            parts = {"reward": torch.tensor(record["rewards"])}
        if not parts:
            return {}
        weights = record.get("reward_weights") or [1.0] * len(parts)
        logged = {"train_reward": weighted_raw_mean(parts, weights)}
        if len(parts) > 1:
            logged.update({f"train_reward/{name}": scores.float().mean() for name, scores in parts.items()})
        if record["rewards"] is not None:  # reward saturation: groups whose samples all scored alike train nothing
            rewards = torch.tensor(record["rewards"]).view(len(record["prompts"]), -1)
            logged["flat_groups"] = (rewards.amax(dim=1) == rewards.amin(dim=1)).float().mean()
        return logged

    def _conditions(self, data: dict[str, Any], groups: Tensor) -> Conditioning:
        """The conditioning of the units of ``groups``, as their round sampled them (:meth:`_encode`). A text
        encoder that reads the sources (Qwen2.5-VL: a 7B forward pass over each image) encodes each group once a
        round, kept with the round's data, instead of once per unit and micro-batch."""
        if data["reference"] is None or not self.backbone.prompt_reads_sources:
            reference = None if data["reference"] is None else data["reference"][groups]
            return self._encode([data["prompts"][i] for i in groups], reference, None)
        encoded = data.setdefault("encoded", {})
        missing = sorted({int(g) for g in groups} - set(encoded))
        if missing:
            cond = self._encode([data["prompts"][g] for g in missing], data["reference"][missing],
                                torch.stack(self._sources(data["round"], missing)))
            encoded.update({g: cond[j:j + 1].to("cpu") for j, g in enumerate(missing)})
        return Conditioning.cat([encoded[int(g)] for g in groups])

    # --- the trainer's interface ---------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's units and denoising steps for (step, micro): a pure function of (seed, step, micro)."""
        tc, acc = self.config.train, self.accelerator
        data = self.round(self.round_of(step))
        global_batch = tc.batch_size * self.share.count
        g = example_generator(tc.seed, step, micro, 2)
        units, steps = self.objective.choose_units(len(data["latents"]), data["trained_steps"], global_batch, g)
        dc = self.config.data
        extra = self.objective.draw(global_batch, self.backbone.latent_shape(dc.resolution, dc.width), g)
        mine = slice(self.share.index * tc.batch_size, (self.share.index + 1) * tc.batch_size)
        units, steps = units[mine], steps[mine]
        device = acc.device
        return {
            "latents": data["latents"][units].to(device),
            "cond": self._conditions(data, data["prompt_of"][units]).to(device),
            "randomness": {"step": steps.to(device), **{k: v[mine].to(device) for k, v in extra.items()}},
            "targets": {name: value[units].to(device) for name, value in data["targets"].items()},
            "logged": {name: value.to(device) for name, value in data["logged"].items()},
        }
