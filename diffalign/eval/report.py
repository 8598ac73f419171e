"""Reports people can look at: image grids, a reward-over-steps plot, and one HTML page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.diffusion.sampling import to_pil  # noqa: F401 - the report's users import it from here


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) times ``factor``, rounded, at least one pixel each."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def _label_font(size: int) -> ImageFont.ImageFont:
    """PIL's own font at ``size`` px (Pillow 10.1 and newer), else its fixed small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


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
    font = _label_font(min(20, max(10, h // 4)))
    for r, (label, images) in enumerate(rows.items()):
        y = r * (h + pad)
        draw.text((4, y + h // 2), label, fill="black", font=font, anchor="lm")
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


def _embed_image(image: torch.Tensor) -> str:
    """One (3, H, W) image as a data URL: PNG for small ones (exact pixels), JPEG for photographs."""
    buffer = io.BytesIO()
    small = max(image.shape[-2:]) <= 64
    to_pil(image).save(buffer, format="PNG" if small else "JPEG", quality=90)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buffer.getvalue()).decode()


def clip_webm(clip: torch.Tensor, fps: float) -> bytes:
    """A (3, F, H, W) clip in [0, 1] as a VP9 WebM (what every browser's video element plays), written with PyAV;
    odd sides are padded by one pixel, as VP9's 4:2:0 sampling needs even ones."""
    import av

    frames = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as out:
        stream = out.add_stream("libvpx-vp9", rate=round(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "b": "0", "deadline": "realtime"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _media_tag(item: torch.Tensor, width: int, alt: str) -> str:
    """An image (3, H, W) as an ``img``, a clip (3, F, H, W) as a looping, muted ``video`` that plays by itself."""
    if item.dim() == 3:
        return f"<img src='{_embed_image(item)}' width='{width}' alt='{html.escape(alt)}'>"
    from diffalign.diffusion.sampling import CLIP_FPS

    data = base64.b64encode(clip_webm(item, CLIP_FPS)).decode()
    return (f"<video src='data:video/webm;base64,{data}' width='{width}' autoplay loop muted playsinline "
            f"title='{html.escape(alt)}'></video>")


def first_frames(images: torch.Tensor) -> torch.Tensor:
    """Images as they are; clips (N, 3, F, H, W) by their first frames (what a still grid shows)."""
    return images[:, :, 0] if images.dim() == 5 else images


def reward_names(summary: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The rewards of a summary in the order they were scored: the first is the one the run optimised."""
    first = next(iter(summary.values()))
    return [k for k in first if not k.endswith(("_low", "_high", "_win_rate"))]


def _interval(row: Mapping[str, float], key: str) -> tuple[float, float] | None:
    """The 95% interval of ``row[key]`` (a mean or a win rate), if the summary has one."""
    low = key.replace("_win_rate", "_win") + "_low" if key.endswith("_win_rate") else key + "_low"
    return (row[low], row[low[:-4] + "_high"]) if low in row else None


def _columns(summary: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Each reward's mean then its win rate, the optimised reward first."""
    present = {k for row in summary.values() for k in row}
    return [k for r in reward_names(summary) for k in (r, f"{r}_win_rate") if k in present]


def _table(summary: Mapping[str, Mapping[str, float]]) -> str:
    columns = _columns(summary)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for model, row in summary.items():
        cells = ""
        for c in columns:
            if c not in row:
                cells += "<td></td>"
                continue
            bounds = _interval(row, c)
            interval = f" <small>[{bounds[0]:.3f}, {bounds[1]:.3f}]</small>" if bounds else ""
            cells += f"<td>{row[c]:.3f}{interval}</td>"
        body += f"<tr><th>{html.escape(model)}</th>{cells}</tr>"
    return f"<table class='summary'><tr><th>model</th>{head}</tr>{body}</table>"


def verdict(summary: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One sentence per compared model: how often it beats the base (the first model) under the first reward, with
    the 95% interval, and whether each other reward held (its mean no lower than the base's interval reaches)."""
    models = list(summary)
    base, rewards = models[0], reward_names(summary)
    sentences = []
    for model in models[1:]:
        row, first = summary[model], rewards[0]
        if f"{first}_win_rate" not in row:
            continue
        low, high = _interval(row, f"{first}_win_rate")
        rate = row[f"{first}_win_rate"]
        side = "beats" if low > 0.5 else "loses to" if high < 0.5 else "is not told apart from"
        held = []
        for other in rewards[1:]:
            before, after, floor = summary[base][other], row[other], summary[base].get(f"{other}_low", summary[base][other])
            held.append(f"{other} {'held' if after >= floor else 'dropped'} ({before:.3f} -> {after:.3f})")
        sentences.append(f"{model} {side} {base} on {first}: it wins {rate:.1%} of same-seed comparisons (95% interval "
                         f"{low:.1%}-{high:.1%})" + (f"; {', '.join(held)}" if held else "") + ".")
    return sentences


def _meanings(rewards: Sequence[str]) -> str:
    """One sentence per column of the summary table."""
    from diffalign.rewards import describe

    items = [f"<dt>{html.escape(name)}</dt><dd>{html.escape(describe(name) or 'A reward model; higher is better.')}"
             f"</dd>" for name in rewards]
    items.append("<dt>&lt;reward&gt;_win_rate</dt><dd>How often the model's image (or completion) beats the base "
                 "model's of the same prompt and seed under that reward (a tie counts one half): above 0.5, the model "
                 "wins more often than it loses.</dd>")
    items.append("<dt>[low, high]</dt><dd>95% intervals: Wilson intervals for win rates and for 0/1 scores, the "
                 "normal approximation for other means.</dd>")
    return f"<h2>What the numbers mean</h2><dl>{''.join(items)}</dl>"


def comparison(prompt: str, seeds: Sequence[int], images: Mapping[str, torch.Tensor],
               scores: Mapping[str, Mapping[str, Sequence[float]]], sources: torch.Tensor | None = None) -> str:
    """One prompt's images: a card per seed (wrapped to the page's width, however many seeds), holding each
    model's image with its scores; the image that scores highest on the first reward is that seed's winner,
    framed in green (none where the best score is tied). An edit's ``sources`` (S, 3, h, w) come first."""
    rewards = list(next(iter(scores.values())))
    first = rewards[0]
    models = list(images)
    cards = ""
    for k, seed in enumerate(seeds):
        column = [scores[m][first][k] for m in models]
        best = max(column)
        winner = models[column.index(best)] if column.count(best) == 1 and len(models) > 1 else None
        cells = ""
        for model in models:
            image = images[model][k]
            width = min(256, max(128, image.shape[-1]))
            won = winner == model
            lines = "<br>".join(f"{html.escape(r)} {scores[model][r][k]:.3f}" for r in rewards)
            cells += (f"<figure class='{'won' if won else ''}'><figcaption>{html.escape(model)}"
                      f"{' &#9733; wins' if won else ''}</figcaption>{_media_tag(image, width, f'{model}, seed {seed}')}"
                      f"<div class='score'>{lines}</div></figure>")
        cards += f"<div class='seed'><h4>seed {seed}</h4>{cells}</div>"
    if sources is not None:
        figures = "".join(f"<figure><figcaption>source{f' {s + 1}' if len(sources) > 1 else ''}</figcaption>"
                          f"<img src='{_embed_image(image)}' width='{min(256, max(128, image.shape[-1]))}' "
                          f"alt='source {s + 1}'></figure>" for s, image in enumerate(sources))
        cards = f"<div class='seed source'><h4>edits of</h4>{figures}</div>{cards}"
    return f"<section><h3>{html.escape(prompt)}</h3><div class='seeds'>{cards}</div></section>"


STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
         "table.summary td,table.summary th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "p.verdict{font-size:1.15em;background:#f3f6fb;border-left:5px solid #3367d6;padding:.6em 1em}"
         ".seeds{display:flex;flex-wrap:wrap;gap:10px}.seed{border:1px solid #ddd;padding:4px;text-align:center}"
         ".seed h4{margin:2px 0;font-size:13px}.seed figure{margin:4px;padding:3px;border:5px solid transparent}"
         ".seed figure.won{border-color:#2a9d3f;background:#eef8f0}.seed figcaption{font-size:12px}"
         ".seed.source{border-style:dashed;background:#f4f4f4}"
         "img,video{image-rendering:pixelated;display:block;margin:auto}.score{font-size:12px;color:#333}"
         "figure{margin:1.5em 0}dt{font-weight:bold;margin-top:.5em}")


def write_html(path: Path, *, title: str, summary: Mapping[str, Mapping[str, float]],
               figures: Sequence[tuple[str, Path]] = (), notes: Sequence[str] = (),
               sections: Sequence[str] = (), sections_intro: str | None = None, tables: Sequence[str] = ()) -> Path:
    """A self-contained HTML report (images embedded): the summary table and what its columns mean, the further
    ``tables`` (HTML, e.g. a benchmark's per-task scores), each figure with its caption, then the ``sections``
    (per-prompt image tables)."""
    rewards = reward_names(summary)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='verdict'>{html.escape(sentence)}</p>" for sentence in verdict(summary)]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append(_table(summary))
    parts.append(_meanings(rewards))
    parts += tables
    for caption, figure in figures:
        parts.append(f"<figure><img src='{_embed(figure)}' style='max-width:100%'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if sections:
        parts.append(sections_intro or "<h2>Images, by prompt</h2><p>Same prompt and seed in each card, so each "
                     "card compares the models on the same starting noise; the image framed in green scores highest "
                     "on the first reward.</p>")
        parts += sections
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style>{''.join(parts)}\n")
    return path


def markdown_table(summary: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> str:
    """A small markdown table of chosen keys per model, each with its 95% interval (missing values shown as -)."""
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for model, row in summary.items():
        cells = []
        for k in keys:
            if k not in row or not np.isfinite(row[k]):
                cells.append("-")
                continue
            bounds = _interval(row, k)
            cells.append(f"{row[k]:.3f}" + (f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_evaluation_report(evaluation, out: Path, *, title: str, figures: Sequence[tuple[str, Path]] = (),
                            notes: Sequence[str] = (), tables: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """metrics.json, report.html (the summary, what each number means, and each prompt's images as a table
    with their scores and each seed's winner; a video model's clips as looping videos) and one grid PNG per prompt
    (rows: models; columns: seeds; a clip's first frame) in grids/ under ``out``.

    Images are shown for the prompts whose images the evaluation kept (all, or the first ones).
    """
    import json

    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    sections = []
    if evaluation.sources is None:  # a prompt's images, wherever it comes
        prompts = list(dict.fromkeys(evaluation.prompts))
        groups = [[i for i, p in enumerate(evaluation.prompts) if p == prompt] for prompt in prompts]
    else:  # edits: one instruction may edit several sources, so each row's images (seeds in a row) are its own
        per_row = len(evaluation.prompts) // len(evaluation.sources)
        groups = [list(range(r * per_row, (r + 1) * per_row)) for r in range(len(evaluation.sources))]
    kept = min(len(images) for images in evaluation.images.values())
    shown = [index for index in groups if index[-1] < kept]
    if len(shown) < len(groups):
        notes = [*notes, f"Image grids: the first {len(shown)} of {len(groups)} prompts; the scores cover all."]
    for number, index in enumerate(shown):
        prompt = evaluation.prompts[index[0]]
        row_sources = None if evaluation.sources is None else evaluation.sources[index[0] // len(index)]
        rows = {name: images[index] for name, images in evaluation.images.items()}
        path = out / "grids" / f"prompt-{number:03d}.png"
        path.parent.mkdir(exist_ok=True)
        image_grid({name: first_frames(images) for name, images in rows.items()}).save(path)
        scores = {name: {r: values[index].tolist() for r, values in per_reward.items()}
                  for name, per_reward in evaluation.scores.items()}
        sections.append(comparison(prompt, [evaluation.seeds[i] for i in index], rows, scores, row_sources))
    write_html(out / "report.html", title=title, summary=summary, figures=figures, notes=notes, sections=sections,
               tables=tables)
    return summary
