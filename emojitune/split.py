"""02: the seeded, stratified train/validation split that keeps every label in validation."""

import random
from collections import defaultdict
from dataclasses import dataclass

from .checkpoints import refuse_data_change, sha256_file, write_bytes, write_json
from .cli import option
from .console import UserError, log
from .data import Record, encode_records, format_counts, label_counts, records_from_json


@dataclass
class SplitSettings:
    test_size: float = option(0.2, "share of each label that goes to validation, at least one per label")
    seed: int = option(42, "random seed of the split")


def val_count(n: int, test_size: float) -> int:
    """Validation examples for a label with n examples: the test share rounded, but at least one
    and never all of them, so each label with 2+ examples is in both splits."""
    return min(n - 1, max(1, round(n * test_size)))


def stratified_split(records: list[Record], test_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split per label; files keep the prepared order so a diff between runs is readable."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r.label].append(i)
    rng = random.Random(seed)
    val_idx = set()
    for label in by_label:  # first-appearance order: the same input and seed draw the same numbers
        idx = by_label[label]
        val_idx.update(rng.sample(idx, val_count(len(idx), test_size)))
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def check_test_size(test_size: float) -> None:
    if not 0 < test_size < 1:
        raise UserError(f"--test-size {test_size} must be between 0 and 1 (exclusive), for example 0.2")


def split(cp, settings: SplitSettings = SplitSettings(), overwrite: bool = False) -> dict:
    """02: split DIR/data/prepared.json into train.json and val.json, stratified by label."""
    test_size, seed = settings.test_size, settings.seed
    check_test_size(test_size)
    hint = "run 01_prepare_data.py first"
    if not cp.prepared.exists():
        raise UserError(f"{cp.prepared} not found: {hint}")
    records = records_from_json(cp.prepared, hint)
    counts = label_counts(records)
    singles = [label for label, n in counts.items() if n < 2]
    if singles:
        raise UserError(
            f"{cp.prepared}: label(s) {' '.join(singles)} have a single example and cannot be in both train and "
            "validation: add examples, or leave them out with 01_prepare_data.py --labels"
        )
    train, val = stratified_split(records, test_size, seed)
    train_counts, val_counts = label_counts(train), label_counts(val)
    files = {cp.train: encode_records(train), cp.val: encode_records(val)}
    refuse_data_change(cp, files, overwrite, "02_split_data.py run")
    info = {
        "seed": seed,
        "test_size": test_size,
        "prepared_sha256": sha256_file(cp.prepared),
        "train_size": len(train),
        "val_size": len(val),
        "labels": {label: {"train": train_counts[label], "val": val_counts[label]} for label in counts},
    }
    for path, data in files.items():
        write_bytes(path, data)
    write_json(cp.split_info, info)
    log(f"split {cp.prepared} (seed {seed}, test size {test_size}): {len(train)} train / {len(val)} val")
    log(format_counts(counts, {"train": train_counts, "val": val_counts}))
    log("wrote " + ", ".join(str(p) for p in (cp.train, cp.val, cp.split_info)))
    return info
