"""Command-line flags: built from the dataclasses that hold the defaults, and the flags every script
shares, each defined once."""

import argparse
from dataclasses import field, fields

from . import DEFAULT_CHECKPOINT_DIR, DEFAULT_MODEL
from .checkpoints import CheckpointDir

DEVICES = ("auto", "cpu", "cuda", "mps")


def option(default, help: str, shown: str | None = None, choices: tuple | None = None):
    """A dataclass field that is also a command-line flag: its default and help live here only."""
    return field(default=default, metadata={"help": help, "shown": shown, "choices": choices})


def add_options(p, cls, defaults_after_parse: bool = False, group: bool = False) -> None:
    """One flag per `option` field of cls: `lora_r` becomes `--lora-r`, typed from its default.
    With defaults_after_parse the flags default to None, so the caller can tell which were given.
    With group, the flags are listed under the class docstring in --help."""
    if group:
        p = p.add_argument_group(cls.__doc__.strip())
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=None if defaults_after_parse else False, help=text)
            continue
        shown = f.metadata["shown"] or (f"{f.default:g}" if isinstance(f.default, float) else f.default)
        p.add_argument(flag, type=type(f.default), default=None if defaults_after_parse else f.default,
                       choices=f.metadata.get("choices"), help=f"{text} (default: {shown})")


def options_from_args(cls, args, **extra):
    """An instance of cls from parsed flags; flags left at None keep the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(cls)
             if "help" in f.metadata and getattr(args, f.name, None) is not None}
    return cls(**given, **extra), set(given)


def add_checkpoint_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, metavar="DIR",
                   help=f"the folder all steps share (default: {DEFAULT_CHECKPOINT_DIR})")


def checkpoint_dir(args) -> CheckpointDir:
    return CheckpointDir(args.checkpoint_dir)


def add_model(p: argparse.ArgumentParser, for_training: bool = False) -> None:
    shown = f"the one in DIR/run.json, else {DEFAULT_MODEL}"
    if for_training:
        shown = f"for a new run {DEFAULT_MODEL}; a rerun in DIR uses the one in DIR/run.json"
    p.add_argument("--model", default=None, metavar="ID_OR_PATH",
                   help=f"base model: a Hugging Face model id or a local model folder (default: {shown})")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks cuda, then mps, then cpu (default: auto)")


def add_checkpoint(p: argparse.ArgumentParser, what: str = "which adapter", default_none: bool = False) -> None:
    """default_none: the flag is None when not given (its meaning stays `last`), for scripts where
    giving it changes what they do."""
    # Not --checkpoint-dir: that is the whole folder; this picks one adapter inside it.
    p.add_argument("--checkpoint", default=None if default_none else "last", metavar="last|best|epoch-N",
                   help=f"{what} in DIR: last (DIR/adapter, written when 03 finishes), best (the epoch with the "
                        "lowest val loss) or epoch-N (default: last)")


def add_system(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system prompt sent with every tweet (default: the one the adapter was trained with, from "
                        "DIR/run.json; before any training, that of DIR/data/train.json; '' sends none)")


def add_history(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--history", type=int, default=0, metavar="N",
                   help=f"{what} (default: 0, every tweet is a fresh conversation)")
