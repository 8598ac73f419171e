"""Compare language models on prompts: sample with each at the same seeds, score with text rewards, and
report as the image evaluation does (means and paired win rates over the first model, with 95% intervals).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from diffalign.eval.compare import Evaluation
from diffalign.eval.report import write_html
from diffalign.lm.sampling import sample_completions
from diffalign.lm.tokenize import collate, tokenize_group


def read_text_pairs(path: str | Path) -> list[tuple]:
    """The (prompt, chosen, rejected) texts of a pairs table (:class:`~diffalign.data.text.TextPairDataset`'s
    columns); bad rows are skipped and said, a table with none usable is refused."""
    from diffalign.data.pairs import BadRow
    from diffalign.data.text import TextPairDataset
    from diffalign.errors import UserError

    table = TextPairDataset(path, tokenizer=None, max_length=None)
    pairs = []
    for position in range(len(table)):
        try:
            pairs.append(table.pair(position))
        except BadRow:
            continue
    if not pairs:
        raise UserError(f"--pairs {path}: no usable pair among its {len(table)} rows")
    if len(pairs) < len(table):
        print(f"--pairs {path}: {len(table) - len(pairs)} of {len(table)} rows skipped (no prompt, chosen or "
              "rejected text)", flush=True)
    return pairs


@torch.no_grad()
def ranking_accuracy(model, tokenizer, pairs: Sequence[tuple], batch_size: int = 64) -> torch.Tensor:
    """(P,) 1 where ``model`` gives a pair's chosen completion the higher summed log-likelihood, else 0: the ranking
    accuracy of Chen et al. 2024 ("Preference Learning Algorithms Do Not Learn Preference Rankings", arXiv 2405.19534,
    Sec. 3), per pair."""
    from diffalign.lm.preference import completion_logps

    ranked = []
    for start in range(0, len(pairs), batch_size):
        groups = [tokenize_group(tokenizer, p, [c, r]) for p, c, r in pairs[start:start + batch_size]]
        batch = collate(groups, pad_token_id=tokenizer.pad_token_id, max_length=None)
        device = next(model.parameters()).device
        logps, _ = completion_logps(model, {k: v.to(device) for k, v in batch.items()})
        chosen, rejected = logps.float().cpu().chunk(2)
        ranked.append((chosen > rejected).float())
    return torch.cat(ranked)


def evaluate_language_models(models: Mapping[str, Callable[[], tuple]], prompts: Sequence[str], rewards: Sequence,
                             *, samples_per_prompt: int = 16, seed: int = 0, max_new_tokens: int = 64,
                             temperature: float = 1.0, batch_size: int = 64,
                             pairs: Sequence[tuple] | None = None) -> Evaluation:
    """``samples_per_prompt`` completions per prompt from every model (``models``: name -> loader returning
    (model, tokenizer); the first is the baseline), each scored by every text reward. The completions are in
    ``Evaluation.texts``; with ``pairs`` ((prompt, chosen, rejected) texts) each model's per-pair ranking is in
    ``Evaluation.rankings``. Each model is loaded in its turn and let go before the next."""
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    result = Evaluation(prompts=expanded, seeds=[seed] * len(expanded))
    for name, load in models.items():
        model, tokenizer = load()
        completions = sample_completions(model.eval(), tokenizer, expanded, seed=seed, max_new_tokens=max_new_tokens,
                                         temperature=temperature, batch_size=batch_size,
                                         progress=f"eval: {len(expanded)} completions of {name}")
        if pairs is not None:
            result.rankings[name] = ranking_accuracy(model, tokenizer, pairs, batch_size)
        del model
        result.texts[name] = completions
        result.scores[name] = {reward.name: reward(completions, expanded).float() for reward in rewards}
    return result


def _samples_section(evaluation: Evaluation, shown_prompts: int, per_prompt: int) -> str:
    """The first completions of the first prompts, each model in a column, with the first reward's score."""
    first = next(iter(next(iter(evaluation.scores.values()))))  # the first reward's name
    names = list(evaluation.texts)
    rows = []
    for prompt in list(dict.fromkeys(evaluation.prompts))[:shown_prompts]:
        index = [i for i, p in enumerate(evaluation.prompts) if p == prompt][:per_prompt]
        cells = "".join(
            "<td>" + "<br>".join(f"{html.escape(evaluation.texts[n][i])} <small>({evaluation.scores[n][first][i]:.2f})"
                                 f"</small>" for i in index) + "</td>" for n in names)
        rows.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    return f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>"


def write_text_report(evaluation: Evaluation, out: Path, *, title: str, figures: Sequence[tuple[str, Path]] = (),
                      notes: Sequence[str] = (), shown_prompts: int = 6, per_prompt: int = 4) -> dict:
    """metrics.json (the summary), samples.jsonl (every completion with its scores) and report.html under ``out``;
    returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "samples.jsonl").open("w") as f:
        for name, texts in evaluation.texts.items():
            for i, text in enumerate(texts):
                scores = {r: float(v[i]) for r, v in evaluation.scores[name].items()}
                f.write(json.dumps({"model": name, "prompt": evaluation.prompts[i], "completion": text, **scores}) + "\n")
    write_html(out / "report.html", title=title, summary=summary, figures=figures, notes=notes,
               sections=[_samples_section(evaluation, shown_prompts, per_prompt)],
               sections_intro=f"<h2>Completions, by prompt</h2><p>The first {per_prompt} completions of each model "
                              f"for the first {shown_prompts} prompts, each with its first reward's score.</p>")
    return summary
