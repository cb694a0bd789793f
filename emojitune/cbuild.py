"""This package's C kernels (dropout_mask.c, output_pass.c, rms_norm.c), built with the machine's C compiler into a
temporary folder that is removed once the library is loaded: nothing is downloaded, cached or written elsewhere.
The caller checks a kernel's results against PyTorch's before using it, and keeps PyTorch's own way where there
is no compiler or the check fails.

A build can be started early (start()) in a thread of its own: the compiler, a process of its own, then runs on
another core while this one does other work. 03 starts its kernels' builds before it imports transformers and
PEFT (~2.3 s on one core of a 2-core machine), which hides the ~0.55 s the three builds took one after the other
in its first training step."""

import threading
from pathlib import Path

_started = {}  # (source, flags, compiler environment) -> (thread, {"library": ...}), until build() takes it
_lock = threading.Lock()


def compilers() -> list[list[str]]:
    """The C compilers tried, in order, each as a command: $CC where it is set (it may carry flags of its own,
    "gcc -m64", as in make), else cc, gcc and clang."""
    import os
    import shlex

    if os.environ.get("CC", "").strip():
        return [shlex.split(os.environ["CC"])]
    return [["cc"], ["gcc"], ["clang"]]


def start(source: Path, flags: tuple[str, ...] = ()) -> None:
    """Begin build(source, flags) in a background thread; build() then waits for it and returns its library.
    Nothing if the same build is started already. A started build that no build() takes is simply dropped."""
    key = _key(source, flags)
    with _lock:
        if key in _started:
            return
        result, found = {}, _found_compilers()  # the settings of now, not of when the thread runs
        # Not a daemon: Python waits for an unfinished build at exit, so its folder is removed (console's quick
        # exit also waits while one runs).
        thread = threading.Thread(target=lambda: result.update(library=_compile_and_load(source, flags, found)),
                                  name=f"emojitune-build-{source.stem}")
        _started[key] = (thread, result)
    thread.start()


def build(source: Path, flags: tuple[str, ...] = ()):
    """`source` compiled as a shared library and loaded (ctypes.CDLL), or None: the build start() began under the
    same compiler settings ($CC, $PATH) if there is one, else a build now. `flags`: wanted, not needed (a compiler
    that refuses them builds without them)."""
    with _lock:
        started = _started.pop(_key(source, flags), None)
    if started is not None:
        thread, result = started
        thread.join()
        if "library" in result:
            return result["library"]
    return _compile_and_load(source, flags, _found_compilers())


def _key(source: Path, flags) -> tuple:
    import os

    return Path(source), tuple(flags), os.environ.get("CC"), os.environ.get("PATH")


def _found_compilers() -> list[list[str]]:
    """compilers() that are on the PATH, each with its full path."""
    import shutil

    return [[shutil.which(name), *own_flags] for name, *own_flags in compilers() if shutil.which(name)]


def _compile_and_load(source: Path, flags, found: list[list[str]]):
    import ctypes
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="emojitune-", ignore_cleanup_errors=True) as folder:
        library = Path(folder) / (source.stem + ".so")
        for compiler, *own_flags in found:
            # -march=native: the vector instructions of the machine that runs it (built for this process only)
            for tried in (["-O3", "-march=native", *flags], ["-O3", *flags], ["-O3"]):
                command = [compiler, *own_flags, *tried, "-shared", "-fPIC", "-o", str(library), str(source), "-lm"]
                try:
                    if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                        return ctypes.CDLL(str(library))  # loaded: the file can go with the folder
                except (OSError, subprocess.SubprocessError):
                    continue
    return None
