import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "training_data_emotion_jp.json"
from emojitune import DEFAULT_SYSTEM_PROMPT as SYSTEM  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 model + tokenizer saved in a temp folder, loaded by path like a real one."""
    from tiny_gemma import build_tiny_gemma

    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


def run_script(name: str, *args, input: str | bytes | None = None, cwd: Path = ROOT, env: dict | None = None):
    """Run a numbered script as a user would; returns the CompletedProcess (text). Bytes for `input` reach
    stdin as they are, like a file in any encoding redirected into the script."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    raw = isinstance(input, bytes)
    result = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], input=input, text=not raw,
                            capture_output=True, cwd=cwd, env=full_env, timeout=600)
    if raw:
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def assert_user_error(result, *fragments):
    """A clean refusal: non-zero exit, no traceback, every fragment in the message."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for f in fragments:
        assert f in result.stderr, f"{f!r} not in: {result.stderr}"


def write_messages(path: Path, rows: list[tuple[str, str]], system: str | None = SYSTEM) -> Path:
    records = []
    for user, label in rows:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": label}]
        records.append({"messages": msgs})
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def shipped_subset(path: Path, n: int) -> Path:
    """The first n shipped records (10 per label, in label order) as a messages file for quick runs."""
    records = load_json(DATASET)[:n]
    return write_messages(path, [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in records])


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


LEARN_LABELS = "😀,🤣,😭,😨"


@pytest.fixture(scope="session")
def learned_run(tiny_model, tmp_path_factory) -> Path:
    """The issue's learning run: 4 labels, many epochs at a high learning rate on the tiny model."""
    d = tmp_path_factory.mktemp("learned")
    assert run_script("01_prepare_data.py", "--labels", LEARN_LABELS, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", "--model", tiny_model, "--epochs", 40, "--lr", "1e-2",
                   "--batch-size", 8, "--evals-per-epoch", 1, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d
