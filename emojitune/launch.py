"""`accelerate launch --num_processes N` on a machine without GPUs: make the N processes exist."""

import os
import sys
from pathlib import Path

from .console import UserError


def _requested_processes(cmdline: list[str]) -> int | None:
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(cmdline):
                return int(cmdline[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return None


def started_alone_by_accelerate() -> bool:
    """True in a process that accelerate's simple launcher started for more than one process: it sets
    MASTER_ADDR only when asked for several, while real multi-process launchers set WORLD_SIZE."""
    return ("ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ)


def relaunch_with_torchrun_on_cpu(script: str) -> None:
    """Without GPUs, `accelerate launch --num_processes N` starts ONE process (its multi-CPU launcher
    needs MPI), so the documented command would silently train alone. accelerate has no flag for this
    case other than `--multi_gpu`, whose torchrun launcher runs CPU processes with gloo: we replace
    this process by that launch of the same command (the parent's command line gives N)."""
    if not started_alone_by_accelerate():
        return
    fix = ("accelerate started a single process; on a machine without GPUs run: uv run accelerate launch "
           f"--multi_gpu --num_processes N {Path(script).name} ...")
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        n = _requested_processes(parent)
    except (OSError, ValueError):
        raise UserError(fix) from None
    if n is None or n < 2:
        return
    print(f"accelerate launch: starting {n} processes (torchrun launcher, gloo on CPU)", file=sys.stderr)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *sys.argv[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    os.execve(sys.executable, args, env)
