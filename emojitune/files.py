"""Files of the checkpoint directory: atomic writes of JSON, bytes and whole folders; hashes."""

import hashlib
import json
import os
import secrets
from pathlib import Path

from .errors import UserError


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a crash or Ctrl+C leaves the old file or the new one, never half of one."""
    write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600, and os.replace keeps that mode. Created like this the
    # file gets what open() gives (0666 minus the umask); O_EXCL makes sure the name is ours alone, and
    # O_BINARY (Windows only) keeps newlines as written.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, missing_hint: str = ""):
    """Read a JSON file we wrote ourselves; a missing or damaged file is a UserError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found{': ' + missing_hint if missing_hint else ''}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fix = missing_hint or "delete it and run the step that writes it again"
        raise UserError(f"{path} is damaged ({e}): {fix}") from None


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one; readers never see half a folder."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def remove(path: Path) -> None:
    import shutil

    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
