"""``diffalign label``: a local web page where a person picks the better image of each pair, ranks a list,
or labels a D3PO round; each label is on disk before the page moves on.

Built on the standard library's ``http.server`` (``ThreadingHTTPServer``): one person or a few on a local
machine need no framework, and a dependency less is one less thing to break. Everything the page needs
is in :data:`PAGE` (no CDN, no external file); images are read from the source and sent at most
``PAGE_PX`` on a side.

The JSON API the page uses, every request checked before anything is written (a malformed one gets a
4xx and a message, and nothing on disk changes):

- ``GET /api/state?labeller=NAME``: the source's kind and size, this labeller's first unlabelled item,
  counts, and the agreement between labellers on items several labelled;
- ``GET /api/item/I?labeller=NAME``: item I (prompt, number of images, reward scores) and this labeller's
  choice there;
- ``GET /image/I/K``: image K of item I; ``GET /source/I/S``: its source image S (an edit's);
- ``POST /api/label`` ``{"index": I, "choice": ..., "labeller": NAME}``: one label, appended and synced;
- ``POST /api/undo`` ``{"labeller": NAME}``: withdraws that labeller's last label standing.

Bound to 127.0.0.1 by default; any other address needs ``--token``, which every request must then carry
(``?token=`` or the ``X-Token`` header): the page passes it on from its own address.

Without a token, the page's own browser is the only client it trusts, so other web pages open in that
browser must not reach it: a request whose ``Host`` is not the address served is refused (DNS rebinding
would otherwise let a page read prompts and images through a name that resolves to 127.0.0.1), and a
write must be ``Content-Type: application/json`` (which a cross-site page cannot send without a CORS
preflight this server never grants) with no ``Origin`` other than the page's own. Every request has
``REQUEST_TIMEOUT_S`` to arrive, so a client that sends less than it announced cannot hold a thread.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image

from diffalign.errors import UserError
from diffalign.label.sources import Source, page_image
from diffalign.label.store import LabelLog

PAGE = files("diffalign.label").joinpath("page.html").read_text(encoding="utf-8")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT_S = 30


class BadRequest(Exception):
    """A request the server refuses with 400 and this message."""


class LabelServer:
    """The source, its log and the HTTP server that serves the page over them."""

    def __init__(self, source: Source, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if host not in LOCAL_HOSTS and not token:
            raise UserError(f"--host {host} lets other machines reach the page: give --token SECRET too (every "
                            "request must carry it), or keep the default 127.0.0.1")
        self.source = source
        self.log = LabelLog(source.log_path)
        self.token = token
        self._write_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"app": self, "timeout": request_timeout_s})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")

    # --- what the API answers ----------------------------------------------------------
    def state(self, labeller: str) -> dict[str, Any]:
        mine = self.log.choices(labeller)
        total = len(self.source)
        start = next((i for i in range(total) if self.source.item_id(i) not in mine), total)
        counts = {"labelled": sum(c != "skip" for c in mine.values()), "skipped": sum(c == "skip" for c in mine.values())}
        return {"kind": self.source.kind, "total": total, "start": start, "counts": counts,
                "allows_tie": self.source.allows_tie, "log": str(self.log.path),
                "dataset": None if self.source.dataset_path is None else str(self.source.dataset_path),
                "agreement": self.log.agreement(), "torn": self.log.torn}

    def item(self, index: int, labeller: str) -> dict[str, Any]:
        item = self.source.item(self._index(index))
        return {"index": index, "id": item.id, "prompt": item.prompt, "images": item.images, "scores": item.scores,
                "sources": item.sources, "videos": item.videos, "choice": self.log.choices(labeller).get(item.id)}

    def label(self, body: dict[str, Any]) -> dict[str, Any]:
        labeller, index, choice = self._labeller(body), self._index(body.get("index")), body.get("choice", ...)
        if choice is ...:
            raise BadRequest("a label needs a choice")
        try:
            self.source.check(index, choice)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        with self._write_lock:  # the log line, then the dataset it makes, one label at a time
            self.log.append(self.source.item_id(index), choice, labeller, **self.source.extra(index, choice))
            self.source.write(self.log)
        return {"ok": True, **self.state(labeller)}

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        labeller = self._labeller(body)
        item_id = self.log.last_label_of(labeller)
        if item_id is None:
            raise BadRequest(f"{labeller} has no label to undo")
        index = self.source.index_of(item_id)
        with self._write_lock:
            self.log.append(item_id, None, labeller, **self.source.extra(index, None))
            self.source.write(self.log)
        return {"ok": True, "index": index, **self.state(labeller)}

    def _index(self, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(self.source):
            raise BadRequest(f"index must be an item number from 0 to {len(self.source) - 1}, got {value!r}")
        return value

    @staticmethod
    def _labeller(body: dict[str, Any]) -> str:
        name = body.get("labeller")
        if not isinstance(name, str) or not re.fullmatch(r"[\w .@-]{1,64}", name):
            raise BadRequest("labeller must be a name of 1-64 letters, digits, spaces or . @ - _")
        return name

    def serve(self) -> None:
        """Serve until Ctrl-C; every label given is on disk already."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    app: LabelServer
    server_version = "diffalign-label"

    def log_message(self, format: str, *args: Any) -> None:  # the page's requests are not worth a line each
        pass

    timeout = REQUEST_TIMEOUT_S  # socketserver sets it on the connection: a stalled client times out

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        if self.app.token is None:
            return True
        given = self.headers.get("X-Token") or (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.app.token.encode())

    def _own_hosts(self) -> set[str]:
        """The ``Host`` values that name this server: its address and, when bound to loopback, localhost's names."""
        host, port = self.server.server_address[:2]
        names = {host, *LOCAL_HOSTS} if host in LOCAL_HOSTS else {host}
        return {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}

    def _refusal(self, write: bool) -> str | None:
        """Why a request without a token must be refused (see the module docstring), or None."""
        if self.app.token is not None:
            return None
        own = self._own_hosts()
        if self.headers.get("Host") not in own:
            return "the Host header does not name this server"
        origin = self.headers.get("Origin")
        if origin is not None and origin.removeprefix("http://") not in own:
            return "requests from other sites are refused"
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if write and content_type != "application/json":
            return "a label must be sent as application/json"
        return None

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _answer(self, work) -> None:
        try:
            self._json(HTTPStatus.OK, work())
        except BadRequest as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "this page needs its token (?token=...)"})
        if refused := self._refusal(write=False):
            return self._json(HTTPStatus.FORBIDDEN, {"error": refused})
        labeller = (query.get("labeller") or ["anonymous"])[0]
        if url.path == "/":
            return self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        if url.path == "/api/state":
            return self._answer(lambda: self.app.state(LabelServer._labeller({"labeller": labeller})))
        if match := re.fullmatch(r"/api/item/(\d+)", url.path):
            return self._answer(lambda: self.app.item(int(match[1]), LabelServer._labeller({"labeller": labeller})))
        if match := re.fullmatch(r"/(image|source)/(\d+)/(\d+)", url.path):
            what, index, k = match[1], int(match[2]), int(match[3])
            source = self.app.source
            item = source.item(index) if index < len(source) else None
            if item is None or k >= (item.images if what == "image" else item.sources):
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no {what} image {k} of item {index}"})
            try:
                body, content_type = page_image(source.image(index, k) if what == "image" else
                                                source.source_image(index, k))
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # undecodable, missing or too large
                return self._json(HTTPStatus.UNPROCESSABLE_ENTITY,
                                  {"error": f"{what} image {k} of item {index} cannot be shown ({type(err).__name__})"})
            return self._send(HTTPStatus.OK, body, content_type)
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if not self._authorised(parse_qs(url.query)):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "this page needs its token (?token=...)"})
        if refused := self._refusal(write=True):
            return self._json(HTTPStatus.FORBIDDEN, {"error": refused})
        actions = {"/api/label": self.app.label, "/api/undo": self.app.undo}
        if url.path not in actions:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no action {url.path}"})
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"a JSON body of at most {MAX_BODY} bytes is needed, "
                                                                 f"with its Content-Length (got {length[:20]!r})"})
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            return self._json(HTTPStatus.REQUEST_TIMEOUT, {"error": f"the body did not arrive in {self.timeout} s"})
        if len(raw) < int(length):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is shorter than its Content-Length"})
        try:
            body = json.loads(raw)
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
        if not isinstance(body, dict):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
        self._answer(lambda: actions[url.path](body))


def serve(source: Source, *, host: str, port: int, token: str | None) -> None:
    """Start the page over ``source`` and serve until Ctrl-C."""
    app = LabelServer(source, host=host, port=port, token=token)
    where = app.source.dataset_path or app.log.path
    print(f"labelling {len(source)} items ({source.kind}) at {app.url}\nlabels: {app.log.path} (every label written "
          f"as it is given); the dataset they make: {where}\nCtrl-C stops the page; running the same command "
          "again continues at the first unlabelled item", flush=True)
    if app.log.torn:
        print(f"note: {app.log.torn} was cut short (a crash while writing); that line is ignored", flush=True)
    app.serve()


__all__ = ["LabelServer", "serve"]
