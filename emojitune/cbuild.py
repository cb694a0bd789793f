"""This package's C kernels (dropout_mask.c, output_pass.c, rms_norm.c), built when first needed with the machine's C
compiler into a temporary folder that is removed once the library is loaded: nothing is downloaded, cached
or written elsewhere. The caller checks a kernel's results against PyTorch's before using it, and keeps
PyTorch's own way where there is no compiler or the check fails."""

from pathlib import Path


def compilers() -> list[list[str]]:
    """The C compilers tried, in order, each as a command: $CC where it is set (it may carry flags of its own,
    "gcc -m64", as in make), else cc, gcc and clang."""
    import os
    import shlex

    if os.environ.get("CC", "").strip():
        return [shlex.split(os.environ["CC"])]
    return [["cc"], ["gcc"], ["clang"]]


def build(source: Path, flags: tuple[str, ...] = ()):
    """`source` compiled as a shared library and loaded (ctypes.CDLL), or None. `flags`: wanted, not needed
    (a compiler that refuses them builds without them)."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="emojitune-", ignore_cleanup_errors=True) as folder:
        library = Path(folder) / (source.stem + ".so")
        for name, *own_flags in compilers():
            compiler = shutil.which(name)
            if compiler is None:
                continue
            # -march=native: the vector instructions of the machine that runs it (built for this process only)
            for tried in (["-O3", "-march=native", *flags], ["-O3", *flags], ["-O3"]):
                command = [compiler, *own_flags, *tried, "-shared", "-fPIC", "-o", str(library), str(source), "-lm"]
                try:
                    if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                        return ctypes.CDLL(str(library))  # loaded: the file can go with the folder
                except (OSError, subprocess.SubprocessError):
                    continue
    return None
