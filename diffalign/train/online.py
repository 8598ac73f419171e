"""Rounds of on-policy samples for online objectives (D3PO): sample, prefer, train, repeat.

Round r covers optimiser steps [r * S, (r + 1) * S) with S = ``online.steps_per_round``. At its
first step the current policy (the backbone's denoiser, LoRA enabled) samples
``online.pairs_per_round`` trajectory pairs without gradients (each pair shares its starting
noise; prompts cycle through ``online.prompts``), a reward model or a person says which final
image of each pair is better, and the round is written to ``run/rounds/round-NNNNN/``: the
trajectories and log-probabilities (safetensors), the images (PNG), and ``pairs.json`` (prompts,
rewards, winners). On N processes each samples and scores every N-th pair. Everything in a round
is a pure function of (seed, r) and the weights at its start (each pair has its own generator),
and a resumed run reads the round from disk instead of sampling it again, so resume stays exact.
Each optimiser step trains one random denoising step per pair, among the steps whose noise level
t / T lies in ``objective.t_range`` (all by default).

Human labels: with ``online.labels`` set, a round whose pairs are not all labelled in that
file raises :class:`NeedsLabels` after writing ``to_label.jsonl``; the trainer checkpoints and
stops, and ``train.resume=latest`` continues once the labels are there (``diffalign label RUN``
serves them as a page). A later line for a pair replaces an earlier one, and ``"winner": null``
withdraws the pair's label (an undo, a tie or a skip on the page).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffalign.data import example_generator
from diffalign.diffusion import Backbone
from diffalign.diffusion.logprob import sample_trajectories
from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.eval.report import to_pil
from diffalign.paths import with_usual_permissions
from diffalign.rewards import load_reward
from diffalign.train.config import Config

Tensor = torch.Tensor


class NeedsLabels(Exception):
    """A round waits for human labels; the message says where to put them."""


class OnlineRounds:
    """The online objectives' batch source; see the module docstring."""

    def __init__(self, config: Config, backbone: Backbone, output_dir: Path, accelerator) -> None:
        self.config, self.backbone, self.accelerator = config, backbone, accelerator
        self.root = output_dir / "rounds"
        self.prompts = read_prompts(config.online.prompts)
        self.reward = load_reward(config.online.reward) if config.online.reward else None
        self.bad_rows: dict[tuple[int, str], str] = {}  # none: the trainer's bad-row accounting, empty
        self._loaded: tuple[int, dict[str, Any]] | None = None

    # --- one round -----------------------------------------------------------------------
    def _round_dir(self, r: int) -> Path:
        return self.root / f"round-{r:05d}"

    def _sample(self, r: int) -> None:
        """Sample, score and write round r: every process samples and scores every N-th pair on its own GPU,
        and the main process joins their parts. Atomic: the folder appears complete or not at all."""
        acc, n = self.accelerator, self.config.online.pairs_per_round
        prompts = [self.prompts[(r * n + i) % len(self.prompts)] for i in range(n)]
        final = self._round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "images").mkdir(parents=True)
        acc.wait_for_everyone()
        mine = list(range(acc.process_index, n, acc.num_processes))
        if mine:
            self._sample_part(r, mine, [prompts[i] for i in mine], tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._join_parts(tmp, prompts)
            os.replace(with_usual_permissions(tmp), final)

    def _sample_part(self, r: int, pairs: list[int], prompts: list[str], tmp: Path) -> None:
        """Round r's pairs ``pairs``: their trajectories, log-probabilities and rewards into
        ``part-<process>.safetensors``, their images into ``images/``, ``online.sample_batch_size`` pairs
        at a time."""
        acc, n = self.accelerator, self.config.online.sample_batch_size
        label = f"round {r}: sampling {len(pairs)} pairs" if acc.is_local_main_process else None
        batches = [self._sample_pairs(r, pairs[i:i + n], prompts[i:i + n], label) for i in range(0, len(pairs), n)]
        latents, log_probs, images = (torch.cat([batch[k] for batch in batches]) for k in range(3))
        for k, image in enumerate(images):
            to_pil(image).save(tmp / "images" / f"pair{pairs[k // 2]:04d}-{k % 2}.png")
        part = {"pairs": torch.tensor(pairs), "latents": latents, "log_probs": log_probs,
                "timesteps": batches[0][3]}
        if self.reward is not None:
            part["rewards"] = self.reward(images, [p for p in prompts for _ in (0, 1)]).float().view(-1, 2)
        save_file(part, str(tmp / f"part-{acc.process_index}.safetensors"))

    def _sample_pairs(self, r: int, pairs: list[int], prompts: list[str],
                      label: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One batch of pairs: (latents, log-probabilities, images in [0, 1], timesteps), on the CPU. Each
        pair draws its starting noise and step noise from its own generator, so a pair is the same
        whichever process, and whichever batch, samples it."""
        obj, acc, backbone = self.config.objective, self.accelerator, self.backbone
        shape = backbone.latent_shape(self.config.data.resolution)
        generators = [example_generator(self.config.train.seed, r, 1, i) for i in pairs]
        noise = torch.cat([torch.randn((1, *shape), generator=g).repeat(2, *[1] * len(shape)) for g in generators])
        step_noise = torch.cat([torch.randn((2, obj.sample_steps, *shape), generator=g) for g in generators])
        cond = backbone.encode_prompts(prompts).repeat_items(2)
        uncond = backbone.encode_prompts([""] * 2 * len(pairs)) if obj.sample_guidance_scale != 1.0 else None
        with torch.no_grad(), acc.autocast():
            trajectory = sample_trajectories(backbone, noise.to(acc.device), cond, steps=obj.sample_steps,
                                             eta=obj.sample_eta, guidance_scale=obj.sample_guidance_scale,
                                             uncond=uncond, step_noise=step_noise, progress=label)
            images = backbone.decode_latents(trajectory.final.to(acc.device)).float().cpu().add(1).div(2)
        return (trajectory.latents.cpu().contiguous(), trajectory.log_probs.cpu().contiguous(), images,
                trajectory.timesteps.float().cpu())

    def _join_parts(self, tmp: Path, prompts: list[str]) -> None:
        """The processes' parts as the round's ``trajectories.safetensors`` and ``pairs.json``, in pair order."""
        files = sorted(tmp.glob("part-*.safetensors"))
        parts = [load_file(str(f)) for f in files]
        order = torch.argsort(torch.cat([part["pairs"] for part in parts]))

        def by_pair(key: str) -> Tensor:  # rows come two per pair (pair-major) in each part
            return torch.cat([part[key].view(-1, 2, *part[key].shape[1:]) for part in parts])[order]

        save_file({"latents": by_pair("latents").flatten(0, 1), "timesteps": parts[0]["timesteps"],
                   "log_probs": by_pair("log_probs").flatten(0, 1)}, str(tmp / "trajectories.safetensors"))
        rewards = torch.cat([part["rewards"] for part in parts])[order].tolist() if self.reward is not None else None
        (tmp / "pairs.json").write_text(json.dumps({"prompts": prompts, "rewards": rewards}))
        for f in files:
            f.unlink()

    def _winners(self, r: int, record: dict) -> list[int]:
        """Index (0 or 1) of the preferred trajectory of each pair: the higher reward, or the human label."""
        if record["rewards"] is not None:
            return [0 if a >= b else 1 for a, b in record["rewards"]]
        labels_path = Path(self.config.online.labels)
        labels = {}
        if labels_path.is_file():
            for number, line in enumerate(labels_path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        key = (int(row["round"]), int(row["pair"]))
                        if row["winner"] is None:  # withdrawn (an undo), or a tie or skip: no winner to train on
                            labels.pop(key, None)
                        else:  # a later line for the same pair replaces an earlier one
                            labels[key] = int(row["winner"])
                    except (ValueError, KeyError, TypeError) as err:
                        raise UserError(f"{labels_path}:{number} is not a label {{round, pair, winner}} ({err})") from None
        missing = [i for i in range(len(record["prompts"])) if (r, i) not in labels]
        if missing:
            folder = self._round_dir(r)
            if self.accelerator.is_main_process:  # every process stops here; one writes what to label
                (folder / "to_label.jsonl").write_text("".join(
                    json.dumps({"round": r, "pair": i, "prompt": record["prompts"][i],
                                "images": [f"images/pair{i:04d}-0.png", f"images/pair{i:04d}-1.png"],
                                "winner": None}) + "\n"
                    for i in missing))
            raise NeedsLabels(f"round {r} waits for {len(missing)} human labels: see {folder / 'to_label.jsonl'}, "
                              f"append lines {{\"round\": {r}, \"pair\": i, \"winner\": 0 or 1}} to {labels_path}, "
                              "then run again with train.resume=latest")
        bad = [i for i in range(len(record["prompts"])) if labels[(r, i)] not in (0, 1)]
        if bad:
            raise UserError(f"{labels_path}: round {r} pairs {bad} have a winner other than 0 or 1")
        return [labels[(r, i)] for i in range(len(record["prompts"]))]

    def _round(self, r: int) -> dict[str, Any]:
        if self._loaded is not None and self._loaded[0] == r:
            return self._loaded[1]
        if not self._round_dir(r).is_dir():
            self._sample(r)
            self.accelerator.wait_for_everyone()
        folder = self._round_dir(r)
        tensors = load_file(str(folder / "trajectories.safetensors"))
        record = json.loads((folder / "pairs.json").read_text())
        winners = torch.tensor(self._winners(r, record))
        n = len(record["prompts"])
        latents = tensors["latents"].view(n, 2, *tensors["latents"].shape[1:])
        order = torch.stack([winners, 1 - winners], dim=1)  # winner first
        data = {"latents": latents[torch.arange(n)[:, None], order], "prompts": record["prompts"],
                "trained_steps": self._trained_steps(tensors["timesteps"])}
        self._loaded = (r, data)
        return data

    def _trained_steps(self, timesteps: Tensor) -> Tensor:
        """Indices of the denoising steps whose noise level t / T lies in ``objective.t_range`` (both ends kept)."""
        lo, hi = self.config.objective.t_range
        level = timesteps.float() / self.backbone.scheduler.config.num_train_timesteps
        steps = ((level >= lo) & (level <= hi)).nonzero().squeeze(1)
        if len(steps) == 0:
            raise UserError(f"objective.t_range={[lo, hi]} keeps none of the sampler's noise levels "
                            f"{[round(v, 3) for v in level.tolist()]}")
        return steps

    # --- the trainer's interface ---------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's pairs and denoising steps for (step, micro): a pure function of (seed, step, micro)."""
        tc, acc = self.config.train, self.accelerator
        data = self._round(step // self.config.online.steps_per_round)
        global_batch = tc.batch_size * acc.num_processes
        g = example_generator(tc.seed, step, micro, 2)
        pairs = torch.randint(0, len(data["prompts"]), (global_batch,), generator=g)
        trained = data["trained_steps"]
        steps = trained[torch.randint(0, len(trained), (global_batch,), generator=g)]
        mine = slice(acc.process_index * tc.batch_size, (acc.process_index + 1) * tc.batch_size)
        pairs, steps = pairs[mine], steps[mine]
        device = acc.device
        return {
            "latents": data["latents"][pairs].to(device),
            "cond": self.backbone.encode_prompts([data["prompts"][i] for i in pairs]).to(device),
            "randomness": {"step": steps.to(device)},
            "targets": {},
        }
