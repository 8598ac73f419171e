"""The round driver on a causal language model: sample K completions per prompt, score, pair, train, repeat.

Round r covers optimiser steps [r S, (r + 1) S) with S = ``online.steps_per_round``. At its first step the
policy (as it is then: pi_r of the self-play loops) samples ``online.group_size`` completions for each of
``online.groups_per_round`` prompts (cycling through ``online.prompts``), a text reward scores them
(:mod:`diffalign.rewards.text`: the toy world's, or any local sequence classifier; a general preference model
or the policy judging itself gives each group's table of s(i beats j) instead, kept as ``preferences`` with each
row's mean as ``rewards``),
and the round is written to ``run/rounds/round-NNNNN/groups.json`` (prompts, completions, rewards). The objective's rule turns the
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
from diffalign.data.pairs import BadRow
from diffalign.data.text import TextUnpairedDataset
from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.lm.packing import padding_share
from diffalign.lm.sampling import sample_completions
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.losses.self_play import preference_scores
from diffalign.rewards.text import load_text_reward
from diffalign.sharded import is_sharded
from diffalign.train.config import Config
from diffalign.train.rounds import RoundDriver

Tensor = torch.Tensor


class TextRounds(RoundDriver):
    """The LM online objectives' batch source; see the module docstring."""

    def __init__(self, config: Config, policy, tokenizer, output_dir: Path, accelerator, objective,
                 real: TextUnpairedDataset | None = None) -> None:
        """``real``: the ``data.path`` table of objectives that set ``real_data`` (DRIFT's dissatisfying completions)."""
        super().__init__(config, output_dir, accelerator)
        self.policy, self.tokenizer, self.objective = policy, tokenizer, objective
        self.group_size = objective.round_group_size(config)
        if real is not None:  # the data's completions, each paired with the policy's fresh one for its prompt
            kept = data_completions(real, config, desirable=objective.real_is_chosen)
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(config.train.seed))
            self.real = [kept[int(i)] for i in order]  # the run's order: a seeded shuffle, so each round mixes prompts
            self.prompts = [prompt for prompt, _ in self.real]
        else:
            self.real, self.prompts = None, read_prompts(config.online.prompts)
        # one text reward (checked with the config); none for objectives whose pairs are the data against fresh samples
        self.reward = load_text_reward(config.online.reward, accelerator.unwrap_model(policy),
                                       tokenizer) if objective.scored else None
        self._sampled: list[str] | None = None  # the round every process sampled (FSDP2), for join
        self._judged: Tensor | None = None  # and the tables every process judged with the policy (self_judge)

    def _rows(self, r: int) -> list[int]:
        g = self.config.online.groups_per_round
        return [(r * g + i) % len(self.prompts) for i in range(g)]

    def _sample(self, r: int) -> list[str]:
        """Round r's completions, group after group, from the round's seed."""
        expanded = [self.prompts[i] for i in self._rows(r) for _ in range(self.group_size)]
        model = self.accelerator.unwrap_model(self.policy)
        was_training = model.training
        seed = int(torch.randint(0, 2**31 - 1, (), generator=example_generator(self.config.train.seed, r, 1, 0)))
        completions = sample_completions(model.eval(), self.tokenizer, expanded, seed=seed,
                                         max_new_tokens=self.objective.max_new_tokens,
                                         temperature=self.objective.temperature,
                                         batch_size=self.config.online.sample_batch_size * self.group_size)
        model.train(was_training)
        return completions

    def _tables(self, r: int, completions: list[str]) -> Tensor:
        """Each group's (K, K) table of s(i beats j) from a comparing reward (a general preference model, the self
        judge)."""
        prompts = [self.prompts[i] for i in self._rows(r)]
        groups = [completions[i:i + self.group_size] for i in range(0, len(completions), self.group_size)]
        return self.reward.tables(groups, prompts).float()

    def sample_part(self, r: int, folder: Path) -> None:
        """Under FSDP2 the policy's forwards need every process: all sample the round, from the same seeds (the same
        completions), and judge it when the policy is its own judge; the main process keeps them for :meth:`join`.
        Whole weights: the main samples (and judges) alone."""
        sharded = is_sharded(self.policy)
        self._sampled = self._sample(r) if sharded else None
        judges = sharded and getattr(self.reward, "runs_the_policy", False)
        self._judged = self._tables(r, self._sampled) if judges else None

    def join(self, r: int, folder: Path) -> None:
        """Round r's completions and rewards, sampled (see :meth:`sample_part`) and scored by the main process."""
        g = self.config.online.groups_per_round
        rows = self._rows(r)
        prompts = [self.prompts[i] for i in rows]
        expanded = [p for p in prompts for _ in range(self.group_size)]
        completions = self._sampled if self._sampled is not None else self._sample(r)
        groups = [completions[i:i + self.group_size] for i in range(0, len(completions), self.group_size)]
        record = {"prompts": prompts, "group_size": self.group_size, "completions": groups}
        if self.real is not None:  # no reward: the data's completion is the pair's chosen one or its rejected one
            record.update(group_size=2, rewards=None, data_rows=rows, completions=[
                [self.real[i][1], *fresh] if self.objective.real_is_chosen else [*fresh, self.real[i][1]]
                for i, fresh in zip(rows, groups)])
        elif hasattr(self.reward, "tables"):  # a comparing reward: each group's s(i beats j), and the mean row
            tables = self._judged if self._judged is not None else self._tables(r, completions)
            record.update(preferences=tables.tolist(), rewards=preference_scores(tables).tolist())
        else:
            record["rewards"] = self.reward(completions, expanded).float().view(g, self.group_size).tolist()
        record["reward"] = None if self.reward is None else self.reward.name
        (folder / "groups.json").write_text(json.dumps(record))

    def load(self, r: int, folder: Path) -> dict[str, Any]:
        """Round r's pairs, tokenized."""
        record = json.loads((folder / "groups.json").read_text())
        rewards = None if record["rewards"] is None else torch.tensor(record["rewards"])
        if rewards is None:  # data against fresh completions: each group is its pair, chosen first (see join)
            groups, items, inputs = torch.arange(len(record["prompts"])), torch.tensor([[0, 1]]), {}
            items = items.expand(len(groups), 2)
        else:
            groups, items, inputs = self.objective.pairs(
                torch.tensor(record["preferences"]) if "preferences" in record else rewards,
                lambda g: example_generator(self.config.train.seed, r, 3, g, 0))
        pairs = [tokenize_group(self.tokenizer, record["prompts"][int(g)],
                                [record["completions"][int(g)][int(k)] for k in pair])
                 for g, pair in zip(groups, items)]
        if not pairs:
            raise UserError(f"round {r} ({folder}): none of its {len(record['prompts'])} groups gives "
                            f"{self.config.objective.name} anything to train on (every group's completions scored alike, "
                            "or all above or all below their mean): the reward is saturated on these prompts; use "
                            "more varied prompts, larger groups (online.group_size) or a finer reward")
        logged = {"pairs_per_round": torch.tensor(float(len(pairs)))}
        if rewards is not None and "preferences" not in record:  # a table's row means average to 0 (skew-symmetry)
            logged["train_reward"] = rewards.mean()
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
                "list_size": len(data["pairs"][0].completions), "logged": {k: v.to(device) for k, v in logged.items()}}


def data_completions(table: TextUnpairedDataset, config: Config, *, desirable: bool) -> list[tuple[Any, Any]]:
    """The (prompt, completion) rows of ``table`` (``data.path`` in KTO's unpaired layout: prompt, completion, label)
    whose label is ``desirable``, in table order; bad rows skipped and counted (``data.on_error=raise`` stops at the
    first), and the run says how many of each it kept."""
    kept, bad = [], 0
    for position in range(len(table)):
        try:
            prompt, completion, label = table.texts(position)
        except BadRow:
            if config.data.on_error == "raise":
                raise
            bad += 1
            continue
        if label == desirable:
            kept.append((prompt, completion))
    which = "desirable" if desirable else "undesirable"
    if not kept:
        raise UserError(f"{config.data.path}: no {which} completion among its {len(table)} rows ({bad} bad); "
                        f"{config.objective.name} pairs the policy's fresh completions with the data's {which} ones")
    print(f"{config.objective.name}: {len(kept)} {which} completions of {len(table)} rows in {config.data.path} "
          f"({bad} bad rows skipped)", flush=True)
    return kept
