"""Command-line flags shared by the numbered scripts, defined once."""

import argparse

from . import DEFAULT_CHECKPOINT_DIR, DEFAULT_MODEL
from .paths import CheckpointDir

DEVICES = ("auto", "cpu", "cuda", "mps")


def add_checkpoint_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, metavar="DIR",
                   help=f"folder shared by all steps (default: {DEFAULT_CHECKPOINT_DIR})")


def checkpoint_dir(args) -> CheckpointDir:
    return CheckpointDir(args.checkpoint_dir)


def add_model(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, help_extra: str = "") -> None:
    shown = f" (default: {default})" if default else ""
    p.add_argument("--model", default=default, metavar="ID_OR_PATH",
                   help=f"Hugging Face model id or a local model folder{shown}{help_extra}")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks cuda, then mps, then cpu (default: auto)")


def add_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (greedy unless --temperature > 0)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default: 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share (default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0, off)")
