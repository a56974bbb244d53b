"""The sandbox's child: runs inside a fresh `python -I -S` process, builds the isolation and runs one program.

`mft_jax.evaluate.sandbox` starts `python -I -S -c <this file's text> <config JSON>` with the program on stdin;
the file is never imported by the evaluating process (standard library only, no package imports). The fresh
interpreter is single-threaded, so it may fork and change its own namespaces before any untrusted code runs
(the evaluating process, a JAX process with threads, never does: no `preexec_fn`).

Stages, each a process (docs/sandbox.md gives the reasoning):
1. outer: unshares user, mount, PID, network, IPC and UTS namespaces (those not disabled), maps its own uid
   and gid, forks and waits; it relays the exit status (it stays outside the new PID namespace).
2. init (PID 1 of the new PID namespace): builds a new root of read-only bind mounts (the interpreter's prefix,
   the site-packages of the evaluating environment, /usr and the loader's paths), a size-limited tmpfs
   read-write at /sandbox (the program's directory), a tmpfs at /tmp, a fresh /proc, a minimal /dev; pivots
   into it, drops its capabilities, forks the program and reaps; when the program exits, init exits and the
   kernel kills every process left in the namespace (setsid or not).
3. program: rlimits, no-new-privileges, no capabilities, Landlock (files: read-only except /sandbox and /tmp;
   TCP; signals and abstract sockets outside), seccomp (sockets other than AF_UNIX, ptrace, process_vm_*,
   mount and namespace calls, keyrings, bpf, io_uring ...), then olmes's reliability guard and `exec`.
Under the "bubblewrap" backend, bwrap does stages 1-2 and this file runs stage 3 only.

Verdict: the program stage writes b"passed" to the status pipe (fd `status_fd`) when `exec` returned; anything
else (an exception, `SystemExit`, a hard exit, a signal, the timer) fails, as in olmes. Exit status 3: timed out.
"""

import ctypes
import marshal
import os
import signal
import struct
import sys

CONFIG = {}  # from argv (as __main__): see mft_jax.evaluate.sandbox._config
DISABLED = set()

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 22, 38, 47
ARCH = os.uname().machine
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(ARCH)


def fail(stage, what):
    """A setup step failed: one line on stderr, exit status 4 (the caller reports it as a sandbox error)."""
    err = ctypes.get_errno()
    sys.stderr.write(f"sandbox setup failed at {stage}: {what}: {os.strerror(err) if err else 'error'}\n")
    sys.stderr.flush()
    os._exit(4)


def check(result, stage, what):
    if result != 0:
        fail(stage, what)


# ---------------------------------------------------------------------------------------------------------
# Stage 1 (outer) and 2 (init): namespaces and the new root
# ---------------------------------------------------------------------------------------------------------

def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def unshare_namespaces():
    flags = CLONE_NEWUSER
    for layer, flag in (("fs", CLONE_NEWNS), ("pid", CLONE_NEWPID), ("net", CLONE_NEWNET),
                        ("ipc", CLONE_NEWIPC | CLONE_NEWUTS)):
        if layer not in DISABLED:
            flags |= flag
    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(flags), "unshare", "user namespace")
    # Our own uid and gid only (no other id of the host exists inside); setgroups denied, as an unprivileged
    # writer of gid_map must.
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"{uid} {uid} 1")
    write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    return flags


def mount(source, target, fstype, flags, data, what):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), "mount", what)


