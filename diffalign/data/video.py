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
from typing import Any

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
    """The clip's frames (RGB) from an encoded video. Stops decoding once the clip is complete. Raises
    :class:`TooFewFrames`, or ``ValueError`` for frames larger than ``max_pixels`` and for bytes PyAV cannot read as
    a video."""
    av = _av()
    try:
        return _decode(av, raw, clip, max_pixels)
    except av.error.FFmpegError as err:
        raise ValueError(err.strerror or str(err)) from None


def _decode(av, raw: bytes, clip: VideoClips, max_pixels: int) -> list[Image.Image]:
    with av.open(io.BytesIO(raw)) as container:
        if not container.streams.video:
            raise ValueError("the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height > max_pixels:
            raise ValueError(f"{stream.codec_context.width}x{stream.codec_context.height} frames, more than the "
                             f"limit of {max_pixels:,} pixels (data.max_image_pixels)")
        if not clip.fps:  # the first frames, at the file's own rate
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_image())
                if len(frames) == clip.frames:
                    return frames
        else:  # the frame on screen at each clip time k / fps from the first frame's
            frames, start, last = [], None, None
            for frame in container.decode(stream):
                time = float(frame.time or 0.0)
                start = time if start is None else start
                while last is not None and len(frames) < clip.frames and len(frames) / clip.fps < time - start - 1e-6:
                    frames.append(last)  # clip times before this frame's show the one before it
                if len(frames) == clip.frames:
                    return frames
                last = frame.to_image()
            # the last frame stays on screen for one frame of the file's own rate
            rate = float(stream.average_rate) if stream.average_rate else clip.fps
            shown_until = (time - start + 1 / rate) if last is not None else 0.0
            while last is not None and len(frames) < clip.frames and len(frames) / clip.fps < shown_until - 1e-6:
                frames.append(last)
            if len(frames) == clip.frames:
                return frames
    have = f"{len(frames)} frame(s)" + (f" at {clip.fps:g} fps" if clip.fps else "")
    raise TooFewFrames(f"the video gives {have}, and a clip is {clip.frames} (data.frames)")


def clip_pixels(frames: list[Image.Image], resolution: int) -> Tensor:
    """(3, F, R, R) pixels in [-1, 1], each frame as :func:`~diffalign.data.pairs.to_pixels` makes an image."""
    from diffalign.data.pairs import to_pixels

    return torch.stack([to_pixels(frame, resolution) for frame in frames], dim=1)


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
