"""Videos as training data: each cell (bytes, or a path as an image's) decoded with PyAV, read at the frame count and
frame rate the run sets (``data.frames``, ``data.fps``), every frame resized and centre-cropped as an image is.

A video model (Wan) trains on clips of a fixed length, so a clip is the first ``frames`` frames at the file's own rate,
or, with ``fps``, the frames shown at times 0, 1/fps, 2/fps, ... (each the frame on screen at that moment), which
resamples 30 fps footage to the 16 fps Wan2.1 was trained at. A video too short for the clip, or one that cannot be
decoded, is a bad row like an undecodable image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from PIL import Image

from diffalign.errors import UserError

Tensor = torch.Tensor

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass(frozen=True)
class VideoClips:
    """How a run reads its videos: ``frames`` per clip, at ``fps`` frames per second (0: the file's own rate)."""

    frames: int
    fps: float = 0.0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise UserError(f"data.frames={self.frames}: a clip needs at least one frame")
        if self.fps < 0:
            raise UserError(f"data.fps={self.fps}: give a positive frame rate, or 0 for each file's own")

    @property
    def key(self) -> bytes:
        """What joins a video's bytes in its cache key: the same file read as another clip has other latents."""
        return f"frames={self.frames},fps={self.fps:g}".encode()


class TooFewFrames(ValueError):
    """A video shorter than the clip the run reads."""


def _av():
    try:
        import av
    except ImportError:
        raise UserError("reading videos needs PyAV: pip install 'diffalign[video]'") from None
    return av


def decode_clip(raw: bytes, clip: VideoClips, max_pixels: int) -> list[Image.Image]:
    """The clip's frames (RGB) from an encoded video, or from an animated WebP or GIF (what diffalign writes a round's,
    an evaluation's and validation's clips as; FFmpeg reads no animated WebP, so PIL reads those). Stops decoding once
    the clip is complete. Raises :class:`TooFewFrames`, or ``ValueError`` for frames larger than ``max_pixels`` and
    for bytes that are no video."""
    if is_animated_image(raw):
        return _select(_pil_frames(raw, max_pixels), clip)
    av = _av()
    try:
        with av.open(io.BytesIO(raw)) as container:
            if not container.streams.video:
                raise ValueError("the file holds no video stream")
            stream = container.streams.video[0]
            _check_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
            rate = float(stream.average_rate) if stream.average_rate else None
            return _select(((float(frame.time or 0.0), 1 / rate if rate else None, frame.to_image())
                            for frame in container.decode(stream)), clip)
    except av.error.FFmpegError as err:
        raise ValueError(err.strerror or str(err)) from None


def is_animated_image(raw: bytes) -> bool:
    """Whether the bytes are a WebP or a GIF (read with PIL; one frame or many)."""
    return (raw.startswith(b"RIFF") and raw[8:12] == b"WEBP") or raw.startswith((b"GIF87a", b"GIF89a"))


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} frames, more than the limit of {max_pixels:,} pixels "
                         "(data.max_image_pixels)")


def _pil_frames(raw: bytes, max_pixels: int) -> Iterator[tuple[float, float | None, Image.Image]]:
    """(time, duration, RGB frame) of each frame of an animated image, from its frames' durations."""
    with Image.open(io.BytesIO(raw)) as image:
        _check_size(*image.size, max_pixels)
        time = 0.0
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()  # PIL reads a WebP frame's duration as it decodes the frame
            duration = (image.info.get("duration") or 0) / 1000 or None
            yield time, duration, image.convert("RGB")
            time += duration or 0.0


def _select(frames: Iterator[tuple[float, float | None, Image.Image]], clip: VideoClips) -> list[Image.Image]:
    """The clip from (time, duration, frame) in order: the first ``clip.frames`` frames, or with ``clip.fps`` the frame
    on screen at each clip time k / fps from the first frame's (the last one shows for its duration)."""
    chosen: list[Image.Image] = []
    start = last = shown_until = None
    for time, duration, image in frames:
        if not clip.fps:
            chosen.append(image)
        else:
            start = time if start is None else start
            while last is not None and len(chosen) < clip.frames and len(chosen) / clip.fps < time - start - 1e-6:
                chosen.append(last)  # clip times before this frame's show the one before it
            last = image
            shown_until = time - start + (duration or 1 / clip.fps)
        if len(chosen) == clip.frames:
            return chosen
    while last is not None and len(chosen) < clip.frames and len(chosen) / clip.fps < shown_until - 1e-6:
        chosen.append(last)
    if len(chosen) == clip.frames:
        return chosen
    have = f"{len(chosen)} frame(s)" + (f" at {clip.fps:g} fps" if clip.fps else "")
    raise TooFewFrames(f"the video gives {have}, and a clip is {clip.frames} (data.frames)")


def clip_pixels(frames: list[Image.Image], resolution: int, width: int | None = None) -> Tensor:
    """(3, F, H, W) pixels in [-1, 1], each frame as :func:`~diffalign.data.pairs.to_pixels` makes an image."""
    from diffalign.data.pairs import to_pixels

    return torch.stack([to_pixels(frame, resolution, width) for frame in frames], dim=1)


def video_suffix(raw: bytes) -> str | None:
    """The container suffix of a video's bytes, read from its signature (MP4/MOV's ``ftyp`` box, Matroska/WebM's EBML
    header, AVI's RIFF form); None for anything else (an image)."""
    if raw[4:8] == b"ftyp":
        return ".mov" if raw[8:10] == b"qt" else ".mp4"
    if raw.startswith(b"\x1a\x45\xdf\xa3"):
        return ".webm" if b"webm" in raw[:64] else ".mkv"
    if raw.startswith(b"RIFF") and raw[8:11] == b"AVI":
        return ".avi"
    return None


def is_video_cell(value: Any) -> bool:
    """Whether a cell holds a video: a path with a video suffix (a folder or .jsonl index of videos), or bytes (or a
    ``{"bytes": ...}`` struct) with a video's signature."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        return value.lower().endswith(VIDEO_SUFFIXES)
    return isinstance(value, (bytes, bytearray)) and video_suffix(bytes(value)) is not None
