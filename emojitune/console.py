"""What the user sees: report lines, warnings, one-line errors with the fix, and exit codes."""

import os
import sys


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag, steps out of order). The message says how."""


def log(*parts, err: bool = False) -> None:
    """A report line: stdout, or stderr where stdout carries answers (06) or only one process reports."""
    print(*parts, file=sys.stderr if err else sys.stdout, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_main(main) -> None:
    """Run a script's main(); turn UserError and Ctrl+C into a short message and an exit code. A main that
    returns ends the process at once (exit_without_teardown)."""
    try:
        main()
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher every process hits the same error
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Exit with status 0 now, skipping the interpreter's teardown of every imported module: after PyTorch
    and transformers are imported it takes 0.5-1 s on a 2-core machine (the time between a script's last
    line and the shell prompt), and it does nothing a finished script needs. What an exit must still do is
    done first: the atexit handlers (where libraries close files, finish trackers, remove temporary
    folders) and the flush of stdout and stderr. Where another (non-daemon) thread still runs, which Python
    would wait for, or this Python has no atexit._run_exitfuncs, it returns and Python exits as usual."""
    import atexit
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if run_exit_handlers is None or others:
        return
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away (`... | head -1`), or the stream was closed
            pass
    os._exit(0)
