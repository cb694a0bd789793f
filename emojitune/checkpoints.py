"""The checkpoint folder that the numbered scripts share: its layout, atomic writes, which adapter a
--checkpoint name means, and the rules that keep a step from overwriting what an earlier step made."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import DEFAULT_MODEL
from .console import UserError


class CheckpointDir:
    """Every path of a checkpoint folder, defined once."""

    def __init__(self, root):
        self.root = Path(root)
        # 01 / 02: data
        self.data_dir = self.root / "data"
        self.prepared = self.data_dir / "prepared.json"
        self.train = self.data_dir / "train.json"
        self.val = self.data_dir / "val.json"
        self.split_info = self.data_dir / "split.json"
        # 03: the training run
        self.run_info = self.root / "run.json"
        self.metrics = self.root / "metrics.json"
        self.epochs_dir = self.root / "epochs"
        self.adapter = self.root / "adapter"
        self.resume_state = self.root / "resume.pt"  # optimizer and random state of the last finished epoch
        self.trainer_dir = self.root / "trl"  # --engine trl: the Trainer's checkpoint-N (what --resume needs), logs
        # 04 / 05: made from the run
        self.loss_plot = self.root / "loss.png"
        self.compare_plot = self.root / "compare.png"  # 04 --compare: this run's curves beside other runs'
        self.eval_base = self.root / "eval_base.json"
        self.eval_compare = self.root / "eval_compare.json"
        # 07
        self.export_dir = self.root / "export"
        self.confusion_plot = self.root / "confusion.png"  # 05: base (and tuned with --compare)

    def epoch_dir(self, epoch: int) -> Path:
        return self.epochs_dir / f"epoch-{epoch}"

    def saved_epochs(self) -> list[int]:
        """The epochs whose adapter folder exists, in order."""
        if not self.epochs_dir.is_dir():
            return []
        numbers = (p.name.removeprefix("epoch-") for p in self.epochs_dir.glob("epoch-*"))
        return sorted(int(n) for n in numbers if n.isdigit())

    def has_trained_adapter(self) -> bool:
        return self.adapter.exists() or bool(self.saved_epochs())

    def derived_outputs(self) -> list[Path]:
        """What 04, 05 and 07 made from a run: stale once the run changes."""
        return [self.loss_plot, self.compare_plot, self.eval_base, self.eval_compare, self.confusion_plot,
                self.export_dir]

    def training_outputs(self) -> list[Path]:
        """Everything 03 writes and what was made from it: what --overwrite clears before a new run."""
        return [self.run_info, self.metrics, self.epochs_dir, self.adapter, self.resume_state, self.trainer_dir,
                *self.derived_outputs()]


# ---- atomic writes: a crash or Ctrl+C leaves the old file or the new one, never half of one ----------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path`; once the block succeeds it replaces `path`.
    The file gets the permissions a plain open() would give it (mkstemp alone makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; once the block succeeds it replaces the folder `path`,
    so readers never see half a folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; ours are not
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        remove(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    finally:
        remove(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


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


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---- which adapter, which base model ------------------------------------------------------------------

def best_epoch(epochs: list[dict]) -> int:
    """The epoch with the lowest validation loss (the earliest on a tie)."""
    return min(epochs, key=lambda e: (e["val_loss"], e["epoch"]))["epoch"]


def resolve_adapter(cp: CheckpointDir, name: str,
                    hint: str = "run 03_train_model.py first, or use --base to test the base model") -> Path:
    """The adapter folder for --checkpoint last|best|epoch-N; `hint` ends the message when there is none."""
    saved = cp.saved_epochs()
    if name == "last":
        if not cp.adapter.exists():
            if saved:  # an unfinished run: adapter/ is written when it finishes
                raise UserError(f"{cp.adapter} not found: the run in {cp.root} stopped after epoch {saved[-1]}: "
                                f"finish it with `uv run 03_train_model.py --resume --checkpoint-dir {cp.root}`, "
                                f"or test a finished epoch with --checkpoint best (or epoch-{saved[-1]})")
            raise UserError(f"{cp.adapter} not found: {hint}")
        return cp.adapter
    if name == "best":
        if not cp.metrics.exists():
            raise UserError(f"{cp.metrics} not found: {hint}")
        epochs = read_json(cp.metrics).get("epochs") or []
        if not epochs:
            raise UserError(f"{cp.metrics} lists no finished epoch: {hint}")
        return resolve_adapter(cp, f"epoch-{best_epoch(epochs)}", hint)
    number = name.removeprefix("epoch-")
    if not name.startswith("epoch-") or not number.isdigit():
        raise UserError(f"--checkpoint {name}: use last, best or epoch-N (for example epoch-2)")
    path = cp.epoch_dir(int(number))
    if not path.exists():
        if not saved:
            raise UserError(f"{path} not found: no epoch is saved in {cp.epochs_dir}: {hint}")
        raise UserError(f"{path} not found: the saved epochs are {', '.join(f'epoch-{n}' for n in saved)}: "
                        "pick one with --checkpoint epoch-N, or --checkpoint best")
    return path


def read_run_info(cp: CheckpointDir) -> dict | None:
    return read_json(cp.run_info) if cp.run_info.exists() else None


def base_model(cp: CheckpointDir, override: str | None) -> tuple[str, str]:
    """The base model to load and where that choice came from: --model, run.json, or the default."""
    if override:
        return override, "--model"
    info = read_run_info(cp)
    if info:
        model = info["base_model"]
        if model.startswith(("/", "~", ".")) and not Path(model).expanduser().exists():
            raise UserError(f"{cp.run_info} names the base model folder {model}, which is not there any more: "
                            "pass its new place with --model PATH")
        return model, str(cp.run_info)
    return DEFAULT_MODEL, "default"


# ---- what a step may overwrite -------------------------------------------------------------------------

def refuse_data_change(cp: CheckpointDir, new_files: dict[Path, bytes], overwrite: bool, step: str) -> None:
    """Refuse to change data files a trained adapter in cp was made from, unless --overwrite."""
    if overwrite or not cp.has_trained_adapter():
        return
    changed = [p for p, data in new_files.items() if not p.exists() or p.read_bytes() != data]
    if changed:
        raise UserError(
            f"{cp.root} holds a training run made from the current data; this {step} would change "
            f"{', '.join(str(p) for p in changed)} under it: pass --overwrite to replace the data anyway "
            "(the adapter then no longer matches it), or use another --checkpoint-dir"
        )


def check_existing_run(cp: CheckpointDir, resume: bool, overwrite: bool) -> dict | None:
    """03's rule: never overwrite a finished or unfinished run by accident. Return the run.json of the
    run to resume, or None for a new run."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if resume:
        if not (cp.resume_state.exists() or cp.trainer_dir.exists()) or not cp.run_info.exists():
            raise UserError(f"{cp.root} holds no run to resume (no finished epoch): start one without --resume")
        return read_json(cp.run_info)
    if overwrite:
        return None
    if cp.adapter.exists():
        raise UserError(f"{cp.adapter} already holds a trained adapter: pass --overwrite to replace the run, "
                        "--resume to continue it with more --epochs, or use another --checkpoint-dir")
    if cp.metrics.exists() or cp.epochs_dir.exists():
        raise UserError(f"{cp.root} holds an unfinished run: pass --resume to continue it, --overwrite to start "
                        "over, or use another --checkpoint-dir")
    return None
