"""Output directories that never destroy what the user had.

Every directory mft_jax writes (`convert`, `apply-masks`, `export`, `demo`, each `hf/` inside them) carries a
marker file, `.mft_jax_output.json` (command, time, inputs, host and pid of the writer, complete or not). The
rules, checked by `check_target` before any work starts, each refusal one line (`OutputError`):
  - an existing target is replaced only if it is an earlier output of ours (the marker), an empty directory,
    or with `overwrite=True`; never a file, and never the filesystem root, the home or current directory, or
    one of their ancestors (`--out ..` or `--out /` empty nothing, even with --overwrite);
  - a target equal to, inside, or above (an ancestor of) any input is refused, even with --overwrite;
  - a target that another live mft_jax process is writing is refused.

Two ways to write:
  `with new_dir(target, inputs=[...]) as tmp:`  write everything into `tmp`, a new hidden sibling
      `.NAME.tmp-HOST-PID-RANDOM`; on success it is renamed into place (an earlier target is first renamed
      aside to `.NAME.old-...`, then removed, so a crash in between leaves one of the two, never neither);
      on an exception the temporary directory is removed and the target is untouched.
  `with claimed_dir(target, inputs=[...]) as out:`  for long writers whose files must keep their final paths
      (the demo: its runs record absolute paths): writes in place into the target, marked incomplete until
      done; an earlier output is moved aside first and removed when the new one completes, restored if it fails.
Leftovers of killed writers are recognised by their names and markers and cleaned (or restored) the next
time the same target is written; nothing without our name pattern and marker is ever removed.

On Cloud Storage (a gs:// target) there is no rename and no directory: `new_dir` yields a temporary sibling
prefix that every writer (orbax included) writes straight into, marker first (incomplete) and last
(complete); the target is then replaced by server-side copies, its marker last, so a reader that checks the
marker never takes a half-copied output for a whole one. The same rules refuse a target that holds objects
not written by mft-jax, or that is, holds or lies inside an input. `claimed_dir` (the demo) is local only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterable, Iterator

from mft_jax import storage
from mft_jax.config import ConfigError

MARKER = ".mft_jax_output.json"
FORMAT = "mft_jax.output/1"
_ACTIVE: set[Path] = set()  # temporary / claimed directories this process is writing now


class OutputError(ConfigError):
    """An output path would destroy or overlap what the user had; the message names it and the way out."""


# --------------------------------------------------------------------------------------------------------
# Markers and leftovers
# --------------------------------------------------------------------------------------------------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def read_marker(path: str | Path) -> dict | None:
    """The marker of an output directory of ours, or None (no marker, unreadable, or not ours)."""
    try:
        marker = json.loads((storage.path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def is_ours(path: str | Path) -> bool:
    return read_marker(path) is not None


def _write_marker(directory: Path, command: str, inputs: list[str], complete: bool) -> None:
    marker = {"format": FORMAT, "command": command, "inputs": inputs, "complete": complete,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "pid": os.getpid()}
    storage.write_atomic(directory / MARKER, json.dumps(marker, indent=2) + "\n")


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-([A-Za-z0-9]+)-(\d+)-[0-9a-f]{{8}}")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _writer_alive(host: str, pid: int, path: Path) -> bool | None:
    """Whether the writer of a leftover still runs: None when it ran on another host (cannot tell)."""
    if host != _host() or pid <= 0:
        return None
    if pid == os.getpid():
        return path in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[Path, str, bool | None]]:
    """(path, 'tmp' | 'old', writer alive?) for each leftover sibling of `target` named by our pattern."""
    pattern = _leftover_pattern(target.name)
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            yield path, match.group(1), _writer_alive(match.group(2), int(match.group(3)), path)


def remove_tree(path: Path) -> None:
    """Removes one of our directories, its marker last (an interrupted removal stays recognisable as ours)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for child in path.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def _dead_partial(path: Path) -> bool:
    """An incomplete output of ours whose writer is gone (a killed `claimed_dir` writer)."""
    marker = read_marker(path)
    if marker is None or marker.get("complete", True):
        return False
    host = re.sub(r"[^A-Za-z0-9]", "", str(marker.get("host", "")))[:24]
    pid = marker.get("pid")
    return isinstance(pid, int) and _writer_alive(host, pid, path) is False


