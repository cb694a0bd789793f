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
    """Run a script's main(); turn UserError and Ctrl+C into a short message and an exit code."""
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
