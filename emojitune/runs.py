"""What a checkpoint directory says about its run: adapters, base model, system prompt, trained labels."""

from collections import Counter
from pathlib import Path

from . import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT
from .errors import UserError
from .files import read_json


def best_epoch(epochs: list[dict]) -> int:
    """The epoch with the lowest validation loss (the earliest on a tie)."""
    return min(epochs, key=lambda e: (e["val_loss"], e["epoch"]))["epoch"]


def resolve_checkpoint(cp, name: str,
                       hint: str = "run 03_train_model.py first, or use --base to test the base model") -> Path:
    """The adapter folder for --checkpoint last|best|epoch-N; `hint` ends the message when it is missing."""
    if name == "last":
        if not cp.adapter.exists():
            extra = f" (finished epochs are in {cp.epochs_dir}: try --checkpoint best)" if cp.epochs_dir.exists() else ""
            raise UserError(f"{cp.adapter} not found{extra}: {hint}")
        return cp.adapter
    if name == "best":
        if not cp.metrics.exists():
            raise UserError(f"{cp.metrics} not found: {hint}")
        epochs = read_json(cp.metrics).get("epochs") or []
        if not epochs:
            raise UserError(f"{cp.metrics} lists no finished epoch: {hint}")
        return resolve_checkpoint(cp, f"epoch-{best_epoch(epochs)}", hint)
    number = name.removeprefix("epoch-")
    if not name.startswith("epoch-") or not number.isdigit():
        raise UserError(f"--checkpoint {name}: use last, best or epoch-N (for example epoch-2)")
    path = cp.epoch_dir(int(number))
    if not path.exists():
        have = sorted(p.name for p in cp.epochs_dir.glob("epoch-*")) if cp.epochs_dir.exists() else []
        raise UserError(f"{path} not found (saved: {', '.join(have) or 'none'}): {hint}")
    return path


def base_model(cp, override: str | None) -> tuple[str, str]:
    """The base model to load and where that choice came from: --model, run.json, or the default."""
    if override:
        return override, "--model"
    if cp.run_info.exists():
        return read_json(cp.run_info)["base_model"], str(cp.run_info)
    return DEFAULT_MODEL, "default"


def train_records(cp):
    from .data import records_from_json

    if not cp.train.exists():
        return None
    return records_from_json(cp.train, "run 02_split_data.py again")


def common_system_prompt(records) -> str | None:
    """The system prompt of the training data (the most common one, if records differ)."""
    return Counter(r.system for r in records).most_common(1)[0][0]


def system_prompt(cp, override: str | None) -> tuple[str | None, str]:
    """--system if given ('' = none); else the prompt the adapter was trained with (run.json), or that of
    the training data before any run; else the default."""
    if override is not None:
        return (override or None), "--system"
    if cp.run_info.exists():
        return read_json(cp.run_info).get("system_prompt"), str(cp.run_info)
    records = train_records(cp)
    if records:
        return common_system_prompt(records), str(cp.train)
    return DEFAULT_SYSTEM_PROMPT, "default"


def trained_labels(cp) -> list[str]:
    """The emoji set seen in DIR/data/train.json, in order of first appearance."""
    records = train_records(cp)
    if not records:
        raise UserError(f"{cp.train} not found: the trained labels come from it: run 02_split_data.py first")
    return list(dict.fromkeys(r.label for r in records))
