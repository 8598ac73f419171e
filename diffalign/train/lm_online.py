"""The round driver on a causal language model: sample K completions per prompt, score, pair, train, repeat.

Round r covers optimiser steps [r S, (r + 1) S) with S = ``online.steps_per_round``. At its first step the
policy (as it is then: pi_r of the self-play loops) samples ``online.group_size`` completions for each of
``online.groups_per_round`` prompts (cycling through ``online.prompts``), a text reward scores them
(:mod:`diffalign.rewards.text`: the toy world's, or any local sequence classifier), and the round is written
to ``run/rounds/round-NNNNN/groups.json`` (prompts, completions, rewards). The objective's rule turns the
groups into pairs (:meth:`~diffalign.objectives.lm_online.LanguageModelSelfPlay.pairs`), which are tokenized
as offline pairs are; each optimiser step trains a random draw of them. Sampling is seeded by (seed, r), the
main process samples and scores, and a resumed run reads its rounds from disk, so resume stays exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffalign.data import example_generator
from diffalign.eval.prompts import read_prompts
from diffalign.lm.packing import padding_share
from diffalign.lm.sampling import sample_completions
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.rewards.text import load_text_reward
from diffalign.train.config import Config
from diffalign.train.rounds import RoundDriver

Tensor = torch.Tensor


class TextRounds(RoundDriver):
    """The LM online objectives' batch source; see the module docstring."""

    def __init__(self, config: Config, policy, tokenizer, output_dir: Path, accelerator, objective) -> None:
        super().__init__(config, output_dir, accelerator)
        self.policy, self.tokenizer, self.objective = policy, tokenizer, objective
        self.group_size = objective.round_group_size(config)
        self.prompts = read_prompts(config.online.prompts)
        self.reward = load_text_reward(config.online.reward)  # one text reward (checked with the config)

    def join(self, r: int, folder: Path) -> None:
        """Round r's completions and rewards, sampled and scored by the main process (the others wait)."""
        acc, g, oc = self.accelerator, self.config.online.groups_per_round, self.config.online
        prompts = [self.prompts[(r * g + i) % len(self.prompts)] for i in range(g)]
        expanded = [p for p in prompts for _ in range(self.group_size)]
        model = acc.unwrap_model(self.policy)
        was_training = model.training
        seed = int(torch.randint(0, 2**31 - 1, (), generator=example_generator(self.config.train.seed, r, 1, 0)))
        completions = sample_completions(model.eval(), self.tokenizer, expanded, seed=seed,
                                         max_new_tokens=self.objective.max_new_tokens,
                                         temperature=self.objective.temperature,
                                         batch_size=oc.sample_batch_size * self.group_size)
        model.train(was_training)
        rewards = self.reward(completions, expanded).float().view(g, self.group_size)
        record = {"prompts": prompts, "group_size": self.group_size, "reward": self.reward.name,
                  "completions": [completions[i:i + self.group_size]
                                  for i in range(0, len(completions), self.group_size)],
                  "rewards": rewards.tolist()}
        (folder / "groups.json").write_text(json.dumps(record))

    def load(self, r: int, folder: Path) -> dict[str, Any]:
        """Round r's pairs, tokenized."""
        record = json.loads((folder / "groups.json").read_text())
        rewards = torch.tensor(record["rewards"])
        groups, items, inputs = self.objective.pairs(rewards)
        pairs = [tokenize_group(self.tokenizer, record["prompts"][int(g)],
                                [record["completions"][int(g)][int(k)] for k in pair])
                 for g, pair in zip(groups, items)]
        logged = {"train_reward": rewards.mean(), "pairs_per_round": torch.tensor(float(len(pairs)))}
        return {"pairs": pairs, "inputs": inputs, "logged": logged}

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's pairs for (step, micro): a pure function of (seed, step, micro) and the round."""
        tc, acc = self.config.train, self.accelerator
        data = self.round(self.round_of(step))
        draw = torch.randint(0, len(data["pairs"]), (tc.batch_size * acc.num_processes,),
                             generator=example_generator(tc.seed, step, micro, 2))
        mine = draw[acc.process_index * tc.batch_size:(acc.process_index + 1) * tc.batch_size]
        inputs = collate([data["pairs"][int(i)] for i in mine], pad_token_id=self.tokenizer.pad_token_id,
                         max_length=self.config.data.max_length, packed=self.config.data.packing)
        device = acc.device
        logged = {**data["logged"], "padding_share": torch.tensor(padding_share(inputs))}
        return {"inputs": {k: v.to(device) for k, v in inputs.items()},
                "targets": {k: v[mine].to(device) for k, v in data["inputs"].items()},
                "list_size": 2, "logged": {k: v.to(device) for k, v in logged.items()}}
