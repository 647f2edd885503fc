"""Local servers for the remote-reading tests: a static HTTP server with Range support, and moto's S3.

Both run as subprocesses on 127.0.0.1 with a port the OS picks; the subprocess prints that port on
its first stdout line, and the tests stop it by its process id. Run by hand with
``python -m tests.sources.servers http ROOT [--fail-every N] [--latency S]`` or
``python -m tests.sources.servers moto``.

The HTTP server:

- answers ``Range: bytes=a-b`` with 206 and ``bytes=a-b,c-d`` with ``multipart/byteranges``;
- counts requests and bytes sent per path, read back as JSON from ``GET /__stats__``
  (``POST /__reset__`` zeroes them); control paths are not counted;
- with ``--fail-every N`` answers 503 to data requests 1, N+1, 2N+1 ... (a shared counter, so it
  is deterministic for a single client; the first request always fails, even for a one-range read);
  ``--fail-status CODE`` answers CODE instead of 503;
- with ``--latency S`` sleeps S seconds before every data answer;
- answers ``/status/CODE/...`` with that HTTP status (403, 500 ...) whatever the path, to test how
  errors are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_STATUS = re.compile(r"^/status/(\d{3})/")


@dataclass
class Stats:
    """Requests and bytes per path, and the data-request counter that drives injected failures."""

    requests: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    ranges: Counter = field(default_factory=Counter)
    times: list = field(default_factory=list)
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "bytes": dict(self.bytes),
                    "statuses": {str(k): v for k, v in self.statuses.items()},
                    "ranges": dict(self.ranges), "times": list(self.times), "count": self.count}

    def reset(self) -> None:
        with self.lock:
            for counter in (self.requests, self.bytes, self.statuses, self.ranges):
                counter.clear()
            self.times.clear()
            self.count = 0


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-d`` as inclusive ``(start, end)`` pairs clipped to the file; None when unsatisfiable."""
    if not header.startswith("bytes="):
        return None
    out = []
    for part in header[len("bytes="):].split(","):
        match = _RANGE.match(part)
        if match is None:
            return None
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            if last == "":
                return None
            start, end = max(size - int(last), 0), size - 1
        else:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        if start >= size or start > end:
            continue
        out.append((start, end))
    return out or None


def _read_range(file: Path, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (inclusive) of ``file``."""
    with open(file, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start + 1)


class RangeHandler(SimpleHTTPRequestHandler):
    """Serve files from ``server.root`` with byte ranges, counting, failures and latency."""

    protocol_version = "HTTP/1.1"  # keep-alive, as object stores answer
    server: RangeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/__reset__":
            self.server.stats.reset()
            self._send_bytes(200, b"{}", "application/json")
        else:
            self._send_bytes(405, b"", "text/plain")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/__stats__":
            self._send_bytes(200, json.dumps(self.server.stats.as_dict()).encode(), "application/json")
            return
        self._serve(head=False)

    def _send_bytes(self, status: int, body: bytes, ctype: str, head: bool = False,
                    headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _count(self, path: str, status: int, nbytes: int, ranges: str | None) -> None:
        stats = self.server.stats
        with stats.lock:
            stats.requests[path] += 1
            stats.bytes[path] += nbytes
            stats.statuses[status] += 1
            stats.times.append([time.monotonic(), path, status])
            if ranges:
                stats.ranges[path] += 1

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        stats = self.server.stats
        with stats.lock:
            stats.count += 1
            count = stats.count
        if self.server.latency:
            time.sleep(self.server.latency)
        if self.server.fail_every and (count - 1) % self.server.fail_every == 0:
            self._count(path, self.server.fail_status, 0, None)
            self._send_bytes(self.server.fail_status, b"slow down", "text/plain", head)
            return
        forced = _STATUS.match(path)
        if forced:
            code = int(forced.group(1))
            self._count(path, code, 0, None)
            self._send_bytes(code, b"<Error><Code>forced</Code></Error>", "application/xml", head)
            return
        file = (self.server.root / path.lstrip("/")).resolve()
        if self.server.root not in file.parents or not file.is_file():
            self._count(path, 404, 0, None)
            self._send_bytes(404, b"not found", "text/plain", head)
            return
        size = file.stat().st_size  # ranges are read from the file as asked, not the whole file per request
        header = self.headers.get("Range")
        ranges = parse_ranges(header, size) if header else None
        ctype = "application/json" if file.suffix == ".json" else "image/tiff"
        if header and ranges is None:
            self._count(path, 416, 0, header)
            self._send_bytes(416, b"", "text/plain", head, {"Content-Range": f"bytes */{size}"})
            return
        if not ranges:
            self._count(path, 200, 0 if head else size, None)
            self._send_bytes(200, file.read_bytes(), ctype, head, {"Accept-Ranges": "bytes"})
            return
        if len(ranges) == 1:
            start, end = ranges[0]
            body = _read_range(file, start, end)
            self._count(path, 206, 0 if head else len(body), header)
            self._send_bytes(206, body, ctype, head,
                             {"Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"})
            return
        boundary = "geobpbyteranges"
        parts = []
        for start, end in ranges:
            parts.append(f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {start}-{end}/{size}"
                         f"\r\n\r\n".encode() + _read_range(file, start, end) + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        self._count(path, 206, 0 if head else len(body), header)
        self._send_bytes(206, body, f"multipart/byteranges; boundary={boundary}", head)


class RangeServer(ThreadingHTTPServer):
    """A threading HTTP server over a folder, with the knobs :class:`RangeHandler` reads."""

    daemon_threads = True

    def __init__(self, root: Path, fail_every: int = 0, latency: float = 0.0, fail_status: int = 503) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root.resolve()
        self.fail_every = fail_every
        self.fail_status = fail_status
        self.latency = latency
        self.stats = Stats()


@dataclass
class ServerProcess:
    """A server subprocess: its process, and the base URL it answers on."""

    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        """The HTTP server's counters (see :class:`Stats`)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/__stats__", timeout=10) as answer:
            return json.loads(answer.read())

    def reset(self) -> None:
        """Zero the HTTP server's counters."""
        import urllib.request

        request = urllib.request.Request(f"{self.url}/__reset__", data=b"", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        """Stop the subprocess by its process id (terminate, then kill after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def start(kind: str, *args: str, timeout: float = 60.0) -> ServerProcess:
    """Start ``python -m tests.sources.servers KIND ARGS`` and wait for the port it prints."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    # stdin is a pipe the server watches: when this process dies, the server exits too (no orphans)
    process = subprocess.Popen([sys.executable, "-m", "tests.sources.servers", kind, *args], cwd=repo,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0].strip().isdigit():
        process.kill()
        process.wait()
        raise RuntimeError(f"the {kind} test server did not start (first line: {result[:1]!r})")
    return ServerProcess(process, int(result[0]))


def _exit_with_parent() -> None:
    """Exit when stdin closes: the test process that started this server has ended."""
    sys.stdin.read()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Run one server in the foreground, printing its port first."""
    parser = argparse.ArgumentParser(prog="python -m tests.sources.servers")
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http")
    http.add_argument("root", type=Path)
    http.add_argument("--fail-every", type=int, default=0)
    http.add_argument("--latency", type=float, default=0.0)
    http.add_argument("--fail-status", type=int, default=503)
    sub.add_parser("moto")
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if args.kind == "http":
        server = RangeServer(args.root, args.fail_every, args.latency, args.fail_status)
        print(server.server_address[1], flush=True)
        server.serve_forever()
    else:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        print(moto.get_host_and_port()[1], flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