def bind(source, target, writable=False):
    """Bind `source` at `target` (created as a directory or an empty file); read-only unless `writable`."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    mount(source, target, None, MS_BIND, None, f"bind {source}")
    # A remount keeps the flags the host locked on the source mount (nosuid, nodev, noexec, ...); dropping one
    # would fail with EPERM.
    host = os.statvfs(source).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (host & (MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096))
    if not writable:
        flags |= MS_RDONLY
    mount(None, target, None, flags, None, f"remount {source}")


def build_root():
    """The new root under CONFIG['root'] (a directory the caller made): tmpfs + binds, then pivot_root."""
    root = CONFIG["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE, None, "make / private")  # nothing propagates to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m", "tmpfs root")
    # /tmp: a small tmpfs of its own, mounted first so that a read-only path below /tmp (a venv there) lands on it.
    os.makedirs(f"{root}/tmp")
    size = CONFIG["scratch_bytes"]
    mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={size}", "tmpfs /tmp")
    for path in CONFIG["ro_paths"]:  # symlinks (merged /usr: /lib -> usr/lib) are recreated, not followed
        inside = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            if not os.path.lexists(inside):
                os.symlink(os.readlink(path), inside)
        elif os.path.exists(path) and not os.path.exists(inside):
            bind(path, inside)
    for name in ("null", "zero", "full", "random", "urandom"):
        bind(f"/dev/{name}", f"{root}/dev/{name}", writable=True)
    os.makedirs(f"{root}/dev/shm")
    mount("tmpfs", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={size}", "tmpfs /dev/shm")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{link}")
    # The program's directory: a tmpfs of its own (its size bounds what a program can write in all, which the
    # file-size rlimit alone does not), gone with the mount namespace.
    os.makedirs(root + CONFIG["cwd"])
    mount("tmpfs", root + CONFIG["cwd"], "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0700,size={size}", "tmpfs scratch")
    os.makedirs(f"{root}/proc")
    fresh_proc = False
    if "pid" not in DISABLED:  # the proc of the new PID namespace: only its own processes
        # The kernel refuses it where the host's /proc is partly masked (some containers): then no /proc.
        fresh_proc = libc.mount(b"proc", f"{root}/proc".encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0
    os.makedirs(f"{root}/.old")
    check(libc.syscall(PIVOT_ROOT, root.encode(), f"{root}/.old".encode()), "pivot_root", root)
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount", "old root")
    os.rmdir("/.old")
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None, "remount / read-only")
    return ["new_root"] + (["fresh_proc"] if fresh_proc else [])


def drop_capabilities():
    """No capabilities left in any set (the bounding and ambient sets too): nothing can remount or unshare."""
    for cap in range(64):
        # EINVAL: past the last capability; EPERM: no CAP_SETPCAP, so no capability left to drop (stage 3).
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() not in (1, 22):
            fail("capabilities", f"drop {cap}")
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # two {effective, permitted, inheritable} words, all zero
    check(libc.capset(header, data), "capabilities", "capset")


# ---------------------------------------------------------------------------------------------------------
# Stage 3 (program): Landlock, seccomp, the guard, exec
# ---------------------------------------------------------------------------------------------------------

def landlock(read_paths, write_paths):
    """Files: read/execute under `read_paths`, everything under `write_paths`; TCP bind/connect (ABI >= 4),
    signals and abstract unix sockets outside (ABI >= 6): denied. Returns the ABI (0: unavailable)."""
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi <= 0:
        return 0
    read = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
    handled = (1 << 13) - 1  # ABI 1: execute ... make_sym
    if abi >= 2:
        handled |= 1 << 13  # REFER
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE
    if abi >= 5:
        handled |= 1 << 15  # IOCTL_DEV
    attr = struct.pack("QQQ", handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # fs, net (TCP), scoped
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(444, attr, size, 0)
    if ruleset < 0:
        fail("landlock", "create ruleset")
    for paths, access in ((read_paths, read), (write_paths, handled)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            rule = struct.pack("=Qi", access if os.path.isdir(path) else access & ~(8 | 128 | 16 | 32 | (1 << 13)
                               | 64 | 256 | 512 | 1024 | 2048 | 4096), fd)
            if libc.syscall(445, ruleset, 1, rule, 0) != 0:  # landlock_add_rule(PATH_BENEATH)
                fail("landlock", f"rule for {path}")
            os.close(fd)
    check(libc.syscall(446, ruleset, 0), "landlock", "restrict self")
    os.close(ruleset)
    return abi


# System calls that the program gets EPERM for (x86_64, aarch64): tracing and other processes' memory,
# mounts and namespaces, keyrings, bpf, perf, userfaultfd, io_uring (it bypasses these filters), modules, kexec,
# handles that open files by inode, chroot.
DENIED = {
    "x86_64": [101, 310, 311, 165, 166, 155, 272, 308, 161, 250, 248, 249, 321, 298, 323, 425, 426, 427, 246, 320,
               175, 313, 176, 303, 304, 428, 429, 430, 431, 432, 442, 169, 167, 168],
    "aarch64": [117, 270, 271, 40, 39, 41, 97, 268, 51, 219, 217, 218, 280, 241, 282, 425, 426, 427, 104, 294, 105,
                273, 106, 264, 265, 428, 429, 430, 431, 432, 442, 142, 224, 225],
}
SOCKET = {"x86_64": 41, "aarch64": 198}
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def seccomp():
    """A BPF filter: EPERM for DENIED, sockets other than AF_UNIX, clone with namespace flags; ENOSYS for
    clone3 (its flags are behind a pointer; libc falls back to clone); other architectures' calls kill."""
    if ARCH not in DENIED:
        return False
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys, eafnosupport = 0x50000 | 1, 0x50000 | 38, 0x50000 | 97
    prog = []

    def stmt(code, k):
        prog.append([code, 0, 0, k])

    def jump_eq(k, ret):  # if A == k: return ret
        prog.append([0x15, 0, 1, k])  # BPF_JMP|BPF_JEQ|BPF_K
        stmt(0x06, ret)  # BPF_RET|BPF_K

    stmt(0x20, 4)  # A = seccomp_data.arch
    prog.append([0x15, 1, 0, AUDIT_ARCH[ARCH]])
    stmt(0x06, kill)
    stmt(0x20, 0)  # A = seccomp_data.nr
    if ARCH == "x86_64":  # the x32 ABI's numbers
        prog.append([0x35, 0, 1, 0x40000000])  # BPF_JGE
        stmt(0x06, eperm)
    for nr in DENIED[ARCH]:
        jump_eq(nr, eperm)
    jump_eq(CLONE3, enosys)
    ns_flags = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
    prog.append([0x15, 0, 4, CLONE[ARCH]])  # clone: A = flags (the low word of args[0])
    stmt(0x20, 16)
    prog.append([0x45, 0, 1, ns_flags])  # BPF_JSET: any namespace flag
    stmt(0x06, eperm)
    stmt(0x06, allow)
    prog.append([0x15, 0, 3, SOCKET[ARCH]])  # socket: A = domain
    stmt(0x20, 16)
    prog.append([0x15, 1, 0, 1])  # AF_UNIX
    stmt(0x06, eafnosupport)
    stmt(0x06, allow)
    filt = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(filt, len(filt))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf)), 16)
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0), "seccomp", "set filter")
    return True


