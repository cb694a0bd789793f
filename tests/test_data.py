"""01_prepare_data.py and 02_split_data.py: contracts, bad input, determinism, the shipped dataset."""

import io
import json
import os
from collections import Counter

import pytest
from conftest import DATASET, SYSTEM, assert_user_error, load_json, run_script, write_messages

from emojitune.emoji import is_single_emoji

LABELS = "😀 😁 😆 🥹 😅 🤣 😍 😋 🤪 🤩 🥳 ☹️ 😩 🥺 😭 😤 🤯 😨 🤗 🤔 🤭 🫠 😴 🤤 🤮".split()


def test_shipped_dataset_shape():
    records = load_json(DATASET)
    assert len(records) == 250
    roles = {tuple(m["role"] for m in r["messages"]) for r in records}
    assert roles == {("system", "user", "assistant")}
    assert {r["messages"][0]["content"] for r in records} == {SYSTEM}
    counts = Counter(r["messages"][2]["content"] for r in records)
    assert counts == {label: 10 for label in LABELS}
    assert "\u2639\ufe0f" in counts  # ☹️ is two code points, kept exactly
    tweets = [r["messages"][1]["content"] for r in records]
    assert len(set(tweets)) == 250
    assert all(8 <= len(t) <= 40 for t in tweets)


@pytest.mark.parametrize("text,ok", [
    ("😀", True), ("☹️", True), ("☹", True), ("👍🏽", True), ("👨‍👩‍👧", True), ("🇯🇵", True), ("1️⃣", True),
    ("😀😀", False), ("happy", False), ("😀!", False), ("", False), ("😀 😭", False),
])
def test_single_emoji(text, ok):
    assert is_single_emoji(text) is ok


def test_prepare_and_split_shipped(tmp_path):
    r = run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "250" in r.stdout
    prepared = load_json(tmp_path / "data/prepared.json")
    assert len(prepared) == 250
    r = run_script("02_split_data.py", "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    train, val = load_json(tmp_path / "data/train.json"), load_json(tmp_path / "data/val.json")
    assert (len(train), len(val)) == (200, 50)
    assert Counter(x["messages"][-1]["content"] for x in val) == {label: 2 for label in LABELS}
    assert Counter(x["messages"][-1]["content"] for x in train) == {label: 8 for label in LABELS}
    info = load_json(tmp_path / "data/split.json")
    from emojitune.split import SplitSettings

    assert (info["seed"], info["test_size"]) == (SplitSettings.seed, SplitSettings.test_size)
    assert len(info["prepared_sha256"]) == 64
    assert info["labels"]["☹️"] == {"train": 8, "val": 2}
    # The same input and seed give byte-identical files; another seed gives another split.
    before = {n: (tmp_path / "data" / n).read_bytes() for n in ("train.json", "val.json", "split.json")}
    assert run_script("02_split_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    assert before == {n: (tmp_path / "data" / n).read_bytes() for n in before}
    assert run_script("02_split_data.py", "--checkpoint-dir", tmp_path, "--seed", 7).returncode == 0
    assert (tmp_path / "data/val.json").read_bytes() != before["val.json"]
    text = (tmp_path / "data/val.json").read_text(encoding="utf-8")
    assert "😀" in text and "\\u" not in text  # UTF-8 as is, not escaped


def test_split_keeps_every_label_in_validation(tmp_path):
    from emojitune.data import Record
    from emojitune.split import stratified_split

    records = [Record(SYSTEM, f"tweet {label} {i}", label) for label, n in (("😀", 2), ("😭", 3), ("🤣", 17))
               for i in range(n)]
    for seed in range(5):
        train, val = stratified_split(records, 0.2, seed)
        assert Counter(r.label for r in val) == {"😀": 1, "😭": 1, "🤣": 3}
        assert len(train) + len(val) == len(records)
        assert not {r.user for r in train} & {r.user for r in val}


def test_formats_csv_tsv_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,emoji\n"今日は最高, 本当に",😀\n泣いた,😭\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("tweet\tlabel\n今日は最高\t😀\n泣いた\t😭\n", encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": "今日は最高"}, {"role": "assistant", "content": "😀"}]},
            {"messages": [{"role": "user", "content": "泣いた"}, {"role": "assistant", "content": "😭"}]}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                      encoding="utf-8")
    for name in ("a.csv", "a.tsv", "a.jsonl"):
        out = tmp_path / name.replace(".", "_")
        r = run_script("01_prepare_data.py", "--input", tmp_path / name, "--checkpoint-dir", out)
        assert r.returncode == 0, r.stderr
        prepared = load_json(out / "data/prepared.json")
        assert [x["messages"][-1]["content"] for x in prepared] == ["😀", "😭"]
    csv_records = load_json(tmp_path / "a_csv/data/prepared.json")
    assert csv_records[0]["messages"] == [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "今日は最高, 本当に"},
                                          {"role": "assistant", "content": "😀"}]
    # JSONL records had no system prompt and keep none unless --system adds one.
    assert [m["role"] for m in load_json(tmp_path / "a_jsonl/data/prepared.json")[0]["messages"]] == \
        ["user", "assistant"]


def test_system_labels_and_duplicates(tmp_path):
    src = write_messages(tmp_path / "in.json", [("楽しい一日", "😀"), ("泣ける話", "😭"), ("楽しい一日", "😭"),
                                                 ("怖い夢", "😨"), ("笑った", "🤣"), ("泣いた", "😭")])
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path, "--system", "絵文字で",
                   "--labels", "😀,😭")
    assert r.returncode == 0, r.stderr
    assert "repeats the tweet of record 1" in r.stderr and "dropped" in r.stderr
    prepared = load_json(tmp_path / "data/prepared.json")
    assert [(x["messages"][1]["content"], x["messages"][2]["content"]) for x in prepared] == \
        [("楽しい一日", "😀"), ("泣ける話", "😭"), ("泣いた", "😭")]
    assert {x["messages"][0]["content"] for x in prepared} == {"絵文字で"}
    assert "has 1 example" in r.stderr  # 😀 is left with one example


