"""Speed of training, evaluation and answering on the real Gemma-3-270M shape (random weights, no hub).

    uv run benchmarks/bench_train.py                    # in-process table (~10 min on 2 CPU cores)
    uv run benchmarks/bench_train.py --whole-process    # also time whole 03 runs vs the original recipe
    uv run benchmarks/bench_train.py --multi-turn 4     # only: the default recipe, single tweets vs conversations
    uv run benchmarks/bench_train.py --eval-cost        # only: what --evals-per-epoch costs an epoch

Three ways to train are timed: the original recipe (TRL, as the original user ran it), 03's fast engine, and
03 --engine trl (TRL's SFTTrainer with 03's recipe and report). On a CUDA GPU the original recipe is also timed
with TRL's default bf16 mixed precision.

The machines this was developed on drift by 10-50% within minutes, so the configurations are timed in rounds
(--rounds, default 2) between timings of the original recipe (float32): original, every configuration,
original, every configuration, ..., original. Each timing of a configuration is compared with the mean of the
original's timings just before and just after its round (a drift that is linear over a round cancels), and a
configuration's speed-up is the mean of its rounds' speed-ups; its seconds are the mean of its rounds'. The
same holds for whole processes. Every timing is printed, so a drift shows. Whole processes are timed first,
before this process trains anything: later it holds the memory of the in-process configurations (~6 GB,
kept by glibc as 03 asks), and on the 2-core VM where this was found a 03 child then ran 40% slower
(`--batch-size 16` 14.4 -> 20.6 s, in turn; its kernel time 2 -> 13 s for the same page faults), the original
recipe not (55.3 vs 55.9 s). A user's 03 starts from a shell, which holds nothing. Where Python may not write bytecode
(PYTHONDONTWRITEBYTECODE) and the libraries have none compiled, --whole-process stops and says how to compile
it: otherwise every timed process would spend seconds compiling them, which users pay only once.

Speed depends on shapes, not weight values, so a random-weight model of the exact shape gives the real
model's timings (not its losses). The tokenizer is a small byte-level BPE whose prompts for the shipped
tweets average ~50 tokens with 2-3 answer tokens, as the real Gemma tokenizer's do.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# The values of google/gemma-3-270m's config.json on the Hugging Face hub (model_type gemma3_text):
# 268.1M parameters, 167.8M of them in the tied 262,144-token embedding.
GEMMA_3_270M = dict(
    vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=512, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(18)],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32_768,
    tie_word_embeddings=True, attn_logit_softcapping=None, final_logit_softcapping=None,
)
BENCH_TOKENIZER_VOCAB = 400  # gives ~50-token prompts on the shipped tweets, like Gemma's tokenizer
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def build_model(path: Path) -> Path:
    import torch
    from tiny_gemma import SPECIAL_TOKENS, build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if (path / "config.json").exists():
        return path
    tok = build_tokenizer(path, vocab_size=BENCH_TOKENIZER_VOCAB)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = AutoConfig.for_model("gemma3_text", **GEMMA_3_270M, pad_token_id=ids["<pad>"],
                                  bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    model.save_pretrained(path)
    return path


# ---- measurement helpers -------------------------------------------------------------------------

def reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def matmul_peak_gflops(device) -> float:
    """A large matmul in the dtype 03 trains in on this device (float32 on CPU, bf16 on most CUDA GPUs)."""
    import torch

    from emojitune.modeling import resolve_dtype

    n = 8192 if device == "cuda" else 2048  # a GPU needs a larger product to reach its peak
    dtype = resolve_dtype(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(3):
            (a @ b).sum().item()
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def uncompiled_libraries(names=("torch", "transformers", "peft", "trl", "accelerate")) -> list[str]:
    """Where Python does not write bytecode (PYTHONDONTWRITEBYTECODE, as on CI and some containers), the
    libraries among `names` whose package has no compiled bytecode: a process importing them compiles their
    modules from source each time, seconds that whole-process timings would count and users do not pay."""
    import importlib.util

    if not sys.dont_write_bytecode:
        return []  # the first process that imports them writes it
    missing = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and not os.path.exists(importlib.util.cache_from_source(spec.origin)):
            missing.append(name)
    return missing


def percent(part: float, whole: float) -> str:
    """A GPU's bf16 peak dwarfs a LoRA step's work: keep one significant digit below 1%."""
    x = 100 * part / whole
    return f"{x:.0f}%" if x >= 1 else f"{x:.1g}%"


def useful_gflop(lengths: list[int], answers: list[int], cfg=GEMMA_3_270M, r: int = 16) -> float:
    """FLOPs a LoRA training step must do for these samples: decoder forward + input gradients (frozen
    weights need no weight gradients), attention, LoRA (with its weight gradients), and the output
    layer at the answer positions only. Padding and recomputation are not useful work."""
    d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    linear = L * sum(i * o for i, o in shapes)
    lora = L * sum(r * (i + o) for i, o in shapes)
    total = 0.0
    for t, a in zip(lengths, answers):
        total += 4 * linear * t + 6 * lora * t + L * 12 * t * t * q + 4 * cfg["vocab_size"] * d * a
    return total / 1e9


# ---- the measured pieces ---------------------------------------------------------------------------

def training_setup(model_path, records, batch_size: int, dropout: float, gradient_checkpointing=False,
                   multi_turn=1):
    """03's fast engine as train() sets it up (seed 42, the benchmark's LoRA with this dropout, 03's optimizer
    and loss), one epoch's batches of `records`, and one training step already run: its first-call
    allocations are not the steady state. Returns the model, the examples, the batches and the step."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig

    from emojitune.chat import encode, pad_id
    from emojitune.launch import keep_freed_memory
    from emojitune.loss import answer_loss_module
    from emojitune.modeling import enable_gradient_checkpointing, load_model
    from emojitune.training import TrainSettings, chained_examples, epoch_batches, make_optimizer, train_step

    keep_freed_memory()  # as 03's train() does
    settings = TrainSettings(multi_turn=multi_turn, lora_dropout=dropout, batch_size=batch_size)
    torch.manual_seed(settings.seed)
    lm = load_model(str(model_path), "cuda" if torch.cuda.is_available() else "cpu",
                    lora=LoraConfig(lora_dropout=dropout, **LORA), training=True)
    if gradient_checkpointing:
        enable_gradient_checkpointing(lm.model)
    accelerator = Accelerator(cpu=lm.device == "cpu")
    examples = chained_examples(lm, records, settings, 1) if multi_turn > 1 else encode(lm, records)
    optimizer = make_optimizer([p for p in lm.model.parameters() if p.requires_grad], settings, lm.device)
    loss_module = accelerator.prepare(answer_loss_module(lm.model, batch_size))
    answer_tokens = [e.answer_tokens for e in examples]
    pad = pad_id(lm.tokenizer)

    def step(batch):
        return train_step(accelerator, loss_module, optimizer, examples, batch, answer_tokens, pad,
                          settings.max_grad_norm)

    batches = epoch_batches([len(e.input_ids) for e in examples], batch_size, settings.seed, 1)
    step(batches[0])
    return lm, examples, batches, step


