"""Runs untrusted Python (model-written code) in an isolated child process with a timeout and resource limits.

Threat model and reasoning: docs/sandbox.md. Each program gets a fresh `python -I -S` process that builds its
own isolation before any untrusted code runs (`sandbox_child.py`; never `preexec_fn`, which is unsafe in a
process with threads, as any JAX process is):
- namespaces (backend "namespaces", our own, through an unprivileged user namespace; or "bubblewrap" where
  user namespaces need it, as on Ubuntu 24.04): no network at all, a new root of read-only binds (the
  interpreter, the evaluating environment's site-packages, /usr and the loader's paths) where only the
  program's own directory and /tmp (size-limited tmpfs) are writable, its own PID namespace (no other process
  visible or signalable; every descendant dies with the program, setsid or not), its own IPC and hostname;
- Landlock (files, TCP, signals, abstract sockets) and seccomp (sockets other than AF_UNIX, ptrace,
  process_vm_*, mount and namespace calls, keyrings, bpf, io_uring, ...) as second layers; no new privileges,
  no capabilities; rlimits (address space, CPU seconds, file size, processes, no core dumps); a cleared
  environment;
- then olmes's `unsafe_execute` (`code_execution_local.py`): its `reliability_guard` (the same functions set to
  None, `resource` / `psutil` / `joblib` unimportable), output swallowed, stdin unreadable, `exec` under a
  real-time timer; passed when it raises nothing (`SystemExit`, even status 0, fails; so does a hard exit).
  The modules a program imports are imported before the guard, as olmes's forked process had its environment
  imported: `import numpy` works.
`status()` says which layers this machine allows (probed once); `require()` refuses code tasks with one line
when no namespace backend works, unless unsandboxed code is explicitly allowed. MFT_JAX_SANDBOX_DISABLE
(comma-separated: fs, net, pid, ipc, landlock, seccomp) switches layers off for tests and diagnostics only;
MFT_JAX_SANDBOX_BACKEND (namespaces, bubblewrap, none) forces a backend.
"""

from __future__ import annotations

import dataclasses
import functools
import marshal
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from mft_jax.evaluate.base import EvalError

CHILD_SOURCE = (Path(__file__).parent / "sandbox_child.py").read_text()
LAYERS = ("fs", "net", "pid", "ipc", "landlock", "seccomp")  # the ones MFT_JAX_SANDBOX_DISABLE may name
BACKENDS = ("namespaces", "bubblewrap", "none")
INSIDE = "/sandbox"  # the program's directory in the new root (a tmpfs; cwd, HOME, TMPDIR); backend none: scratch
# What the program sees of the host, read-only: the system's programs and libraries, the loader's cache (no
# other file of /etc: it holds secrets), plus the interpreter's prefix and site-packages (`_python_paths`).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/localtime")
FIX = ("install bubblewrap (sudo apt-get install bubblewrap; `bash launch/install.sh` does it) or allow "
       "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 "
       "kernel.apparmor_restrict_unprivileged_userns=0)")


class SandboxUnavailable(EvalError):
    """No isolation can be set up here, and unsandboxed code was not allowed."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # the program's real time; the child is killed 2 s after it
    cpu_s: int | None = None  # CPU seconds; None: the timeout rounded up, plus 1
    memory_bytes: int = 2 << 30  # address space
    file_bytes: int = 1 << 20  # largest file the program may write (its stderr included)
    processes: int = 256  # processes of the sandbox's user namespace (fork bombs)
    scratch_bytes: int = 64 << 20  # size of each tmpfs the program may write: its directory, /tmp, /dev/shm

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool  # returned from exec within the limits
    result: str  # "passed", "timed out", or the last line of stderr / the exit status


@dataclasses.dataclass(frozen=True)
class Status:
    backend: str  # "namespaces", "bubblewrap" or "none"
    layers: tuple[str, ...]  # the layers a probe program ran under
    disabled: tuple[str, ...]  # switched off by MFT_JAX_SANDBOX_DISABLE
    problem: str | None = None  # why the namespace backends are unavailable ("none" only)

    @property
    def isolated(self) -> bool:
        return self.backend != "none"

    def describe(self) -> str:
        text = f"sandbox backend {self.backend}: {' '.join(self.layers) or 'no layers'}"
        return text + (f" (switched off: {','.join(self.disabled)})" if self.disabled else "")

    def record(self, allow_unsandboxed_code: bool = False) -> dict:
        """What results.json keeps about the isolation the programs ran under."""
        return {"backend": self.backend, "layers": list(self.layers), "disabled": list(self.disabled),
                "allow_unsandboxed_code": allow_unsandboxed_code, "problem": self.problem}


def _disabled() -> tuple[str, ...]:
    names = tuple(n.strip() for n in os.environ.get("MFT_JAX_SANDBOX_DISABLE", "").split(",") if n.strip())
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise EvalError(f"MFT_JAX_SANDBOX_DISABLE names unknown layers {unknown}; choose from {list(LAYERS)}")
    return names


@functools.lru_cache(maxsize=None)
def _python_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths to bind read-only, the child's sys.path): the interpreter's prefix (its standard library) and the
    site-packages directories of this environment, never the working directory or an editable checkout."""
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    user_site = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []  # off in a venv
    packages = [p for p in site.getsitepackages() + user_site if os.path.isdir(p)]
    sys_path = [p for p in sys.path if p and os.path.exists(p) and (
        any(os.path.realpath(p).startswith(prefix + os.sep) for prefix in prefixes) or p in packages)]
    for p in packages:
        if p not in sys_path:
            sys_path.append(p)
    binds = sorted(prefixes | set(packages) | {os.path.dirname(os.path.realpath(sys.executable))}, key=len)
    return tuple(binds), tuple(sys_path)


