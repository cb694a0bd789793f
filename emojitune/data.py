"""Reading the user's tweets (JSON, JSONL, CSV, TSV), validating every record, and 01's prepare step."""

import csv
import io
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

from . import DEFAULT_SYSTEM_PROMPT
from .checkpoints import read_json, refuse_data_change, write_bytes
from .console import UserError, log, warn
from .emoji import count_emojis_hint, is_single_emoji

ROLES = ("system", "user", "assistant")
# Column (or key) names accepted for CSV/TSV files and for flat JSON records.
TEXT_COLUMNS = ("text", "tweet", "user", "input")
LABEL_COLUMNS = ("emoji", "label", "assistant", "output")
MIN_PER_LABEL = 10  # below this a label gets a warning: too few examples to learn it reliably


class Record:
    """One validated example: an optional system prompt, the tweet and its emoji label, and the line of the
    user's JSONL/CSV/TSV file it came from (for messages; not written to the data files). A multi-turn
    conversation keeps its earlier (tweet, emoji) turns in `history`; `user` and `label` are its last turn."""

    __slots__ = ("system", "user", "label", "line", "history")

    def __init__(self, system: str | None, user: str, label: str, line: int | None = None,
                 history: tuple[tuple[str, str], ...] = ()):
        self.system, self.user, self.label, self.line, self.history = system, user, label, line, tuple(history)

    @property
    def turns(self) -> list[tuple[str, str]]:
        """Every (tweet, emoji) turn, in order."""
        return [*self.history, (self.user, self.label)]

    @property
    def labels(self) -> list[str]:
        """Every answer of the conversation, in order."""
        return [label for _, label in self.turns]

    def to_messages(self) -> dict:
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        for user, label in self.turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": label}]
        return {"messages": messages}


