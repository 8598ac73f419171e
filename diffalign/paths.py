"""Where files live: those shipped with diffalign, and models a user names by Hugging Face Hub id.

diffalign installs in editable mode (``pip install -e .``), so assets/ and configs/ sit next to
the package.
"""

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from diffalign.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
CONFIGS = ROOT / "configs"
TOY_BASE = ASSETS / "models" / "toy-base"
PROMPTS = ASSETS / "prompts"


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
    match = re.fullmatch(r"([\w.-]+/[\w.-]+)(?:/(.+))?", str(source))
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
        raise UserError(f"{what} {source} does not exist, and it names nothing in the local Hugging Face cache "
                        "(diffalign never downloads). Give a local path, or download the model first: "
                        f"hf download {'/'.join(str(source).split('/')[:2])}")
    return found
