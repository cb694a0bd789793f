"""Several training processes on one machine: `03_train_model.py --processes N`, and the documented
`accelerate launch --num_processes N` on a machine without GPUs.

Each process gets the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); accelerate and torch do the distribution (gloo on CPU, NCCL on GPUs). Launching them
ourselves means a user error is one line and exit code 1, not a launcher's traceback.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .console import UserError, log


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the system at once.

    A training step allocates and frees the same large activations every time. By default glibc serves
    blocks from about 128 KB up with fresh mmap()s and unmaps them when freed, and trims the heap top, so
    every step pays page faults to get zeroed pages back from the kernel. Raising the mmap threshold to its
    maximum (32 MB on 64-bit) and not trimming reuses the memory instead. Only the allocator's policy
    changes, not a number computed; elsewhere than glibc (macOS, musl) this does nothing.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 2 ** 31 - 1)  # int: about 2 GB of free heap top kept
    mallopt(m_top_pad, 256 * 1024 * 1024)


def is_worker() -> bool:
    """True inside a process that a launcher (ours, torchrun or accelerate's) started as one of several."""
    return "WORLD_SIZE" in os.environ


def _requested_processes(cmdline: list[str]) -> int | None:
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(cmdline):
                return int(cmdline[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return None


def started_alone_by_accelerate() -> int | None:
    """Without GPUs, `accelerate launch --num_processes N` starts ONE process (its multi-CPU launcher
    needs MPI), which would silently train alone. That launcher sets MASTER_ADDR only when asked for
    several processes, and no WORLD_SIZE; N is on its command line, our parent's. Returns N, or None."""
    if not ("ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and not is_worker()):
        return None
    fix = ("accelerate started a single process; on a machine without GPUs run: uv run 03_train_model.py "
           "--processes N ...")
    try:
        n = _requested_processes(Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0"))
    except (OSError, ValueError):
        raise UserError(fix) from None
    return n if n and n > 1 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int) -> int:
    """Run this same command as n processes of one training run; return the exit code to end with:
    0, or the first failing process's code (the others are then stopped)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n))
    log(f"starting {n} training processes", err=True)
    procs = [subprocess.Popen([sys.executable, *sys.argv], env={**base, "RANK": str(i), "LOCAL_RANK": str(i)})
             for i in range(n)]
    code = 0
    while any(p.poll() is None for p in procs):
        try:
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not code:
                code = failed[0]
                for p in procs:  # a process that failed alone would leave the others waiting on it forever
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        except KeyboardInterrupt:  # Ctrl+C reached every process: wait for them to save and stop
            code = code or 130
    return code or next((p.returncode for p in procs if p.returncode), 0)