def time_ours(model_path, records, batch_size, dropout, samples, gradient_checkpointing=False, multi_turn=1):
    """03's own training step (training.train_step) on this model, after one warm-up step. A sample is a
    tweet: with multi_turn above 1, the tweets are chained into conversations as in 03's first epoch, and
    steps are timed until as many tweets have been trained on."""
    lm, examples, batches, step = training_setup(model_path, records, batch_size, dropout, gradient_checkpointing,
                                                 multi_turn)
    tweets = [e.answers for e in examples]
    todo, n, lengths, answers = [], 0, [], []
    for b in batches[1:]:
        if n >= samples:
            break
        todo.append(b)
        n += sum(tweets[i] for i in b)
    reset_peak_rss()
    sync(lm.device)
    start = time.perf_counter()
    for b in todo:
        loss, _ = step(b)
    loss.item()
    sync(lm.device)
    seconds = time.perf_counter() - start
    for b in todo:
        lengths += [len(examples[i].input_ids) for i in b]
        answers += [examples[i].answer_tokens for i in b]
    return seconds / n, useful_gflop(lengths, answers) / n, peak_memory(lm.device)


def time_trl(model_path, train_path, samples, bf16=False):
    import torch

    from original_recipe import build_trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(str(model_path), train_path, None, Path(out), max_steps=samples + 1, bf16=bf16)
        times = []

        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                times.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                times.append(time.perf_counter())

        trainer.add_callback(Clock())
        reset_peak_rss()
        trainer.train()
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # times[1] is the start of step 2: the first step is warm-up, as for ours. No useful GFLOP count of its own
    # (None): TRL trains on the same kind of samples, and its work is counted as ours.
    return (times[-1] - times[1]) / samples, None, peak_memory(device)


