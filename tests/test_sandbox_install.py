"""launch/install.sh and the evaluation sandbox (docs/sandbox.md): bubblewrap is installed with apt where it
is missing and this user may (root, or sudo), never otherwise; the last step prints the sandbox's layers.
Dry runs, with stand-ins for `id`, `sudo` and `apt-get` on PATH (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path: Path, uid: int, apt: bool, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / f"bin_{uid}_{apt}_{len(args)}"
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    stubs = {"id": f"echo {uid}", "sudo": "exit 0"}
    if apt:
        stubs["apt-get"] = "echo apt-get ran >&2; exit 1"  # a dry run must never run it
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("no .venv here: install.sh would create one")
    return subprocess.run([shutil.which("bash"), str(ROOT / "launch/install.sh"), "--dry-run", *args], cwd=ROOT,
                          env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)


def test_install_dry_run_installs_bubblewrap_where_it_may(tmp_path):
    as_user = _dry_run(tmp_path, 1000, True)
    assert as_user.returncode == 0, as_user.stderr
    lines = as_user.stdout.splitlines()
    assert "+ sudo -n apt-get install -y -q bubblewrap" in lines, lines
    assert lines[-1].startswith("+ .venv/bin/python -c") and "sandbox.main()" in lines[-1]
    as_root = _dry_run(tmp_path, 0, True).stdout.splitlines()
    assert "+ apt-get install -y -q bubblewrap" in as_root
    skipped = _dry_run(tmp_path, 0, True, "--no-sandbox").stdout
    assert "bubblewrap" not in skipped and "sandbox.main()" in skipped
    no_apt = _dry_run(tmp_path, 1000, False)
    assert no_apt.returncode == 0 and "bubblewrap" not in no_apt.stdout
    assert "bubblewrap is not installed and there is no apt-get here" in no_apt.stderr
