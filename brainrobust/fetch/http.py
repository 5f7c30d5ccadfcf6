"""HTTP for the fetch commands: HEAD, range reads and resumable downloads (standard library only).

Connections are kept alive per thread and host: a --roi-only fetch makes thousands of range
requests, and a new TLS handshake for each would cost more than its bytes. Redirects are
followed (Hugging Face resolve URLs redirect to a CDN). A dropped connection, a short body or a
5xx answer is retried with backoff, resuming at the byte where the transfer stopped; what cannot
be retried ends as one FetchError line naming the URL.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from brainrobust.errors import BrainRobustError, StorageError

T = TypeVar("T")
USER_AGENT = "brainrobust-fetch"
PART_PREFIX = ".partial."  # a download in progress: hidden, same suffix (nibabel reads by it)
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 8
_BODY_BLOCK = 1 << 20
RETRIES = 5  # a failure worth retrying is retried this often, after BACKOFF x 1, 2, 4, ... s
BACKOFF = 0.5


class FetchError(BrainRobustError):
    """A server cannot be reached, refuses a request or sends other bytes than it announced."""


class NotFound(FetchError):
    """The server has no such file (HTTP 404, or 403 from a bucket that hides absent keys)."""


class _Retry(Exception):
    """A failure worth another attempt: a 5xx or 429 answer, a dropped connection, a short body."""


@contextlib.contextmanager
def disk_errors(where: Path) -> Iterator[None]:
    """A failed write (full disk, no permission) as one line; the network's errors are
    FetchErrors by the time they get here, so any OSError left is the disk's."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(f"cannot write under {where}: {err.strerror or err}; free space or fix "
                           "the permissions there, then run the same command again (it resumes)"
                           ) from None


@dataclass(frozen=True)
class Remote:
    """A file on a server as its HEAD answer describes it."""

    url: str
    size: int
    etag: str | None

    @property
    def md5(self) -> str | None:
        """The content MD5 when the ETag is one (S3 objects uploaded in a single part)."""
        return self.etag if self.etag and re.fullmatch(r"[0-9a-f]{32}", self.etag) else None


