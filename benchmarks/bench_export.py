"""Time and size of 07_export_model.py on the real Gemma-3-270M shape (random weights, no hub).

    uv run benchmarks/bench_export.py        # ~1.5 min on 2 CPU cores, ~3.5 GB of disk in the temp folder

Builds bench_train's random-weight model of the exact google/gemma-3-270m shape with a SentencePiece
tokenizer like Gemma's (the GGUF vocabulary is read from tokenizer.model), trains a LoRA adapter for one
step with 03 (a real adapter folder and run.json), then runs 07 as a user would, once per GGUF type, and
prints each step's time and each file's size.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_train import GEMMA_3_270M, build_model  # noqa: E402

GGUF_TYPES = ("f16", "q8_0")
# Bytes per weight in a GGUF row of 640 values: f16 2; q8_0 stores blocks of 32 values as 32 int8 + one
# f16 scale (34 bytes per 32 weights).
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "f32": 4.0}


def build_export_model(path: Path) -> Path:
    """bench_train's model, with its tokenizer replaced by a SentencePiece one (same special-token ids)."""
    from tiny_gemma import build_sentencepiece_tokenizer

    if not (path / "tokenizer.model").exists():
        build_model(path)
        (path / "tokenizer.json").unlink()
        build_sentencepiece_tokenizer(path)
    return path


def prepare_run(model_path: Path, run: Path) -> None:
    """Data for 2 labels (16 train / 4 val tweets) and a one-step adapter trained by 03."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for cmd in (["01_prepare_data.py", "--labels", "😀,😭"], ["02_split_data.py"],
                ["03_train_model.py", "--model", str(model_path), "--epochs", "1", "--batch-size", "16"]):
        subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:], "--checkpoint-dir", str(run)], check=True,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed_export(run: Path, gguf_type: str, out: Path) -> list[tuple[float, str]]:
    """Run 07 as a user would; (seconds since start, line) for every line it prints."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "07_export_model.py"), "--checkpoint-dir", str(run), "--gguf-type", gguf_type,
           "--out", str(out)]
    start, lines = time.perf_counter(), []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
    if proc.returncode:
        raise SystemExit(f"07 failed ({proc.returncode}); last lines: {lines[-3:]}")
    lines.append((time.perf_counter() - start, "(process exit)"))
    return lines


def gguf_parts(path: Path) -> tuple[int, int, int]:
    """(metadata bytes, token_embd bytes, all tensor bytes) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    first = min(t.data_offset for t in reader.tensors)
    return first, tensors["token_embd.weight"], sum(tensors.values())


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "emojitune-bench-export-270m",
                   help="where the random-weight model is built (reused if present)")
    args = p.parse_args()

    model_path = build_export_model(args.model_dir)
    rows, embd = GEMMA_3_270M["vocab_size"], GEMMA_3_270M["hidden_size"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        start = time.perf_counter()
        prepare_run(model_path, run)
        print(f"01/02/03 (one training step) to get an adapter: {time.perf_counter() - start:.0f} s", flush=True)
        for gguf_type in GGUF_TYPES:
            out = Path(tmp) / f"export-{gguf_type}"
            lines = timed_export(run, gguf_type, out)
            print(f"\n07 --gguf-type {gguf_type}: whole process {lines[-1][0]:.1f} s", flush=True)
            steps = [(0.0, "(Python start-up)")] + [
                (s, line) for s, line in lines if not line.startswith(" ")]  # indented lines are details
            for (seconds, line), (following, _) in zip(steps, steps[1:]):
                print(f"  {following - seconds:6.1f} s  {line[:100]}")
            meta, embd_bytes, tensor_bytes = gguf_parts(out / f"model-{gguf_type}.gguf")
            size = (out / f"model-{gguf_type}.gguf").stat().st_size
            print(f"  model-{gguf_type}.gguf: {size / 1e6:.1f} MB = metadata {meta / 1e6:.1f} MB (vocabulary, "
                  f"template) + tensors {tensor_bytes / 1e6:.1f} MB, of which token_embd {embd_bytes / 1e6:.1f} MB "
                  f"({rows:,} rows x {embd} x {BYTES_PER_WEIGHT[gguf_type]:g} bytes)")
            print(f"  merged/ (float32, as the random model is stored): {folder_size(out / 'merged') / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