BAD_CASES = {
    "broken_json": ('[{"messages": [', "not valid JSON at line 1"),
    "not_list": ('{"a": 1}', "not a list"),
    "no_messages": ('[{"text_x": "a"}]', 'record 1 (index 0): has no "messages"'),
    "unknown_role": ('[{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "😀"}]}]',
                     "unknown role 'bot'"),
    "out_of_order": ('[{"messages": [{"role": "assistant", "content": "😀"}, {"role": "user", "content": "x"}]}]',
                     "expected system (optional) → user → assistant"),
    "empty_tweet": ('[{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "😀"}]}]',
                    "the tweet is empty or only whitespace"),
    "missing_answer": ('[{"messages": [{"role": "user", "content": "x"}]}]', "missing the assistant answer"),
    "not_emoji": ('[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "happy"}]}]',
                  "'happy' is not an emoji"),
    "two_emojis": ('[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "😀😀"}]}]',
                   "is more than one emoji"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_refused_and_nothing_written(tmp_path, case):
    text, message = BAD_CASES[case]
    assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    prepared = tmp_path / "data/prepared.json"
    before = prepared.read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", bad, "--checkpoint-dir", tmp_path)
    assert_user_error(r, str(bad), message)
    assert prepared.read_bytes() == before


def test_all_problems_reported_at_once(tmp_path):
    good = {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "😀"}]}
    records = [good, {"messages": [{"role": "user", "content": "x"}]}, good,
               {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "no"}]}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records), encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", bad, "--checkpoint-dir", tmp_path)
    assert_user_error(r, "3 problem(s)", "record 2 (index 1)", "record 4 (index 3)", "nothing was written")
    assert not (tmp_path / "data/prepared.json").exists()


