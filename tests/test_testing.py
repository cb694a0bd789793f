"""06_test_finetuned_single.py and 05_test_base.py on the learned tiny model."""

from dataclasses import asdict

import pytest
from conftest import LEARN_LABELS, SYSTEM, assert_user_error, load_json, run_script

TWEETS = ["今日は朝から最高の気分！", "腹筋崩壊した、息できないｗｗｗ", "夜道で足音がついてくる、怖い"]


def plain_greedy(model_dir, adapter, tweets, system=SYSTEM):
    """What a user would write with plain transformers + PEFT: fresh chat, greedy, decoded answer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for t in tweets:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": t}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, do_sample=False, max_new_tokens=16)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def test_learned_the_training_tweets(learned_run):
    """Template, loss mask, LoRA, saving, loading and generation agree: the tiny model learns 4 labels."""
    train = load_json(learned_run / "data/train.json")
    tweets = [r["messages"][1]["content"] for r in train]
    r = run_script("06_test_finetuned_single.py", "--checkpoint-dir", learned_run, input="\n".join(tweets) + "\n")
    assert r.returncode == 0, r.stderr[-2000:]
    answers = r.stdout.splitlines()
    assert len(answers) == len(tweets)
    right = sum(a == rec["messages"][2]["content"] for a, rec in zip(answers, train))
    assert right / len(train) >= 0.9, (right, len(train))


def test_piped_answers_are_history_free_and_match_plain_peft(learned_run, tiny_model):
    piped = "\n".join(TWEETS[:2]) + "\n\n" + TWEETS[2] + "\n"  # the empty line is skipped
    tuned = run_script("06_test_finetuned_single.py", "--checkpoint-dir", learned_run, input=piped)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    lines = tuned.stdout.splitlines()
    assert len(lines) == 3
    alone = run_script("06_test_finetuned_single.py", "--checkpoint-dir", learned_run, input=TWEETS[2] + "\n")
    assert alone.stdout.splitlines() == [lines[2]]
    assert lines == plain_greedy(tiny_model, learned_run / "adapter", TWEETS)

    base = run_script("06_test_finetuned_single.py", "--base", "--checkpoint-dir", learned_run, input=piped)
    assert base.returncode == 0, base.stderr[-2000:]
    assert "no adapter" in base.stderr
    base_lines = base.stdout.splitlines()
    assert len(base_lines) == 3
    assert base_lines == plain_greedy(tiny_model, None, TWEETS)
    assert base_lines != lines

    # --compare: both answers from one load, one line per input, base<TAB>tuned.
    both = run_script("06_test_finetuned_single.py", "--compare", "--checkpoint-dir", learned_run, input=piped)
    assert both.returncode == 0, both.stderr[-2000:]
    assert [line.split("\t") for line in both.stdout.splitlines()] == [[b, t] for b, t in zip(base_lines, lines)]
    assert_user_error(run_script("06_test_finetuned_single.py", "--compare", "--base", "--checkpoint-dir",
                                 learned_run, input=piped), "--compare", "drop --base")


def test_labels_only_and_top(learned_run):
    labels = set(LEARN_LABELS.split(","))
    tweets = ["全然関係ない天気の話", "ラーメンうまい", "明日は雨らしい"]
    r = run_script("06_test_finetuned_single.py", "--labels-only", "--base", "--checkpoint-dir", learned_run,
                   input="\n".join(tweets))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 3 and set(r.stdout.split()) <= labels
    r = run_script("06_test_finetuned_single.py", "--top", 2, "--checkpoint-dir", learned_run,
                   input=TWEETS[0] + "\n")
    [line] = r.stdout.splitlines()
    first, p1, second, p2 = line.split()
    assert {first, second} <= labels and first != second and 1 >= float(p1) >= float(p2) >= 0


def test_piped_shift_jis_is_a_user_error(learned_run):
    """06 < tweets.txt saved as Shift_JIS: the lines before the bad one are answered, then one error line
    naming the line, not a traceback from the tokenizer. A BOM on the first line is fine."""
    piped = ("\ufeff" + TWEETS[0] + "\n").encode() + (TWEETS[1] + "\n").encode("shift_jis")
    r = run_script("06_test_finetuned_single.py", "--checkpoint-dir", learned_run, input=piped)
    assert_user_error(r)
    assert r.stderr.splitlines()[-1].startswith(
        "error: <stdin>: not UTF-8 text (byte 0x95 on line 2): save the file as UTF-8")
    assert len(r.stdout.splitlines()) == 1


def test_checkpoint_choice_and_missing_adapter(learned_run, tmp_path):
    best = load_json(learned_run / "metrics.json")["best_epoch"]
    r = run_script("06_test_finetuned_single.py", "--checkpoint", "best", "--checkpoint-dir", learned_run,
                   input=TWEETS[0])
    assert r.returncode == 0 and f"epoch-{best}" in r.stderr
    assert_user_error(run_script("06_test_finetuned_single.py", "--checkpoint", "epoch-99",
                                 "--checkpoint-dir", learned_run, input="x"), "epoch-99", "not found")
    assert_user_error(run_script("06_test_finetuned_single.py", "--checkpoint-dir", tmp_path, input="x"),
                      "adapter not found", "run 03_train_model.py first, or use --base")


def greedy_answer_ids(lm, system, user, history=()) -> list[int]:
    """The tokens greedy generation gives after the prompt 06 builds (with 06's generation settings,
    one tweet at a time, so no padding), <end_of_turn> included."""
    import torch

    from emojitune.chat import prompt_ids
    from emojitune.generation import Sampling, generation_config

    prompt = torch.tensor([prompt_ids(lm.tokenizer, system, user, history, lm.end_of_turn_id)])
    with torch.no_grad():
        out = lm.model.generate(input_ids=prompt, generation_config=generation_config(lm, Sampling()))
    return out[0, prompt.shape[1]:].tolist()


def test_teacher_forced_accuracy_agrees_with_greedy_generation(learned_run):
    """03's one-pass accuracy: argmax at every answer position == the greedy answer is exactly the label's
    tokens, then <end_of_turn>. 05 and 06 strip spaces around an answer, so there a greedy "\n😭" counts
    as "😭": every exact answer is right there too, not always the other way round."""
    from emojitune.chat import answer_ids, encode, pad_id
    from emojitune.checkpoints import CheckpointDir, base_model
    from emojitune.data import records_from_json
    from emojitune.generation import decode_answer
    from emojitune.modeling import load_model
    from emojitune.scoring import score

    cp = CheckpointDir(learned_run)
    lm = load_model(base_model(cp, None)[0], "cpu", adapter=cp.adapter)
    records = records_from_json(cp.val, "") + records_from_json(cp.train, "")
    scores = score(lm.model, encode(lm, records), pad_id(lm.tokenizer), lm.device)
    greedy = [greedy_answer_ids(lm, r.system, r.user) for r in records]
    exact = [g == answer_ids(lm.tokenizer, r.label, lm.end_of_turn_id) for g, r in zip(greedy, records)]
    assert scores.exact == exact
    stripped = [decode_answer(lm.tokenizer, g) == r.label for g, r in zip(greedy, records)]
    assert all(s for s, e in zip(stripped, exact) if e)
    assert sum(exact) >= len(records) // 2  # a real check: most answers are right, not all trivially wrong


def test_label_scores_with_a_shared_prompt_equal_scoring_each_label_alone(learned_run):
    """06 --labels-only runs the prompt once and copies its cache for every label: same numbers as
    scoring prompt + label as separate examples."""
    from emojitune.chat import Example, answer_ids, pad_id, prompt_ids
    from emojitune.checkpoints import CheckpointDir, base_model
    from emojitune.modeling import load_model
    from emojitune.scoring import score, shared_prompt_losses
    from emojitune.session import trained_labels

    cp = CheckpointDir(learned_run)
    lm = load_model(base_model(cp, None)[0], "cpu", adapter=cp.adapter)
    labels = trained_labels(cp) + ["☹️", "🫠", "a longer answer than any label"]
    answers = [answer_ids(lm.tokenizer, label, lm.end_of_turn_id) for label in labels]
    assert len({len(a) for a in answers}) > 1  # rows of different lengths: padding is exercised
    for system, tweet in [(SYSTEM, TWEETS[0]), (None, TWEETS[1])]:
        prompt = prompt_ids(lm.tokenizer, system, tweet)
        alone = score(lm.model, [Example.of(prompt, a) for a in answers], pad_id(lm.tokenizer), lm.device).loss
        shared = shared_prompt_losses(lm.model, prompt, answers, pad_id(lm.tokenizer), lm.device)
        assert shared == pytest.approx(alone, rel=1e-4, abs=1e-4)


def test_summary_numbers_on_a_hand_made_case():
    from emojitune.evaluation import summarize

    s = summarize(["😀", "😭", "Happy!", "🥺", "😀😀"], ["😀", "😨", "😀", "🥺", "😀"], {"😀", "😨", "😭"})
    assert (s["n"], s["correct"], s["one_emoji"], s["trained_label"]) == (5, 2, 3, 2)
    assert s["accuracy"] == pytest.approx(0.4) and s["one_emoji_share"] == pytest.approx(0.6)


def test_test_base_and_compare(learned_run):
    r = run_script("05_test_base.py", "--checkpoint-dir", learned_run, "--limit", 4)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base: accuracy" in r.stdout
    saved = load_json(learned_run / "eval_base.json")
    assert len(saved["results"]) == 4 and saved["adapter"] is None
    r = run_script("05_test_base.py", "--checkpoint-dir", learned_run, "--compare")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_json(learned_run / "eval_compare.json")
    for name in ("base", "tuned"):
        rows = saved["results"]
        assert saved["summary"][name]["correct"] == sum(x[f"{name}_correct"] for x in rows)
        assert f"{name}: accuracy" in r.stdout
    # Every val tweet 03's last epoch counted right (its greedy answer is exactly the label's tokens) is right
    # here; 05 strips spaces around an answer, so it may count a few more (a greedy "\n😭" is "😭" here).
    last = load_json(learned_run / "metrics.json")["epochs"][-1]
    assert saved["summary"]["tuned"]["correct"] >= last["val_correct"] > 0
    # The report: per-label numbers, groups from the shipped file, confusion counts, generation settings.
    from emojitune.generation import Sampling

    assert saved["sampling"] == asdict(Sampling()) and saved["labels_only"] is False
    assert "emotion_groups.json" in saved["groups_note"] and "tuned, per label" in r.stdout
    assert saved["groups"]["joy"] == ["😀", "😁", "🤩", "🥳"]
    for name in ("base", "tuned"):
        report = saved["report"][name]
        assert set(report["per_label"]) == set(LEARN_LABELS.split(","))
        assert sum(p["support"] for p in report["per_label"].values()) == len(rows)
        assert sum(map(sum, report["confusion"]["counts"])) == len(rows)
        assert sum(report["confusion"]["counts"][i][i] for i in range(4)) == saved["summary"][name]["correct"]
        assert report["group_accuracy"] >= report["accuracy"] and 0 <= report["macro_f1"] <= 1
    assert (learned_run / "confusion.png").read_bytes().startswith(b"\x89PNG")


def test_interactive_prompt_has_line_editing_and_history(learned_run):
    """In a terminal, ← moves the cursor and ↑ recalls the last tweet (a real terminal sends escape codes)."""
    import os
    import pty
    import subprocess
    import sys
    import time

    from conftest import ROOT

    def piped(text):
        r = run_script("06_test_finetuned_single.py", "--top", 4, "--checkpoint-dir", learned_run, input=text + "\n")
        return r.stdout.strip()

    train = load_json(learned_run / "data/train.json")
    left = "\x1b[D"
    for record in train[:5]:  # a tweet whose answer differs from the answer to the raw escape codes
        tweet = record["messages"][1]["content"]
        typed = tweet[1:] + left * (len(tweet) - 1) + tweet[0]
        expected = piped(tweet)
        if expected != piped(typed):
            break
    else:
        pytest.fail("no tweet answered differently from its unedited keystrokes")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "06_test_finetuned_single.py"), "--top", "4",
                             "--checkpoint-dir", str(learned_run)], stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"}, close_fds=True)
    os.close(slave)
    screen = b""

    def read_until(needle: bytes, seconds: float = 120):
        nonlocal screen
        deadline = time.time() + seconds
        while needle not in screen and time.time() < deadline:
            try:
                screen += os.read(master, 4096)
            except OSError:
                break

    read_until(b"> ")
    os.write(master, typed.encode() + b"\r")
    answer = expected.encode() + b"\r\n> "
    read_until(answer)  # the answer, then the next prompt: readline is ready again
    os.write(master, b"\x1b[A\r")  # ↑ then Enter: the same tweet again
    screen_before, screen = screen, b""
    read_until(answer)
    screen = screen_before + screen
    os.write(master, b"\x04")  # Ctrl+D
    proc.wait(timeout=60)
    os.close(master)
    assert screen.count(expected.encode()) >= 2, screen.decode(errors="replace")[-2000:]


def test_teacher_forced_accuracy_per_turn_agrees_with_greedy_generation_with_history(learned_run):
    """03's per-answer accuracy on conversations: answer k is right exactly when greedy generation after the
    earlier turns (as in the data) gives the label's tokens, with the prompts 05/06 --history build."""
    from emojitune.chat import answer_ids, encode, pad_id
    from emojitune.checkpoints import CheckpointDir, base_model
    from emojitune.data import Record, records_from_json
    from emojitune.modeling import load_model
    from emojitune.scoring import score

    cp = CheckpointDir(learned_run)
    lm = load_model(base_model(cp, None)[0], "cpu", adapter=cp.adapter)
    tweets = records_from_json(cp.val, "") + records_from_json(cp.train, "")[:16]
    chats = [Record(SYSTEM, r3.user, r3.label, history=[(r1.user, r1.label), (r2.user, r2.label)])
             for r1, r2, r3 in zip(tweets[0::3], tweets[1::3], tweets[2::3])]
    scores = score(lm.model, encode(lm, chats), pad_id(lm.tokenizer), lm.device)
    greedy = [[greedy_answer_ids(lm, SYSTEM, user, c.turns[:k]) == answer_ids(lm.tokenizer, label, lm.end_of_turn_id)
               for k, (user, label) in enumerate(c.turns)] for c in chats]
    assert scores.answers == [3] * len(chats)
    assert scores.right == [sum(g) for g in greedy] and scores.exact == [all(g) for g in greedy]
    assert 0 < scores.correct  # a real check: some answers with history are right