def time_trl_engine(model_path, train_records, val_records, batch_size, samples):
    """03 --engine trl's trainer (trl_engine.make_trainer) on this model, timed from its second step."""
    import torch
    from transformers import TrainerCallback

    from emojitune import trl_engine
    from emojitune.chat import encode, pad_id
    from emojitune.checkpoints import CheckpointDir
    from emojitune.modeling import load_model
    from emojitune.training import TrainSettings

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = -(-samples // batch_size) + 1  # + the warm-up step
    with tempfile.TemporaryDirectory() as out:
        cp = CheckpointDir(out)
        settings = TrainSettings(model=str(model_path), engine="trl", batch_size=batch_size, device=device)
        config = trl_engine.sft_config(cp, settings)
        # One "epoch" of exactly these steps, so the progress line counts k/steps.
        config.max_steps, config.num_train_epochs, config.save_strategy = steps, 1, "no"
        lm = load_model(settings.model, device, training=True)
        reporter = trl_engine.EpochReport(cp, settings, encode(lm, val_records[:4]), pad_id(lm.tokenizer), [])
        trainer = trl_engine.make_trainer(lm, settings, config, trl_engine.conversations(train_records), reporter)
        trainer.add_callback(Clock())
        reset_peak_rss()
        trainer.train()
        reporter.close()
    # times[2] is the start of step 2 and times[2 * steps - 1] the end of the last: the first step is warm-up.
    # No useful GFLOP count of its own, as time_trl.
    return (times[2 * steps - 1] - times[2]) / ((steps - 1) * batch_size), None, peak_memory(device)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        gb = torch.cuda.max_memory_allocated() / 1024 ** 3
        torch.cuda.reset_peak_memory_stats()
        return gb
    return peak_rss_gb()


def time_eval_and_answer(model_path, train_records, val_records):
    import torch

    from emojitune.chat import encode, pad_id
    from emojitune.generation import Sampling, generate
    from emojitune.modeling import load_model
    from emojitune.scoring import label_probabilities, score

    lm = load_model(str(model_path), "cuda" if torch.cuda.is_available() else "cpu")
    val = encode(lm, val_records)
    score(lm.model, val[:4], pad_id(lm.tokenizer), lm.device)  # warm-up
    start = time.perf_counter()
    score(lm.model, val, pad_id(lm.tokenizer), lm.device)
    sync(lm.device)
    eval_s = time.perf_counter() - start
    # Random weights never say <end_of_turn>: cap the answer at 3 new tokens, an emoji and its end.
    emoji_answer = Sampling(max_new_tokens=3)
    tweet = val_records[0]
    generate(lm, tweet.system, tweet.user, emoji_answer)
    answer = []
    for r in val_records[1:6]:
        start = time.perf_counter()
        generate(lm, r.system, r.user, emoji_answer)
        answer.append(time.perf_counter() - start)
    labels = list(dict.fromkeys(r.label for r in train_records))
    top = []
    for r in val_records[1:4]:
        start = time.perf_counter()
        label_probabilities(lm, r.system, r.user, labels)
        top.append(time.perf_counter() - start)
    return eval_s, statistics.median(answer), statistics.median(top), len(val), len(labels)


def time_eval_cost(model_path, train_records, val_records, samples: int, repeats: int):
    """03's default recipe on one LoRA model, as train() runs it: `samples` training steps, then one
    evaluation pass over the validation tweets, `repeats` times. Returns the s/sample and eval seconds
    of each repeat."""
    from emojitune.chat import encode, pad_id
    from emojitune.scoring import score
    from emojitune.training import TrainSettings

    recipe = TrainSettings()
    lm, _, batches, step = training_setup(model_path, train_records, recipe.batch_size, recipe.lora_dropout)
    val, pad = encode(lm, val_records), pad_id(lm.tokenizer)
    score(lm.model, val[:4], pad, lm.device)
    per_sample, eval_seconds, at = [], [], 1
    for _ in range(repeats):
        todo, n = [], 0
        while n < samples:
            todo.append(batches[at % len(batches)])
            n, at = n + len(todo[-1]), at + 1
        sync(lm.device)
        start = time.perf_counter()
        for b in todo:
            loss, _ = step(b)
        loss.item()
        sync(lm.device)
        per_sample.append((time.perf_counter() - start) / n)
        start = time.perf_counter()
        score(lm.model, val, pad, lm.device)
        sync(lm.device)
        eval_seconds.append(time.perf_counter() - start)
        print(f"  repeat {len(per_sample)}: {per_sample[-1]:.3f} s/sample, evaluation {eval_seconds[-1]:.2f} s", flush=True)
    return per_sample, eval_seconds, recipe.batch_size


def print_eval_cost(per_sample: list[float], eval_seconds: list[float], batch_size: int, n_train: int, n_val: int):
    """An epoch with K evaluations costs n_train x s/sample + K x eval; compare K = 4 (the default) with 1."""
    from emojitune.training import TrainSettings

    k = TrainSettings.evals_per_epoch
    spread = lambda xs: f"median {statistics.median(xs):.3f}, min {min(xs):.3f}, max {max(xs):.3f}"  # noqa: E731
    print(f"eval-cost: batch size {batch_size}, {len(per_sample)} repeats")
    print(f"  training s/sample: {spread(per_sample)}")
    print(f"  evaluation pass over {n_val} val tweets, s: {spread(eval_seconds)}")
    train_s, eval_s = n_train * statistics.median(per_sample), statistics.median(eval_seconds)
    ratio = (train_s + k * eval_s) / (train_s + eval_s)
    worst = (n_train * min(per_sample) + k * max(eval_seconds)) / (n_train * min(per_sample) + max(eval_seconds))
    print(f"  an epoch of {n_train} train tweets: {train_s:.1f} s training; with 1 evaluation "
          f"{train_s + eval_s:.1f} s, with {k} {train_s + k * eval_s:.1f} s: {ratio:.3f}x "
          f"(worst pairing of the repeats: {worst:.3f}x)")


WHOLE_ORIGINAL = "original recipe (TRL), whole process"


def whole_process(model_path, train_records, val_records, tmp: Path, rounds: int):
    """Whole processes (imports, load, train 1 epoch, evaluate, save) on the same 48 training tweets, in rounds
    between runs of the original recipe (see the docstring). Returns bracketed()'s result."""
    import torch

    from emojitune.checkpoints import CheckpointDir, write_bytes
    from emojitune.data import encode_records

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [("03_train_model.py default, whole process", [sys.executable, str(ROOT / "03_train_model.py")]),
            ("03_train_model.py --batch-size 16, whole process",
             [sys.executable, str(ROOT / "03_train_model.py"), "--batch-size", "16"]),
            ("03_train_model.py --engine trl, whole process",
             [sys.executable, str(ROOT / "03_train_model.py"), "--engine", "trl"]),
            ("03_train_model.py --engine trl --batch-size 16, whole process",
             [sys.executable, str(ROOT / "03_train_model.py"), "--engine", "trl", "--batch-size", "16"])]
    if torch.cuda.is_available():  # on a GPU a TRL user would keep TRL's default bf16 mixed precision
        runs.insert(0, ("original recipe (TRL) --bf16, whole process",
                        [sys.executable, str(ROOT / "benchmarks/original_recipe.py"), "--bf16"]))
    count = iter(range(10 ** 6))

    def timed(name, cmd):
        def run():
            d = CheckpointDir(tmp / f"whole-{next(count)}")
            write_bytes(d.train, encode_records(train_records[:48]))
            write_bytes(d.val, encode_records(val_records[:12]))
            start = time.perf_counter()
            subprocess.run(cmd + ["--model", str(model_path), "--epochs", "1", "--checkpoint-dir", str(d.root)],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            print(f"  measured {name}: {seconds:.1f} s", flush=True)
            shutil.rmtree(d.root, ignore_errors=True)  # its adapter and resume state
            return seconds
        return name, run

    original = timed(WHOLE_ORIGINAL, [sys.executable, str(ROOT / "benchmarks/original_recipe.py")])
    return bracketed(original[1], [timed(name, cmd) for name, cmd in runs], rounds)


def bracketed(original, others, rounds: int):
    """Time original(), then each of `others` ((name, function returning seconds) pairs), then original() again,
    `rounds` times: original, others, original, ..., others, original. With original None (not timed), just
    the rounds. Returns the original's timings (rounds + 1, or []) and {name: [(seconds, speed-up), ...] per
    round}, each speed-up against the mean of the original's timings just before and after that round (None
    without the original)."""
    originals = [original()] if original else []
    results = {name: [] for name, _ in others}
    for r in range(rounds):
        if rounds > 1:
            print(f"round {r + 1} of {rounds}", flush=True)
        seconds = [(name, function()) for name, function in others]
        if original:
            originals.append(original())
        around = (originals[-2] + originals[-1]) / 2 if original else None
        for name, s in seconds:
            results[name].append((s, around / s if around else None))
    return originals, results


def summary(timings: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """(mean seconds, mean speed-up) of a configuration's rounds."""
    seconds = statistics.mean(s for s, _ in timings)
    ratios = [r for _, r in timings if r is not None]
    return seconds, statistics.mean(ratios) if ratios else None


def each_round(timings: list[tuple[float, float | None]], unit: str, digits: int) -> str:
    return ", ".join(f"{s:.{digits}f}{unit}" + (f" {r:.2f}x" if r else "") for s, r in timings)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "emojitune-bench-gemma-3-270m",
                   help="where the random-weight model is built (reused if present)")
    p.add_argument("--samples", type=int, default=32, help="training samples timed per configuration and round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of every configuration between timings of the original recipe (default: 2)")
    p.add_argument("--whole-process", action="store_true", help="also time whole 03 processes vs TRL")
    p.add_argument("--skip-trl", action="store_true", help="skip the TRL original recipe and 03 --engine trl (slow)")
    p.add_argument("--multi-turn", type=int, default=None, metavar="K",
                   help="time only the default recipe on single tweets and on conversations of 2..K turns "
                        "(03 --multi-turn K), per tweet trained on")
    p.add_argument("--eval-cost", action="store_true",
                   help="only time 03's default recipe and its evaluation pass, --repeats times, and print what "
                        "--evals-per-epoch costs an epoch")
    p.add_argument("--repeats", type=int, default=3, help="repeats for --eval-cost (default: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 keeps a machine busy with other work from "
                        "stalling every multi-threaded operation")
    args = p.parse_args()
    if args.whole_process and (missing := uncompiled_libraries()):
        sys.exit(f"bench_train.py --whole-process: Python may not write bytecode here (PYTHONDONTWRITEBYTECODE is "
                 f"set) and {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} none compiled, so every "
                 f"timed process would compile it from source again (about 5 s per process here; a user pays it "
                 f"once): compile it once with {sys.executable} -m compileall -q -j 0 "
                 f"{sysconfig.get_paths()['purelib']}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from emojitune import dropout_masks, output_pass
    from emojitune.data import load_records
    from emojitune.split import stratified_split

    print(f"machine: {os.cpu_count()} CPU threads visible, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
          + (", CPU dropout masks: " + ("our C kernel" if dropout_masks.uses_kernel() else "torch's"))
          + (", batch-1 output-layer pass: " + ("our C kernel" if output_pass.available() else "torch's two")),
          flush=True)
    model_path = build_model(args.model_dir)
    records = load_records(ROOT / "training_data_emotion_jp.json")
    train, val = stratified_split(records, 0.2, 42)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.eval_cost:
        per_sample, eval_seconds, batch_size = time_eval_cost(model_path, train, val, args.samples, args.repeats)
        print_eval_cost(per_sample, eval_seconds, batch_size, len(train), len(val))
        return
    peak = matmul_peak_gflops(device)
    from emojitune.modeling import resolve_dtype

    print(f"{str(resolve_dtype(device)).removeprefix('torch.')} matmul peak measured here: {peak:.0f} GFLOP/s",
          flush=True)

    if args.multi_turn is not None:
        multi_turn_table(model_path, train, args.samples, args.multi_turn, peak)
        return
    whole = None
    if args.whole_process:  # first, while this process holds little memory: see the docstring
        with tempfile.TemporaryDirectory() as tmp:
            whole = whole_process(model_path, train, val, Path(tmp), args.rounds)
    train_path = None if args.skip_trl else _write_train(train)
    gflop, memory = {}, {}  # per configuration: useful GFLOP per sample, peak memory (largest of its rounds)

    def timed(name, measure):
        def run():
            s, work, mem = measure()
            gflop[name], memory[name] = work, max(mem, memory.get(name, 0.0))
            print(f"  measured {name}: {s:.3f} s/sample", flush=True)
            return s
        return name, run

    others = []
    if not args.skip_trl and device == "cuda":  # the recipe's float32 is for CPUs; on a GPU a TRL user keeps bf16
        others.append(timed("original recipe with TRL's default bf16 (mixed precision)",
                            lambda: time_trl(model_path, train_path, args.samples, bf16=True)))
    configs = [("ours, default recipe (batch 1, dropout 0.05)", 1, 0.05),
               ("ours, --batch-size 8", 8, 0.05),
               ("ours, --batch-size 16", 16, 0.05),
               ("ours, --batch-size 16 --lora-dropout 0", 16, 0.0)]
    for name, bs, dropout in configs:
        others.append(timed(name, lambda bs=bs, dropout=dropout: time_ours(model_path, train, bs, dropout, args.samples)))
    if not args.skip_trl:
        for name, bs in (("03 --engine trl, default recipe (batch 1)", 1), ("03 --engine trl --batch-size 16", 16)):
            others.append(timed(name, lambda bs=bs: time_trl_engine(model_path, train, val, bs, args.samples)))
    original_name = "original recipe: TRL SFTTrainer, batch 1, grad ckpt"
    original = None if args.skip_trl else timed(original_name,
                                                 lambda: time_trl(model_path, train_path, args.samples))[1]
    originals, results = bracketed(original, others, args.rounds)
    # TRL trains on the same kind of samples: count its useful work as for ours.
    ours_gflop = next(g for g in gflop.values() if g is not None)
    eval_s, answer_s, top_s, n_val, n_labels = time_eval_and_answer(model_path, train, val)

    print()
    if originals:
        print(f"original recipe, s/sample, in the order timed: {', '.join(f'{s:.3f}' for s in originals)}; "
              f"each configuration is compared with the mean of the two around its round")
    print("| configuration | s/sample | samples/s | useful GFLOP/s | % of matmul peak | peak memory | speed-up vs original "
          "| each round: s/sample, speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    if originals:
        s = statistics.mean(originals)
        g = ours_gflop / s
        print(f"| {original_name} | {s:.3f} | {1 / s:.2f} | {g:.0f} | {percent(g, peak)} | {memory[original_name]:.1f} GB "
              f"| reference | {', '.join(f'{x:.3f}' for x in originals)} |")
    for name, timings in results.items():
        s, ratio = summary(timings)
        g = (gflop[name] or ours_gflop) / s
        print(f"| {name} | {s:.3f} | {1 / s:.2f} | {g:.0f} | {percent(g, peak)} | {memory[name]:.1f} GB "
              f"| {f'{ratio:.2f}x' if ratio else 'n/a'} | {each_round(timings, '', 3)} |")
    print()
    print(f"evaluation pass (val loss + accuracy, {n_val} tweets, one teacher-forced pass): {eval_s:.2f} s")
    default = summary(results[configs[0][0]])[0]
    print_eval_cost([default], [eval_s], configs[0][1], len(train), n_val)
    print(f"06 answer latency, one tweet, greedy, prompt + 3 new tokens: {answer_s:.3f} s (median of 5)")
    print(f"06 --labels-only / --top, one tweet scored against {n_labels} labels: {top_s:.3f} s (median of 3)")
    if whole:
        originals, results = whole
        print()
        print(f"original recipe, whole process, in the order timed: {', '.join(f'{s:.1f} s' for s in originals)}; "
              f"each run is compared with the mean of the two around its round")
        print("| whole process, 1 epoch over 48 tweets | seconds | speed-up vs original | each round: seconds, speed-up |")
        print("|---|---|---|---|")
        print(f"| {WHOLE_ORIGINAL} | {statistics.mean(originals):.1f} | reference "
              f"| {', '.join(f'{x:.1f}' for x in originals)} |")
        for name, timings in results.items():
            s, ratio = summary(timings)
            print(f"| {name} | {s:.1f} | {ratio:.2f}x | {each_round(timings, ' s', 1)} |")


def multi_turn_table(model_path, train, samples: int, k: int, peak: float) -> None:
    """The default recipe with single tweets and with 03 --multi-turn k, timed one after the other on the
    same number of tweets: conversations are longer, and each step trains on several answers."""
    rows = []
    for turns in (1, k):
        name = f"ours, default recipe, --multi-turn {turns}"
        s, gflop, mem = time_ours(model_path, train, 1, 0.05, samples, multi_turn=turns)
        rows.append((name, s, gflop, mem))
        print(f"  measured {name}: {s:.3f} s/sample", flush=True)
    print()
    print("| configuration (a sample is a tweet) | s/sample | samples/s | useful GFLOP/s | % of matmul peak "
          "| peak memory | time vs --multi-turn 1 |")
    print("|---|---|---|---|---|---|---|")
    for name, s, gflop, mem in rows:
        print(f"| {name} | {s:.3f} | {1 / s:.2f} | {gflop / s:.0f} | {percent(gflop / s, peak)} | {mem:.1f} GB "
              f"| {s / rows[0][1]:.2f}x |")


def _write_train(train) -> Path:
    from emojitune.data import encode_records

    path = Path(tempfile.mkdtemp()) / "train.json"
    path.write_bytes(encode_records(train))
    return path


if __name__ == "__main__":
    main()
