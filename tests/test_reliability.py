"""Interruption and resume, several processes, security details, and the rest of the bad-input matrix."""

import contextlib
import http.server
import os
import subprocess
import sys
import threading

import pytest
from conftest import (ROOT, assert_same_epochs_and_adapter, assert_user_error, interrupt_after_first_epoch,
                      one_and_two_processes, run_script, small_run_dir)


def test_ctrl_c_keeps_finished_epochs_and_resume_matches(tmp_path, tiny_model):
    common = ["--model", str(tiny_model), "--batch-size", "2", "--lr", "3e-3", "--epochs", "4"]
    straight, interrupted = small_run_dir(tmp_path, "straight"), small_run_dir(tmp_path, "interrupted")
    done = interrupt_after_first_epoch(interrupted, *common)
    assert len(done) < 4
    # Without --resume a new run refuses to overwrite the unfinished one.
    assert_user_error(run_script("03_train_model.py", *common, "--checkpoint-dir", interrupted),
                      "unfinished run", "--resume")
    r = run_script("03_train_model.py", "--resume", "--checkpoint-dir", interrupted)
    assert r.returncode == 0, r.stderr[-2000:]
    assert run_script("03_train_model.py", *common, "--checkpoint-dir", straight).returncode == 0
    assert_same_epochs_and_adapter(straight, interrupted, ("epoch", "train_loss", "val_loss", "val_accuracy"))


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model):
    _, _, r2 = one_and_two_processes(tmp_path, "--model", tiny_model)
    assert "\r" not in r2.stderr and "epoch 1/2: step" in r2.stderr  # plain progress lines in a log


def test_a_mistake_in_a_several_process_run_is_one_line(tmp_path, tiny_model):
    d = small_run_dir(tmp_path, "run")
    # Found before the processes start (settings) and inside them (every tweet over --max-length).
    for flags in (["--epochs", 0], ["--max-length", 8]):
        r = run_script("03_train_model.py", "--processes", 2, "--model", tiny_model, *flags, "--checkpoint-dir", d)
        assert_user_error(r, f"{flags[0]} {flags[1]}")
        assert r.returncode == 1 and r.stderr.count("error:") == 1, r.stderr


def test_adapter_without_safetensors_is_refused(tmp_path, tiny_model):
    d = tmp_path / "run"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter/adapter_config.json").write_text("{}")
    (d / "adapter/adapter_model.bin").write_bytes(b"not loaded")
    r = run_script("06_test_finetuned_single.py", "--model", tiny_model, "--checkpoint-dir", d, input="x\n")
    assert_user_error(r, "no adapter_model.safetensors")


def test_token_is_never_printed(tmp_path):
    assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    secret = "hf_SECRETtoken1234567890"
    r = run_script("03_train_model.py", "--model", "someone/missing-model", "--checkpoint-dir", tmp_path,
                   env={"HF_TOKEN": secret})
    assert_user_error(r, "someone/missing-model", "--model PATH")
    assert secret not in r.stdout + r.stderr


@contextlib.contextmanager
def fake_hub(status: int, error_code: str):
    """A Hugging Face hub on this machine that answers every request with one error, as the real hub
    does for a gated or a missing model (the hub client reads the X-Error-Code header)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("status,code,expected", [
    (403, "GatedRepo", ["is a gated model", "accept its licence", "hf auth login", "--model PATH"]),
    (404, "RepoNotFound", ["no such model on the Hugging Face hub", "check the id", "--model PATH"]),
])
def test_hub_refusals_are_explained(tmp_path, status, code, expected):
    with fake_hub(status, code) as endpoint:
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}
        r = run_script("06_test_finetuned_single.py", "--base", "--model", "google/gemma-3-270m-it",
                       "--checkpoint-dir", tmp_path / "run", input="今日は最高\n", env=env)
    assert_user_error(r, "google/gemma-3-270m-it", *expected)


def test_an_unreachable_hub_fails_at_once(tmp_path):
    """No network and no cached model: the offline message, without a minute of download retries."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run_script("06_test_finetuned_single.py", "--base", "--model", "google/gemma-3-270m-it",
                   "--checkpoint-dir", tmp_path / "run", input="今日は最高\n", env=env)
    assert_user_error(r, "not in the local Hugging Face cache and the hub cannot be reached", "--model PATH")
    assert "Retry" not in r.stderr and "retry" not in r.stderr


def test_steps_out_of_order(tmp_path):
    assert_user_error(run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path), "run 03_train_model.py first")
    assert_user_error(run_script("05_test_base.py", "--checkpoint-dir", tmp_path), "run 02_split_data.py first")
    assert_user_error(run_script("03_train_model.py", "--resume", "--checkpoint-dir", tmp_path),
                      "no run to resume")
    r = run_script("03_train_model.py", "--device", "tpu", "--checkpoint-dir", tmp_path)
    assert r.returncode != 0 and "invalid choice: 'tpu'" in r.stderr and "Traceback" not in r.stderr


def test_a_cached_hub_model_loads_without_the_network(tmp_path, tiny_model):
    """Offline with the model in the Hugging Face cache: no retries against the hub (they took ~3 minutes)."""
    import shutil

    repo = tmp_path / "hf/hub/models--acme--tiny-gemma-it"
    shutil.copytree(tiny_model, repo / "snapshots/0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0123abcd")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run_script("06_test_finetuned_single.py", "--base", "--model", "acme/tiny-gemma-it", "--checkpoint-dir",
                   tmp_path / "run", input="今日は最高\n", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 1
    assert "Retry" not in r.stderr and "127.0.0.1" not in r.stderr, r.stderr[-2000:]


def _script_ending(tmp_path, body: str):
    """A script whose main() is `body`, run through run_main as the numbered scripts are."""
    code = (f"import atexit, pathlib, sys, threading, time\nsys.path.insert(0, {str(ROOT)!r})\n"
            f"from emojitune.console import run_main\nout = pathlib.Path({str(tmp_path)!r})\n"
            f"def main():\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "run_main(main)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the buffering a user's shell has
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_a_finished_script_flushes_its_output_and_runs_exit_handlers(tmp_path):
    # stdout into a pipe is block-buffered: the lines are still in the buffer when main() returns.
    r = _script_ending(tmp_path, "atexit.register(lambda: (out / 'closed').write_text('yes'))\n"
                                 "print('answer 1'); print('answer 2')\nprint('a report', file=sys.stderr)")
    assert (r.returncode, r.stdout, r.stderr) == (0, "answer 1\nanswer 2\n", "a report\n")
    assert (tmp_path / "closed").read_text() == "yes"


def test_a_finished_script_waits_for_a_thread_still_running(tmp_path):
    r = _script_ending(tmp_path, "def late():\n    time.sleep(0.5); (out / 'late').write_text('done'); print('late')\n"
                                 "threading.Thread(target=late).start()")
    assert (r.returncode, r.stdout) == (0, "late\n")
    assert (tmp_path / "late").read_text() == "done"
