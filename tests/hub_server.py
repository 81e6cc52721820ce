"""A local HTTP server speaking the Hugging Face Hub's protocol for the endpoints expo-ray and
huggingface_hub use, serving model folders from disk and counting the bytes it sends.

Endpoints: ``GET /api/models/{repo}/revision/{rev}`` (model info, file sizes with
``blobs=true``), ``GET /api/models/{repo}/tree/{rev}`` (file listing, as ``snapshot_download``
asks), ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (with ``Range``; the commit in
``X-Repo-Commit``, the file's sha256 as ``ETag``). Set ``token`` to require
``Authorization: Bearer <token>`` (a gated model). Bound to 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubServer:
    def __init__(self):
        self.repos: dict[str, tuple[str, Path, dict]] = {}  # repo -> (commit, folder, {path: (size, sha256)})
        self.token: str | None = None
        self.lock = threading.Lock()
        self.served: list[tuple[str, str, int, int]] = []  # (repo, path, start, end) of every file body sent
        self.api_calls = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, repo: str, folder: str | os.PathLike) -> str:
        """Publish ``folder`` as ``repo``; returns its commit (a hash of the files)."""
        folder = Path(folder)
        files = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = (path.stat().st_size,
                                                              hashlib.sha256(path.read_bytes()).hexdigest())
        commit = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
        self.repos[repo] = (commit, folder, files)
        return commit

    def reset_counts(self) -> None:
        with self.lock:
            self.served.clear()
            self.api_calls = 0

    def bytes_served(self, repo: str | None = None, suffix: str = "") -> int:
        with self.lock:
            return sum(e - s for r, p, s, e in self.served if (repo is None or r == repo) and p.endswith(suffix))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, value, status=200):
                self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _error(self, status: int, message: str):
                self._send(status, json.dumps({"error": message}).encode(),
                           {"Content-Type": "application/json", "X-Error-Message": message})

            def _authorized(self) -> bool:
                if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._error(401, "Invalid credentials in Authorization header")
                return False

            def _repo(self, repo: str, rev: str):
                if repo not in hub.repos:
                    self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                    return None
                commit, folder, files = hub.repos[repo]
                if rev not in ("main", commit):
                    self._send(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
                    return None
                return commit, folder, files

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

            def _route(self, head: bool):
                path = unquote(urlparse(self.path).path)
                if not self._authorized():
                    return
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
                if m:
                    found = self._repo(m.group(1), m.group(2))
                    if found:
                        commit, _, files = found
                        with hub.lock:
                            hub.api_calls += 1
                        self._json({"id": m.group(1), "sha": commit, "private": False, "siblings": [
                            {"rfilename": p, "size": size, "blobId": sha[:40]} for p, (size, sha) in files.items()]})
                    return
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if m:
                    found = self._repo(m.group(1), m.group(2))
                    if found:
                        _, _, files = found
                        with hub.lock:
                            hub.api_calls += 1
                        under = (m.group(3) or "").strip("/")
                        self._json([{"type": "file", "oid": sha[:40], "size": size, "path": p}
                                    for p, (size, sha) in files.items() if not under or p.startswith(under + "/")])
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    found = self._repo(m.group(1), m.group(2))
                    if not found:
                        return
                    commit, folder, files = found
                    if m.group(3) not in files:
                        self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
                        return
                    size, sha = files[m.group(3)]
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
                    start, end, status = 0, size, 200
                    wanted = self.headers.get("Range")
                    if wanted:
                        r = RANGE_RE.match(wanted)
                        if not r or int(r.group(1)) >= size:
                            self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                            return
                        start = int(r.group(1))
                        end = min(size, int(r.group(2)) + 1) if r.group(2) else size
                        status = 206
                        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
                    headers["Content-Length"] = str(end - start)
                    if head:
                        self._send(status, b"", headers, head=True)
                        return
                    with open(folder / m.group(3), "rb") as f:
                        f.seek(start)
                        body = f.read(end - start)
                    with hub.lock:
                        hub.served.append((m.group(1), m.group(3), start, end))
                    self._send(status, body, headers)
                    return
                self._error(404, f"no such endpoint: {path}")

        return Handler
