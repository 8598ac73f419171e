"""One JSON call over HTTP with retries, for the rewards that score through a server: a ``diffalign serve-reward``
server (:mod:`diffalign.rewards.remote`) and an OpenAI-compatible judge (:mod:`diffalign.rewards.openai_judge`).

A call that fails on the network or with a server error (5xx) is retried ``retries`` times, ``retry_wait`` seconds
apart, then raises :class:`~diffalign.errors.RewardServerDown`, which stops a training run with a checkpoint (nothing
is lost). A refusal (4xx) is the user's to fix, at once, and so is an answer that is not JSON.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image

from diffalign.errors import RewardServerDown, UserError


def png_base64(image: Image.Image) -> str:
    """The image as base64 PNG text: how images travel in these rewards' JSON (8-bit, lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class JsonEndpoint:
    """A server at ``url`` (what error messages call ``what``), a bearer ``token`` if it wants one, and how long
    and how often to try a call."""

    url: str
    what: str = "the reward server"
    token: str | None = None
    token_hint: str = ""  # what to do about a 401, e.g. which environment variable holds the token
    timeout: float = 600.0
    retries: int = 3
    retry_wait: float = 5.0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON call, retried on network and server errors (see the module docstring)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait)
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read()
            except urllib.error.HTTPError as err:
                message = _error_text(err)
                if err.code < 500:
                    hint = f" ({self.token_hint})" if err.code == 401 and self.token_hint else ""
                    raise UserError(f"{self.what} at {self.url} refused {method} {path}: {err.code} "
                                    f"{message}{hint}") from None
                last = f"{err.code} {message}"
            except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out, name not found
                last = str(getattr(err, "reason", err))
            else:
                try:
                    return json.loads(text)
                except ValueError:
                    raise UserError(f"{self.what} at {self.url} answered {method} {path} with "
                                    f"{text[:200]!r}, not JSON") from None
        raise RewardServerDown(f"{self.what} at {self.url} did not answer {method} {path} after "
                               f"{self.retries + 1} tries ({last})")


def _error_text(err: urllib.error.HTTPError) -> str:
    """The server's own words about an HTTP error: a JSON body's ``error`` (a string, or OpenAI's object with a
    ``message``) or ``detail`` (FastAPI's), else the status's reason."""
    try:
        body = json.loads(err.read())
        error = body.get("error") or body.get("detail") or ""
    except (ValueError, AttributeError, OSError):
        return err.reason or ""
    return str(error.get("message", error) if isinstance(error, dict) else error)
