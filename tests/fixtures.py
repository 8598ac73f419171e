"""Small on-disk datasets (and a Hugging Face cache) written by the tests (no downloads)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png_bytes(color: tuple[int, int, int], size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 20, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_parquet(path: Path, n: int = 8, *, corrupt_rows=(), nan_rows=(), tie_rows=(), size: int = 32) -> Path:
    """Pick-a-Pic v2 columns: reddish images preferred over bluish ones (label_0 alternates).

    Also two reward models' scores of each image (``pick_0/1``, ``aes_0/1``): pick prefers the
    reddish image by a margin of 0.01 i, aes by 0.6 on even rows and the bluish one by 0.5 on
    odd rows.
    """
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [],
            "pick_0": [], "pick_1": [], "aes_0": [], "aes_1": []}
    for i in range(n):
        good, bad = png_bytes((200, 60, 60), size, i), png_bytes((60, 60, 200), size, 100 + i)
        first_wins = i % 2 == 0
        rows["caption"].append(f"a picture number {i}")
        rows["jpg_0"].append(good if first_wins else bad)
        rows["jpg_1"].append(bad if first_wins else good)
        label = 1.0 if first_wins else 0.0
        if i in tie_rows:
            label = 0.5
        if i in nan_rows:
            label = float("nan")
        if i in corrupt_rows:
            rows["jpg_1"][-1] = b"definitely not an image"
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label if label == label else label)
        pick = {"good": 0.20 + 0.01 * i, "bad": 0.20}
        aes = {"good": 5.0, "bad": 5.5} if i % 2 else {"good": 5.6, "bad": 5.0}
        for name, score in (("pick", pick), ("aes", aes)):
            rows[f"{name}_0"].append(score["good"] if first_wins else score["bad"])
            rows[f"{name}_1"].append(score["bad"] if first_wins else score["good"])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def ranked_parquet(path: Path, n: int = 4, k: int = 3, *, bad_rows=(), size: int = 32) -> Path:
    """RankDPO/Syn-Pic layout: per prompt a list of k images (redder = better) with shuffled scores."""
    rows = {"caption": [], "images": [], "scores": [], "generator": []}
    for i in range(n):
        order = [(j + i) % k for j in range(k)]  # list positions do not follow the ranking
        rows["caption"].append(f"a ranked picture number {i}")
        rows["images"].append([png_bytes((60 + 60 * r, 60, 200 - 60 * r), size, 10 * i + r) for r in order])
        rows["scores"].append([float(r) for r in order])
        rows["generator"].append([f"model-{r}" for r in order])
        if i in bad_rows:
            rows["scores"][-1][0] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def toy_policy_and_reference():
    """The shipped toy model as a backbone whose denoiser is nudged (seeded), and the untouched UNet as reference."""
    import torch

    from diffalign.diffusion import backbone_for, load_pipeline
    from diffalign.paths import TOY_BASE

    backbone = backbone_for(load_pipeline(TOY_BASE))
    torch.manual_seed(0)
    for p in backbone.denoiser.parameters():  # a policy that differs from the reference
        p.data.add_(0.01 * torch.randn_like(p))
    return backbone, load_pipeline(TOY_BASE).unet


def images_parquet(path: Path, n: int = 6, *, bad_rows=(), size: int = 32, labels: list | None = None) -> Path:
    """Captioned images (Self-NPO's layout), with a ``label`` column when ``labels`` are given
    (Diffusion-KTO's layout); ``bad_rows`` hold bytes that are no image."""
    rows = {"caption": [f"a picture number {i}" for i in range(n)],
            "image": [b"not an image" if i in bad_rows else png_bytes((40 * i % 255, 90, 160), size, i)
                      for i in range(n)]}
    if labels is not None:
        rows["label"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def hub_cache_with(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567",
                   repo_type: str = "model") -> Path:
    """A Hugging Face cache (``HF_HUB_CACHE`` layout) holding ``folder`` as ``repo_id``'s main revision."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}describe {{ m['content'] }} :"
                 "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")


def chat_lm(folder: Path) -> Path:
    """The toy text world's LM architecture (random weights) with a chat template: the user's message becomes
    "describe <message> :", the assistant's follows it and ends with the EOS."""
    import json

    from diffalign.toy.text_model import write_toy_lm

    write_toy_lm(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def conversations_parquet(path: Path, rows: int = 4, *, layout: str = "pairs") -> Path:
    """TRL's conversational formats in the toy language: ``pairs`` as UltraFeedback's (chosen and rejected
    conversations sharing the user's message, no prompt column), ``unpaired`` as kto-mix's (prompt and
    completion message lists, a label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.toy import text_world as tw

    users = [{"role": "user", "content": f"the {c} {a}"} for c in tw.COLOURS for a in tw.ANIMALS][:rows]

    def answer(user: dict, mood: str) -> list[dict]:
        return [{"role": "assistant", "content": f"{user['content']} is {mood} and runs slowly ."}]

    if layout == "pairs":
        table = {"chosen": [[u, *answer(u, "joyful")] for u in users],
                 "rejected": [[u, *answer(u, "angry")] for u in users]}
    else:
        table = {"prompt": [[u] for u in users for _ in range(2)],
                 "completion": [answer(u, mood) for u in users for mood in ("joyful", "angry")],
                 "label": [True, False] * len(users)}
    pq.write_table(pa.table(table), path)
    return path