class BadLine:
    """A JSONL line that is not JSON. It still counts as a record, so the records after it keep the numbers
    the user sees in the file, and the other records are still checked: every problem shows at once."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


def record_name(number: int, line: int | None = None) -> str:
    """How a record is named in messages: counted from 1, with its 0-based index and line if known."""
    text = f"record {number} (index {number - 1}"
    return text + (f", line {line})" if line else ")")


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found: check the path given to --input")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a data file: pass a .json, .jsonl, .csv or .tsv file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}): check its permissions") from None
    try:
        return data.decode("utf-8-sig")  # a BOM from Excel/Notepad is harmless
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data[e.start], data[: e.start].count(b"\n") + 1) from None


def read_lines(stream, name: str = "<stdin>"):
    """Yield the lines of a binary stream (sys.stdin.buffer) as UTF-8 text, a BOM allowed, one at a time so
    piped input is answered as it arrives. Text-mode stdin would crash on Shift_JIS with a traceback (or, in
    Python's UTF-8 mode, hand the tokenizer undecodable surrogates); this stops with read_text's message."""
    for number, data in enumerate(stream, 1):
        try:
            yield data.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(name, data[e.start], number) from None


def _not_utf8(name: Path | str, byte: int, line: int) -> UserError:
    return UserError(
        f"{name}: not UTF-8 text (byte 0x{byte:02x} on line {line}): "
        "save the file as UTF-8 (for example 'UTF-8' in your editor's save dialog, not Shift_JIS)"
    )


def _detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl"):
        return suffix[1:]
    if suffix == ".json":
        return "json"
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        return "jsonl" if stripped.count("\n") and not stripped.rstrip().endswith("]") else "json"
    # A table without a telling extension (Excel's "Text (tab delimited)" saves .txt): the header line
    # names the columns, so it holds the delimiter and rarely anything else. csv.Sniffer is not used: it
    # weighs every character of a sample as a possible delimiter and can give up on a few odd rows, while
    # this one rule is easy to state in the README.
    header = re.sub(r'"[^"]*"', "", text.partition("\n")[0])  # a quoted column name may hold either
    return "tsv" if header.count("\t") > header.count(",") else "csv"


def parse_file(path: Path) -> list[tuple[int | None, object]]:
    """Parse a data file into raw records, each with its line number when the format has one
    (a JSONL line that is not JSON comes back as a BadLine)."""
    path = Path(path)
    text = read_text(path)
    kind = _detect_format(path, text)
    if not text.strip():
        raise UserError(f"{path}: the file is empty: it must hold a JSON array, JSONL or CSV/TSV of tweets")
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}): fix the file "
                "(or save it as .jsonl if it has one record per line)"
            ) from None
        if isinstance(data, dict) and "messages" in data:
            data = [data]
        if not isinstance(data, list):
            raise UserError(
                f"{path}: the JSON top level is {type(data).__name__}, not a list: "
                'it must be an array of {"messages": [...]} records'
            )
        return [(None, item) for item in data]
    if kind == "jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((lineno, BadLine(f"not valid JSON ({e.msg} at column {e.colno})")))
        return records
    return _parse_table(path, text, "\t" if kind == "tsv" else ",")


def _parse_table(path: Path, text: str, delimiter: str) -> list[tuple[int | None, object]]:
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UserError(f"{path}: not valid CSV/TSV near line {reader.line_num} ({e}): fix the quoting") from None
    header = [h.strip().lower() for h in rows[0][1]]
    text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if text_col is None or label_col is None:
        raise UserError(
            f"{path}: the header {rows[0][1]} needs a text column ({', '.join(TEXT_COLUMNS)}) and an emoji "
            f"column ({', '.join(LABEL_COLUMNS)}): rename the columns in the first line"
        )
    records = []
    for lineno, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        get = lambda col: row[col] if col < len(row) else None  # noqa: E731
        records.append((lineno, {"text": get(text_col), "emoji": get(label_col)}))
    return records


def validate_record(raw, system_override: str | None) -> tuple[Record | None, list[str]]:
    """Check one raw record; return it as a Record, or None and every problem found in it."""
    if isinstance(raw, BadLine):
        return None, [raw.problem]
    if not isinstance(raw, dict):
        return None, [f"is a {type(raw).__name__}, not an object with \"messages\""]
    if "messages" in raw:
        return _validate_messages(raw["messages"], system_override)
    text_key = next((k for k in TEXT_COLUMNS if k in raw), None)
    label_key = next((k for k in LABEL_COLUMNS if k in raw), None)
    if text_key is None and label_key is None:
        keys = ", ".join(map(str, raw)) or "none"
        return None, [f'has no "messages" list (keys found: {keys}): give each record '
                      '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}']
    problems = []
    user = _check_text(raw.get(text_key) if text_key else None, "tweet", problems)
    label = _check_label(raw.get(label_key) if label_key else None, problems)
    if problems:
        return None, problems
    system = DEFAULT_SYSTEM_PROMPT if system_override is None else (system_override or None)
    return Record(system, user, label), []


def _validate_messages(messages, system_override):
    if not isinstance(messages, list) or not messages:
        return None, ['"messages" must be a non-empty list of {"role", "content"} objects']
    problems, roles = [], []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            shown = f"unknown role {role!r}" if isinstance(m, dict) else f"message {i + 1} is not an object"
            problems.append(f"{shown} (allowed: system, user, assistant)")
        roles.append(role)
    if problems:
        return None, problems
    body = roles[1:] if roles[0] == "system" else roles
    turns = len(body) // 2
    if body != ["user", "assistant"] * max(turns, 1):
        if "assistant" not in roles:
            problems.append("missing the assistant answer (the emoji): add "
                            '{"role": "assistant", "content": "<emoji>"} after the tweet')
        elif "user" not in roles:
            problems.append('missing the user tweet: add {"role": "user", "content": "<tweet>"}')
        elif body == ["user", "assistant"] * turns + ["user"]:
            problems.append(f"turn {turns + 1}: missing the assistant answer (the emoji) after the last tweet: add "
                            '{"role": "assistant", "content": "<emoji>"} or remove the tweet')
        else:
            problems.append(f"roles are {' → '.join(map(str, roles))}; expected system (optional) → user → "
                            "assistant, then more user → assistant pairs for a conversation, in that order")
        return None, problems
    system = None
    if roles[0] == "system":
        system = _check_text(messages[0].get("content"), "system prompt", problems)
    pairs = messages[len(roles) - len(body):]
    checked = []
    for turn in range(turns):
        found = []
        user = _check_text(pairs[2 * turn].get("content"), "tweet", found)
        label = _check_label(pairs[2 * turn + 1].get("content"), found)
        # A single-turn record's problems read as before; in a conversation each names its turn.
        problems += [f"turn {turn + 1}: {p}" for p in found] if turns > 1 else found
        checked.append((user, label))
    if problems:
        return None, problems
    if system_override is not None:
        system = system_override or None
    *history, (user, label) = checked
    return Record(system, user, label, history=history), []


def _check_text(value, what: str, problems: list[str]) -> str | None:
    if value is None:
        problems.append(f"missing the {what}")
    elif not isinstance(value, str):
        problems.append(f"the {what} is a {type(value).__name__}, not a string")
    elif not value.strip():
        problems.append(f"the {what} is empty or only whitespace")
    else:
        return value.strip()
    return None


def _check_label(value, problems: list[str]) -> str | None:
    label = _check_text(value, "assistant answer (the emoji)", problems)
    if label is None:
        return None
    if not is_single_emoji(label):
        # Refused, not warned: accuracy and the tester compare answers with labels as exact strings,
        # so a label that is not one emoji could never be answered "correctly".
        problems.append(f"the answer {label!r} {count_emojis_hint(label)}: the answer must be exactly one emoji")
        return None
    return label


def _join_problems(problems: list[str], path: Path, fix: str) -> str:
    shown = problems[:50]
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    return (f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(shown) + more
            + f"\n{path}: nothing was written: {fix} and run again")


def load_records(path: Path, system_override: str | None = None) -> list[Record]:
    """Read and validate a data file; every problem in every record is reported at once."""
    path = Path(path)
    records, problems = [], []
    for number, (line, raw) in enumerate(parse_file(path), 1):
        record, found = validate_record(raw, system_override)
        problems += [f"{record_name(number, line)}: {p}" for p in found]
        if record is not None:
            record.line = line
            records.append(record)
    if problems:
        raise UserError(_join_problems(problems, path, "fix the records above"))
    if not records:
        raise UserError(f"{path}: holds no records: add tweets with their emoji")
    return records


def drop_duplicates(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Keep the first of each exact duplicate tweet (for conversations, the same tweets in the same order);
    return the kept records and one warning per drop."""
    seen: dict[tuple[str, ...], tuple[int, Record]] = {}
    kept, warnings = [], []
    for number, r in enumerate(records, 1):
        key = tuple(user for user, _ in r.turns)
        if key in seen:
            first_number, first = seen[key]
            label, labels = " ".join(first.labels), " ".join(r.labels)
            extra = "" if label == labels else f" with a different label ({labels} vs {label}; kept {label})"
            named = f"record {first_number}" + (f" (line {first.line})" if first.line else "")
            what = "tweet" if len(key) == 1 else "tweets"
            warnings.append(f"{record_name(number, r.line)} repeats the {what} of {named}{extra}: dropped")
            continue
        seen[key] = (number, r)
        kept.append(r)
    return kept, warnings


def parse_labels(spec: str) -> list[str]:
    """Parse --labels '😀,😭,...': comma-separated emojis, each checked to be one emoji."""
    labels = [s.strip() for s in spec.split(",") if s.strip()]
    if not labels:
        raise UserError("--labels is empty: give emojis separated by commas, for example --labels 😀,😭,🤣")
    bad = [s for s in labels if not is_single_emoji(s)]
    if bad:
        raise UserError(f"--labels: {', '.join(map(repr, bad))} is not a single emoji: separate emojis with commas")
    return list(dict.fromkeys(labels))


def filter_labels(records: list[Record], wanted: list[str], path: Path) -> list[Record]:
    """Keep the records whose every answer is one of `wanted` (a conversation with another label goes)."""
    present = {label for r in records for label in r.labels}
    missing = [w for w in wanted if w not in present]
    if missing:
        hints = []
        for m in missing:
            twin = next((p for p in present if p.replace("\ufe0f", "") == m.replace("\ufe0f", "")), None)
            hints.append(f"{m} (did you mean {twin}? they differ in U+FE0F)" if twin else m)
        raise UserError(f"--labels: {', '.join(hints)} not found in {path}; labels there: "
                        f"{' '.join(label_counts(records))}")
    keep = set(wanted)
    return [r for r in records if keep.issuperset(r.labels)]


def label_counts(records: list[Record]) -> Counter:
    """Count per label, every answer of a conversation included, in order of first appearance."""
    return Counter(label for r in records for label in r.labels)


def label_warnings(counts: Counter) -> list[str]:
    warnings = []
    for label, n in counts.items():
        if n < 2:
            warnings.append(f"label {label} has {n} example: it cannot appear in both train and validation; "
                            "02_split_data.py will refuse it: add examples or leave it out with --labels")
        elif n < MIN_PER_LABEL:
            warnings.append(f"label {label} has only {n} examples (fewer than {MIN_PER_LABEL}): "
                            "the model may not learn it")
    return warnings


def _wide(char: str) -> bool:
    # Emojis newer than this Python's Unicode tables (🥹 and 🫠 on Python 3.10) are unassigned there.
    return unicodedata.east_asian_width(char) in "WF" or (unicodedata.category(char) == "Cn" and char >= "\U0001f000")


def display_width(text: str) -> int:
    """Terminal columns text takes, for lining up tables: len() counts code points, but an emoji or a
    CJK character takes two columns, and ☹️ is two code points (☹ + U+FE0F) shown as one wide emoji."""
    width = 0
    for i, char in enumerate(text):
        previous = text[i - 1] if i else ""
        if char == "\ufe0f":
            if previous and not _wide(previous):
                width += 1  # emoji presentation: a narrow symbol such as ☹ is drawn as a wide emoji
        elif (unicodedata.category(char) in ("Mn", "Me", "Cf") or previous == "\u200d"
              or "\U0001f3fb" <= char <= "\U0001f3ff"):
            pass  # marks, the ZWJ, what a ZWJ joins on and skin tones are drawn into the glyph before them
        else:
            width += 2 if _wide(char) else 1
    return width


def format_counts(counts: Counter, columns: dict[str, Counter] | None = None) -> str:
    """A label table: one row per label with its count(s), then the total."""
    if columns is None:
        columns = {"count": counts}
    header = "label  " + "  ".join(f"{name:>6}" for name in columns)
    lines = [header]
    for label in counts:
        pad = " " * max(0, 5 - display_width(label))  # f"{label:<5}" would pad by code points
        lines.append(f"{label}{pad}  " + "  ".join(f"{c[label]:>6}" for c in columns.values()))
    lines.append("total  " + "  ".join(f"{sum(c.values()):>6}" for c in columns.values()))
    return "\n".join(lines)


def system_prompt_warning(records: list[Record]) -> str | None:
    """A warning when records hold several system prompts: a run records only the most common one
    (runs.common_system_prompt) and 05/06 send it with every tweet, so tweets trained with another prompt
    are tested with a prompt they were not trained with."""
    counts = Counter(r.system for r in records).most_common()
    if len(counts) < 2:
        return None

    def shown(prompt):
        return "(none)" if prompt is None else repr(prompt if len(prompt) <= 20 else prompt[:20] + "…")

    listed = ", ".join(f"{shown(prompt)} {n}" for prompt, n in counts[:3])
    more = f", and {len(counts) - 3} more" if len(counts) > 3 else ""
    return (f"the records use {len(counts)} different system prompts (records per prompt: {listed}{more}); "
            "03 records only the most common one in run.json and 05/06 send that one with every tweet: "
            "pass --system TEXT to give every record the same prompt")


def records_from_json(path: Path, hint: str) -> list[Record]:
    """Read a messages file this tool wrote (prepared/train/val), as Records."""
    data = read_json(path, hint)
    if not isinstance(data, list):
        raise UserError(f"{path} is not a list of records: {hint}")
    records = []
    for number, raw in enumerate(data, 1):
        record, problems = validate_record(raw, None)
        if problems:
            raise UserError(f"{path}: {record_name(number)}: {problems[0]}: {hint}")
        records.append(record)
    return records


def training_system_prompt(records: list[Record]) -> str | None:
    """The system prompt of the training data (the most common one, if records differ)."""
    return Counter(r.system for r in records).most_common(1)[0][0]


def records_to_json(records: list[Record]) -> list[dict]:
    return [r.to_messages() for r in records]


def encode_records(records: list[Record]) -> bytes:
    """The exact bytes of a messages file: UTF-8, emojis and Japanese as they are, stable formatting."""
    return (json.dumps(records_to_json(records), ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def prepare(input_path: Path, cp, system: str | None = None, labels: str | None = None,
            overwrite: bool = False) -> list[Record]:
    """01: read, validate and normalise the user's file; write DIR/data/prepared.json."""
    wanted = parse_labels(labels) if labels is not None else None
    records = load_records(input_path, system)
    records, dup_warnings = drop_duplicates(records)
    for w in dup_warnings:
        warn(f"{input_path}: {w}")
    if wanted is not None:
        records = filter_labels(records, wanted, input_path)
    counts = label_counts(records)
    data = encode_records(records)
    refuse_data_change(cp, {cp.prepared: data}, overwrite, "01_prepare_data.py run")
    write_bytes(cp.prepared, data)
    log(f"read {input_path}: {len(records)} records kept, {len(dup_warnings)} duplicate(s) dropped, "
        f"{len(counts)} labels")
    log(format_counts(counts))
    for w in label_warnings(counts):
        warn(w)
    prompts = system_prompt_warning(records)
    if prompts:
        warn(f"{input_path}: {prompts}")
    log(f"wrote {cp.prepared}")
    return records
