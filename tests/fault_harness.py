"""Running the CLI on faulty inputs and checking what it did: exit code, one line on stderr, no file touched.

`run_cli` calls `mft_jax.cli.main(argv)` in this process (fast: JAX is warm); `run_cli_process` starts
`python -m mft_jax` for the cases that need a real process (a real interpreter exit, environment variables
read at start). `snapshot` records every file under some roots, so that a test can assert that nothing outside
the command's own outputs changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The `mft-jax CMD: error: ...` line (the last non-empty stderr line)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _exit_code(error: SystemExit) -> int:
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def run_cli(*argv: str, env: dict | None = None) -> Result:
    """`mft-jax ARGV` in this process; returns its exit code and captured stdout / stderr. An exception that
    escapes `main` is a failure of the CLI's error handling, so it is not caught here."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        from mft_jax import cli

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([str(a) for a in argv])
                code = 0
            except SystemExit as e:
                code = _exit_code(e)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_process(*argv: str, env: dict | None = None, timeout: float = 300, cwd: str | Path | None = None
                    ) -> Result:
    """`python -m mft_jax ARGV` as a subprocess."""
    repo = Path(__file__).resolve().parents[1]
    environ = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "mft_jax", *map(str, argv)], capture_output=True, text=True,
                          env=environ, timeout=timeout, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(*roots: str | Path) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, sha256) of every file under `roots` (symlinks not followed); directories
    appear as path -> (0, 0, 'dir') so that removed or added empty directories count as changes too."""
    files: dict[str, tuple[int, int, str]] = {}
    for root in map(Path, roots):
        if root.is_file():
            st = root.stat()
            files[str(root)] = (st.st_size, st.st_mtime_ns, _digest(root))
            continue
        for directory, dirnames, filenames in os.walk(root):
            files[directory] = (0, 0, "dir")
            for name in filenames:
                path = Path(directory) / name
                st = path.lstat()
                files[str(path)] = (st.st_size, st.st_mtime_ns, _digest(path) if path.is_file() else "link")
    return files


def changes(before: dict, after: dict, allowed: tuple[str | Path, ...] = ()) -> list[str]:
    """Paths added, removed or modified between two snapshots, except those under `allowed`."""
    allowed_prefixes = [str(Path(a)) for a in allowed]

    def is_allowed(path: str) -> bool:
        return any(path == a or path.startswith(a + os.sep) for a in allowed_prefixes)

    changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p)]
    return sorted(p for p in changed if not is_allowed(p))
