"""`mft-jax` and `python -m mft_jax`: the command line (mft_jax.cli) in a process of its own. Ctrl-C at any
moment is one line and exit 130: during the import of the command modules (seconds) as during the command,
and the interpreter's teardown after it prints nothing more. An interrupted command has unwound through its own
cleanup (output directories, checkpoints, the run lock) when it returns; the process then ends at once, so
library threads still running (orbax's writers, whose files the cleanup has removed) neither report nor write
on while the interpreter tears down."""

import _thread
import os
import signal
import sys
import time


def main():
    sys.unraisablehook = _interrupt_where_it_can_be_handled
    try:
        from mft_jax import cli
    except BaseException as error:  # a C extension's import interrupted raises ImportError from KeyboardInterrupt
        if not _interrupted(error):
            raise
        _say_interrupted()
        os._exit(130)  # nothing of ours started yet; skip the interpreter's teardown of half-imported modules
    try:
        cli.main()
    except SystemExit as done:
        if done.code == cli.EXIT_INTERRUPTED:
            _exit_now(cli.EXIT_INTERRUPTED)
        signal.signal(signal.SIGINT, _interrupted_in_teardown)
        raise
    except KeyboardInterrupt:  # between the command's end and here
        _say_interrupted()
        _exit_now(cli.EXIT_INTERRUPTED)
    signal.signal(signal.SIGINT, _interrupted_in_teardown)


def _interrupted(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is `error` or in its chain of causes."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def _interrupt_where_it_can_be_handled(unraisable, _default=sys.unraisablehook) -> None:
    """A Ctrl-C that lands in code whose exceptions Python cannot raise (a GC callback such as JAX's, a
    destructor) is reported as 'Exception ignored' and lost; it is delivered to the main thread again instead."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):  # (from another thread: here it would raise at once)
        _thread.start_new_thread(_interrupt_main_soon, ())
        return
    _default(unraisable)


def _interrupt_main_soon() -> None:
    time.sleep(0.01)  # once the hook has returned
    _thread.interrupt_main()


def _interrupted_in_teardown(signum, frame) -> None:
    """Ctrl-C once the command has returned, while the interpreter waits for writer threads and tears down."""
    _say_interrupted()
    os._exit(130)


def _say_interrupted() -> None:
    print("mft-jax: error: interrupted", file=sys.stderr, flush=True)


def _exit_now(code: int) -> None:
    """After a Ctrl-C, once the error line is out: end the process without the interpreter's teardown, where
    interrupted library threads (orbax's writers and event loops, JAX's GC callback) would log tracebacks after
    the error line. Only in a process of its own (tests call cli.main)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
