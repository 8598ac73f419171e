"""The policy as its own judge: self-judged preference strengths for the LM loops (online self-preferring, OSP,
Zhai et al. 2024, "Online Self-Preferring Language Models", arXiv 2405.14103).

OSP learns from the policy's own completions and from preference strengths the policy itself judges, where other
online loops ask an external reward model. Here the judgement is read from the policy's next-token distribution:
for two completions y_i, y_j of a prompt x, the judging prompt (``template``, with ``{prompt}``, ``{first}`` and
``{second}``; wrapped in the tokenizer's chat template when it has one) shows y_i first and y_j second, and

    l(i, j) = log p(label_1 | judging prompt) - log p(label_2 | judging prompt)

is the judge's log-odds that the first shown is better. Judges favour a position, so each pair is asked in both
orders and the table is their mean,

    s(i, j) = (l(i, j) - l(j, i)) / 2,

skew-symmetric (s(j, i) = -s(i, j), s(i, i) = 0): a general preference table, as ``gpm:PATH`` gives
(:mod:`diffalign.rewards.general_preference`). The loops read it as such: each completion's score is its row's mean,
the pairs are ranked by it, and a soft-label loss takes sigma(s(w, l) / T) as the pair's preference strength
(:class:`~diffalign.objectives.lm_online.LanguageModelOnline`). The judge is the policy as each round begins (LoRA
adapters on), so it changes as the policy learns, as OSP's does; a K-completion group costs K (K - 1) forwards.

``self_judge[:template=FILE][:labels=A/B]``: FILE holds the judging prompt (default: :data:`DEFAULT_TEMPLATE`);
``labels`` the two answers, each one token of the policy's tokenizer (default ``1/2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.errors import UserError

Tensor = torch.Tensor
NAME = "self_judge"

DEFAULT_TEMPLATE = (
    "Which response answers the request better?\n\nRequest: {prompt}\n\nResponse 1: {first}\n\n"
    "Response 2: {second}\n\nAnswer with 1 or 2 only."
)
FIELDS = ("{prompt}", "{first}", "{second}")


def is_self_judge(spec: object) -> bool:
    """Whether ``spec`` names the self judge (``self_judge`` or ``self_judge:...``)."""
    return isinstance(spec, str) and (spec == NAME or spec.startswith(NAME + ":"))


def parse_self_judge(spec: str) -> tuple[str, tuple[str, str]]:
    """The judging template and the two labels that ``self_judge[:template=FILE][:labels=A/B]`` names."""
    parts = spec.split(":")[1:]
    options = dict(part.split("=", 1) for part in parts if "=" in part)
    if len(options) != len(parts) or set(options) - {"template", "labels"}:
        raise UserError(f"online.reward={spec!r}: write {NAME}[:template=FILE][:labels=A/B]")
    template = DEFAULT_TEMPLATE
    if "template" in options:
        path = Path(options["template"])
        if not path.is_file():
            raise UserError(f"online.reward={spec!r}: no judging template at {path}")
        template = path.read_text()
    missing = [field for field in FIELDS if field not in template]
    if missing:
        raise UserError(f"online.reward={spec!r}: the judging template lacks {', '.join(missing)} (it shows the "
                        "request as {prompt} and the two responses as {first} and {second})")
    labels = tuple(options.get("labels", "1/2").split("/"))
    if len(labels) != 2 or not all(labels) or labels[0] == labels[1]:
        raise UserError(f"online.reward={spec!r}: labels= takes two different answers, as labels=A/B")
    return template, labels


class SelfJudge:
    """``self_judge``: see the module docstring. ``model`` is the policy (read at call time, so it judges as it is)."""

    description = ("The policy's own judgement (OSP): its log-odds of answering that one completion is better than "
                   "another, averaged over both orders; a preference table, higher is better.")
    runs_the_policy = True  # its forwards are the policy's: under FSDP2 every process must judge in step

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = DEFAULT_TEMPLATE,
                 labels: tuple[str, str] = ("1", "2"), batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.name = NAME
        self.label_ids = [self._single_token(label) for label in labels]

    @classmethod
    def parse(cls, spec: str, model: torch.nn.Module, tokenizer: Any) -> "SelfJudge":
        template, labels = parse_self_judge(spec)
        return cls(model, tokenizer, template, labels)

    def _single_token(self, label: str) -> int:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise UserError(f"{NAME}: the answer {label!r} is {len(ids)} tokens of the policy's tokenizer "
                            f"({ids}); each label must be one known token (labels=A/B chooses others)")
        return ids[0]

    def _check_fits(self, length: int) -> None:
        """A judging prompt past the policy's positions would index out of its position table: say so instead."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is not None and length > limit:
            raise UserError(f"{NAME}: a judging prompt is {length} tokens and the policy reads at most {limit}; "
                            "shorten the template (template=FILE) or the completions (objective.options.max_new_tokens)")

    def judging_prompt(self, prompt: str, first: str, second: str) -> str:
        """The text the judge continues: the template filled in, as a chat turn when the tokenizer has a template."""
        question = (self.template.replace("{prompt}", prompt).replace("{first}", first)
                    .replace("{second}", second))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return question

    @torch.no_grad()
    def log_odds(self, texts: Sequence[str]) -> Tensor:
        """(N,) log p(label_1) - log p(label_2) at the next token after each judging prompt."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True,
                                   add_special_tokens=False)
            self._check_fits(batch["input_ids"].shape[1])
            mask = batch["attention_mask"].to(device)
            logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask).logits.float()
            if self.tokenizer.padding_side == "left":
                last = logits[:, -1]
            else:
                last = logits[torch.arange(len(logits), device=device), mask.sum(1) - 1]
            logp = last.log_softmax(-1)
            out.append((logp[:, self.label_ids[0]] - logp[:, self.label_ids[1]]).cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def tables(self, groups: Sequence[Sequence[str]], prompts: Sequence[str]) -> Tensor:
        """(G, K, K) s(i, j) of each prompt's completions, every ordered pair asked once."""
        k = len(groups[0])
        ordered = [(i, j) for i in range(k) for j in range(k) if i != j]
        texts = [self.judging_prompt(prompt, group[i], group[j]) for prompt, group in zip(prompts, groups, strict=True)
                 for i, j in ordered]
        first_better = torch.zeros(len(groups), k, k)
        rows, cols = torch.tensor([i for i, _ in ordered]), torch.tensor([j for _, j in ordered])
        first_better[:, rows, cols] = self.log_odds(texts).view(len(groups), len(ordered))
        return (first_better - first_better.transpose(1, 2)) / 2
