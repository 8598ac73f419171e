"""Where files live: those shipped with diffalign, and models a user names by Hugging Face Hub id;
and who may read the weights diffalign writes.

diffalign installs in editable mode (``pip install -e .``), so assets/ and configs/ sit next to
the package.
"""

import os
import re
import threading
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from diffalign.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
CONFIGS = ROOT / "configs"
TOY_BASE = ASSETS / "models" / "toy-base"
TOY_SIGN = ASSETS / "models" / "toy-sign"  # the text-rendering toy world's base (diffalign.toy.sign_world)
TOY_VIDEO = ASSETS / "models" / "toy-video"  # the toy video world's base (diffalign.toy.video_world)
PROMPTS = ASSETS / "prompts"
_HUB_NAME = re.compile(r"([\w.-]+/[\w.-]+)(?:/(.+))?")  # owner/name, optionally a path inside the repository


def with_usual_permissions(path: Path) -> Path:
    """Give ``path`` (a .safetensors file), or every .safetensors file under the folder ``path``, the mode
    any new file of this process gets (``0o666`` less the umask, as config.json beside it); returns ``path``.

    safetensors 0.8 writes each file through a temporary file created 0600 and renames it into place
    (safetensors issue #782; its fix, PR #789, is open), and so do diffusers' and accelerate's savers that call it.
    The weights would be readable by their writer alone: an inference server, a container or a colleague
    running as another user could not load a model whose config they can read.
    """
    folder = path if path.is_dir() else path.parent
    probe = folder / f".diffalign-mode-{os.getpid()}-{threading.get_ident()}"
    try:  # best effort: a file system without Unix modes (a mounted bucket, say) keeps what it has
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as to any new file
        try:
            mode = probe.stat().st_mode & 0o777
        finally:
            probe.unlink()
        for file in (path.rglob("*.safetensors") if path.is_dir() else [path]):
            file.chmod(mode)
    except OSError:
        pass
    return path


LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".tsv", ".txt", ".safetensors")
# folders that hold a project's own files (the recipes write and read these), never a Hub owner's name
LOCAL_FOLDERS = ("runs", "data", "cache", "models", "outputs", "reports", "export", "assets", "configs")


def is_clearly_local(source: str | Path) -> bool:
    """Whether a path that does not exist can only mean a local file: absolute, starting with ``.``,
    starting in a folder that exists here or in one the recipes use for local files (``runs/x``, ``data/y``),
    or a single table or weights file name.
    A Hub name is ``owner/name`` (optionally with a path inside, as ``xswu/HPSv2/HPS_v2.1_compressed.pt``),
    whose owner is no folder here."""
    text = str(source)
    parts = Path(text).parts
    return (Path(text).is_absolute() or text.startswith(".") or (len(parts) > 1 and (Path(parts[0]).is_dir() or parts[0] in LOCAL_FOLDERS))
            or (len(parts) == 1 and text.endswith(LOCAL_SUFFIXES)))


def how_to_get(source: str | Path, repo_type: str = "model") -> str:
    """The advice for a ``source`` that :func:`find_locally` did not find: where a shipped file is, when a
    shipped config's relative path is read from another folder; the ``hf download`` command, when it reads
    as a Hub name; else to give an existing local path."""
    shipped = ROOT / source
    if not Path(source).is_absolute() and shipped.exists():
        return (f"Relative paths are read from the current directory ({Path.cwd()}); diffalign ships this one "
                f"as {shipped}: run from {ROOT}, or give the full path")
    if is_clearly_local(source):
        made_by = (" Make the data first (`diffalign generate-ranked CONFIG` writes ranked lists and pairs.jsonl; "
                   "the toy configs read toy:pairs, toy:ranked, toy:images, toy:labelled or toy:world, which "
                   "diffalign makes from the shipped toy model on first use), or give" if repo_type == "dataset"
                   else " Give")
        return (f"It reads as a local path (relative to {Path.cwd()}), not a Hub name.{made_by} the path of an "
                "existing file or folder")
    match = _HUB_NAME.fullmatch(str(source))
    if match is None:
        return "Give the path of an existing file or folder"
    more = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return f"Give a local path, or download it first (diffalign never downloads): hf download {match[1]}{more}"


def find_locally(source: str | Path, repo_type: str = "model") -> Path | None:
    """``source`` as a local path if it exists, else what it names in the local Hugging Face cache,
    else None; never downloads.

    As a Hub name, ``owner/name`` is a repository's cached snapshot (a folder; ``repo_type="dataset"`` for a
    dataset repository); ``owner/name/some/file`` is a file or folder inside it
    (``xswu/HPSv2/HPS_v2.1_compressed.pt``). A name resolves only when ``hf download`` (or an
    earlier ``from_pretrained``) has put the files in the cache (``HF_HUB_CACHE``, by default
    ``~/.cache/huggingface/hub``). The snapshot's folder name is the commit, so anything keyed by
    the resolved path follows the repository's revision.
    """
    if Path(source).exists():
        return Path(source)
    match = _HUB_NAME.fullmatch(str(source))
    if not match:
        return None
    try:
        found = Path(snapshot_download(match[1], repo_type=repo_type, local_files_only=True)) / (match[2] or "")
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return found if found.exists() else None


def resolve_model_path(source: str | Path, *, what: str = "model.path") -> Path:
    """``source`` as a local path if it exists, else what it names in the local Hugging Face cache
    (:func:`find_locally`); a clear error if neither."""
    found = find_locally(source)
    if found is None:
        raise UserError(f"{what} {source} does not exist, and it names nothing in the local Hugging Face cache. "
                        f"{how_to_get(source)}.")
    return found