def _config(backend: str, disabled: tuple[str, ...], limits: Limits, scratch: str, root: str, status_fd: int) -> dict:
    binds, sys_path = _python_paths()
    ro_paths = [p for p in SYSTEM_PATHS + binds if os.path.lexists(p)]
    new_root = backend != "none" and "fs" not in disabled
    work = INSIDE if new_root else scratch
    writable = [work, "/tmp"] if new_root else [scratch]
    read = ro_paths + (["/proc"] if new_root and "pid" not in disabled else [])  # no host /proc, no /dev nodes
    return {"backend": backend, "disable": list(disabled), "root": root, "scratch": scratch, "cwd": work,
            "ro_paths": ro_paths, "sys_path": list(sys_path), "landlock_read": read,
            # /dev/shm only when it is the sandbox's own tmpfs (the host's is shared with other processes)
            "landlock_write": writable + ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
                              + (["/dev/shm"] if new_root else []),
            "scratch_bytes": limits.scratch_bytes,
            "memory": limits.memory_bytes, "cpu": limits.cpu_seconds, "fsize": limits.file_bytes,
            "nproc": limits.processes if backend != "none" else 0, "timeout": limits.timeout_s,
            "status_fd": status_fd}


def _bwrap_argv(config: dict) -> list[str]:
    """bubblewrap's options for the same view our own namespace backend builds (stages 1-2 of the child)."""
    disabled = set(config["disable"])
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL"]
    argv += [] if "pid" in disabled else ["--unshare-pid"]
    argv += [] if "net" in disabled else ["--unshare-net"]
    argv += [] if "ipc" in disabled else ["--unshare-ipc", "--unshare-uts", "--hostname", "sandbox"]
    if "fs" in disabled:
        return argv + ["--bind", "/", "/", "--dev-bind", "/dev", "/dev", "--"]
    argv += _bwrap_size(config) + ["--tmpfs", "/tmp"]  # first: a read-only path below /tmp lands on it
    for path in config["ro_paths"]:
        argv += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    argv += ["--dev", "/dev"] + _bwrap_size(config) + ["--tmpfs", "/dev/shm"] + _bwrap_size(config)
    argv += ["--tmpfs", INSIDE, "--chdir", INSIDE]
    argv += ["--proc", "/proc"] if "pid" not in disabled else []
    return argv + ["--remount-ro", "/", "--"]


@functools.lru_cache(maxsize=None)
def _bwrap_has_size() -> bool:
    """bwrap >= 0.5 takes --size for a tmpfs."""
    help_text = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, text=True).stdout
    return "--size" in help_text


def _bwrap_size(config: dict) -> list[str]:
    return ["--size", str(config["scratch_bytes"])] if _bwrap_has_size() else []