def test_history_is_kept_and_cut_at_n(learned_run, monkeypatch):
    """06 --history N and 05's running conversation pass the last N (tweet, answer) pairs, oldest first."""
    import io
    from types import SimpleNamespace

    from emojitune import generation, tester
    from emojitune.checkpoints import CheckpointDir

    seen = []

    def fake_generate(lm, system, user, sampling=None, streamer=None, history=()):
        seen.append(list(history))
        return f"A{len(seen)}"

    expected = {0: [[], [], [], []],
                2: [[], [("t1", "A1")], [("t1", "A1"), ("t2", "A2")], [("t2", "A2"), ("t3", "A3")]]}
    for n, histories in expected.items():
        monkeypatch.setattr(tester, "generate", fake_generate)
        seen.clear()
        stdin = SimpleNamespace(isatty=lambda: False, buffer=io.BytesIO(b"t1\nt2\n\nt3\nt4\n"))
        out = io.StringIO()
        tester.run_tester(CheckpointDir(learned_run), history=n, stdin=stdin, stdout=out)
        assert seen == histories and out.getvalue().split() == ["A1", "A2", "A3", "A4"]
        monkeypatch.setattr(generation, "generate", fake_generate)
        seen.clear()
        assert generation.converse(None, SYSTEM, ["t1", "t2", "t3", "t4"], n) == ["A1", "A2", "A3", "A4"]
        assert seen == histories


