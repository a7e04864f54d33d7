"""A stand-in for Kaggle's API on 127.0.0.1:80, for the official client with ``KAGGLE_API_ENVIRONMENT=LOCALHOST``.

The real ``kaggle`` client (and its ``kagglesdk``) talks to it over HTTP exactly as
to api.kaggle.com: the download request with its ``Authorization`` header, a
redirect, then the archive. Tests use it to exercise hcd's Kaggle code at the
client's API boundary — success, refused rules, bad tokens — with the client's
verbose and debug switches on, and to check that the key is sent (so the test
is real) yet never printed.
"""

from __future__ import annotations

import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PORT = 80  # KAGGLE_API_ENVIRONMENT=LOCALHOST makes the client call http://localhost/api/v1/…
DOWNLOAD = "/api/v1/competitions.CompetitionApiService/DownloadDataFiles"
START_UPLOAD = "/api/v1/competitions.CompetitionApiService/StartSubmissionUpload"  # hcd submit: ask where to upload
CREATE_SUBMISSION = "/api/v1/competitions.CompetitionApiService/CreateSubmission"  # then the PUT, then this


class FakeKaggle:
    def __init__(self, archive: Path, status: int = 200) -> None:
        self.archive = archive
        self.status = status  # 200: serve; 401 / 403 / 404: refuse the download request
        self.auth_headers: list[str] = []
        self.requests: list[str] = []
        self.uploaded: bytes | None = None  # the submission file the client PUT
        self.submissions: list[bytes] = []  # CreateSubmission request bodies (the message is in them)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _record(self) -> None:
                fake.requests.append(f"{self.command} {self.path}")
                if self.headers.get("Authorization"):
                    fake.auth_headers.append(self.headers["Authorization"])

            def do_POST(self) -> None:
                self._record()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path in (START_UPLOAD, CREATE_SUBMISSION):
                    if fake.status != 200:
                        return self._send(fake.status, b'{"code": %d, "message": "refused"}' % fake.status, "application/json")
                    if self.path == START_UPLOAD:
                        return self._send(200, b'{"token": "blob-token-1", "createUrl": "http://localhost/upload/submission"}', "application/json")
                    fake.submissions.append(body)
                    return self._send(200, b'{"message": "Successfully submitted to Histopathologic Cancer Detection"}', "application/json")
                if self.path != DOWNLOAD:
                    return self._send(404, b'{"code": 404, "message": "not found"}', "application/json")
                if fake.status != 200:
                    return self._send(fake.status, b'{"code": %d, "message": "refused"}' % fake.status, "application/json")
                self.send_response(302)
                self.send_header("Location", "http://localhost/files/histopathologic-cancer-detection.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_PUT(self) -> None:
                self._record()
                fake.uploaded = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(200, b"{}", "application/json")

            def do_GET(self) -> None:
                self._record()
                if not self.path.startswith("/files/"):
                    return self._send(404, b"not found", "text/plain")
                self._send(200, fake.archive.read_bytes(), "application/zip")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", formatdate(0, usegmt=True))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKaggle:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