def limit_resources():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CONFIG["memory"], CONFIG["memory"]))
    resource.setrlimit(resource.RLIMIT_CPU, (CONFIG["cpu"], CONFIG["cpu"] + 1))  # SIGXCPU, SIGKILL 1 s later
    resource.setrlimit(resource.RLIMIT_FSIZE, (CONFIG["fsize"], CONFIG["fsize"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if CONFIG["nproc"]:  # counted per user namespace (Linux >= 5.14): a fork bomb stays inside
        resource.setrlimit(resource.RLIMIT_NPROC, (CONFIG["nproc"], CONFIG["nproc"]))


def imported_modules(code):
    """The module names of the import statements in `code` and the code nested in it (its IMPORT_NAME
    instructions; cheaper than parsing the source with `ast`)."""
    import opcode

    import_name, extended_arg = opcode.opmap["IMPORT_NAME"], opcode.EXTENDED_ARG
    names, stack = [], [code]
    while stack:
        current = stack.pop()
        raw, extended = current.co_code, 0
        for i in range(0, len(raw), 2):
            op, arg = raw[i], raw[i + 1] | extended
            extended = arg << 8 if op == extended_arg else 0
            if op == import_name:
                names.append(current.co_names[arg])
        stack.extend(c for c in current.co_consts if isinstance(c, type(code)))
    return names


def run_program(program, status_fd):
    """Stage 3: confine this process, then run the program as olmes's `unsafe_execute` does."""
    limit_resources()
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs", "prctl")
    drop_capabilities()
    layers = ["no_new_privs", "no_capabilities", "rlimits", "clean_environment"]
    if "landlock" not in DISABLED:
        abi = landlock(CONFIG["landlock_read"], CONFIG["landlock_write"])
        if abi:
            layers.append(f"landlock_abi{abi}")
    if "seccomp" not in DISABLED and seccomp():
        layers.append("seccomp")
    os.write(status_fd, ("layers " + " ".join(layers) + "\n").encode())
    os.chdir(CONFIG["cwd"])
    sys.path[:] = CONFIG["sys_path"]
    # olmes's process imported its environment before the guard ran (it forks from the harness): the modules
    # the program imports are imported here, before the guard, so that an import that calls a removed function
    # behaves as there. Missing ones fail later, in exec. A program that does not compile fails there too.
    import io

    try:
        code, error = compile(program, "<program>", "exec"), None
    except BaseException as e:  # SyntaxError, null bytes, ...
        code, error = None, e
    blocked = {"ipdb", "joblib", "resource", "psutil", "tkinter"}
    for name in imported_modules(code) if code is not None else ():
        if name and name.split(".")[0] not in blocked:
            try:
                __import__(name)
            except BaseException:
                pass

    class WriteOnlyStringIO(io.StringIO):  # olmes's swallow_io: output kept, reads raise
        def read(self, *args, **kwargs):
            raise IOError

        def readline(self, *args, **kwargs):
            raise IOError

        def readlines(self, *args, **kwargs):
            raise IOError

        def readable(self, *args, **kwargs):
            return False

    class TimedOut(Exception):
        pass

    def alarm(signum, frame):
        raise TimedOut()

    import builtins
    import faulthandler
    import shutil
    import subprocess

    status_write, exit_now, stderr = os.write, os._exit, sys.stderr
    # olmes's reliability_guard: these names become None (calling one raises TypeError), as there.
    faulthandler.disable()
    builtins.exit = builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in blocked:
        sys.modules[name] = None
    stream = WriteOnlyStringIO()
    sys.stdout = sys.stdin = stream
    sys.stderr = stream
    signal.signal(signal.SIGALRM, alarm)
    try:
        if error is not None:
            raise error
        signal.setitimer(signal.ITIMER_REAL, CONFIG["timeout"])
        exec(code, {})
        signal.setitimer(signal.ITIMER_REAL, 0)
    except TimedOut:
        exit_now(3)
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:  # imported only on failure (time per program); its last line is the result
            import traceback

            traceback.print_exception(e, file=stderr)
        except BaseException:
            stderr.write(f"{type(e).__name__}: {e}\n")
        stderr.flush()
        exit_now(1)
    status_write(status_fd, b"passed\n")
    exit_now(0)


def wait_status(pid):
    """waitpid's status as an exit code for our own exit (a signal: 128 + its number)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def init(program, status_fd):
    """Stage 2: PID 1 of the new namespace. Its exit kills everything else in the namespace."""
    # The outer stage died (killed with its process group): so do we, and with us everything inside.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if "fs" not in DISABLED:
        os.write(status_fd, ("layers " + " ".join(build_root()) + "\n").encode())
    if "ipc" not in DISABLED:  # IPC and UTS: a hostname of its own
        libc.sethostname(b"sandbox", 7)
    drop_capabilities()
    child = os.fork()
    if child == 0:
        run_program(program, status_fd)
    os.close(status_fd)
    while True:  # reap orphans until the program itself exits
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main():
    program = sys.stdin.read()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    status_fd = CONFIG["status_fd"]
    if CONFIG["backend"] != "namespaces" or {"fs", "pid", "net", "ipc"} <= DISABLED:
        run_program(program, status_fd)  # bwrap made the namespaces, or none are wanted
    flags = unshare_namespaces()
    names = [name for name, flag in (("user_ns", CLONE_NEWUSER), ("mount_ns", CLONE_NEWNS), ("pid_ns", CLONE_NEWPID),
                                     ("net_ns", CLONE_NEWNET), ("ipc_uts_ns", CLONE_NEWIPC)) if flags & flag]
    os.write(status_fd, ("layers " + " ".join(names) + "\n").encode())
    child = os.fork()  # the first child of a new PID namespace is its PID 1
    if child == 0:
        init(program, status_fd)
    os.close(status_fd)
    os._exit(wait_status(child))


if __name__ == "__main__":  # `python -c <this text>`; importing this file does nothing
    CONFIG.update(marshal.loads(bytes.fromhex(sys.argv[1])))  # marshal: no import cost, same interpreter
    DISABLED.update(CONFIG["disable"])
    main()
