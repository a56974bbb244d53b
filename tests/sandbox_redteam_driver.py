"""Scores hostile programs through the evaluation sandbox in a process of its own (tests/test_sandbox.py).

Usage: python sandbox_redteam_driver.py PROGRAMS.json OUT.json [--allow-unsandboxed-code]

The red-team tests run it as the current user (root on CI) and as an unprivileged user (uid 65534), whose
interpreter may lack this project's dependencies: so `mft_jax/evaluate/sandbox.py` is loaded from its file
with a stand-in for the one name it imports (EvalError), not through the package (which imports JAX).
The programs may name {SCORER_PID}: this process's pid, whose environment holds the test's marker variable.
Writes {"status": Status.record(), "outcomes": [[passed, result], ...], "seconds": float}.
"""

import importlib.util
import json
import os
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sandbox():
    base = types.ModuleType("mft_jax.evaluate.base")

    class EvalError(ValueError):
        pass

    base.EvalError = EvalError
    for name in ("mft_jax", "mft_jax.evaluate"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mft_jax.evaluate.base"] = base
    spec = importlib.util.spec_from_file_location("redteam_sandbox", os.path.join(REPO, "mft_jax/evaluate/sandbox.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["redteam_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def main():
    programs_path, out_path = sys.argv[1:3]
    allow = "--allow-unsandboxed-code" in sys.argv[3:]
    sandbox = load_sandbox()
    with open(programs_path) as f:
        programs = [p.replace("{SCORER_PID}", str(os.getpid())) for p in json.load(f)]
    status = sandbox.require(allow)
    start = time.perf_counter()
    outcomes = sandbox.run_programs(programs, sandbox.Limits(timeout_s=5), allow_unsandboxed_code=allow)
    seconds = time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump({"status": status.record(allow), "outcomes": [[o.passed, o.result] for o in outcomes],
                   "seconds": seconds}, f)


if __name__ == "__main__":
    main()
