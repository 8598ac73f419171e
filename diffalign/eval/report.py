"""Reports people can look at: image grids, a reward-over-steps plot, and one HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) times ``factor``, rounded, at least one pixel each."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def image_grid(rows: Mapping[str, torch.Tensor], *, scale: int = 3, max_tile: int = 256, label_width: int = 90,
               columns: int | None = None) -> Image.Image:
    """One labelled row per model, images side by side (the same column = the same prompt and seed).

    Small images are enlarged ``scale`` times with square pixels; no tile is larger than
    ``max_tile`` px (a grid of 1024 px samples stays a few MB, not 3072 px tiles).
    """
    first = next(iter(rows.values()))
    n = first.shape[0] if columns is None else min(columns, first.shape[0])
    factor = min(scale, max_tile / max(first.shape[-2:]))
    h, w = scaled_size(*first.shape[-2:], factor)
    resample = Image.NEAREST if factor >= 1 else Image.LANCZOS
    pad = 2
    grid = Image.new("RGB", (label_width + n * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for c in range(n):
            tile = to_pil(images[c]).resize((w, h), resample)
            grid.paste(tile, (label_width + c * (w + pad), y))
    return grid


def line_plot(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
              ylabel: str, title: str) -> Path:
    """A PNG line plot of named (x, y) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _table(summary: Mapping[str, Mapping[str, float]]) -> str:
    columns = sorted({k for row in summary.values() for k in row if not k.endswith(("_low", "_high"))})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for model, row in summary.items():
        cells = ""
        for c in columns:
            if c not in row:
                cells += "<td></td>"
                continue
            low_key = c.replace("_win_rate", "_win") + "_low" if c.endswith("_win_rate") else c + "_low"
            interval = ""
            if low_key in row:
                interval = f" <small>[{row[low_key]:.3f}, {row[low_key[:-4] + '_high']:.3f}]</small>"
            cells += f"<td>{row[c]:.3f}{interval}</td>"
        body += f"<tr><th>{html.escape(model)}</th>{cells}</tr>"
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


def write_html(path: Path, *, title: str, summary: Mapping[str, Mapping[str, float]],
               figures: Sequence[tuple[str, Path]], notes: Sequence[str] = ()) -> Path:
    """A self-contained HTML report (images embedded): the summary table, then each figure."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append(_table(summary))
    parts.append("<p><small>Brackets: 95% intervals (means: normal approximation; win rates: Wilson, "
                 "paired by prompt and seed, ties count one half).</small></p>")
    for caption, figure in figures:
        parts.append(f"<figure><img src='{_embed(figure)}' style='image-rendering:pixelated;max-width:100%'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}figure{margin:1.5em 0}")
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style>{''.join(parts)}\n")
    return path


def markdown_table(summary: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> str:
    """A small markdown table of chosen keys per model (missing values shown as -)."""
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for model, row in summary.items():
        cells = [f"{row[k]:.3f}" if k in row and np.isfinite(row[k]) else "-" for k in keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation_report(evaluation, out: Path, *, title: str, figures: Sequence[tuple[str, Path]] = (),
                            notes: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """metrics.json, one grid per prompt (rows: models; columns: seeds) and report.html under ``out``.

    Grids are drawn for the prompts whose images the evaluation kept (all, or the first ones).
    """
    import json

    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    grids = []
    prompts = list(dict.fromkeys(evaluation.prompts))
    kept = min(len(images) for images in evaluation.images.values())
    last = {prompt: i for i, prompt in enumerate(evaluation.prompts)}
    shown = [p for p in prompts if last[p] < kept]
    if len(shown) < len(prompts):
        notes = [*notes, f"Image grids: the first {len(shown)} of {len(prompts)} prompts; the scores cover all."]
    for number, prompt in enumerate(shown):
        index = [i for i, p in enumerate(evaluation.prompts) if p == prompt]
        rows = {name: images[index] for name, images in evaluation.images.items()}
        path = out / "grids" / f"prompt-{number:03d}.png"
        path.parent.mkdir(exist_ok=True)
        image_grid(rows).save(path)
        grids.append((prompt, path))
    write_html(out / "report.html", title=title, summary=summary, figures=[*figures, *grids], notes=notes)
    return summary
