"""Encode once, reuse every epoch: VAE latents and prompt embeddings cached as safetensors shards.

A cache is a folder of ``shard-NNNNN.safetensors`` files plus ``index.json`` mapping each
entry's key to its shard. Keys are content hashes (of the prompt text or the image bytes,
salted with the model's name), so a changed image or another model never reads stale
entries. Each write is a new shard and a new index, both moved into place atomically, so an
interrupted run leaves a cache that is complete for every key its index lists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.diffusion.backbones import Backbone, Conditioning

Tensor = torch.Tensor


def content_key(*parts: str | bytes) -> str:
    """A stable hex key for the given strings/bytes."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: ranks may write at once
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class TensorCache:
    """A folder of safetensors shards: key -> {field: tensor}."""

    INDEX = "index.json"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        index_path = self.folder / self.INDEX
        self.index: dict[str, str] = json.loads(index_path.read_text()) if index_path.exists() else {}
        self._handles: dict[str, object] = {}

    def refresh(self) -> None:
        """Re-read the index, to see what other processes have written."""
        index_path = self.folder / self.INDEX
        if index_path.exists():
            self.index = {**self.index, **json.loads(index_path.read_text())}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, Tensor]:
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        handle = self._handles[shard]
        prefix = f"{key}."
        return {name[len(prefix):]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}

    def put_many(self, entries: dict[str, dict[str, Tensor]]) -> None:
        """Write the entries as one new shard, then publish them in the index."""
        if not entries:
            return
        shard = f"shard-{len(set(self.index.values())):05d}-{content_key(*sorted(entries))[:8]}.safetensors"
        flat = {
            f"{key}.{field}": tensor.detach().to("cpu").contiguous()
            for key, fields in entries.items()
            for field, tensor in fields.items()
        }
        tmp = self.folder / f"{shard}.{os.getpid()}.tmp"
        save_file(flat, str(tmp))
        os.replace(tmp, self.folder / shard)
        self.refresh()  # keep what other processes published meanwhile
        self.index.update({key: shard for key in entries})
        _atomic_write_json(self.folder / self.INDEX, self.index)


class CachedEncoder:
    """A backbone's prompt and image encoders behind a :class:`TensorCache`.

    Entries missing from the cache are encoded in one batch and stored; the rest are read.
    ``model_id`` salts the keys (use the model path), so caches of two models never mix.
    """

    def __init__(self, backbone: Backbone, cache: TensorCache, model_id: str) -> None:
        self.backbone = backbone
        self.cache = cache
        self.model_id = model_id

    def _cached(
        self, keys: list[str], encode_missing: Callable[[list[int]], list[dict[str, Tensor]]]
    ) -> list[dict[str, Tensor]]:
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            encoded = encode_missing(missing)
            self.cache.put_many({keys[i]: fields for i, fields in zip(missing, encoded)})
        return [self.cache.get(k) for k in keys]

    def has_prompt(self, prompt: str) -> bool:
        return content_key("prompt", self.model_id, prompt) in self.cache

    def prompts(self, prompts: Sequence[str]) -> Conditioning:
        keys = [content_key("prompt", self.model_id, p) for p in prompts]

        def encode(indices: list[int]) -> list[dict[str, Tensor]]:
            cond = self.backbone.encode_prompts([prompts[i] for i in indices])
            return [cond[j : j + 1].tensors() for j in range(len(indices))]

        rows = self._cached(keys, encode)
        return Conditioning.cat([Conditioning(**row) for row in rows])

    def has_latents(self, image_ids: Sequence[str | bytes]) -> bool:
        """Whether every one of these images is cached (then their pixels are never needed)."""
        return all(content_key("latent", self.model_id, i) in self.cache for i in image_ids)

    def latents(self, image_ids: Sequence[str | bytes], pixels: Callable[[list[int]], Tensor]) -> Tensor:
        """Latents of images identified by ``image_ids`` (their bytes, or a stable id).

        ``pixels(indices)`` returns the (n, 3, H, W) pixels in [-1, 1] of the images at those
        indices; it is only called for images not in the cache.
        """
        keys = [content_key("latent", self.model_id, i) for i in image_ids]

        def encode(indices: list[int]) -> list[dict[str, Tensor]]:
            lat = self.backbone.encode_images(pixels(indices))
            return [{"latents": lat[j]} for j in range(len(indices))]

        return torch.stack([row["latents"] for row in self._cached(keys, encode)])
