"""Encode once, reuse every epoch: VAE latents and prompt embeddings cached as safetensors shards.

A cache is a folder of ``shard-*.safetensors`` files and ``index-*.jsonl`` files, one index
per writer (each :class:`TensorCache` object, so each process of a multi-GPU run, writes its
own; nobody rewrites anyone's file). Keys are content hashes (of the prompt text or the image
bytes, salted with the model's name), so a changed image or another model never reads stale
entries.

Writes are buffered and published in large shards: a shard is written in full and moved into
place before its index lines are appended, so every listed key is complete. A crash loses at
most the unpublished buffer (those entries are encoded again) and at most a torn last index
line, which readers ignore. Publishing costs the new entries only, whatever the cache's size:
a Pick-a-Pic-sized run caches millions of entries, and rewriting a whole index per write, or
writing a shard per step, would make the cache slower than the encoders it replaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.diffusion.backbones import Backbone, Conditioning
from diffalign.errors import UserError
from diffalign.paths import with_usual_permissions

Tensor = torch.Tensor


def content_key(*parts: str | bytes) -> str:
    """A stable hex key for the given strings/bytes."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


class TensorCache:
    """A folder of safetensors shards: key -> {field: tensor}.

    ``put_many`` buffers entries (readable at once through ``get``) and publishes them as one
    shard when the buffer reaches ``shard_bytes``; ``flush`` publishes the rest (the trainer
    calls it at every checkpoint and at the end). At most ``open_shards`` shards are kept open.
    """

    def __init__(self, folder: str | Path, shard_bytes: int = 256 * 2**20, open_shards: int = 64) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.open_shards = open_shards
        self.writer = uuid.uuid4().hex[:12]
        self.index: dict[str, tuple[str, list[str]]] = {}  # key -> (shard, field names)
        self._read_up_to: dict[Path, int] = {}
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._pending_bytes = 0
        self._shards_written = 0
        self._handles: OrderedDict[str, object] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """Read the index lines published since the last call, by this or any other writer."""
        for path in sorted(self.folder.glob("index-*.jsonl")):
            with path.open("rb") as f:
                f.seek(self._read_up_to.get(path, 0))
                new = f.read()
            complete = new.rfind(b"\n") + 1  # a line still being written, or torn by a crash, waits
            for line in new[:complete].splitlines():
                try:
                    entry = json.loads(line)
                    self.index[entry["key"]] = (entry["shard"], entry["fields"])
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"the cache index {path} has a damaged line: {line[:200]!r}. The cache "
                                    f"can be rebuilt: delete {self.folder} (or point data.cache_dir elsewhere).")
            self._read_up_to[path] = self._read_up_to.get(path, 0) + complete

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self.index

    def __len__(self) -> int:
        return len(self.index) + sum(key not in self.index for key in self._pending)

    def get(self, key: str) -> dict[str, Tensor]:
        if key in self._pending:
            return dict(self._pending[key])
        shard, fields = self.index[key]
        handle = self._handles.pop(shard, None)
        if handle is None:
            handle = safe_open(str(self.folder / shard), framework="pt")
            if len(self._handles) >= self.open_shards:
                self._handles.popitem(last=False)  # least recently used
        self._handles[shard] = handle
        return {field: handle.get_tensor(f"{key}.{field}") for field in fields}

    def put_many(self, entries: dict[str, dict[str, Tensor]]) -> None:
        """Buffer the entries; publish a shard once the buffer holds ``shard_bytes``."""
        for key, fields in entries.items():
            stored = {field: tensor.detach().to("cpu").contiguous() for field, tensor in fields.items()}
            self._pending[key] = stored
            self._pending_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Publish the buffered entries: write their shard, then append their index lines."""
        if not self._pending:
            return
        shard = f"shard-{self.writer}-{self._shards_written:05d}.safetensors"
        tmp = self.folder / f"{shard}.tmp"
        save_file({f"{key}.{field}": tensor for key, fields in self._pending.items()
                   for field, tensor in fields.items()}, str(tmp))
        os.replace(with_usual_permissions(tmp), self.folder / shard)
        published = {key: (shard, sorted(fields)) for key, fields in self._pending.items()}
        with (self.folder / f"index-{self.writer}.jsonl").open("a") as index:
            index.write("".join(json.dumps({"key": key, "shard": shard, "fields": names}) + "\n"
                                for key, (shard, names) in published.items()))
        self.index.update(published)
        self._shards_written += 1
        self._pending, self._pending_bytes = {}, 0


class CachedEncoder:
    """A backbone's prompt and image encoders behind a :class:`TensorCache`.

    Entries missing from the cache are encoded in one batch and stored; the rest are read.
    ``model_id`` salts the keys (use the model path), so caches of two models never mix.
    ``latent_dtype`` (e.g. bf16) stores latents in that dtype, for half the disk of fp32; they
    are read back as fp32 (rounded alike whether just encoded or read), and salted apart from
    fp32 entries.
    """

    def __init__(self, backbone: Backbone, cache: TensorCache, model_id: str,
                 latent_dtype: torch.dtype = torch.float32) -> None:
        self.backbone = backbone
        self.cache = cache
        self.model_id = model_id
        self.latent_dtype = latent_dtype
        self._latent_salt = model_id if latent_dtype == torch.float32 else f"{model_id}@{latent_dtype}"
        tokens = backbone.prompt_tokens  # embeddings of another sequence length are other entries
        self._prompt_salt = model_id if tokens is None else f"{model_id}@{tokens}tokens"

    def _cached(
        self, keys: list[str], encode_missing: Callable[[list[int]], list[dict[str, Tensor]]]
    ) -> list[dict[str, Tensor]]:
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            encoded = encode_missing(missing)
            self.cache.put_many({keys[i]: fields for i, fields in zip(missing, encoded)})
        return [self.cache.get(k) for k in keys]

    def has_prompt(self, prompt: str, source_ids: Sequence[str] = ()) -> bool:
        return content_key("prompt", self._prompt_salt, prompt, *source_ids) in self.cache

    def prompts(self, prompts: Sequence[str], source_ids: Sequence[Sequence[str]] | None = None,
                sources: Callable[[list[int]], Tensor] | None = None) -> Conditioning:
        """Prompt embeddings; for a text encoder that reads the edits' sources (``Backbone.prompt_reads_sources``),
        each prompt's ``source_ids`` join its key and ``sources(indices)`` gives the (n, S, 3, H, W) pixels of the
        prompts at those indices, called only for prompts not in the cache."""
        ids = source_ids or [()] * len(prompts)
        keys = [content_key("prompt", self._prompt_salt, p, *i) for p, i in zip(prompts, ids)]

        def encode(indices: list[int]) -> list[dict[str, Tensor]]:
            texts = [prompts[i] for i in indices]
            cond = self.backbone.encode_prompts(texts) if sources is None else \
                self.backbone.encode_prompts(texts, sources(indices))
            return [cond[j : j + 1].tensors() for j in range(len(indices))]

        rows = self._cached(keys, encode)
        return Conditioning.cat([Conditioning(**row) for row in rows])

    def _kind(self, sources: bool) -> str:
        return self.backbone.source_cache_kind if sources else "latent"

    def has_latents(self, image_ids: Sequence[str | bytes], sources: bool = False) -> bool:
        """Whether every one of these images is cached (then their pixels are never needed); ``sources``: as an
        edit's sources (:meth:`latents`)."""
        return all(content_key(self._kind(sources), self._latent_salt, i) in self.cache for i in image_ids)

    def latents(self, image_ids: Sequence[str | bytes], pixels: Callable[[list[int]], Tensor],
                sources: bool = False) -> Tensor:
        """Latents of images identified by ``image_ids`` (their bytes, or a stable id); with ``sources``, what the
        denoiser reads of them as an edit's sources (``Backbone.encode_sources``: the same latents for most models,
        an image-to-video model's first-frame condition, cached apart).

        ``pixels(indices)`` returns the (n, 3, H, W) pixels in [-1, 1] of the images at those
        indices; it is only called for images not in the cache.
        """
        keys = [content_key(self._kind(sources), self._latent_salt, i) for i in image_ids]
        encode_pixels = self.backbone.encode_sources if sources else self.backbone.encode_images

        def encode(indices: list[int]) -> list[dict[str, Tensor]]:
            lat = encode_pixels(pixels(indices))
            return [{"latents": lat[j].to(self.latent_dtype)} for j in range(len(indices))]

        return torch.stack([row["latents"] for row in self._cached(keys, encode)]).float()


def example_cached(encoder: CachedEncoder, prompt_reads_sources: bool, guides: bool = False) -> Callable[[Any], bool]:
    """Whether all a run encodes of an example (read undecoded) is in ``encoder``'s cache: its images' and sources'
    latents, and its prompt (keyed by its sources too when the text encoder reads them; then also the empty prompt
    read with them, for an objective that ``guides``). Such an example is only hashed, never decoded."""
    def cached(example) -> bool:
        prompt_sources = example.source_ids if prompt_reads_sources else ()
        return (encoder.has_latents(example.image_ids) and encoder.has_latents(example.source_ids, sources=True)
                and encoder.has_prompt(example.caption, prompt_sources)
                and not (guides and prompt_sources and not encoder.has_prompt("", prompt_sources)))
    return cached
