"""Small HTTP servers on 127.0.0.1 that misbehave as a broken Hub, a proxy or a hostile server would.

    with HangingServer() as url: ...            # accepts connections, never answers
    with CannedServer(200, b"<html>") as url:   # answers every request with the same status and body
    with EchoAuthServer(500) as url: ...        # quotes the Authorization header back in its error message

Each runs on a random port in a daemon thread and is stopped (its sockets closed) on exit.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HangingServer", "CannedServer", "EchoAuthServer", "point_hub_at"]


class HangingServer:
    """Accepts TCP connections and reads nothing, writes nothing: a server that never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()

    def __enter__(self) -> str:
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)  # keep it open, never answer

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for conn in self._held:
            conn.close()
        self._sock.close()


class _Server:
    handler: type[BaseHTTPRequestHandler]

    def __enter__(self) -> str:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _answer(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body, headers = owner.reply(self)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer


class CannedServer(_Server):
    """Answers every request with ``status`` and ``body`` (``content_type`` as given)."""

    handler = _Handler

    def __init__(self, status: int, body: bytes, content_type: str = "text/html") -> None:
        self.status, self.body, self.content_type = status, body, content_type

    def reply(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        return self.status, self.body, {"Content-Type": self.content_type}


class EchoAuthServer(_Server):
    """Answers ``status`` with the request's Authorization header quoted in the body and in X-Error-Message,
    as some proxies and misconfigured servers do; records the tokens it saw."""

    handler = _Handler

    def __init__(self, status: int = 500) -> None:
        self.status = status
        self.seen: list[str] = []

    def reply(self, request: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        message = f"bad request, your header was: Authorization: {auth}"
        body = ('{"error": "%s"}' % message).encode()
        return self.status, body, {"Content-Type": "application/json", "X-Error-Message": message}


def point_hub_at(monkeypatch: Any, url: str) -> None:
    """Redirect huggingface_hub (already set up by the ``hub_env`` fixture) to ``url``."""
    import sys

    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    for name, module in list(sys.modules.items()):
        if name.startswith("huggingface_hub.") and module is not constants:
            if isinstance(getattr(module, "ENDPOINT", None), str):
                monkeypatch.setattr(module, "ENDPOINT", url)
            if isinstance(getattr(module, "HUGGINGFACE_CO_URL_TEMPLATE", None), str):
                monkeypatch.setattr(module, "HUGGINGFACE_CO_URL_TEMPLATE", template)
