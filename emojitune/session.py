"""What 05 and 06 share: the base model, adapter, system prompt and labels that a checkpoint folder
implies, and one model load that answers both as the tuned model and as the base model."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

from . import DEFAULT_SYSTEM_PROMPT
from .checkpoints import CheckpointDir, base_model, read_run_info, resolve_adapter
from .console import UserError
from .data import Record, records_from_json, training_system_prompt
from .modeling import LoadedModel, load_model


def train_records(cp: CheckpointDir) -> list[Record] | None:
    if not cp.train.exists():
        return None
    return records_from_json(cp.train, "run 02_split_data.py again")


def system_prompt(cp: CheckpointDir, override: str | None) -> tuple[str | None, str]:
    """--system if given ('' = none); else the prompt the adapter was trained with (run.json), or that of
    the training data before any run; else the default. Returns the prompt and where it came from."""
    if override is not None:
        return (override or None), "--system"
    info = read_run_info(cp)
    if info:
        return info.get("system_prompt"), str(cp.run_info)
    records = train_records(cp)
    if records:
        return training_system_prompt(records), str(cp.train)
    return DEFAULT_SYSTEM_PROMPT, "default"


def trained_labels(cp: CheckpointDir) -> list[str]:
    """The emoji set seen in DIR/data/train.json (every turn of a conversation), in order of first appearance."""
    records = train_records(cp)
    if not records:
        raise UserError(f"{cp.train} not found: the trained labels come from it: run 02_split_data.py first")
    return list(dict.fromkeys(label for r in records for label in r.labels))


@dataclass
class Setup:
    model_id: str
    model_from: str  # where the base model choice came from: --model, run.json or default
    adapter: Path | None
    system: str | None
    system_from: str


def resolve_setup(cp: CheckpointDir, *, model: str | None, checkpoint: str | None, system: str | None) -> Setup:
    """Everything 05/06 need to know before loading: checkpoint=None means no adapter (the base model)."""
    adapter = resolve_adapter(cp, checkpoint) if checkpoint is not None else None
    model_id, model_from = base_model(cp, model)
    system, system_from = system_prompt(cp, system)
    return Setup(model_id, model_from, adapter, system, system_from)


def load(setup: Setup, device: str) -> LoadedModel:
    return load_model(setup.model_id, device, adapter=setup.adapter)


@contextlib.contextmanager
def as_base_model(lm: LoadedModel):
    """Answer as the base model from the same load: PEFT switches the adapter off inside the block."""
    if hasattr(lm.model, "disable_adapter"):
        with lm.model.disable_adapter():
            yield
    else:
        yield
