"""05: answer a set of tweets with the base model (and, with --compare, the tuned adapter) and score it;
with --history N, ask them in order as one running conversation and measure how often answers repeat."""

from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

from .checkpoints import CheckpointDir, write_json
from .console import UserError, log
from .data import load_records, records_from_json
from .emoji import is_single_emoji
from .generation import Sampling, converse, generate_batch
from .report import (classification_report, format_report, groups_for, groups_json, order_by_group,
                     plot_confusion)
from .scoring import label_probabilities
from .session import as_base_model, load, resolve_setup, train_records


def summarize(answers: list[str], expected: list[str], labels: set[str]) -> dict:
    """Accuracy (answer == label, exact string), share that is exactly one emoji, share in the labels."""
    n = len(answers)
    correct = sum(a == e for a, e in zip(answers, expected))
    one = sum(is_single_emoji(a) for a in answers)
    known = sum(a in labels for a in answers)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "one_emoji": one, "one_emoji_share": one / n if n else 0.0,
            "trained_label": known, "trained_label_share": known / n if n else 0.0}


def repeats(answers: list[str]) -> dict:
    """How often an answer equals the answer just before it (in the order the tweets were asked)."""
    pairs = len(answers) - 1
    same = sum(a == b for a, b in pairwise(answers))
    return {"repeats": same, "pairs": max(pairs, 0), "repeat_rate": same / pairs if pairs > 0 else 0.0}


def format_repeats(name: str, s: dict, labels: dict) -> str:
    return (f"{name}: repeats its previous answer {s['repeat_rate']:.2f} ({s['repeats']}/{s['pairs']}); "
            f"the labels themselves repeat {labels['repeat_rate']:.2f} ({labels['repeats']}/{labels['pairs']})")


def format_summary(name: str, s: dict) -> str:
    return (f"{name}: accuracy {s['accuracy']:.2f} ({s['correct']}/{s['n']})  "
            f"one emoji {s['one_emoji_share']:.2f} ({s['one_emoji']}/{s['n']})  "
            f"trained label {s['trained_label_share']:.2f} ({s['trained_label']}/{s['n']})")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def evaluate(cp: CheckpointDir, *, input_path: Path | None = None, limit: int | None = None, compare: bool = False,
             model: str | None = None, checkpoint: str = "last", system: str | None = None,
             device: str = "auto", sampling: Sampling = Sampling(), history: int = 0, labels_only: bool = False,
             groups: Path | None = None) -> dict:
    sampling.check()
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be 1 or more")
    if history < 0:
        raise UserError(f"--history {history} must be 0 (each tweet alone) or more")
    if history and labels_only:
        raise UserError("--labels-only scores each tweet alone: drop --history (or --labels-only)")
    if input_path is None:
        if not cp.val.exists():
            raise UserError(f"{cp.val} not found: run 02_split_data.py first, or pass --input FILE")
        records = records_from_json(cp.val, "run 02_split_data.py again")
        input_path = cp.val
    else:
        records = load_records(input_path)
    trained = train_records(cp)
    label_list = list(dict.fromkeys(label for r in (trained or records) for label in r.labels))  # before --limit
    labels = set(label_list)
    setup = resolve_setup(cp, model=model, checkpoint=checkpoint if compare else None, system=system)
    labels_from = str(cp.train) if trained else f"{input_path} (no {cp.train} yet)"

    turns = [turn for r in records for turn in r.turns]  # every turn of a conversation is a tweet to test
    turns = turns[:limit] if limit else turns
    tweets, expected = [user for user, _ in turns], [label for _, label in turns]
    group_of, groups_note = groups_for(list(dict.fromkeys(label_list + expected)), groups)
    log(f"{len(tweets)} tweets from {input_path}; system prompt ({setup.system_from}): {setup.system or '(none)'}")
    log(f"trained labels from {labels_from}: {len(labels)}")
    log(f"history: one running conversation in file order, keeping the last {history} tweets and answers" if history
        else "history: none, each tweet is a fresh conversation (--history N keeps the last N)")
    lm = load(setup, device)  # one load: the tuned answers with the adapter, the base answers without it
    adapter = f" + {setup.adapter}" if setup.adapter else ""
    log(f"model: {setup.model_id}{adapter} ({setup.model_from}) on {lm.device}")
    if labels_only:
        log(f"answers restricted to the {len(label_list)} trained labels (the most likely of them, no generation)")

    def answer_all() -> list[str]:
        if labels_only:
            return [label_probabilities(lm, setup.system, t, label_list)[0][0] for t in tweets]
        if history:
            return converse(lm, setup.system, tweets, history, sampling)
        return generate_batch(lm, setup.system, tweets, sampling)

    answers = {}
    with as_base_model(lm):
        answers["base"] = answer_all()
    if compare:
        answers["tuned"] = answer_all()
    summaries = {name: summarize(a, expected, labels) | repeats(a) for name, a in answers.items()}
    labels_repeat = repeats(expected)
    ordered = order_by_group(label_list, group_of)
    reports = {name: classification_report(a, expected, ordered, group_of) for name, a in answers.items()}
    results = []
    for i, (tweet, exp) in enumerate(zip(tweets, expected)):
        row = {"tweet": tweet, "expected": exp}
        cells = []
        for name in answers:
            a = answers[name][i]
            row[name] = a
            row[f"{name}_correct"] = a == exp
            cells.append(f"{name} {_clip(a, 16) or '(empty)'} {'✓' if a == exp else '✗'}")
        results.append(row)
        log(f"{i + 1:>3}. {_clip(tweet, 30)}  expected {exp}  " + "  ".join(cells))
    for name, report in reports.items():
        log(format_report(name, report))
    log(groups_note)
    for name, s in summaries.items():
        log(format_summary(name, s))
    for name, s in summaries.items():
        log(format_repeats(name, s, labels_repeat))
    out = cp.eval_compare if compare else cp.eval_base
    write_json(out, {"base_model": setup.model_id, "adapter": str(setup.adapter) if setup.adapter else None,
                     "system_prompt": setup.system, "input": str(input_path), "labels_only": labels_only,
                     "sampling": None if labels_only else asdict(sampling), "groups_note": groups_note,
                     "groups": groups_json(group_of), "history": history, "labels_repeat": labels_repeat,
                     "summary": summaries, "report": reports, "results": results})
    drawn = plot_confusion(cp.confusion_plot, {name: reports[name] for name in ("base", "tuned") if name in reports},
                           group_of)
    log(f"confusion matrix: {drawn}")
    log(f"wrote {out}, {cp.confusion_plot}")
    return {"summary": summaries, "report": reports, "results": results}
