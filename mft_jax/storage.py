"""Paths that may be local or on Cloud Storage (gs://), and the few operations object storage does differently.

A path is local unless it starts with `gs://`. `path(p)` gives a `pathlib.Path` for a local one and an
`etils.epath.Path` (backed by gcsfs) for a gs:// one: both take `/`, `.name`, `.parent`, `exists`, `is_file`,
`is_dir`, `iterdir`, `glob`, `read_text`, `write_text`, `mkdir` and `open`, which is what the run directory,
checkpoint discovery, the safetensors reader and writer and the output directories use. orbax writes gs://
itself (TensorStore, straight to the bucket). What object storage does not have, and what we do instead:
  - rename: an object write is atomic by itself, so `write_atomic` writes the object once; a directory move is
    a server-side copy of each object, then deletes (`move`), never atomic (callers keep a marker for it);
  - append: `append_text` composes the old object with a new one (one server-side call, atomic; O(record));
  - flock: `Lease` (below) is the one-writer rule of a run directory.
The Cloud Storage client finds an emulator through STORAGE_EMULATOR_HOST (tests); TensorStore through
TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REMOTE_PREFIX = "gs://"


class StorageError(OSError):
    """A Cloud Storage path cannot be used (client missing, bucket unreachable); the message names the fix."""


def is_remote(p: Any) -> bool:
    return str(p).startswith(REMOTE_PREFIX)


def path(p: str | os.PathLike):
    """`pathlib.Path` (user home expanded) for a local path, `etils.epath.Path` for gs://."""
    if not is_remote(p):
        return Path(os.path.expanduser(str(p)))
    _check_client()
    from etils import epath

    return epath.Path(str(p))


def absolute(p: str | os.PathLike):
    """The absolute form of a local path; a gs:// path is absolute already."""
    return path(p) if is_remote(p) else path(p).absolute()


@functools.lru_cache(maxsize=None)
def _check_client() -> None:
    try:
        import gcsfs  # noqa: F401  (etils.epath reads gs:// through it)
        from google.cloud import storage  # noqa: F401
    except ImportError as e:
        raise StorageError(f"gs:// paths need gcsfs and google-cloud-storage ({e}); install them with "
                           f"`pip install gcsfs` (launch/install.sh installs them)") from None


def filesystem():
    """gcsfs's filesystem (fsspec caches one instance per process)."""
    _check_client()
    import fsspec

    return fsspec.filesystem("gs")


@contextlib.contextmanager
def _named(url):
    """Cloud Storage API errors as one `StorageError` line naming the URL and the fix."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        from google.api_core import exceptions as api

        bucket = split(str(url))[0]
        if isinstance(e, api.NotFound):
            raise StorageError(f"{url}: not found (does the bucket gs://{bucket} exist? create it with `gcloud "
                               f"storage buckets create gs://{bucket}`, or fix the path)") from None
        if isinstance(e, (api.Forbidden, api.Unauthorized)):
            raise StorageError(f"{url}: access denied ({e.code}); give this machine's account read and write access "
                               f"to gs://{bucket}, or log in with `gcloud auth application-default login`") from None
        raise


def split(url: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, name = str(url)[len(REMOTE_PREFIX):].partition("/")
    return bucket, name.strip("/")


@functools.lru_cache(maxsize=None)
def client():
    """One google-cloud-storage client per process (anonymous on an emulator)."""
    _check_client()
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="mft-jax", credentials=AnonymousCredentials())
    return storage.Client()


def blob(url: str):
    bucket, name = split(url)
    return client().bucket(bucket).blob(name)


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------

def write_atomic(p, text: str) -> None:
    """Writes `p` so that a reader never sees half of it: a local temporary sibling renamed into place, or one
    object write (atomic on Cloud Storage)."""
    if is_remote(p):
        with _named(p):
            blob(str(p)).upload_from_string(text.encode())
        return
    p = Path(p)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def append_text(p, text: str) -> None:
    """Appends to a file; on Cloud Storage the object is composed with a new one holding `text` (atomic: a reader
    sees the record whole or not at all), so each append costs one record, not the whole file."""
    if not is_remote(p):
        with open(p, "a") as f:
            f.write(text)
        return
    with _named(p):
        target = blob(str(p))
        if not target.exists():
            target.upload_from_string(text.encode())
            return
        bucket, name = split(str(p))
        part = client().bucket(bucket).blob(f"{name}.part-{socket.gethostname()}-{os.getpid()}")
        part.upload_from_string(text.encode())
        try:
            target.compose([target, part])
        finally:
            part.delete()


def copy_file(src, dst) -> None:
    """Copies one file between any two of local and gs:// (server-side when both are gs://)."""
    if is_remote(src) and is_remote(dst):
        source = blob(str(src))
        bucket, name = split(str(dst))
        source.bucket.copy_blob(source, client().bucket(bucket), name)
    elif not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
    elif is_remote(dst):
        blob(str(dst)).upload_from_filename(str(src))
    else:
        blob(str(src)).download_to_filename(str(dst))


def objects(prefix_url: str) -> list[str]:
    """The names (relative to the prefix) of every object under a gs:// directory, recursively."""
    bucket, name = split(prefix_url)
    prefix = f"{name}/" if name else ""
    with _named(prefix_url):
        return [b.name[len(prefix):] for b in client().list_blobs(bucket, prefix=prefix)]


def remove_tree(p) -> None:
    """Removes a directory and everything under it (local or gs://)."""
    if is_remote(p):
        bucket, name = split(str(p))
        for entry in objects(str(p)):
            client().bucket(bucket).blob(f"{name}/{entry}").delete()
    else:
        shutil.rmtree(p)


