"""Tiny datasets of every layout diffalign trains on, written to disk in the columns a run reads by default.

They serve three readers: ``diffalign train CONFIG --smoke`` (a recipe's data on its tiny counterpart),
``diffalign data example LAYOUT PATH`` (a newcomer's template of each layout, which ``diffalign data check``
then reads), and the tests. The images are 32-pixel noise around a colour: reddish ones are the preferred ones,
so a table of pairs has a preference a model can learn.
"""

from __future__ import annotations

import io
import json
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


def clip_bytes(color: tuple[int, int, int], size: int = 32, seed: int = 0, frames: int = 5, fps: int = 8) -> bytes:
    """An MPEG-4 clip of ``frames`` frames of noise around ``color`` with a light square crossing it left to right,
    the video counterpart of :func:`png_bytes` (written with PyAV, the decoder diffalign reads videos with)."""
    import av

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        side = max(size // 4, 2)
        for k in range(frames):
            array = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 20, (size, size, 3)), 0, 255)
            left = round(k * (size - side) / max(frames - 1, 1))
            array[size // 2 - side // 2: size // 2 + side // 2, left: left + side] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(array.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def media_bytes(color: tuple[int, int, int], size: int, seed: int, frames: int = 0) -> bytes:
    """An image (``frames`` 0) or a clip of that many frames, around ``color``."""
    return clip_bytes(color, size, seed, frames) if frames else png_bytes(color, size, seed)


def source_images(rows: dict, n: int, columns: tuple[str, ...], size: int) -> None:
    """Edit data: the columns ``columns`` of ``rows`` get each row's source images, greyish and of their own."""
    for s, column in enumerate(columns):
        rows[column] = [png_bytes((120, 120 + 20 * s, 120), size, 1000 + 10 * i + s) for i in range(n)]


def pickapic_parquet(path: Path, n: int = 8, *, corrupt_rows=(), nan_rows=(), tie_rows=(), size: int = 32,
                     extra_scores: tuple[str, ...] = (), sources: tuple[str, ...] = (), frames: int = 0) -> Path:
    """Pick-a-Pic v2 columns: reddish images preferred over bluish ones (label_0 alternates).

    Also two reward models' scores of each image (``pick_0/1``, ``aes_0/1``): pick prefers the
    reddish image by a margin of 0.01 i, aes by 0.6 on even rows and the bluish one by 0.5 on
    odd rows. ``extra_scores`` names more score columns holding pick's scores (``pickscore``: the
    ``pickscore_0/1`` that sdxl_smpo.yaml reads). ``corrupt_rows``, ``nan_rows`` and ``tie_rows``
    make those rows' second image undecodable, their label NaN, or their label a tie (0.5). ``sources`` names
    columns of source images, which makes the pairs edits of those (:func:`source_images`). With ``frames`` the pairs
    are of MPEG-4 clips of that many frames (:func:`clip_bytes`), reddish preferred as well.
    """
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [],
            "pick_0": [], "pick_1": [], "aes_0": [], "aes_1": []}
    for i in range(n):
        good, bad = media_bytes((200, 60, 60), size, i, frames), media_bytes((60, 60, 200), size, 100 + i, frames)
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
    for name in extra_scores:
        rows[f"{name}_0"], rows[f"{name}_1"] = rows["pick_0"], rows["pick_1"]
    source_images(rows, n, sources, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def ranked_parquet(path: Path, n: int = 4, k: int = 3, *, bad_rows=(), size: int = 32,
                   sources: tuple[str, ...] = (), frames: int = 0) -> Path:
    """RankDPO/Syn-Pic layout: per prompt a list of k images (redder = better) with shuffled scores; edits of the
    images in the ``sources`` columns when any are named; clips of ``frames`` frames instead of images if given."""
    rows = {"caption": [], "images": [], "scores": [], "generator": []}
    for i in range(n):
        order = [(j + i) % k for j in range(k)]  # list positions do not follow the ranking
        rows["caption"].append(f"a ranked picture number {i}")
        rows["images"].append([media_bytes((60 + 60 * r, 60, 200 - 60 * r), size, 10 * i + r, frames) for r in order])
        rows["scores"].append([float(r) for r in order])
        rows["generator"].append([f"model-{r}" for r in order])
        if i in bad_rows:
            rows["scores"][-1][0] = float("nan")
    source_images(rows, n, sources, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def images_parquet(path: Path, n: int = 6, *, bad_rows=(), size: int = 32, labels: list | None = None,
                   sources: tuple[str, ...] = (), frames: int = 0) -> Path:
    """Captioned images (Self-NPO's layout), with a ``label`` column when ``labels`` are given
    (Diffusion-KTO's layout); ``bad_rows`` hold bytes that are no image; edits of the ``sources`` columns' images
    when any are named; clips of ``frames`` frames instead of images if given."""
    rows = {"caption": [f"a picture number {i}" for i in range(n)],
            "image": [b"not an image" if i in bad_rows else media_bytes((40 * i % 255, 90, 160), size, i, frames)
                      for i in range(n)]}
    if labels is not None:
        rows["label"] = labels
    source_images(rows, n, sources, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}describe {{ m['content'] }} :"
                 "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")


def chat_lm(folder: Path) -> Path:
    """The toy text world's LM architecture (random weights) with a chat template: the user's message becomes
    "describe <message> :", the assistant's follows it and ends with the EOS."""
    from diffalign.toy.text_model import write_toy_lm

    write_toy_lm(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def conversations_parquet(path: Path, rows: int = 4, *, layout: str = "pairs") -> Path:
    """TRL's conversational formats in the toy language: ``pairs`` as UltraFeedback's (chosen and rejected
    conversations sharing the user's message, no prompt column), ``unpaired`` as kto-mix's (prompt and
    completion message lists, a label), ``ranked`` a prompt with a list of three completions and their scores
    (higher better), ``completions`` a prompt and one completion (TRL's prompt-completion format)."""
    from diffalign.toy import text_world as tw

    users = [{"role": "user", "content": f"the {c} {a}"} for c in tw.COLOURS for a in tw.ANIMALS][:rows]

    def answer(user: dict, mood: str) -> list[dict]:
        return [{"role": "assistant", "content": f"{user['content']} is {mood} and runs slowly ."}]

    if layout == "pairs":
        table = {"chosen": [[u, *answer(u, "joyful")] for u in users],
                 "rejected": [[u, *answer(u, "angry")] for u in users]}
    elif layout == "ranked":
        moods = ("joyful", "calm", "angry")
        table = {"prompt": [[u] for u in users], "completions": [[answer(u, m) for m in moods] for u in users],
                 "scores": [[2.0, 1.0, 0.0] for _ in users]}
    elif layout == "completions":
        table = {"prompt": [[u] for u in users], "completion": [answer(u, "joyful") for u in users]}
    else:
        table = {"prompt": [[u] for u in users for _ in range(2)],
                 "completion": [answer(u, mood) for u in users for mood in ("joyful", "angry")],
                 "label": [True, False] * len(users)}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)
    return path


def as_jsonl_index(table: Path, index: Path) -> Path:
    """The rows of the parquet ``table`` as a JSON-lines ``index``, each image written to a file in ``images/``
    beside it and named by its path relative to the index (the layout of a folder of images a person labels)."""
    folder = index.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with index.open("w") as out:
        for number, row in enumerate(pq.read_table(table).to_pylist()):
            for column, value in row.items():
                if isinstance(value, bytes):
                    row[column] = _image_file(value, folder / f"{number:04d}-{column}{_suffix(value)}", index.parent)
                elif isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
                    row[column] = [_image_file(v, folder / f"{number:04d}-{column}-{k}{_suffix(v)}", index.parent)
                                   for k, v in enumerate(value)]
            out.write(json.dumps(row) + "\n")
    return index


def _suffix(data: bytes) -> str:
    """.png for the samples' images, .mp4 for their clips."""
    return ".png" if data.startswith(b"\x89PNG") else ".mp4"


def _image_file(data: bytes, path: Path, base: Path) -> str:
    path.write_bytes(data)
    return str(path.relative_to(base))


EXAMPLE_LAYOUTS = {
    # with PickScore's scores of both images as pickscore_0/1, the columns sdxl_smpo.yaml reads
    "pairs": lambda path, sources=(), frames=0: pickapic_parquet(path, 4, extra_scores=("pickscore",), sources=sources,
                                                                 frames=frames),
    "ranked": lambda path, sources=(), frames=0: ranked_parquet(path, sources=sources, frames=frames),
    "images": lambda path, sources=(), frames=0: images_parquet(path, 4, sources=sources, frames=frames),
    "labelled_images": lambda path, sources=(), frames=0: images_parquet(path, 4, labels=[1, 0, 1, 0], sources=sources,
                                                                         frames=frames),
    "text_pairs": lambda path: conversations_parquet(path),
    "text_unpaired": lambda path: conversations_parquet(path, layout="unpaired"),
    "text_ranked": lambda path: conversations_parquet(path, layout="ranked"),
    "text_completions": lambda path: conversations_parquet(path, layout="completions"),
}


def write_example(layout: str, path: Path, sources: tuple[str, ...] = (), frames: int = 0) -> Path:
    """A small dataset of ``layout`` at ``path``: a parquet table, or for a ``.jsonl`` path an index with its
    images in files beside it. ``sources`` names the columns of an edit's source images (an image layout only);
    ``frames`` makes its items MPEG-4 clips of that many frames (an image layout only)."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: write a .parquet table or a .jsonl index")
    if frames and layout.startswith("text_"):
        raise ValueError(f"{layout} holds text; frames make clips of an image layout")
    options = {**({"sources": sources} if sources else {}), **({"frames": frames} if frames else {})}
    write = (lambda p: EXAMPLE_LAYOUTS[layout](p, **options)) if options else EXAMPLE_LAYOUTS[layout]
    if path.suffix == ".parquet":
        return write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = write(path.with_name(f".{path.stem}.parquet"))
    try:
        return as_jsonl_index(table, path)
    finally:
        table.unlink()