def test_file_level_errors(tmp_path):
    r = run_script("01_prepare_data.py", "--input", tmp_path / "nope.json", "--checkpoint-dir", tmp_path)
    assert_user_error(r, "nope.json", "file not found")
    sjis = tmp_path / "sjis.csv"
    sjis.write_bytes("text,emoji\n今日は最高,😀\n".encode("utf-8").replace("今".encode(), "今".encode("shift_jis")))
    assert_user_error(run_script("01_prepare_data.py", "--input", sjis, "--checkpoint-dir", tmp_path),
                      "sjis.csv", "not UTF-8", "save the file as UTF-8")
    header = tmp_path / "h.csv"
    header.write_text("foo,bar\na,😀\n", encoding="utf-8")
    assert_user_error(run_script("01_prepare_data.py", "--input", header, "--checkpoint-dir", tmp_path),
                      "h.csv", "needs a text column")
    quoting = tmp_path / "q.csv"
    quoting.write_text('text,emoji\n"an unclosed quote,😀\n', encoding="utf-8")
    assert_user_error(run_script("01_prepare_data.py", "--input", quoting, "--checkpoint-dir", tmp_path),
                      "q.csv", "not valid CSV/TSV")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "a", "emoji": "😀"}\n{"text": \n', encoding="utf-8")
    assert_user_error(run_script("01_prepare_data.py", "--input", jsonl, "--checkpoint-dir", tmp_path),
                      "x.jsonl", "record 2 (index 1, line 2): not valid JSON")
    assert not (tmp_path / "data").exists()


def test_labels_flag_errors(tmp_path):
    r = run_script("01_prepare_data.py", "--labels", "😀,🦄", "--checkpoint-dir", tmp_path)
    assert_user_error(r, "--labels", "🦄", "not found")
    r = run_script("01_prepare_data.py", "--labels", "☹", "--checkpoint-dir", tmp_path)
    assert_user_error(r, "did you mean ☹️")
    r = run_script("01_prepare_data.py", "--labels", "happy", "--checkpoint-dir", tmp_path)
    assert_user_error(r, "--labels", "not a single emoji")


def test_split_errors(tmp_path):
    assert_user_error(run_script("02_split_data.py", "--checkpoint-dir", tmp_path), "run 01_prepare_data.py first")
    assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    for size in ("0", "1", "1.5", "-0.1"):
        assert_user_error(run_script("02_split_data.py", "--test-size", size, "--checkpoint-dir", tmp_path),
                          "--test-size", "between 0 and 1")
    assert not (tmp_path / "data/train.json").exists()
    src = write_messages(tmp_path / "one.json", [("a", "😀"), ("b", "😀"), ("c", "😭")])
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path / "one")
    assert r.returncode == 0 and "😭 has 1 example" in r.stderr
    assert_user_error(run_script("02_split_data.py", "--checkpoint-dir", tmp_path / "one"),
                      "😭", "single example", "--labels")


def test_txt_table_format_from_the_header(tmp_path):
    """Excel's "Text (tab delimited)" export is a .txt: tabs in the header make it TSV, commas CSV, even when
    the tweets hold the other character."""
    tsv = tmp_path / "excel.txt"
    tsv.write_text("tweet\tlabel\n今日は最高, 本当に\t😀\n泣いた\t😭\n", encoding="utf-8-sig")
    csv_txt = tmp_path / "comma.txt"
    csv_txt.write_text('text,emoji\n"今日は最高\t本当に",😀\n泣いた,😭\n', encoding="utf-8")
    for src, first in ((tsv, "今日は最高, 本当に"), (csv_txt, "今日は最高\t本当に")):
        out = tmp_path / src.stem
        r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", out)
        assert r.returncode == 0, r.stderr
        assert [x["messages"][1:] for x in load_json(out / "data/prepared.json")] == [
            [{"role": "user", "content": first}, {"role": "assistant", "content": "😀"}],
            [{"role": "user", "content": "泣いた"}, {"role": "assistant", "content": "😭"}]]