def move_tree(src, dst) -> None:
    """Moves a directory: a rename locally; on Cloud Storage a server-side copy of each object, then the
    deletes (not atomic: callers mark completeness themselves)."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    for entry in objects(str(src)):
        copy_file(f"{src}/{entry}", f"{dst}/{entry}")
    remove_tree(src)


def local_cache(url) -> Path:
    """The local directory that mirrors a gs:// path: $MFT_JAX_CACHE (default ~/.cache/mft_jax)/gcs/BUCKET/PATH."""
    bucket, name = split(str(url))
    root = Path(os.environ.get("MFT_JAX_CACHE", "~/.cache/mft_jax")).expanduser() / "gcs" / bucket
    cache = root / name if name else root
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def local_copy(directory, names: list[str] | None = None) -> Path:
    """A local directory holding `names` (default: every file directly in `directory` below 64 MiB, i.e. the
    config and tokenizer files, not the weights) of a gs:// directory, for readers that need a local path
    (transformers' tokenizer loading). Cached under $MFT_JAX_CACHE (default ~/.cache/mft_jax)/gcs/, refreshed
    when an object's generation changes. A local directory is returned as it is."""
    if not is_remote(directory):
        return Path(os.path.expanduser(str(directory)))
    bucket, name = split(str(directory))
    cache = local_cache(directory)
    prefix = f"{name}/" if name else ""
    for b in client().list_blobs(bucket, prefix=prefix, delimiter="/"):
        entry = b.name[len(prefix):]
        if not entry or (names is not None and entry not in names) or (names is None and b.size > 64 << 20):
            continue
        stamp = cache / f".{entry}.generation"
        if (cache / entry).is_file() and stamp.is_file() and stamp.read_text() == str(b.generation):
            continue
        tmp = cache / f".{entry}.{os.getpid()}.tmp"
        b.download_to_filename(str(tmp))
        os.replace(tmp, cache / entry)
        stamp.write_text(str(b.generation))
    return cache


# --------------------------------------------------------------------------------------------------------
# One writer per run directory on Cloud Storage
# --------------------------------------------------------------------------------------------------------

class Lease:
    """The one-writer rule of a gs:// run directory: an object RUN/.lock created only if absent (a generation
    precondition, checked by Cloud Storage itself), renewed by its holder every `ttl_s / 4` seconds under the
    precondition that it is still the generation the holder wrote, and deleted on exit.

    Why a lease and not the pod's coordination: two *jobs* (a relaunch while the first is still running, two
    users on one bucket) do not share a coordinator; only the bucket sees both. Within one job only process 0
    holds it. A holder killed outright leaves the object behind; it is taken over when it is stale: not renewed
    for `ttl_s` seconds, or held by a process of this host that no longer exists. A holder that finds its lease
    taken (it was frozen past the ttl) stops at once: two writers in one run directory would corrupt it."""

    def __init__(self, url: str, ttl_s: float = 60.0, on_lost=None):
        self.url = url
        self.ttl_s = ttl_s
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost = on_lost or _lease_lost

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "renewed": time.time(),
                           "ttl_s": self.ttl_s,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()

    def acquire(self) -> dict | None:
        """Takes the lease; returns None, or the holder's record when another live holder has it."""
        with _named(self.url):
            return self._acquire()

    def _acquire(self) -> dict | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        target = blob(self.url)
        for _ in range(5):
            try:
                target.upload_from_string(self._record(), if_generation_match=0)
                self.generation = target.generation
                break
            except PreconditionFailed:
                pass
            try:
                held = client().bucket(target.bucket.name).get_blob(target.name)
            except NotFound:
                continue
            if held is None:
                continue
            try:
                holder = json.loads(held.download_as_bytes(if_generation_match=held.generation) or b"{}")
            except (PreconditionFailed, NotFound):
                continue
            except ValueError:
                holder = {}
            if not _stale(holder):
                return holder
            try:  # take over the stale lease, unless someone else did meanwhile
                target.upload_from_string(self._record(), if_generation_match=held.generation)
                self.generation = target.generation
                break
            except PreconditionFailed:
                continue
        else:
            raise StorageError(f"{self.url}: the run's lease object keeps changing; another process is taking it")
        self._thread = threading.Thread(target=self._renew, name="mft_jax-lease", daemon=True)
        self._thread.start()
        return None

    def _renew(self) -> None:
        from google.api_core.exceptions import PreconditionFailed

        while not self._stop.wait(self.ttl_s / 4):
            target = blob(self.url)
            try:
                target.upload_from_string(self._record(), if_generation_match=self.generation)
                self.generation = target.generation
            except PreconditionFailed:
                self.generation = None  # not ours any more: release must not delete it
                self._on_lost(self.url)
                return
            except Exception as e:  # a network hiccup: try again at the next renewal (the ttl covers three)
                print(f"warning: renewing the run's lease {self.url} failed ({type(e).__name__}); retrying",
                      file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None:
            try:
                blob(self.url).delete(if_generation_match=self.generation)
            except Exception:  # taken over, or gone: not ours to delete any more
                pass
            self.generation = None


def _stale(holder: dict) -> bool:
    renewed = holder.get("renewed")
    if not isinstance(renewed, (int, float)):
        return True
    if time.time() - renewed > float(holder.get("ttl_s", 60.0)):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def _lease_lost(url: str) -> None:
    print(f"error: another process took over the run directory's lease {url} (this one was frozen for longer "
          f"than the lease lasts); stopping at once so that two writers never share the run", file=sys.stderr,
          flush=True)
    os._exit(75)