class Client:
    """Thread-safe HTTP client; `requests` and `bytes_received` count what it cost."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_received = 0

    def _pool(self) -> dict:
        if not hasattr(self._local, "pool"):
            self._local.pool = {}
        return self._local.pool

    def _drop(self, url: str) -> None:
        """Forget this thread's connection to `url`'s host: after an error its state is unknown."""
        parts = urlsplit(url)
        conn = self._pool().pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def _count(self, requests: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_received += nbytes

    def _open(self, method: str, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The 2xx response to a request, after redirects."""
        for _ in range(_MAX_REDIRECTS):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise FetchError(f"cannot fetch {url}: only http:// and https:// addresses work")
            key = (parts.scheme, parts.netloc)
            conn = self._pool().get(key)
            if conn is None:
                kind = http.client.HTTPSConnection if parts.scheme == "https" else \
                    http.client.HTTPConnection
                conn = self._pool()[key] = kind(parts.netloc, timeout=self.timeout)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(method, target, headers={"User-Agent": USER_AGENT, **headers})
                resp = conn.getresponse()
                self._count(requests=1)
                if resp.status not in (200, 206):
                    resp.read()  # a small error or redirect body; reading it keeps the connection
            except (OSError, http.client.HTTPException) as err:
                self._drop(url)
                raise _Retry(f"{method} {url} failed ({err or type(err).__name__})") from None
            if resp.status in _REDIRECTS and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status >= 500 or resp.status == 429:
                raise _Retry(f"{method} {url} answered HTTP {resp.status} {resp.reason}")
            if resp.status == 412:  # If-Match / If-Range are the only conditions ever sent
                raise FetchError(f"{url} changed on the server during the fetch; run the same "
                                 "command again")
            if resp.status >= 400:
                refusal = NotFound if resp.status in (403, 404) else FetchError
                raise refusal(f"{method} {url} answered HTTP {resp.status} {resp.reason}; "
                              "check the address (--base-url) and the file name")
            return resp
        raise FetchError(f"{url} redirects more than {_MAX_REDIRECTS} times; check --base-url")

    def _retrying(self, attempt: Callable[[], T]) -> T:
        failures = 0
        while True:
            try:
                return attempt()
            except _Retry as err:
                if failures == RETRIES:
                    raise FetchError(f"{err}, and {RETRIES} retries; check the network and run "
                                     "the same command again (it resumes)") from None
                time.sleep(BACKOFF * 2**failures)
                failures += 1

    def head(self, url: str) -> Remote:
        def attempt() -> Remote:
            resp = self._open("HEAD", url, {"Accept-Encoding": "identity"})
            resp.read()
            size = resp.getheader("Content-Length")
            if size is None:
                raise FetchError(f"{url} announces no size (no Content-Length); the download "
                                 "could not be checked or resumed")
            etag = resp.getheader("ETag")
            return Remote(url, int(size), etag.removeprefix("W/").strip('"') if etag else None)

        return self._retrying(attempt)

    def read_range(self, remote: Remote, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of `remote`; refused if the file changed since its HEAD."""

        def attempt() -> bytes:
            headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
            if remote.etag:
                headers["If-Match"] = f'"{remote.etag}"'
            resp = self._open("GET", remote.url, headers)
            if resp.status != 206:
                self._drop(remote.url)  # do not read a whole file we did not ask for
                raise FetchError(f"{remote.url} ignores Range requests (HTTP {resp.status}); "
                                 "--roi-only needs a server that honours them")
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException) as err:
                self._drop(remote.url)
                raise _Retry(f"GET {remote.url} broke off ({err})") from None
            self._count(nbytes=len(data))
            if len(data) != stop - start:
                self._drop(remote.url)
                raise _Retry(f"GET {remote.url} sent {len(data)} of {stop - start} bytes")
            return data

        return self._retrying(attempt)

    def download(self, remote: Remote, part: Path,
                 progress: Callable[[int], object] = lambda n: None) -> None:
        """Bring `part` to the `remote.size` bytes of `remote`, resuming from what it holds."""

        def attempt() -> None:
            have = part.stat().st_size if part.exists() else 0
            if have == remote.size:
                return
            headers = {"Accept-Encoding": "identity"}
            if 0 < have < remote.size:
                headers["Range"] = f"bytes={have}-"
                if remote.etag:  # a changed file comes back whole (200), not as a wrong tail
                    headers["If-Range"] = f'"{remote.etag}"'
            resp = self._open("GET", remote.url, headers)
            if resp.status == 200:
                have = 0
            elif not (resp.getheader("Content-Range") or "").startswith(f"bytes {have}-"):
                self._drop(remote.url)
                raise FetchError(f"{remote.url} answered a range request with "
                                 f"{resp.getheader('Content-Range')!r}; delete {part} and retry")
            # Only the network's errors are retried: a full disk is the caller's to report.
            with open(part, "r+b" if have else "wb") as fh:
                fh.seek(have)
                fh.truncate()
                while True:
                    try:
                        block = resp.read(_BODY_BLOCK)
                    except (OSError, http.client.HTTPException) as err:
                        self._drop(remote.url)
                        raise _Retry(f"GET {remote.url} broke off at byte {fh.tell()} ({err})") \
                            from None
                    if not block:
                        break
                    fh.write(block)
                    self._count(nbytes=len(block))
                    progress(len(block))
                got = fh.tell()
            if got != remote.size:
                self._drop(remote.url)
                raise _Retry(f"GET {remote.url} stopped at byte {got} of {remote.size}")

        part.parent.mkdir(parents=True, exist_ok=True)
        self._retrying(attempt)


class RangeFile(io.RawIOBase):
    """A read-only file over HTTP range requests, for h5py to parse a remote file's metadata.

    HDF5 reads its metadata in many small pieces, so reads are rounded out to whole blocks and
    the most recent blocks are kept.
    """

    def __init__(self, client: Client, remote: Remote, block: int = 1 << 16, keep: int = 64):
        super().__init__()
        self.client, self.remote, self.block, self.keep = client, remote, block, keep
        self.pos = 0
        # h5py turns an exception in a read into "cannot open file": keep the real one.
        self.failure: FetchError | None = None
        self.blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.remote.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer) -> int:
        stop = min(self.pos + len(buffer), self.remote.size)
        if stop <= self.pos:
            return 0
        first, last = self.pos // self.block, (stop - 1) // self.block
        missing = [b for b in range(first, last + 1) if b not in self.blocks]
        if missing:  # one request for the span of the missing blocks
            lo, hi = missing[0], missing[-1]
            try:
                data = self.client.read_range(self.remote, lo * self.block,
                                              min((hi + 1) * self.block, self.remote.size))
            except FetchError as err:
                self.failure = err
                raise
            for b in range(lo, hi + 1):
                self.blocks[b] = data[(b - lo) * self.block:(b - lo + 1) * self.block]
        view, filled = memoryview(buffer).cast("B"), 0
        for b in range(first, last + 1):
            self.blocks.move_to_end(b)
            lo = max(self.pos, b * self.block) - b * self.block
            hi = min(stop, (b + 1) * self.block) - b * self.block
            view[filled:filled + hi - lo] = self.blocks[b][lo:hi]
            filled += hi - lo
        while len(self.blocks) > self.keep:
            self.blocks.popitem(last=False)
        self.pos = stop
        return filled