def _run(program: str, limits: Limits, backend: str, disabled: tuple[str, ...]) -> tuple[Outcome, list[str]]:
    """One program under `backend`: its Outcome and the layers it ran under (as the child reported them)."""
    with tempfile.TemporaryDirectory(prefix="mft_jax_sandbox_", ignore_cleanup_errors=True) as work:
        scratch, root = os.path.join(work, "scratch"), os.path.join(work, "root")
        os.mkdir(scratch, 0o700)
        os.mkdir(root, 0o700)
        stderr_path = os.path.join(work, "stderr")
        read_fd, write_fd = os.pipe()
        config = _config(backend, disabled, limits, scratch, root, write_fd)
        inside = config["cwd"]
        env = {"PATH": "/usr/bin:/bin", "HOME": inside, "TMPDIR": inside, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = [os.path.realpath(sys.executable), "-I", "-S", "-c", CHILD_SOURCE, marshal.dumps(config).hex()]
        if backend == "bubblewrap":
            argv = _bwrap_argv(config) + argv
        try:
            with open(stderr_path, "wb") as stderr:
                child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                         cwd=scratch, env=env, pass_fds=(write_fd,),
                                         start_new_session=True)  # its own process group: killed as one
                os.close(write_fd)
                write_fd = -1
                # A timer kills the group 2 s after the program's timeout; meanwhile a blocking wait (subprocess's
                # wait with a timeout polls with sleeps of up to 50 ms, which doubled the time per program).
                killed = []
                timer = threading.Timer(limits.timeout_s + 2, lambda: killed.append(_signal_group(child)))
                timer.start()
                try:
                    child.communicate(program.encode())
                finally:
                    timer.cancel()
                    _kill_group(child)  # whatever the program left in its group (only without the pid layer)
                timed_out = bool(killed)
            os.set_blocking(read_fd, False)  # a survivor could hold the pipe open (only with the pid layer off)
            try:
                status = os.read(read_fd, 1 << 16).decode("utf-8", "replace").splitlines()
            except BlockingIOError:
                status = []
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        layers = [name for line in status if line.startswith("layers ") for name in line.split()[1:]]
        if backend == "bubblewrap":  # what bwrap made (the child reports its own layers only)
            made = [("mount_ns", "fs"), ("pid_ns", "pid"), ("net_ns", "net"), ("ipc_uts_ns", "ipc"), ("new_root", "fs")]
            made += [("fresh_proc", "pid")] if "fs" not in disabled else []
            layers = ["user_ns"] + [name for name, layer in made if layer not in disabled] + layers
        if timed_out or child.returncode == 3:
            return Outcome(False, "timed out"), layers
        if "passed" in status and child.returncode == 0:
            return Outcome(True, "passed"), layers
        with open(stderr_path, "rb") as f:
            lines = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
        if child.returncode < 0 or child.returncode > 128:
            number = -child.returncode if child.returncode < 0 else child.returncode - 128
            return Outcome(False, f"killed by {signal.Signals(number).name}"), layers
        return Outcome(False, lines[-1] if lines else f"exit status {child.returncode}"), layers


def _signal_group(child: subprocess.Popen) -> bool:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


def _kill_group(child: subprocess.Popen) -> None:
    _signal_group(child)
    child.wait()


@functools.lru_cache(maxsize=None)
def _probe(disabled: tuple[str, ...], forced: str | None) -> Status:
    """Tries the backends in order (or the forced one) with a program that does nothing; the first that runs it
    is this machine's."""
    problems = []
    for backend in ([forced] if forced else ["namespaces", "bubblewrap"]):
        if backend == "bubblewrap" and not shutil.which("bwrap"):
            problems.append("bubblewrap: not installed")
            continue
        if backend == "none":
            break
        outcome, layers = _run("pass", Limits(timeout_s=10), backend, disabled)
        if outcome.passed:
            return Status(backend, tuple(layers), disabled)
        problems.append(f"{backend}: {outcome.result}")
    outcome, layers = _run("pass", Limits(timeout_s=10), "none", disabled)
    return Status("none", tuple(layers), disabled, "; ".join(problems) or "backend none forced")


def status() -> Status:
    """The isolation programs run under on this machine (probed once per process and setting)."""
    forced = os.environ.get("MFT_JAX_SANDBOX_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise EvalError(f"MFT_JAX_SANDBOX_BACKEND is {forced!r}; choose one of {list(BACKENDS)}")
    return _probe(_disabled(), forced)


def require(allow_unsandboxed_code: bool = False, what: str = "code tasks") -> Status:
    """The Status; raises SandboxUnavailable (one line: the missing layer and the fix) where no namespace
    backend works, unless `allow_unsandboxed_code`."""
    current = status()
    if not current.isolated and not allow_unsandboxed_code:
        raise SandboxUnavailable(
            f"{what} run model-written code, but no sandbox can be set up here (missing layer: user namespaces; "
            f"{current.problem}); {FIX}; or pass --allow-unsandboxed-code to run it without isolation")
    return current


def run_program(program: str, limits: Limits = Limits(), allow_unsandboxed_code: bool = False) -> Outcome:
    """Runs one Python program isolated in a fresh child; passed = `exec` returned within the limits."""
    current = require(allow_unsandboxed_code)
    return _run(program, limits, current.backend, current.disabled)[0]


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 allow_unsandboxed_code: bool = False) -> list[Outcome]:
    """`run_program` over many programs, `workers` child processes at a time (default: CPU count)."""
    current = require(allow_unsandboxed_code)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: _run(p, limits, current.backend, current.disabled)[0], programs))


def main() -> int:
    """The layers code tasks get here; exit status 1 (and the one-line reason with its fix) where there is no
    sandbox. launch/install.sh runs it (`python -c "...; sys.exit(sandbox.main())"`)."""
    current = status()
    print(current.describe())
    try:
        require(False)
    except SandboxUnavailable as error:
        print(error)
        return 1
    return 0