def test_jsonl_bad_line_does_not_hide_other_problems(tmp_path):
    """A line that is not JSON still counts as a record: the records after it keep their numbers, and
    their problems are reported in the same message."""
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"text": "a", "emoji": "😀"}\n{"text": \n\n{"text": "b", "emoji": "😭"}\n'
                     '{"text": "c", "emoji": "happy"}\n', encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", jsonl, "--checkpoint-dir", tmp_path)
    assert_user_error(r, "2 problem(s) in", "record 2 (index 1, line 2): not valid JSON",
                      "record 4 (index 3, line 5): the answer 'happy' is not an emoji", "nothing was written")
    assert not (tmp_path / "data").exists()


def test_duplicate_warnings_name_lines(tmp_path):
    src = tmp_path / "dup.csv"
    src.write_text("text,emoji\n楽しい一日,😀\n泣ける話,😭\n楽しい一日,😭\n", encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "record 3 (index 2, line 4) repeats the tweet of record 1 (line 2) with a different label" in r.stderr


def test_label_table_columns_line_up():
    """Every shipped label, ☹️ (two code points) included, takes the same terminal width in the table."""
    from emojitune.data import display_width, format_counts

    assert [display_width(t) for t in ("☹️", "☹", "😀", "🫠", "今日", "abc", "👍🏽", "1️⃣")] == [2, 1, 2, 2, 4, 3, 2, 2]
    for table in (format_counts(Counter({label: 10 for label in LABELS})),
                  format_counts(Counter(LABELS), {"train": Counter(LABELS), "val": Counter(LABELS)})):
        lines = table.splitlines()
        assert len(lines) == len(LABELS) + 2
        assert {display_width(line) for line in lines} == {len(lines[0])}


def test_mixed_system_prompts_warned(tmp_path):
    records = [[{"role": "system", "content": "このツイートを絵文字で感情分類してください。一つだけ答えて"}], [], [],
               [{"role": "system", "content": "短い"}]]
    src = tmp_path / "mixed.json"
    src.write_text(json.dumps([{"messages": m + [{"role": "user", "content": f"ツイート{i}"},
                                                 {"role": "assistant", "content": "😀"}]}
                               for i, m in enumerate(records)], ensure_ascii=False), encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    [warning] = [line for line in r.stderr.splitlines() if "system prompts" in line]
    assert "3 different system prompts (records per prompt: (none) 2, 'このツイートを絵文字で感情分類してくださ…' 1, " \
        "'短い' 1)" in warning
    assert "03 records only the most common one" in warning and "--system" in warning
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path, "--system", "短い")
    assert r.returncode == 0 and "system prompts" not in r.stderr


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_data_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave the data private (0600): the mode is what open() gives under the umask."""
    old = os.umask(0o002)  # not the common 022, so the check cannot pass by luck
    try:
        assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
        (tmp_path / "plain").open("w").close()
    finally:
        os.umask(old)
    mode = (tmp_path / "data/prepared.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o664


def test_read_lines_of_piped_bytes():
    from emojitune.data import read_lines
    from emojitune.console import UserError

    lines = read_lines(io.BytesIO("\ufeff今日は最高\r\n泣いた\n".encode()))
    assert list(lines) == ["今日は最高\r\n", "泣いた\n"]
    lines = read_lines(io.BytesIO("今日は最高\n".encode() + "泣いた\n".encode("shift_jis")))
    assert next(lines) == "今日は最高\n"
    with pytest.raises(UserError, match=r"^<stdin>: not UTF-8 text \(byte 0x8b on line 2\): save the file as UTF-8"):
        next(lines)


def conversation(*turns, system=SYSTEM):
    """A multi-turn messages record: turns are (tweet, emoji) pairs."""
    messages = [{"role": "system", "content": system}] if system else []
    for tweet, emoji in turns:
        messages += [{"role": "user", "content": tweet}, {"role": "assistant", "content": emoji}]
    return {"messages": messages}


def test_single_turn_data_files_are_unchanged(tmp_path):
    """Multi-turn support must not move a byte of the single-turn files: these are the SHA-256 sums of
    prepared/train/val/split.json for the shipped data, made before conversations were accepted."""
    import hashlib

    assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    sums = {n: hashlib.sha256((tmp_path / "data" / n).read_bytes()).hexdigest()[:16]
            for n in ("prepared.json", "train.json", "val.json", "split.json")}
    assert sums == {"prepared.json": "5606ed8116b06ef3", "train.json": "6b7fe0528341c497",
                    "val.json": "3a8931857bca5c2a", "split.json": "b7f8958244627e14"}


def test_multi_turn_records_are_prepared_and_counted(tmp_path):
    records = [conversation(("朝から最高", "😀"), ("でも電車で寝過ごした", "😭"), ("結局遅刻", "😨")),
               conversation(("笑った", "🤣"), system=None),
               conversation(("楽しい", "😀"), ("泣いた", "😭"))]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_json(tmp_path / "data/prepared.json") == records  # every turn kept, in order
    table = dict(line.split() for line in r.stdout.splitlines() if line.split()[0] in ("😀", "😭", "😨", "🤣", "total"))
    assert table == {"😀": "2", "😭": "2", "😨": "1", "🤣": "1", "total": "6"}  # every answer counted
    # --labels keeps a conversation only when every answer in it is wanted.
    r = run_script("01_prepare_data.py", "--input", src, "--labels", "😀,😭,🤣", "--checkpoint-dir",
                   tmp_path / "some")
    assert r.returncode == 0, r.stderr
    assert load_json(tmp_path / "some/data/prepared.json") == records[1:]


def test_multi_turn_problems_name_the_record_and_the_turn(tmp_path):
    records = [conversation(("ok", "😀"), ("二つ目", "happy"), ("  ", "😭😭")),
               {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "😀"},
                             {"role": "user", "content": "b"}]},
               {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                             {"role": "assistant", "content": "😀"}]},
               conversation(("fine", "😀"), ("also fine", "😭"))]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    r = run_script("01_prepare_data.py", "--input", bad, "--checkpoint-dir", tmp_path)
    assert_user_error(r, "5 problem(s)", "record 1 (index 0): turn 2: the answer 'happy' is not an emoji",
                      "record 1 (index 0): turn 3: the tweet is empty", "record 1 (index 0): turn 3: the answer",
                      "record 2 (index 1): turn 2: missing the assistant answer",
                      "record 3 (index 2): roles are user → user → assistant; expected system (optional) → user → "
                      "assistant", "nothing was written")
    assert "record 4" not in r.stderr and not (tmp_path / "data").exists()


def test_split_keeps_conversations_whole_and_labels_in_both(tmp_path):
    """Conversations count under the label of their last turn; 😨 appears only in earlier turns, and still
    lands in both files."""
    from emojitune.data import Record
    from emojitune.split import stratified_split

    singles = [Record(SYSTEM, f"tweet {label} {i}", label) for label in ("😀", "😭") for i in range(5)]
    chats = [Record(SYSTEM, f"last {i}", "😀", history=[(f"first {i}", "😨"), (f"second {i}", "😭")])
             for i in range(4)]
    records = singles + chats
    for seed in range(10):
        train, val = stratified_split(records, 0.2, seed)
        assert sorted(map(id, train + val)) == sorted(map(id, records))  # each record whole, on one side
        for side in (train, val):
            assert {label for r in side for label in r.labels} == {"😀", "😭", "😨"}
        assert stratified_split(records, 0.2, seed)[1] == val  # the same seed, the same split


def test_split_refuses_a_label_that_lives_in_one_conversation(tmp_path):
    src = tmp_path / "chat.json"
    src.write_text(json.dumps([conversation(("a", "😀"), ("b", "😨"), ("c", "😨"))] +
                              [conversation((f"t{i}", "😀")) for i in range(4)], ensure_ascii=False),
                   encoding="utf-8")
    assert run_script("01_prepare_data.py", "--input", src, "--checkpoint-dir", tmp_path).returncode == 0
    assert_user_error(run_script("02_split_data.py", "--checkpoint-dir", tmp_path),
                      "😨 appear in one conversation only", "cannot be in both train and validation")