def test_piped_history_matches_plain_transformers_chat(learned_run, tiny_model):
    """06 --history 2: each answer is what plain transformers gives for the chat template with the last two
    tweets and answers before the new tweet."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tweets = TWEETS + ["明日は雨らしい"]
    r = run_script("06_test_finetuned_single.py", "--history", 2, "--checkpoint-dir", learned_run,
                   input="\n".join(tweets) + "\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "keeps your last 2 tweets" in r.stderr
    answers = r.stdout.splitlines()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), learned_run / "adapter")
    model.eval()
    for i, tweet in enumerate(tweets):
        msgs = [{"role": "system", "content": SYSTEM}]
        for before, answer in zip(tweets[max(0, i - 2):i], answers[max(0, i - 2):i]):
            msgs += [{"role": "user", "content": before}, {"role": "assistant", "content": answer}]
        ids = tok.apply_chat_template(msgs + [{"role": "user", "content": tweet}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, do_sample=False, max_new_tokens=16)
        assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answers[i]
    assert_user_error(run_script("06_test_finetuned_single.py", "--history", -1, "--checkpoint-dir", learned_run,
                                 input="x\n"), "--history -1 must be 0")


def test_repeat_rate_on_hand_made_answers():
    from emojitune.evaluation import repeats

    assert repeats(["😀", "😀", "😭", "😭", "😭", "🤣"]) == {"repeats": 3, "pairs": 5, "repeat_rate": 0.6}
    assert repeats(["😀", "", "", "😀"]) == {"repeats": 1, "pairs": 3, "repeat_rate": pytest.approx(1 / 3)}
    assert repeats(["😀"]) == {"repeats": 0, "pairs": 0, "repeat_rate": 0.0}


def test_test_base_with_history_reports_the_repeat_rate(learned_run):
    from emojitune.evaluation import repeats

    r = run_script("05_test_base.py", "--checkpoint-dir", learned_run, "--compare", "--history", 3, "--limit", 6)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "keeping the last 3 tweets and answers" in r.stdout
    saved = load_json(learned_run / "eval_compare.json")
    assert saved["history"] == 3 and len(saved["results"]) == 6
    expected = [x["expected"] for x in saved["results"]]
    assert saved["labels_repeat"] == repeats(expected)
    for name in ("base", "tuned"):
        answers = [x[name] for x in saved["results"]]
        assert {k: saved["summary"][name][k] for k in ("repeats", "pairs", "repeat_rate")} == repeats(answers)
        s = saved["summary"][name]
        assert f"{name}: repeats its previous answer {s['repeat_rate']:.2f} ({s['repeats']}/5)" in r.stdout


def test_trained_labels_include_earlier_turns(tmp_path):
    """06 --labels-only chooses among every label trained on, those of earlier turns of a conversation too."""
    from emojitune.checkpoints import CheckpointDir, write_bytes
    from emojitune.data import Record, encode_records
    from emojitune.session import trained_labels

    cp = CheckpointDir(tmp_path)
    write_bytes(cp.train, encode_records([Record(SYSTEM, "b", "😀", history=[("a", "😨")]), Record(None, "c", "😭")]))
    assert trained_labels(cp) == ["😨", "😀", "😭"]


def test_labels_only_report_and_own_groups(learned_run, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text('{"happy": ["😀", "🤣"], "unhappy": ["😭"]}', encoding="utf-8")
    r = run_script("05_test_base.py", "--checkpoint-dir", learned_run, "--compare", "--groups", groups)
    assert_user_error(r, "label(s) 😨 are in no group")
    groups.write_text('{"happy": ["😀", "🤣"], "unhappy": ["😭", "😨"]}', encoding="utf-8")
    r = run_script("05_test_base.py", "--checkpoint-dir", learned_run, "--compare", "--labels-only", "--groups", groups)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_json(learned_run / "eval_compare.json")
    assert saved["labels_only"] is True and saved["sampling"] is None and str(groups) in saved["groups_note"]
    assert saved["groups"] == {"happy": ["😀", "🤣"], "unhappy": ["😭", "😨"]}
    labels = set(LEARN_LABELS.split(","))
    for name in ("base", "tuned"):
        assert {row[name] for row in saved["results"]} <= labels  # every answer is a trained label
        assert saved["report"][name]["other"] == 0
        assert saved["report"][name]["confusion"]["rows"] == ["😀", "🤣", "😭", "😨"]  # ordered by group


def test_classification_report_on_hand_made_answers():
    """Known precision/recall: 😀 answered 3 times (2 right), 😭 twice (1 right), 😨 never; 2 answers are
    not a trained label and land in "other"."""
    from emojitune.report import classification_report

    expected = ["😀", "😀", "😀", "😭", "😭", "😨", "😨", "😨"]
    answers = ["😀", "😀", "😭", "😭", "😀", "Happy!", "😱", "😭"]
    groups = {"😀": "joy", "😭": "sadness", "😨": "fear", "😱": "fear"}  # 😱 is no label but has a group
    r = classification_report(answers, expected, ["😀", "😭", "😨"], groups)
    p = r["per_label"]
    assert (p["😀"]["precision"], p["😀"]["recall"], p["😀"]["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (p["😭"]["precision"], p["😭"]["recall"], p["😭"]["support"]) == (pytest.approx(1 / 3), 0.5, 2)
    assert (p["😨"]["precision"], p["😨"]["recall"], p["😨"]["f1"]) == (0.0, 0.0, 0.0)
    assert p["😭"]["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    assert r["accuracy"] == pytest.approx(3 / 8) and r["other"] == 2
    # Group accuracy: the 3 exact answers, plus 😱 for 😨 (both fear); 😭 for 😨 and 😀 for 😭 are not.
    assert r["group_correct"] == 4 and r["group_accuracy"] == pytest.approx(0.5)
    assert r["per_group"] == {"joy": {"correct": 2, "total": 3}, "sadness": {"correct": 1, "total": 2},
                              "fear": {"correct": 1, "total": 3}}
    assert r["confusion"] == {"rows": ["😀", "😭", "😨"], "columns": ["😀", "😭", "😨", "other"],
                              "counts": [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 2]]}
    assert "group_accuracy" not in classification_report(answers, expected, ["😀", "😭", "😨"])


def test_groups_file_problems_and_the_shipped_groups(tmp_path):
    from conftest import DATASET

    from emojitune.console import UserError
    from emojitune.report import SHIPPED_GROUPS, groups_for, load_groups, order_by_group

    shipped = load_groups(SHIPPED_GROUPS)
    labels = list(dict.fromkeys(r["messages"][2]["content"] for r in load_json(DATASET)))
    assert sorted(shipped) == sorted(labels)  # every shipped emoji in exactly one group
    assert 8 <= len(set(shipped.values())) <= 14
    bad = tmp_path / "bad.json"
    bad.write_text('{"joy": ["😀", "😁"], "fun": ["😁"], "odd": "😭"}', encoding="utf-8")
    with pytest.raises(UserError, match="😁 is in both 'joy' and 'fun'; group 'odd' must be a list"):
        load_groups(bad)
    small = tmp_path / "small.json"
    small.write_text('{"joy": ["😀"], "sadness": ["😭"]}', encoding="utf-8")
    with pytest.raises(UserError, match="label\\(s\\) 😨 🤣 are in no group"):
        groups_for(["😀", "😨", "😭", "🤣"], small)
    # The shipped file without --groups: labels it lacks turn group accuracy off, with a note saying so.
    group_of, note = groups_for(["😀", "🐱"], None)
    assert group_of is None and "🐱" in note and "--groups" in note
    assert order_by_group(["😭", "🤣", "😀", "😁"], shipped) == ["😀", "😁", "🤣", "😭"]


def test_confusion_axes_never_show_missing_glyphs(tmp_path, monkeypatch):
    """Without an emoji font, the axes name each label ('grinning face'); ☹️'s U+FE0F is never drawn alone."""
    import emojitune.report as report
    from emojitune.report import classification_report, plot_confusion, short_name

    assert short_name("☹️") == "white frowning face" and short_name("😀") == "grinning face"
    monkeypatch.setattr(report, "EMOJI_FONTS", ("No Such Emoji Font",))
    r = classification_report(["😀", "☹️", "x"], ["😀", "☹️", "☹️"], ["😀", "☹️"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)"
        note = plot_confusion(tmp_path / "confusion.png", {"tuned": r}, None)
    assert "Unicode names" in note and (tmp_path / "confusion.png").read_bytes().startswith(b"\x89PNG")