def clean_leftovers(target: Path) -> None:
    """Removes the temporaries of dead writers of `target`; an earlier output moved aside by a writer that
    died before putting the new one in place is renamed back. Only directories named by our pattern and
    carrying our marker are removed; others are named in a warning and left alone."""
    for path, kind, alive in _leftovers(target):
        if alive is not False:
            continue
        if kind == "old" and (not target.exists() or _dead_partial(target)):
            if target.exists():
                remove_tree(target)
            os.rename(path, target)  # the writer died between its two renames: the earlier output comes back
            print(f"note: restored {target} from {path.name}, left by an interrupted mft-jax writer",
                  file=sys.stderr)
        elif is_ours(path):
            remove_tree(path)
        else:
            print(f"warning: {path} was left by an interrupted mft-jax writer; it holds no marker of ours, so "
                  f"it was not removed", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------

def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _relation(target: Path, other: Path) -> str | None:
    if target == other:
        return "is"
    if target in other.parents:
        return "contains"
    if other in target.parents:
        return "is inside"
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _entries(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except OSError:
        return []


def check_target(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 flag: str = "--out") -> Path:
    """Refuses (OutputError) an output directory that would destroy or overlap what the user had; returns it
    resolved. Reads only metadata, so commands call it before loading anything. See the module docstring."""
    if storage.is_remote(target):
        return _check_remote_target(str(target), inputs=inputs, overwrite=overwrite, flag=flag)
    shown = str(target)
    resolved = _resolve(target)
    if resolved == resolved.parent:
        raise OutputError(f"{flag} {shown}: is the filesystem root; give a new directory, e.g. {flag} ./out")
    for name, protected in (("current directory", Path.cwd()), ("home directory", Path.home())):
        protected = _resolve(protected)
        if resolved == protected or resolved in protected.parents:
            what = "is the" if resolved == protected else "is an ancestor of the"
            raise OutputError(f"{flag} {shown}: {what} {name} ({protected}); it would be replaced. Give a new "
                              f"directory, e.g. {flag} {shown.rstrip('/')}/out")
    for source in inputs:
        if source is None:
            continue
        relation = _relation(resolved, _resolve(source))
        if relation is not None:
            raise OutputError(f"{flag} {shown}: {relation} the input {source}; the output must be a separate "
                              f"directory, not the input, inside it or above it (even with --overwrite)")
    existing = _nearest_existing(resolved.parent)
    if not existing.is_dir():
        raise OutputError(f"{flag} {shown}: {existing} is a file, not a directory; give a path under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {shown}: permission denied: cannot create files in {existing}")
    if resolved.exists():
        if not resolved.is_dir():
            raise OutputError(f"{flag} {shown}: exists and is a file; give a new directory (a file is never "
                              f"replaced, even with --overwrite)")
        entries = _entries(resolved)
        marker = read_marker(resolved)
        if (marker is not None and not marker.get("complete", True) and resolved not in _ACTIVE and not overwrite
                and not _dead_partial(resolved)):
            raise OutputError(f"{flag} {shown}: mft-jax {marker.get('command', '')} (pid {marker.get('pid')} on "
                              f"{marker.get('host')}) is writing it now; wait for it to finish, give another "
                              f"directory, or pass --overwrite if that process is gone")
        if entries and marker is None and not overwrite:
            listed = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"{flag} {shown}: exists and was not written by mft-jax ({len(entries)} entries: "
                              f"{listed}); give a new directory, or pass --overwrite to replace it")
    for path, _, alive in _leftovers(resolved):
        if alive and path not in _ACTIVE:
            raise OutputError(f"{flag} {shown}: another mft-jax process is writing it now ({path.name}); wait "
                              f"for it to finish or give another directory")
    return resolved


# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------

def _inputs(inputs) -> list[str]:
    return list(dict.fromkeys(str(p) if storage.is_remote(p) else str(_resolve(p)) for p in inputs if p is not None))


@contextlib.contextmanager
def new_dir(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
            command: str = "mft-jax", flag: str = "--out") -> Iterator[Path]:
    """Yields a new temporary sibling of `target` to write into; renames it into place on success.

    The target is checked first (`check_target`). An earlier target (ours, empty, or any with overwrite) is
    renamed aside, the new one renamed in, then the old one removed. On an exception (or KeyboardInterrupt)
    the temporary directory is removed and the target left as it was."""
    inputs = list(inputs)
    if storage.is_remote(target):
        with _remote_new_dir(str(target), inputs, overwrite, command, flag) as tmp:
            yield tmp
        return
    target = check_target(target, inputs=inputs, overwrite=overwrite, flag=flag)
    existing = _nearest_existing(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    _ACTIVE.add(tmp)
    try:
        _write_marker(tmp, command, _inputs(inputs), complete=False)
        yield tmp
        _write_marker(tmp, command, _inputs(inputs), complete=True)
        check_target(target, inputs=inputs, overwrite=overwrite, flag=flag)  # it may have appeared meanwhile
        _install(tmp, target)
    except BaseException:
        if tmp.exists():
            remove_tree(tmp)
        _remove_empty_parents(target.parent, existing)
        raise
    finally:
        _ACTIVE.discard(tmp)


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Undoes the `mkdir -p` of a failed writer: the directories it created below `stop`, if still empty."""
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def _install(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = _sibling(target, "old")
    _ACTIVE.add(aside)
    try:
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _remove_aside(aside)
    finally:
        _ACTIVE.discard(aside)


def _remove_aside(aside: Path) -> None:
    try:
        remove_tree(aside) if is_ours(aside) else shutil.rmtree(aside)
    except OSError as e:
        print(f"warning: could not remove the replaced output {aside}: {e}", file=sys.stderr)


@contextlib.contextmanager
def claimed_dir(target: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                command: str = "mft-jax", flag: str = "--out") -> Iterator[Path]:
    """Yields `target` itself, claimed by our marker (incomplete until the block ends without an error).

    For writers whose files must keep their final paths. An earlier output of ours (or, with overwrite, a
    foreign directory) is renamed aside first, removed when the new output completes and renamed back if
    the block fails; an existing empty directory is claimed as it is. A writer killed outright leaves the
    target marked incomplete, and the next writer of the same target restores the earlier output first."""
    inputs = list(inputs)
    if storage.is_remote(target):
        raise OutputError(f"{flag} {target}: this command writes a local directory only; give a local path (and "
                          f"copy it to the bucket afterwards if you wish)")
    target = check_target(target, inputs=inputs, overwrite=overwrite, flag=flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    aside = None
    if target.exists() and _entries(target):
        aside = _sibling(target, "old")
        os.rename(target, aside)
        _ACTIVE.add(aside)
    target.mkdir(exist_ok=True)
    _ACTIVE.add(target)
    try:
        _write_marker(target, command, _inputs(inputs), complete=False)
        yield target
        _write_marker(target, command, _inputs(inputs), complete=True)
    except BaseException:
        if aside is not None:
            remove_tree(target)
            os.rename(aside, target)
            aside = None
        raise
    finally:
        _ACTIVE.discard(target)
        if aside is not None:
            _remove_aside(aside)
            _ACTIVE.discard(aside)


# --------------------------------------------------------------------------------------------------------
# Cloud Storage targets
# --------------------------------------------------------------------------------------------------------

def _remote_relation(target: str, other: str) -> str | None:
    target, other = target.rstrip("/"), str(other).rstrip("/")
    if target == other:
        return "is"
    if other.startswith(target + "/"):
        return "contains"
    if target.startswith(other + "/"):
        return "is inside"
    return None


def _check_remote_target(target: str, *, inputs, overwrite: bool, flag: str):
    target = target.rstrip("/")
    bucket, name = storage.split(target)
    if not name:
        raise OutputError(f"{flag} {target}: is a whole bucket; give a directory in it, e.g. {flag} {target}/out")
    for source in inputs:
        if source is not None and storage.is_remote(source):
            relation = _remote_relation(target, str(source))
            if relation is not None:
                raise OutputError(f"{flag} {target}: {relation} the input {source}; the output must be a separate "
                                  f"directory, not the input, inside it or above it (even with --overwrite)")
    try:
        entries = storage.objects(target)
    except Exception as e:
        raise OutputError(f"{flag} {target}: cannot list the bucket ({type(e).__name__}: {str(e)[:120]}); check "
                          f"the bucket name and your credentials (gcloud auth application-default login)") from None
    if storage.blob(target).exists():
        raise OutputError(f"{flag} {target}: exists and is an object (a file); give a new directory (a file is "
                          f"never replaced, even with --overwrite)")
    target_path = storage.path(target)
    if entries:
        marker = read_marker(target_path)
        if marker is not None and not marker.get("complete", True) and not overwrite:
            host = re.sub(r"[^A-Za-z0-9]", "", str(marker.get("host", "")))[:24]
            if _writer_alive(host, int(marker.get("pid") or 0), target_path) is not False:
                raise OutputError(f"{flag} {target}: mft-jax {marker.get('command', '')} (pid {marker.get('pid')} "
                                  f"on {marker.get('host')}) is writing it now; wait for it to finish, give another "
                                  f"directory, or pass --overwrite if that process is gone")
        if marker is None and not overwrite:
            listed = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"{flag} {target}: exists and was not written by mft-jax ({len(entries)} objects: "
                              f"{listed}); give a new directory, or pass --overwrite to replace it")
    return target_path


@contextlib.contextmanager
def _remote_new_dir(target: str, inputs: list, overwrite: bool, command: str, flag: str):
    """`new_dir` on Cloud Storage: writers write straight into a temporary sibling prefix; on success the target's
    marker is set incomplete, its old objects replaced by server-side copies of the new ones, the marker
    written complete last, and the temporary prefix deleted. A failure deletes the temporary prefix."""
    target_path = _check_remote_target(target, inputs=inputs, overwrite=overwrite, flag=flag)
    target = str(target_path)
    _clean_remote_leftovers(target)
    parent, _, leaf = target.rpartition("/")
    tmp = storage.path(f"{parent}/.{leaf}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_marker(tmp, command, _inputs(inputs), complete=False)
        yield tmp
        _write_marker(tmp, command, _inputs(inputs), complete=True)
        _check_remote_target(target, inputs=inputs, overwrite=overwrite, flag=flag)  # it may have appeared
        new = [e for e in storage.objects(str(tmp)) if e != MARKER]
        old = storage.objects(target)
        _write_marker(target_path, command, _inputs(inputs), complete=False)  # claims it while copying
        for entry in new:
            storage.copy_file(f"{tmp}/{entry}", f"{target}/{entry}")
        for entry in set(old) - set(new) - {MARKER}:
            storage.blob(f"{target}/{entry}").delete()
        _write_marker(target_path, command, _inputs(inputs), complete=True)
    finally:
        storage.remove_tree(str(tmp))


def _clean_remote_leftovers(target: str) -> None:
    """Deletes the temporary prefixes of dead writers of `target` (ours by name and marker)."""
    parent, _, leaf = target.rpartition("/")
    pattern = _leftover_pattern(leaf)
    try:
        siblings = list(storage.path(parent).iterdir())
    except OSError:
        return
    for path in siblings:
        match = pattern.fullmatch(path.name)
        if match and match.group(1) == "tmp" and is_ours(path):
            if _writer_alive(match.group(2), int(match.group(3)), path) is False:
                storage.remove_tree(str(path))
