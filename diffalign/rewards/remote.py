"""Rewards served apart from training: ``diffalign serve-reward`` puts any reward behind HTTP, and a reward spec that
is a URL (``online.reward: http://gpu2:8400``) scores through it.

Peers run heavy rewards this way (flow_grpo's reward server, verl-omni's HTTP scorers), because GenEval's mmdet or a
7B judge conflicts with the trainer's environment or needs its own GPU. The protocol is two JSON calls:

- ``GET /info``: ``{"name", "description", "reads_sources"}`` of the served reward;
- ``POST /score``: ``{"prompts": [...], "images": [PNG as base64, ...], "sources": [[PNG, ...], ...]}`` (sources only
  for a reward that compares edits with them) answered by ``{"scores": [...]}``, one float per image.

Images travel as 8-bit PNG, the precision every reward reads them at. A token, when the server has one, travels as
``Authorization: Bearer TOKEN``; the client reads it from ``$DIFFALIGN_REWARD_TOKEN``. The server listens on
127.0.0.1 unless told otherwise, and another address needs a token. The client retries as
:mod:`diffalign.rewards.json_client` says, then stops a training run with a checkpoint (nothing is lost).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import os
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.errors import UserError
from diffalign.rewards.clip_rewards import to_pil
from diffalign.rewards.json_client import JsonEndpoint, png_base64

TOKEN_ENV = "DIFFALIGN_REWARD_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 30  # a round of 64 images of 1024 px as PNG is about 100 MB


def encode_images(images: torch.Tensor) -> list[str]:
    """Float (N, 3, H, W) images in [0, 1] as base64 PNG strings."""
    return [png_base64(image) for image in to_pil(images)]


def decode_images(encoded: Sequence[str]) -> torch.Tensor:
    """Base64 PNG strings (all one size) as float (N, 3, H, W) images in [0, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(e))).convert("RGB")) for e in encoded]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class RemoteReward:
    """A reward scored by a ``diffalign serve-reward`` server at ``url``; its name and description are the served
    reward's."""

    def __init__(self, url: str, *, timeout: float | str = 600, retries: int | str = 3,
                 retry_wait: float | str = 5.0) -> None:
        self.url = url.rstrip("/")
        self.endpoint = JsonEndpoint(self.url, "the reward server", os.environ.get(TOKEN_ENV),
                                     f"set ${TOKEN_ENV} to the server's token", float(timeout), int(retries),
                                     float(retry_wait))
        info = self.endpoint.call("GET", "/info")
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise UserError(f"{self.url}/info answered {str(info)[:200]!r}, not a diffalign reward server's info")
        self.name, self.description = info["name"], str(info.get("description", ""))
        self.reads_sources = bool(info.get("reads_sources", False))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], sources: torch.Tensor | None = None
                 ) -> torch.Tensor:
        body: dict[str, Any] = {"prompts": list(prompts), "images": encode_images(images)}
        if sources is not None and self.reads_sources:
            body["sources"] = [encode_images(s) for s in sources]
        reply = self.endpoint.call("POST", "/score", body)
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts) or \
                not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise UserError(f"the reward server at {self.url} answered {str(reply)[:200]!r}, not {len(prompts)} "
                            "scores")
        return torch.tensor(scores, dtype=torch.float32)


class RewardServer:
    """A reward model behind HTTP (the protocol in the module docstring), one scoring call at a time."""

    def __init__(self, reward, *, host: str = "127.0.0.1", port: int = 8400, token: str | None = None) -> None:
        if host not in LOCAL_HOSTS and not token:
            raise UserError(f"--host {host} lets other machines reach the reward: give --token SECRET too (every "
                            f"request must carry it; clients read it from ${TOKEN_ENV}), or keep 127.0.0.1")
        self.reward, self.token = reward, token
        self._scoring = threading.Lock()  # one model, one batch at a time
        handler = type("Handler", (_Handler,), {"app": self})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self.httpd = server_class((host, port), handler)
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        return {"name": self.reward.name, "description": getattr(self.reward, "description", ""),
                "reads_sources": bool(getattr(self.reward, "reads_sources", False))}

    def score(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts, images = body.get("prompts"), body.get("images")
        if not isinstance(prompts, list) or not isinstance(images, list) or len(prompts) != len(images) \
                or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("a score request holds prompts and images, two lists of the same non-zero length")
        pixels = decode_images(images)
        with self._scoring:
            if getattr(self.reward, "reads_sources", False):
                if not isinstance(body.get("sources"), list) or len(body["sources"]) != len(images):
                    raise ValueError(f"{self.reward.name} compares edits with their sources: send sources, a list "
                                     "of each image's source PNGs")
                sources = torch.stack([decode_images(s) for s in body["sources"]])
                scores = self.reward(pixels, prompts, sources)
            else:
                scores = self.reward(pixels, prompts)
        return {"scores": [float(s) for s in scores]}

    def serve(self) -> None:
        """Serve until Ctrl-C."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    app: RewardServer
    server_version = "diffalign-reward"

    def log_message(self, format: str, *args: Any) -> None:  # a round's calls are not worth a line each
        pass

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        if self.app.token is None:
            return True
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        return hmac.compare_digest(given.encode(), self.app.token.encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._authorised():
            return self._json(HTTPStatus.UNAUTHORIZED, {"error": "this reward server needs its token"})
        if self.path != "/info":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "GET /info or POST /score"})
        self._json(HTTPStatus.OK, self.app.info())

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return self._json(HTTPStatus.UNAUTHORIZED, {"error": "this reward server needs its token"})
        if self.path != "/score":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "GET /info or POST /score"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"a body of 1 to {MAX_BODY} bytes is expected"})
        try:
            answer = self.app.score(json.loads(self.rfile.read(length)))
        except (ValueError, OSError) as err:  # bad JSON, a bad PNG, mismatched lists
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except UserError as err:  # the reward's own refusal (a prompt the OCR reward cannot read a target from)
            return self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(err)})
        except Exception as err:  # the reward failed (out of memory, ...): the client retries, then stops its run
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})
        self._json(HTTPStatus.OK, answer)


def serve_reward(spec: str, *, host: str, port: int, token: str | None) -> None:
    """Load the reward ``spec`` names and serve it until Ctrl-C."""
    from diffalign.rewards import load_reward

    server = RewardServer(load_reward(spec), host=host, port=port, token=token)
    print(f"serving reward {server.reward.name} at {server.url} (online.reward: {server.url}); Ctrl-C stops",
          flush=True)
    server.serve()
