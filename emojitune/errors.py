"""User-facing errors: one clear line with the fix, a non-zero exit, no traceback."""

import os
import sys


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag, steps out of order). The message says how."""


def run_main(main) -> None:
    """Run a script's main(); turn UserError and Ctrl+C into a short message and an exit code."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
