"""05's classification report: per-label precision / recall / F1, macro-F1, accuracy by emotion group, and
the confusion matrix (counts, and DIR/confusion.png with emoji glyphs where a font has them)."""

import json
import unicodedata
from pathlib import Path

from .checkpoints import atomic_file
from .console import UserError
from .data import display_width

OTHER = "other"  # the column of answers that are not a trained label
SHIPPED_GROUPS = Path(__file__).resolve().parent.parent / "emotion_groups.json"


# ---- emotion groups -------------------------------------------------------------------------------------

def load_groups(path: Path) -> dict[str, str]:
    """emotion_groups.json: {"group": ["emoji", ...], ...} as {emoji: group}, in the file's order. Every
    problem of the file (not a mapping of lists of strings, an emoji in two groups) at once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--groups {path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--groups {path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f'--groups {path}: expected an object of groups, like {{"joy": ["😀", "😁"], "fear": ["😨"]}}')
    problems, group_of = [], {}
    for group, emojis in raw.items():
        if not isinstance(emojis, list) or not all(isinstance(e, str) and e for e in emojis):
            problems.append(f"group {group!r} must be a list of emojis")
            continue
        for emoji in emojis:
            if emoji in group_of and group_of[emoji] != group:
                problems.append(f"{emoji} is in both {group_of[emoji]!r} and {group!r}")
            group_of.setdefault(emoji, group)
    if problems:
        raise UserError(f"--groups {path}: " + "; ".join(problems) + ": put every emoji in exactly one group")
    return group_of


def groups_for(labels: list[str], path: Path | None) -> tuple[dict[str, str] | None, str]:
    """The groups to report and a note on where they came from. --groups FILE must cover every label
    (an error lists the missing ones); the shipped file is used when it covers them, and otherwise
    group accuracy is left out with a note that says so."""
    if path is not None:
        group_of = load_groups(path)
        missing = [label for label in labels if label not in group_of]
        if missing:
            raise UserError(f"--groups {path}: label(s) {' '.join(missing)} are in no group: add each to one group")
        return group_of, f"groups from {path}"
    group_of = load_groups(SHIPPED_GROUPS)
    missing = [label for label in labels if label not in group_of]
    if missing:
        return None, (f"no group accuracy: label(s) {' '.join(missing)} are not in the shipped "
                      f"{SHIPPED_GROUPS.name}; pass --groups FILE with a group for every label")
    return group_of, f"groups from {SHIPPED_GROUPS.name}"


def order_by_group(labels: list[str], group_of: dict[str, str] | None) -> list[str]:
    """Labels ordered group by group (in the file's order of groups, then of emojis); without groups, as given."""
    if not group_of:
        return list(labels)
    rank = {emoji: i for i, emoji in enumerate(group_of)}
    group_rank = {g: i for i, g in enumerate(dict.fromkeys(group_of.values()))}
    return sorted(labels, key=lambda label: (group_rank[group_of[label]], rank[label]))


# ---- the report ---------------------------------------------------------------------------------------------

def classification_report(answers: list[str], expected: list[str], labels: list[str],
                          group_of: dict[str, str] | None = None) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support, group accuracy and confusion counts.

    `labels` are the classes (the trained labels, in the order to show them); an answer that is not one of
    them counts in the "other" column. Precision of a label never answered is 0. Macro-F1 is the mean F1
    over the labels that occur in `expected` (a trained label absent from the tested tweets would only
    add a 0 that says nothing about the model).
    """
    classes = list(dict.fromkeys(labels + [e for e in expected if e not in labels]))
    columns = classes + [OTHER]
    index = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(columns) for _ in classes]
    for answer, label in zip(answers, expected):
        counts[index[label]][index.get(answer, len(classes))] += 1
    per_label = {}
    for i, label in enumerate(classes):
        true_positive = counts[i][i]
        support = sum(counts[i])
        answered = sum(row[i] for row in counts)
        precision = true_positive / answered if answered else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                            "answered": answered}
    present = [p["f1"] for p in per_label.values() if p["support"]]
    n = len(expected)
    correct = sum(a == e for a, e in zip(answers, expected))
    report = {"n": n, "accuracy": correct / n if n else 0.0,
              "macro_f1": sum(present) / len(present) if present else 0.0,
              "other": sum(row[-1] for row in counts), "per_label": per_label,
              "confusion": {"rows": classes, "columns": columns, "counts": counts}}
    if group_of:
        per_group = {}
        for a, e in zip(answers, expected):
            entry = per_group.setdefault(group_of[e], {"correct": 0, "total": 0})
            entry["correct"] += a in group_of and group_of[a] == group_of[e]
            entry["total"] += 1
        same = sum(g["correct"] for g in per_group.values())
        report["group_accuracy"] = same / n if n else 0.0
        report["group_correct"] = same
        report["per_group"] = per_group
    return report


def groups_json(group_of: dict[str, str] | None) -> dict[str, list[str]] | None:
    """{emoji: group} back to the file's shape, {group: [emoji, ...]}, for eval_*.json."""
    if not group_of:
        return None
    groups = {}
    for emoji, group in group_of.items():
        groups.setdefault(group, []).append(emoji)
    return groups


def format_report(name: str, report: dict) -> str:
    """The per-label table of one model, then its accuracy, macro-F1 and group accuracy."""
    lines = [f"{name}, per label (answers that are no trained label: {report['other']} of {report['n']}):",
             "  label  precision  recall    f1  support"]
    for label, p in report["per_label"].items():
        pad = " " * max(0, 5 - display_width(label))
        lines.append(f"  {label}{pad}  {p['precision']:>9.2f}  {p['recall']:>6.2f}  {p['f1']:>4.2f}  {p['support']:>7}")
    groups = (f"  group accuracy {report['group_accuracy']:.2f} ({report['group_correct']}/{report['n']})"
              if "group_accuracy" in report else "")
    lines.append(f"{name}: accuracy {report['accuracy']:.2f}  macro-F1 {report['macro_f1']:.2f}{groups}")
    return "\n".join(lines)


# ---- the picture ----------------------------------------------------------------------------------------

# Fonts with emoji outlines that matplotlib can draw (it cannot draw bitmap-only colour fonts such as
# Noto Color Emoji or Apple Color Emoji, and skips them when it lists the fonts).
EMOJI_FONTS = ("Noto Emoji", "Segoe UI Emoji", "Symbola", "Apple Color Emoji", "Noto Color Emoji",
               "Twemoji Mozilla", "OpenMoji")
INVISIBLE = {"\ufe0e", "\ufe0f", "\u200d"}  # variation selectors and the ZWJ: never drawn on their own


def emoji_font(labels: list[str]) -> tuple[str | None, set[str]]:
    """The emoji font matplotlib has that draws the most labels, and the labels it draws."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    best, drawn = None, set()
    for family in EMOJI_FONTS:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
            font = FT2Font(path)
        except (ValueError, RuntimeError, OSError):
            continue
        charmap = font.get_charmap()
        covered = {label for label in labels if all(ord(c) in charmap for c in label if c not in INVISIBLE)}
        if len(covered) > len(drawn):
            best, drawn = font.family_name, covered
    return best, drawn


def short_name(label: str) -> str:
    """The label's Unicode name(s), for axes when no font draws it: 'grinning face'."""
    return " + ".join(unicodedata.name(c, f"U+{ord(c):04X}").lower() for c in label if c not in INVISIBLE)


def plot_confusion(path: Path, reports: dict[str, dict], group_of: dict[str, str] | None) -> str:
    """DIR/confusion.png: one matrix per model, side by side; rows = label, columns = answer (+ other),
    both ordered by emotion group with lines between groups. Returns a note on how labels are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(reports.values()))["confusion"]
    rows = order_by_group(first["rows"], group_of)
    columns = rows + [OTHER]
    family, drawn = emoji_font(rows)
    shown = {label: label.replace("\ufe0f", "").replace("\ufe0e", "") if label in drawn else short_name(label)
             for label in rows}
    shown[OTHER] = "other (not a label)"
    drawn_text = {shown[label] for label in drawn}
    names = len(drawn) < len(rows)  # long Unicode names on the axes need room
    side = 0.26 * len(columns) + (2.2 if names else 0.8)
    fig, axes = plt.subplots(1, len(reports), figsize=((side + (1.4 if group_of else 0.3)) * len(reports),
                                                      side + 0.9), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        confusion = report["confusion"]
        at = {label: i for i, label in enumerate(confusion["columns"])}
        matrix = [[confusion["counts"][at[r]][at[c]] for c in columns] for r in rows]
        peak = max(max(row) for row in matrix) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                            color="white" if count > peak / 2 else "black")
        ax.set_xticks(range(len(columns)))
        ax.set_yticks(range(len(rows)))
        # Names and counts in the default font; emojis from the emoji font, where it has them.
        font = {"fontfamily": [matplotlib.rcParams["font.family"][0], family]} if family else {}
        ax.set_xticklabels([shown[c] for c in columns], rotation=90, **font)
        ax.set_yticklabels([shown[r] for r in rows], **font)
        for tick in ax.get_xticklabels() + ax.get_yticklabels():
            glyph = tick.get_text() in drawn_text
            tick.set_fontsize(14 if glyph else 8)
            if glyph:
                tick.set_rotation(0)  # an emoji reads upright; names are turned to fit under a column
        if group_of:  # lines between groups, and each group's name beside its rows
            starts = [k for k in range(len(rows)) if k == 0 or group_of[rows[k]] != group_of[rows[k - 1]]]
            for k, end in zip(starts, starts[1:] + [len(rows)]):
                if k:
                    ax.axhline(k - 0.5, color="grey", linewidth=0.6)
                    ax.axvline(k - 0.5, color="grey", linewidth=0.6)
                ax.text(len(columns) - 0.3, (k + end - 1) / 2, group_of[rows[k]], va="center", fontsize=8,
                        color="dimgrey")
        ax.set_xlabel("answer")
        ax.set_ylabel("label (expected)")
        ax.set_title(f"{name}\naccuracy {report['accuracy']:.2f}   macro-F1 {report['macro_f1']:.2f}"
                     + (f"   group accuracy {report['group_accuracy']:.2f}" if "group_accuracy" in report else ""),
                     fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    if len(drawn) == len(rows):
        return f"emojis drawn with the font {family}"
    if drawn:
        return (f"the font {family} lacks {len(rows) - len(drawn)} of the labels: those are named by their "
                "Unicode names")
    return "no emoji font found for matplotlib: labels are named by their Unicode names (install Noto Emoji to see glyphs)"
