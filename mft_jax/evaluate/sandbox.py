"""Runs untrusted Python (model-written code) in a child process with a timeout and resource limits.

Each program gets its own `python -I -S` process (isolated, standard library only) in a fresh temporary
directory, never the calling process:
- limits set by the child on itself before any untrusted code runs (no `preexec_fn`, which is unsafe in a
  process with threads, as any JAX process is): address space, CPU seconds, file size, no core dumps;
- the program is `exec`uted as olmes's HumanEval check does it (`code_execution_local.py`): in a namespace
  that holds only the builtins, under a real-time timer of `timeout_s`; it passes when it raises nothing
  (a `SystemExit`, even with status 0, fails); the parent kills the child's process group 2 s after that;
- stdout discarded (a print loop cannot fill a pipe), stderr to a size-limited file (its tail is the result);
- a few destructive calls (process kill/spawn/exit, file removal, shell) replaced by a function that raises.
This guards against accidents of generated code, not against a determined attacker: run evaluations of
untrusted models inside a container as well.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

# The child's entry point; argv: memory bytes, CPU seconds, file-size bytes, timeout seconds. The program
# arrives on stdin. Exit status 0: passed; 3: timed out; 1: raised (traceback on stderr).
_CHILD = r"""
import resource, signal, sys, traceback
memory, cpu, fsize = (int(a) for a in sys.argv[1:4])
timeout = float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
program = sys.stdin.read()

import os, shutil, subprocess
_exit = os._exit
def _blocked(*args, **kwargs):
    raise PermissionError("blocked in the evaluation sandbox")
for _module, _names in ((os, ("kill", "killpg", "system", "popen", "fork", "forkpty", "remove", "unlink",
                              "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
                              "chown", "putenv", "unsetenv", "execv", "execve", "execvp", "spawnv", "_exit")),
                        (shutil, ("rmtree", "move", "chown", "copyfile", "copytree")),
                        (subprocess, ("Popen", "run", "call", "check_call", "check_output"))):
    for _name in _names:
        if hasattr(_module, _name):
            setattr(_module, _name, _blocked)
del _module, _names, _name

class _TimedOut(Exception):
    pass
def _alarm(signum, frame):
    raise _TimedOut()
signal.signal(signal.SIGALRM, _alarm)
try:
    code = compile(program, "<program>", "exec")
    signal.setitimer(signal.ITIMER_REAL, timeout)
    exec(code, {"__builtins__": __builtins__})
    signal.setitimer(signal.ITIMER_REAL, 0)
except _TimedOut:
    _exit(3)
except BaseException:
    signal.setitimer(signal.ITIMER_REAL, 0)
    traceback.print_exc()
    sys.stderr.flush()
    _exit(1)
sys.stderr.flush()
_exit(0)
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # the program's real time; the child is killed 2 s after it
    cpu_s: int | None = None  # CPU seconds; None: the timeout rounded up, plus 1
    memory_bytes: int = 2 << 30  # address space
    file_bytes: int = 1 << 20  # largest file the program may write (its stderr included)

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool  # exited with status 0 in time
    result: str  # "passed", "timed out", or the last line of stderr / the exit status


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Runs one Python program in a fresh child process; passed = exit status 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="mft_jax_sandbox_") as work:
        stderr_path = os.path.join(work, ".stderr")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work,
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD, str(limits.memory_bytes), str(limits.cpu_seconds),
                 str(limits.file_bytes), str(limits.timeout_s)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, cwd=work, env=env,
                start_new_session=True)  # its own process group, so a timeout kills its children too
            try:
                child.communicate(program.encode(), timeout=limits.timeout_s + 2)
            except subprocess.TimeoutExpired:
                _kill_group(child)
                return Outcome(False, "timed out")
            finally:
                _kill_group(child)  # children the program left behind
        if child.returncode == 0:
            return Outcome(True, "passed")
        if child.returncode == 3:
            return Outcome(False, "timed out")
        with open(stderr_path, "rb") as f:
            lines = f.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
        if child.returncode < 0:
            return Outcome(False, f"killed by {signal.Signals(-child.returncode).name}")
        return Outcome(False, lines[-1] if lines else f"exit status {child.returncode}")


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """`run_program` over many programs, `workers` child processes at a time (default: CPU count)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))
