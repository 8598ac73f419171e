"""The benchmarks papers print, by name (``diffalign eval --benchmark NAME``): a prompt set, the reward that scores
it, and the tasks its scores are grouped into, as the papers' tables have them.

| name | prompts | reward | table |
| --- | --- | --- | --- |
| ``geneval`` | GenEval's 553 (``assets/prompts/geneval.jsonl``) | ``geneval`` (its official rule; weights via ``--rewards``) | each task's share of correct images, and their mean, GenEval's overall score (its ``summary_scores.py``) |
| ``ocr`` | Flow-GRPO's 1018 OCR test prompts (``assets/prompts/ocr_test.txt``, MIT) | ``ocr`` | mean OCR accuracy, Flow-GRPO's OCR column |
| ``signs`` | the sign world's 8 held-out words | ``ocr`` | the same, on the text-rendering toy world |
| ``drawbench`` | DrawBench's 200 (Saharia et al. 2022), from a file you give (``--prompts``: not shipped, as their licence is not stated) | every reward of ``--rewards`` (PickScore, aesthetic, ImageReward, HPSv3, a UnifiedReward judge: whichever weights you have) | each reward's mean over every image, the DrawBench columns of DGPO's, AWM's and DiffusionNFT's tables |

A prompt's task comes from its line in a ``.jsonl`` prompt file (its ``tag``, as GenEval's metadata has it); a prompt
set without tags is one task. ``--prompts`` may replace a benchmark's prompts (Flow-GRPO's GenEval test metadata,
say), and ``--rewards`` its reward (a served one: ``--rewards http://gpu2:8400``).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diffalign.errors import UserError
from diffalign.eval.prompts import prompt_path

OVERALL = "overall"


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: its prompt set (None: the user's file, which ``needs_prompts`` says how to get), the reward
    (by registered name) that scores it (None: every reward given, a column each), and the spec used when
    ``--rewards`` is not given (None where the reward needs weights the user points to)."""

    name: str
    prompts: str | None
    reward: str | None
    default_spec: str | None
    needs: str  # what --rewards must give when there is no default, as a spec to copy
    needs_prompts: str = ""

    def spec(self, given: Sequence[str] | None) -> list[str]:
        """The reward specs to score with: ``given`` (which must include this benchmark's reward) or the default."""
        from diffalign.rewards import RewardSpec

        if not given:
            if self.default_spec is None:
                if self.reward is None:
                    raise UserError(f"--benchmark {self.name} scores with the reward models you give, a column each: "
                                    f"add --rewards with {self.needs}")
                raise UserError(f"--benchmark {self.name} is scored by the {self.reward} reward, whose weights it "
                                f"needs: add --rewards {self.needs}")
            return [self.default_spec]
        parsed = [RewardSpec.parse(spec) for spec in given]
        if self.reward is not None and not any(spec.name in (self.reward, "remote") for spec in parsed):
            raise UserError(f"--benchmark {self.name} is scored by the {self.reward} reward; --rewards names none "
                            f"(give {self.needs})")
        for spec in parsed:
            if spec.name == "geneval" and spec.options.get("rule", "official") != "official":
                raise UserError("--benchmark geneval prints GenEval's own score: drop rule=... from the geneval "
                                "reward (rule=official is the number the papers print)")
        return list(given)


