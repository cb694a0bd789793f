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
