import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "training_data_emotion_jp.json"
from emojitune import DEFAULT_SYSTEM_PROMPT as SYSTEM  # noqa: E402
from emojitune.launch import free_port  # noqa: E402


def usable_cpus() -> int:
    """The CPUs this process may run on (a taskset or a container's cpuset counts; psutil's count does not)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker per usable CPU, at most 4. Each test file runs on one worker (--dist loadfile) and
    the largest takes about a third of the whole, so more workers would only wait for it, holding memory."""
    return max(1, min(usable_cpus(), 4))


def pytest_configure(config):
    """With pytest-xdist's workers (pyproject.toml: -n auto), every worker and each script its tests start
    get an equal share of the cores, as one process has them without workers: PyTorch's threads, each
    process as many as the machine has cores, made the workers' runs up to 5x slower on 2 cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // workers))


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


def interrupt_after_first_epoch(run_dir: Path, *args) -> list[dict]:
    """Start 03 with `args` on run_dir, press Ctrl+C once an epoch is saved, and check the stop: exit 130, no
    traceback, the --resume hint, every finished epoch's adapter, no final adapter, nothing half written.
    Returns the finished epochs of metrics.json.

    SIGINT is set back to its default in 03, as in a terminal, even where the tests themselves run with
    SIGINT ignored (a shell's background job), which Python would otherwise pass on and make Ctrl+C do nothing."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "03_train_model.py"), *map(str, args), "--checkpoint-dir",
                             str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = run_dir / "metrics.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(load_json(metrics)["epochs"]) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted during epoch" in err and "--resume" in err
    done = load_json(metrics)["epochs"]
    assert done and not (run_dir / "adapter").exists() and not list(run_dir.rglob("*.tmp"))
    assert all((run_dir / "epochs" / f"epoch-{e['epoch']}" / "adapter_model.safetensors").exists() for e in done)
    return done


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


def small_run_dir(base: Path, name: str, n: int = 40) -> Path:
    """base/name prepared and split (01, 02) from the first n shipped tweets: ready for 03."""
    data = shipped_subset(base / f"{name}.json", n)
    d = base / name
    assert run_script("01_prepare_data.py", "--input", data, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    return d


def straight_and_resumed(base: Path, *flags):
    """The same 03 run trained for 3 epochs in one go (base/straight) and for 2, then --resume to 3
    (base/resumed). Returns the two folders and the straight run's result."""
    straight, resumed = small_run_dir(base, "straight"), small_run_dir(base, "resumed")
    first = run_script("03_train_model.py", *flags, "--epochs", 3, "--checkpoint-dir", straight)
    assert first.returncode == 0, first.stderr[-2000:]
    r = run_script("03_train_model.py", *flags, "--epochs", 2, "--checkpoint-dir", resumed)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("03_train_model.py", "--resume", "--epochs", 3, "--checkpoint-dir", resumed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after epoch 2 of 3" in r.stdout
    return straight, resumed, first


def assert_same_epochs_and_adapter(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    """Two runs' metrics.json agree exactly on `keys` of every epoch, and their final adapters are the same bytes."""
    x, y = load_json(a / "metrics.json")["epochs"], load_json(b / "metrics.json")["epochs"]
    assert [{k: e[k] for k in keys} for e in x] == [{k: e[k] for k in keys} for e in y]
    assert (a / "adapter/adapter_model.safetensors").read_bytes() == \
        (b / "adapter/adapter_model.safetensors").read_bytes()


def one_and_two_processes(base: Path, *flags) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """03 with `flags` for 2 epochs as one process at batch 4 and as two (accelerate launch) at batch 2 each:
    the same global batch, so the same numbers to float rounding. Returns both folders and the two-process run."""
    one, two = small_run_dir(base, "one"), small_run_dir(base, "two")
    common = [*flags, "--epochs", 2, "--lr", "3e-3", "--lora-dropout", 0]
    r1 = run_script("03_train_model.py", *common, "--batch-size", 4, "--checkpoint-dir", one)
    assert r1.returncode == 0, r1.stderr[-2000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    # A free port, not accelerate's fixed 29500: another test may be launching processes at the same time.
    r2 = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--main_process_port", str(free_port()),
                         str(ROOT / "03_train_model.py"), *map(str, common), "--batch-size", "2",
                         "--checkpoint-dir", str(two)],
                        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 processes (global batch 4)" in r2.stdout
    assert r2.stdout.count("epoch 2/2  train") == 1  # one process reports and writes
    a, b = load_json(one / "metrics.json")["epochs"], load_json(two / "metrics.json")["epochs"]
    for x, y in zip(a, b, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], abs=1e-4)
        assert y["val_loss"] == pytest.approx(x["val_loss"], abs=1e-4)
    assert load_json(two / "run.json")["processes"] == 2
    assert not list(two.rglob("*.tmp")) and not list(two.rglob(".*.old"))
    return one, two, r2


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


@pytest.fixture(params=["kernel", "none"])
def output_kernel(request, monkeypatch):
    """output_pass with its C kernel (where a compiler is found here) and without one (CC names none)."""
    from emojitune import output_pass

    output_pass._kernel.cache_clear()
    if request.param == "none":
        monkeypatch.setenv("CC", "no-such-compiler")
    yield request.param
    output_pass._kernel.cache_clear()  # built again with the real environment by the next user


def c_compiler_on_path() -> bool:
    """Whether one of the C compilers our kernels are built with (cbuild.compilers()) is on the PATH."""
    import shutil

    from emojitune import cbuild

    return any(shutil.which(command[0]) for command in cbuild.compilers())