BENCHMARKS = {
    "geneval": Benchmark("geneval", "geneval", "geneval", None, "geneval:DIR:clip=FILE (see docs/rewards.md)"),
    "ocr": Benchmark("ocr", "ocr_test", "ocr", "ocr", "ocr"),
    "signs": Benchmark("signs", "sign_heldout", "ocr", "ocr", "ocr"),
    "drawbench": Benchmark(
        "drawbench", None, None, None,
        "one or more of pickscore:DIR, aesthetic:FILE:clip=FILE, image_reward:FILE:tokenizer=DIR, hps_v3:FILE:base=DIR, "
        "openai_judge:URL:template=unifiedreward (see docs/rewards.md)",
        "DrawBench's prompts are not shipped (their licence is not stated): give --prompts the DrawBench file, a "
        ".csv or .tsv with a Prompt column (Imagen's sheet exported) or any prompt file of its 200 prompts"),
}


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``, or an error listing them."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; the benchmarks are {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def prompt_tasks(source: str | Path, prompts: Sequence[str]) -> list[str] | None:
    """Each prompt's task (its ``tag``) when ``source`` is a ``.jsonl`` prompt file (or shipped set) whose lines
    carry one, else None."""
    path = prompt_path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    tags = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if isinstance(row, dict) and isinstance(row.get("tag"), str):
            tags[row.get("prompt")] = row["tag"]
    return [tags.get(p, "untagged") for p in prompts] if tags else None


def task_scores(images_prompts: Sequence[str], scores: torch.Tensor, tasks: Sequence[str] | None,
                prompts: Sequence[str]) -> dict[str, float]:
    """Each task's mean score over its images, in the order tasks first appear, and ``overall``, the mean over
    tasks (GenEval's overall score; with one task, that task's mean). ``images_prompts`` is each image's prompt,
    ``tasks`` each of ``prompts``' task (None: one task, named after nothing)."""
    task_of = dict(zip(prompts, tasks)) if tasks is not None else {p: OVERALL for p in prompts}
    by_task: dict[str, list[float]] = {}
    for prompt, value in zip(images_prompts, scores.tolist(), strict=True):
        by_task.setdefault(task_of[prompt], []).append(value)
    table = {task: sum(values) / len(values) for task, values in by_task.items() if task != OVERALL}
    means = list(table.values()) or [sum(by_task[OVERALL]) / len(by_task[OVERALL])]
    table[OVERALL] = sum(means) / len(means)
    return table


def benchmark_table(evaluation, reward: str, tasks: Sequence[str] | None, prompts: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """Per model (base first): each task's score and the overall one, from ``evaluation``'s ``reward`` scores."""
    return {model: task_scores(evaluation.prompts, scores[reward], tasks, prompts)
            for model, scores in evaluation.scores.items()}


def reward_means_table(evaluation) -> dict[str, dict[str, float]]:
    """Per model (base first): each reward's mean over every image, a column per reward (DrawBench's table)."""
    return {model: {reward: float(values.double().mean()) for reward, values in scores.items()}
            for model, scores in evaluation.scores.items()}


def score_table(bench: Benchmark, evaluation, prompt_source: str | Path, prompts: Sequence[str]
                ) -> tuple[dict[str, dict[str, float]], str]:
    """The benchmark's table and its title: per task of its reward, or (no reward of its own) each reward's mean."""
    seeds = len(evaluation.prompts) // max(len(prompts), 1)
    if bench.reward is None:
        return reward_means_table(evaluation), f"{bench.name} benchmark: each reward's mean, {seeds} image(s) a prompt"
    table = benchmark_table(evaluation, bench.reward, prompt_tasks(prompt_source, prompts), prompts)
    return table, f"{bench.name} benchmark: {bench.reward} per task, {seeds} image(s) a prompt"


def markdown(table: Mapping[str, Mapping[str, float]], title: str) -> str:
    """The table as the papers print it: a row per model, a column per task, the overall score last."""
    columns = list(next(iter(table.values())))
    lines = [f"{title}", "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for model, row in table.items()]
    return "\n".join(lines)


def html_table(table: Mapping[str, Mapping[str, float]], title: str) -> str:
    """The same table for the HTML report."""
    columns = list(next(iter(table.values())))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *columns])
    rows = "".join("<tr><td>" + html.escape(model) + "</td>" + "".join(f"<td>{row[c]:.3f}</td>" for c in columns)
                   + "</tr>" for model, row in table.items())
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{rows}</table>"
