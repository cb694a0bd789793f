"""02: the seeded, stratified train/validation split that keeps every label in validation."""

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from .checkpoints import refuse_data_change, sha256_file, write_bytes, write_json
from .cli import option
from .console import UserError, log, warn
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
    """Split per label; files keep the prepared order so a diff between runs is readable. A conversation
    stays whole and counts under the label of its last turn; then `_cover_labels` moves a few conversations
    so that labels of earlier turns are in both splits too, where the data allows."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r.label].append(i)
    rng = random.Random(seed)
    val_idx = set()
    for label in by_label:  # first-appearance order: the same input and seed draw the same numbers
        idx = by_label[label]
        val_idx.update(rng.sample(idx, val_count(len(idx), test_size)))
    _cover_labels(records, val_idx, rng)
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def _cover_labels(records: list[Record], val_idx: set[int], rng: random.Random) -> None:
    """Move conversations so every label held by 2+ records is in train and in validation. A record moves
    only when each of its labels has another record on the side it leaves, so no move undoes another.
    Single-turn records are already covered by the stratified draw: for them this moves and draws nothing."""
    holders: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        for label in dict.fromkeys(r.labels):
            holders[label].append(i)

    def can_move(i: int) -> bool:
        side = i in val_idx
        return all(any(j != i and (j in val_idx) == side for j in holders[label]) for label in records[i].labels)

    for idx in holders.values():
        for to_val in (True, False):
            if len(idx) < 2 or any((i in val_idx) == to_val for i in idx):
                continue
            movable = [i for i in idx if can_move(i)]
            if movable:
                i = rng.choice(movable)
                if to_val:
                    val_idx.add(i)
                else:
                    val_idx.discard(i)


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
    records_with = Counter(label for r in records for label in set(r.labels))
    singles = [label for label, n in counts.items() if n < 2]
    one_conversation = [label for label in counts if counts[label] >= 2 and records_with[label] < 2]
    if singles or one_conversation:
        what = [f"label(s) {' '.join(singles)} have a single example"] if singles else []
        what += [f"label(s) {' '.join(one_conversation)} appear in one conversation only"] if one_conversation else []
        raise UserError(
            f"{cp.prepared}: {'; '.join(what)} and cannot be in both train and validation: add examples, or "
            "leave them out with 01_prepare_data.py --labels"
        )
    train, val = stratified_split(records, test_size, seed)
    train_counts, val_counts = label_counts(train), label_counts(val)
    uncovered = [label for label in counts if not (train_counts[label] and val_counts[label])]
    if uncovered:
        warn(f"label(s) {' '.join(uncovered)} could not be put in both train and validation: every conversation "
             "holding them is needed on one side for other labels; add single-turn examples of them")
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
    turns = "" if sum(counts.values()) == len(records) else \
        f" conversations ({sum(train_counts.values())} / {sum(val_counts.values())} answers)"
    log(f"split {cp.prepared} (seed {seed}, test size {test_size}): {len(train)} train / {len(val)} val{turns}")
    log(format_counts(counts, {"train": train_counts, "val": val_counts}))
    log("wrote " + ", ".join(str(p) for p in (cp.train, cp.val, cp.split_info)))
    return info
