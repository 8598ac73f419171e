"""What the language-model online loops share (online DPO, SPPO, DNO, INPO): rounds of the policy's own
completions (:mod:`diffalign.train.lm_online`), pairs chosen from each group of K by a rule, a pairwise core
loss on the completions' summed token log-probs.

The self-play loops train pi_{t+1} against pi_t, the policy as the round began (kept as shadow weights and
saved in every checkpoint, :mod:`diffalign.objectives.round_reference`); online DPO against the base. The
pair rules are the diffusion loops' own (:mod:`diffalign.objectives.self_play`), so both families pick the
same pairs from the same rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from diffalign.lm import preference_loss
from diffalign.losses.self_play import preference_scores
from diffalign.config import ranged
from diffalign.errors import UserError
from diffalign.objectives.base import OnlineObjective
from diffalign.objectives.lm import LanguageModelObjective
from diffalign.objectives.round_reference import PreviousRoundReference
from diffalign.objectives.self_play import extreme_pairs

Tensor = torch.Tensor


@dataclass
class LMSamplingOptions:
    # tokens sampled per completion of a round
    max_new_tokens: int = ranged(64, "[1, inf)")
    # the rounds' sampling temperature (plain sampling, no top-k or top-p)
    sample_temperature: float = ranged(1.0, "(0, inf)")


@dataclass
class LMOnlineDPOOptions(LMSamplingOptions):
    # the pairs of a group: its best vs its worst completion (extremes), or every two completions of different
    # reward, the better first (all: the ranked pairing of online self-preferring, OSP)
    pairs: str = ranged("extremes", ("extremes", "all"))
    # soft-label losses (soft_dpo, smpo, ...): each pair's preference strength sigma((r_w - r_l) / T), the
    # Bradley-Terry probability of the reward gap at this temperature T; with a comparing reward (gpm:PATH,
    # self_judge) sigma(s(w, l) / T) of its table's entry
    preference_temperature: float = ranged(1.0, "(0, inf)")


def best_vs_worst(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) groups and (N, 2) each group's best and worst sample, a group of equal rewards left out."""
    groups, items = extreme_pairs(rewards)
    keep = rewards.gather(1, items[:, :1]).squeeze(1) > rewards.gather(1, items[:, 1:]).squeeze(1)
    return groups[keep], items[keep]


def all_ranked_pairs(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) groups and (N, 2) every two samples of a group whose rewards differ, the better first."""
    groups, items = [], []
    for g, scores in enumerate(rewards):
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if scores[i] != scores[j]:
                    groups.append(g)
                    items.append([i, j] if scores[i] > scores[j] else [j, i])
    return torch.tensor(groups, dtype=torch.long), torch.tensor(items, dtype=torch.long).view(-1, 2)


class LanguageModelOnline(LanguageModelObjective, OnlineObjective):
    """Online DPO on an LM (Guo et al. 2024, arXiv 2402.04792; iterative DPO, Xiong et al. 2024, arXiv
    2312.11456): each round the policy samples K completions per prompt, the reward's best and worst (or every two of
    different reward, ``objective.options.pairs=all``) make pairs, and the pairs train ``objective.loss`` (DPO by
    default; a soft-label loss takes each pair's Bradley-Terry strength from the reward gap, or from a comparing
    reward's table: with ``online.reward=self_judge`` the policy judges its own completions, online self-preferring's
    self-judged strengths, Zhai et al. 2024, arXiv 2405.14103) against the base model."""

    paper = "Guo et al. 2024, arXiv 2402.04792"

    loss_kinds = ("pairwise", "soft-label")
    group_size = 4
    takes_labels = False
    keeps_trajectories = False
    reads_preference_tables = True  # the rule takes (G, K, K) tables of s(i beats j) (online.reward=gpm:PATH, self_judge)
    Options = LMOnlineDPOOptions

    @classmethod
    def check_sampling(cls, config) -> None:
        """Rounds of completions, scored by one text reward (no image sampler to check)."""
        from diffalign.rewards.text import TEXT_REWARDS, is_preference_table_reward, is_text_reward

        if not is_text_reward(config.online.reward):
            raise UserError(f"online.reward={config.online.reward!r}: {config.objective.name} scores its completions "
                            f"with one text reward: {', '.join(TEXT_REWARDS)}, classifier:PATH, cdr:STRONG:WEAK or gpm:PATH")
        if is_preference_table_reward(config.online.reward) and not cls.reads_preference_tables:
            raise UserError(f"online.reward={config.online.reward!r} compares a group's completions (a general preference "
                            f"model or the self judge gives no score of one completion); {config.objective.name} needs "
                            "a score per completion: use lm_online_dpo or lm_gpo, or a scalar reward")

    def __init__(self, config, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        options = self.options_of(config)
        self.max_new_tokens, self.temperature = options.max_new_tokens, options.sample_temperature
        self.settings = options

    def pairs(self, rewards: Tensor, generator: Callable[[int], torch.Generator]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(N,) each unit's group, (N, L) its completions (a pair, chosen first; a whole group for DisCO) and (N, ...)
        per-unit loss inputs, from a round's (G, K) rewards or (G, K, K) tables of s(i beats j); ``generator(g)`` is
        group g's own generator, for rules that draw (RSO's acceptance).

        A table ranks each completion by its row's mean (its score against the group) and gives a soft-label
        loss the pair's own entry s(w, l) as its gap, so a self-judged strength is the judge's (OSP)."""
        scores = preference_scores(rewards)  # r - mean(r): the same order and the same gaps as the rewards
        groups, items = (all_ranked_pairs if self.settings.pairs == "all" else best_vs_worst)(scores)
        if self.spec is None or self.spec.kind != "soft-label":
            return groups, items, {}
        if rewards.dim() == 3:
            gap = rewards[groups, items[:, 0], items[:, 1]]
        else:
            gap = rewards[groups, items[:, 0]] - rewards[groups, items[:, 1]]
        return groups, items, {"preference": torch.sigmoid(gap / self.settings.preference_temperature)}

    def reference_for(self, reference):
        return reference

    def extra_inputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-pair loss inputs computed on the batch itself (INPO's pi_t scores); default none."""
        return {}

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        options = {**self.options, **batch["targets"], **self.extra_inputs(batch)}
        return preference_loss(policy, self.reference_for(reference), batch["inputs"], loss=self.name, beta=self.beta,
                               **options)


class LanguageModelSelfPlay(PreviousRoundReference, LanguageModelOnline):
    """A self-play loop on an LM: the pairs train against pi_t, the previous iterate."""

    shadow_weights = True
    frozen_reference = False
    group_size = 5  # the SPPO and DNO authors' K
    loss_kinds = ("pairwise",)  # each loop's own rule picks its pairs and the inputs its losses read
    reads_preference_tables = False  # each rule reads a score per completion (GPO's reads tables)
    Options = LMSamplingOptions

    def pairs(self, rewards, generator):
        """Each group's best vs worst (INPO's rule; the other loops have their own)."""
        return (*best_vs_worst(rewards), {})

    def reference_for(self, reference):
        return self.previous_round()

    def __call__(self, policy, reference, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = super().__call__(policy, reference, batch)
        metrics["round"] = torch.tensor(float(self.round_index()), device=loss.device)
        return loss, metrics
