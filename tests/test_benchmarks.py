"""The training benchmark's bookkeeping: the README's speed-ups come from it."""

import compileall
import re
import sys

import bench_train
from conftest import assert_user_error, run_script


def test_each_round_is_compared_with_the_original_timings_around_it():
    """original, configurations, original, configurations, original: round r's speed-up is against the mean
    of the original's timings r and r + 1, and a configuration's figures are the means of its rounds'."""
    originals = iter([2.0, 4.0, 3.0])
    fast = iter([0.5, 1.0])
    timed, results = bench_train.bracketed(lambda: next(originals), [("fast", lambda: next(fast))], rounds=2)
    assert timed == [2.0, 4.0, 3.0]
    assert results["fast"] == [(0.5, 6.0), (1.0, 3.5)]  # (2 + 4) / 2 / 0.5, (4 + 3) / 2 / 1.0
    assert bench_train.summary(results["fast"]) == (0.75, 4.75)
    assert bench_train.each_round(results["fast"], " s", 1) == "0.5 s 6.00x, 1.0 s 3.50x"
    untimed, alone = bench_train.bracketed(None, [("fast", lambda: 0.5)], rounds=1)
    assert untimed == [] and bench_train.summary(alone["fast"]) == (0.5, None)


def test_whole_process_timings_wait_for_compiled_bytecode(tmp_path, monkeypatch):
    """Where Python may not write bytecode, a library without any is named (every timed process would compile
    it again); once compiled, or where Python writes it itself, nothing is."""
    package = tmp_path / "freshly_installed_lib"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bench_train.uncompiled_libraries(("freshly_installed_lib", "not_installed_at_all")) == [
        "freshly_installed_lib"]
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bench_train.uncompiled_libraries(("freshly_installed_lib",)) == []
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert compileall.compile_dir(str(package), quiet=1)
    assert bench_train.uncompiled_libraries(("freshly_installed_lib",)) == []


def test_whole_process_run_stops_in_one_line_without_bytecode(tmp_path):
    """bench_train.py --whole-process refuses before timing anything, naming the command that fixes it."""
    fake = tmp_path / "site"
    (fake / "trl").mkdir(parents=True)
    (fake / "trl" / "__init__.py").write_text("")
    result = run_script("benchmarks/bench_train.py", "--whole-process", "--model-dir", tmp_path / "never-built",
                        env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(fake)})
    assert_user_error(result, "-m compileall -q")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    named = re.search(r"\) and (.+) (?:has|have) none compiled", result.stderr)
    assert named and "trl" in named.group(1).split(", ")
    assert not (tmp_path / "never-built").exists()


def test_whole_processes_are_timed_before_this_process_trains(tmp_path, monkeypatch, capsys):
    """--whole-process times the 03 processes before the in-process configurations, whose memory the benchmark
    keeps (a 03 child ran 40% slower beside it), and still prints their table last."""
    calls = []
    monkeypatch.setattr(bench_train, "build_model", lambda path: path)
    monkeypatch.setattr(bench_train, "matmul_peak_gflops", lambda device: 100.0)
    monkeypatch.setattr(bench_train, "uncompiled_libraries", lambda: [])

    def whole(*args):
        calls.append("whole")
        return [60.0, 60.0], {"03 default, whole process": [(20.0, 3.0)]}

    def ours(model, records, batch_size, dropout, samples):
        calls.append(f"ours b{batch_size}")
        return 0.5, 10.0, 1.0

    monkeypatch.setattr(bench_train, "whole_process", whole)
    monkeypatch.setattr(bench_train, "time_ours", ours)
    monkeypatch.setattr(bench_train, "time_eval_and_answer",
                        lambda *a: calls.append("eval") or (3.0, 0.2, 0.4, 50, 25))
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--whole-process", "--skip-trl", "--rounds", "1",
                                      "--model-dir", str(tmp_path)])
    bench_train.main()
    assert calls == ["whole", "ours b1", "ours b8", "ours b16", "ours b16", "eval"]
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("| 03 default, whole process | 20.0 | 3.00x | 20.0 s 3.00x |")
