"""A local HTTP server for the fetch tests and benchmarks: files of a folder at their paths.

Answers HEAD and GET like S3 and the Hugging Face hub do for what brainrobust asks: Content-Length,
a strong ETag (the content MD5, as S3 gives for single-part uploads), X-Repo-Commit (which
huggingface_hub requires), single byte ranges (206), If-Range and If-Match. Faults on demand:
`drop_after[path] = n` sends n bytes of the next GET of that path and closes the connection;
`slow[path] = seconds` per 64 KiB slows its bodies down so a test can kill a client mid-file.
Counts requests and body bytes per path.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Self

_BLOCK = 1 << 16


class FolderServer:
    def __init__(self, folder: str | Path, aliases: dict[str, Path] | None = None,
                 md5_etags: bool = True):
        """Serve `folder`; `aliases` maps extra URL paths (no leading slash) to files.

        md5_etags=False gives ETags like S3's multipart ones (not an MD5), which cost no read
        of the file: for the benchmarks' GB-sized files.
        """
        self.folder = Path(folder)
        self.md5_etags = md5_etags
        self.aliases = dict(aliases or {})
        self.drop_after: dict[str, int] = {}
        self.slow: dict[str, float] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.body_bytes: Counter[str] = Counter()
        self._etags: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def file(self, path: str) -> Path | None:
        path = path.split("?")[0].lstrip("/")
        found = self.aliases.get(path) or self.folder / path
        return found if found.is_file() and ".." not in Path(path).parts else None

    def etag(self, file: Path) -> str:
        stat = file.stat()
        key = (file, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._etags and not self.md5_etags:
                self._etags[key] = hashlib.md5(repr(key).encode()).hexdigest() + "-1"
            elif key not in self._etags:
                with open(file, "rb") as fh:
                    self._etags[key] = hashlib.file_digest(fh, "md5").hexdigest()
            return self._etags[key]

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, send_body: bool) -> None:
                with server._lock:
                    server.requests.append((self.command, self.path, self.headers.get("Range")))
                file = server.file(self.path)
                if file is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size, etag = file.stat().st_size, server.etag(file)
                start, stop, status = 0, size, 200
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if self.headers.get("If-Match") not in (None, f'"{etag}"'):
                    status = 412
                elif wanted and (if_range is None or if_range == f'"{etag}"'):
                    start = int(wanted.group(1))
                    stop = min(size, int(wanted.group(2)) + 1) if wanted.group(2) else size
                    status = 206
                self.send_response(status)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("Accept-Ranges", "bytes")
                if status == 412:
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.send_header("Content-Length", str(stop - start))
                self.end_headers()
                if send_body:
                    self._send(file, start, stop)

            def _send(self, file: Path, start: int, stop: int) -> None:
                key = self.path.split("?")[0].lstrip("/")
                with server._lock:
                    limit = server.drop_after.pop(key, None)
                end = stop if limit is None else min(stop, start + limit)
                with open(file, "rb") as fh:
                    fh.seek(start)
                    while start < end:
                        block = fh.read(min(_BLOCK, end - start))
                        self.wfile.write(block)
                        start += len(block)
                        with server._lock:
                            server.body_bytes[key] += len(block)
                        if server.slow.get(key):
                            threading.Event().wait(server.slow[key])
                if limit is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

        return Handler
