"""03: LoRA training with loss on the answer only, an evaluation after every epoch, adapters and resume.

A plain PyTorch loop (with accelerate for several processes) rather than TRL's SFTTrainer: on CPU TRL
projects the 262k-token output layer over every prompt position and computes full-vocabulary entropy
for its logs, which is much slower for the same numbers (benchmarks/bench_train.py measures both).
`--engine trl` trains with TRL instead (trl_engine.py), for FSDP, DeepSpeed and TRL's reporting.
"""

import contextlib
import importlib.metadata
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import DEFAULT_MODEL
from .chat import collate, encode, pad_id
from .checkpoints import (CheckpointDir, atomic_dir, atomic_file, best_epoch, check_existing_run, read_json, remove,
                          sha256_file, write_json)
from .cli import option
from .console import UserError, log
from .data import record_name, records_from_json, training_system_prompt
from .loss import answer_loss_module
from .modeling import load_model, resolve_device
from .scoring import score

ENGINES = ("fast", "trl")
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")


@dataclass
class TrainSettings:
    """The recipe; the defaults are the original project's."""
    model: str = DEFAULT_MODEL
    epochs: int = option(3, "passes over the training tweets")
    lr: float = option(5e-5, "learning rate, constant")
    batch_size: int = option(1, "tweets per step and process (the global batch is this x processes); "
                                "try 16 with --lr 2e-4 for speed (see README: Speed)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    max_length: int = option(512, "longest prompt + answer in tokens; longer examples are refused")
    seed: int = option(42, "seed of the LoRA initialisation, dropout and batch order")
    weight_decay: float = option(0.01, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient to this norm (0 = no clipping)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: "
                                                 "less memory, same numbers, about 30% slower")
    engine: str = option("fast", "fast: this project's loop (2.5-6x faster on CPU); trl: TRL's SFTTrainer "
                                 "(FSDP, DeepSpeed, --report-to), same files", choices=ENGINES)
    report_to: str = option("none", "with --engine trl: send TRL's training logs there (the package is an "
                                    "optional extra, see README)", choices=REPORT_TO)
    device: str = "auto"

    # What a resumed run must share with the run it continues (epochs may grow).
    FIXED_ON_RESUME = ("model", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "max_length",
                       "seed", "weight_decay", "max_grad_norm", "engine")

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs {self.epochs} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr {self.lr} must be a positive number, for example 5e-5")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.lora_r < 1:
            problems.append(f"--lora-r {self.lora_r} must be at least 1")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            problems.append(f"--lora-alpha {self.lora_alpha} must be above 0")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        if self.max_length < 8:
            problems.append(f"--max-length {self.max_length} must be at least 8 tokens")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"--weight-decay {self.weight_decay} must be 0 or more, for example 0.01")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            problems.append(f"--max-grad-norm {self.max_grad_norm} must be 0 (off) or more")
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine}: use {' or '.join(ENGINES)}")
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to {self.report_to}: use one of {', '.join(REPORT_TO)}")
        elif self.report_to != "none" and self.engine != "trl":
            problems.append(f"--report-to {self.report_to} reports through TRL: add --engine trl")
        if problems:
            raise UserError("; ".join(problems))


def train(cp: CheckpointDir, settings: TrainSettings, explicit: set[str] = frozenset(), resume: bool = False,
          overwrite: bool = False) -> dict:
    """Train a LoRA adapter on DIR/data/train.json, evaluating on val.json after every epoch.
    `explicit`: the settings given on the command line (a resumed or rerun run keeps the others)."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig

    settings = replace(settings)  # the caller's object stays as it was
    settings.check()
    previous = check_existing_run(cp, resume, overwrite)
    settings, model_note = _settings_for_this_run(cp, settings, explicit, previous)
    if settings.engine == "trl":  # same recipe, files and report, trained by TRL's SFTTrainer
        from .trl_engine import train_with_trl

        return train_with_trl(cp, settings, previous, model_note)
    train_records, val_records = _read_split(cp)
    data_hashes = _checked_data_hashes(cp, previous)
    device = resolve_device(settings.device)
    accelerator = Accelerator(cpu=device == "cpu")
    check_data_parallel(accelerator)
    if accelerator.device.type == "cuda":  # under accelerate launch each process has its own GPU
        device = str(accelerator.device)
    main = accelerator.is_main_process
    report = log if main else (lambda *_: None)
    world, rank = accelerator.num_processes, accelerator.process_index

    state = torch.load(cp.resume_state, map_location="cpu", weights_only=True) if previous else None
    done = state["epoch"] if state else 0
    if done >= settings.epochs:
        raise UserError(f"the run already finished {done} epochs: pass --epochs above {done} to continue it")
    torch.manual_seed(settings.seed)  # the LoRA initialisation and dropout masks follow from the seed
    if state is None:
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        lm = load_model(settings.model, device, lora=lora, training=True)
    else:
        lm = load_model(settings.model, device, adapter=cp.epoch_dir(done), training=True)
    if settings.gradient_checkpointing:
        lm.model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    train_examples = _encode_checked(lm, train_records, cp.train, settings.max_length)
    val_examples = _encode_checked(lm, val_records, cp.val, settings.max_length)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings, lm.device)
    epochs = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        epochs = state["metrics"]
    loss_module = accelerator.prepare(answer_loss_module(lm.model))

    n_params, n_train = sum(p.numel() for p in lm.model.parameters()), sum(p.numel() for p in params)
    report(f"model {settings.model}{model_note}: {n_params / 1e6:.1f}M parameters, LoRA trains "
           f"{n_train / 1e6:.2f}M ({100 * n_train / n_params:.2f}%)")
    processes = f", {world} processes (global batch {settings.batch_size * world})" if world > 1 else ""
    report(f"device {lm.device}, {lm.dtype_name}{processes}")
    report(f"data {len(train_records)} train / {len(val_records)} val from {cp.data_dir}")
    report("settings " + "  ".join(f"{k}={v}" for k, v in asdict(settings).items() if k not in ("model", "device")))
    if done:
        report(f"resuming after epoch {done} of {settings.epochs}")
    run_info = {
        "base_model": settings.model,
        "engine": settings.engine,
        "settings": asdict(settings),
        "device": lm.device,
        "dtype": lm.dtype_name,
        "processes": world,
        "global_batch_size": settings.batch_size * world,
        "system_prompt": training_system_prompt(train_records),
        "data": {**data_hashes, "train_size": len(train_records), "val_size": len(val_records)},
        "versions": library_versions(),
        "finished": False,
    }
    if main:
        if previous is None:
            for path in cp.training_outputs():
                remove(path)
        write_json(cp.run_info, run_info)
    accelerator.wait_for_everyone()

    pad = pad_id(lm.tokenizer)
    answer_tokens = [e.answer_tokens for e in train_examples]
    started = time.time()
    epoch = done
    try:
        for epoch in range(done + 1, settings.epochs + 1):
            # One epoch: every training tweet once, in the seeded order of this epoch.
            batches = epoch_batches([len(e.input_ids) for e in train_examples], settings.batch_size * world,
                                    settings.seed, epoch)
            loss_module.train()
            loss_sum, token_sum, epoch_start = torch.zeros((), device=accelerator.device), 0, time.time()
            bar = progress(batches, f"epoch {epoch}/{settings.epochs}", enabled=main)
            for step, batch in enumerate(bar):
                summed, tokens = train_step(accelerator, loss_module, optimizer, train_examples, batch,
                                            answer_tokens, pad, settings.max_grad_norm)
                loss_sum += summed
                token_sum += tokens
                if step % 10 == 9 and main:  # a host sync every 10 steps, not every step
                    bar.set_postfix(loss=f"{loss_sum.item() / max(token_sum, 1):.4f}", refresh=False)
            bar.close()
            totals = torch.tensor([loss_sum.item(), float(token_sum)], device=accelerator.device)
            if world > 1:
                totals = accelerator.reduce(totals, reduction="sum")
            seconds = time.time() - epoch_start

            # Evaluate on the validation tweets: loss and exact-match accuracy in one teacher-forced pass.
            eval_start = time.time()
            scores = score(lm.model, val_examples, pad, lm.device)
            row = {"epoch": epoch, "train_loss": totals[0].item() / totals[1].item(), "seconds": seconds,
                   "val_loss": scores.mean_loss, "val_accuracy": scores.accuracy,
                   "val_correct": sum(scores.exact), "val_total": len(scores.exact),
                   "eval_seconds": time.time() - eval_start}
            epochs.append(row)
            report(f"epoch {epoch}/{settings.epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                   f"acc {row['val_accuracy']:.2f} ({row['val_correct']}/{row['val_total']})  [{seconds:.0f}s]")

            # Save: this epoch's adapter, then the state to resume from, then the metrics that name them.
            if main:
                with deferred_interrupt():
                    save_adapter(lm, cp.epoch_dir(epoch))
                    with atomic_file(cp.resume_state) as tmp:
                        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                                    "rng_cpu": torch.get_rng_state(), "metrics": epochs,
                                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                    else None}, tmp)
                    write_json(cp.metrics, {"epochs": epochs, "best_epoch": best_epoch(epochs)})
            accelerator.wait_for_everyone()
    except KeyboardInterrupt:
        if main:
            _report_interrupt(cp, epoch, len(epochs))
        raise

    best = best_epoch(epochs)
    if main:
        with deferred_interrupt():
            save_adapter(lm, cp.adapter)
            write_json(cp.run_info, {**run_info, "finished": True, "train_seconds": round(time.time() - started, 1),
                                     "best_epoch": best})
        report(advice(epochs, cp))
        first, last = epochs[0]["epoch"], epochs[-1]["epoch"]
        folders = str(cp.epoch_dir(last)) if first == last else f"{cp.epoch_dir(first)} … epoch-{last}"
        report("wrote " + ", ".join(str(p) for p in (cp.run_info, cp.metrics, folders, cp.adapter, cp.resume_state)))
        report(f"next: uv run 04_plot_loss.py --checkpoint-dir {cp.root}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"epochs": epochs, "best_epoch": best}


def train_step(accelerator, loss_module, optimizer, examples, batch: list[int], answer_tokens: list[int],
               pad: int, max_grad_norm: float):
    """One optimizer step on one global batch (this process trains on its share). Returns this process's
    summed answer-token loss (a tensor: no host sync) and its number of answer tokens."""
    world = accelerator.num_processes
    mine, weight = batch[accelerator.process_index::world], 1.0
    if not mine:  # a short last batch: this process joins the step with a zero-weight example
        mine, weight = batch[:1], 0.0
    tokens = sum(answer_tokens[i] for i in batch)  # over the global batch: known on every process
    summed = loss_module(*collate([examples[i] for i in mine], pad, accelerator.device))
    # DDP averages gradients over processes; scaling by world / global tokens makes the step the
    # mean over all answer tokens of the global batch, as in a single process.
    accelerator.backward(summed * (weight * world / tokens))
    if max_grad_norm:
        accelerator.clip_grad_norm_(loss_module.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return summed.detach() * weight, (sum(answer_tokens[i] for i in mine) if weight else 0)


def make_optimizer(params, settings: TrainSettings, device: str):
    """AdamW (fused on CUDA) with a constant learning rate, as in the original recipe."""
    import torch

    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                             fused=device.startswith("cuda"))


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each step of an epoch, the same on every process and every rerun.

    Shuffled with a generator of its own (seed, epoch), so resuming at any epoch gives the same order.
    For batches above 1, examples are grouped by length within windows of 8 batches: padding stays
    small (on the shipped tweets ~17% → ~6% padding) while batches stay mixed.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if global_batch == 1:
        return [[i] for i in order]
    window = global_batch * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + global_batch] for j in range(0, len(chunk), global_batch)]
    rng.shuffle(batches)
    return batches


def progress(items, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="step", leave=False, disable=not enabled, file=sys.stderr)


def check_data_parallel(accelerator) -> None:
    """03 trains with plain data parallelism (DDP: a whole model copy per process), which suits Gemma 3
    270M/1B on any GPU. Sharded engines need the optimizer and the adapter saving done their way, which
    this loop does not do and we cannot test here: refuse them instead of training wrongly."""
    sharded = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in sharded:
        raise UserError(f"accelerate is configured for {kind}, which 03_train_model.py does not support: it trains "
                        "with plain data parallelism. Run `accelerate config` and choose multi-GPU without "
                        "FSDP/DeepSpeed, or launch with `accelerate launch --multi_gpu --num_processes N`; "
                        "or train with --engine trl, which supports them")


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl+C until the block ends, so an epoch's files are never half written."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save_adapter(lm, folder: Path) -> None:
    with atomic_dir(folder) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)


def advice(epochs: list[dict], cp: CheckpointDir) -> str:
    best, last = best_epoch(epochs), epochs[-1]["epoch"]
    if best < last:
        return (f"val loss lowest at epoch {best}: later epochs overfit. Rerun with --epochs {best}, "
                f"or use {cp.epoch_dir(best).relative_to(cp.root)} (06_test_finetuned_single.py "
                f"--checkpoint best)")
    return f"val loss lowest at the last epoch ({last}): more --epochs may still help"


def library_versions(extra: tuple[str, ...] = ()) -> dict:
    """The versions of what a run used, for run.json (`extra`: what an engine adds, e.g. trl)."""
    names = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "huggingface_hub", *extra)
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    versions["python"] = sys.version.split()[0]
    return versions


def _settings_for_this_run(cp, settings: TrainSettings, explicit: set[str], previous: dict | None):
    """A resumed run keeps its own settings (only --epochs may change); a rerun in a folder whose
    run.json names a model keeps that model unless --model is given. A local model folder is stored
    as an absolute path, so 05/06 find it from any working folder."""
    note = ""
    if Path(settings.model).expanduser().is_dir():
        settings = replace(settings, model=str(Path(settings.model).expanduser().resolve()))
    if previous is not None:
        saved = previous["settings"]
        clashes = [f"--{k.replace('_', '-')} {getattr(settings, k)} (run used {saved[k]})"
                   for k in TrainSettings.FIXED_ON_RESUME
                   if k in explicit and k in saved and getattr(settings, k) != saved[k]]
        if clashes:
            raise UserError("--resume continues the run with its own settings; these differ: " + ", ".join(clashes)
                            + ": drop them, or start a new run with --overwrite")
        kept = {k: saved[k] for k in TrainSettings.FIXED_ON_RESUME if k in saved}
        settings = replace(settings, **kept, epochs=settings.epochs if "epochs" in explicit else saved["epochs"])
        settings.check()
    elif "model" not in explicit and cp.run_info.exists():
        settings = replace(settings, model=read_json(cp.run_info)["base_model"])
        note = f" (from {cp.run_info}; --model picks another)"
    return settings, note


def _read_split(cp: CheckpointDir):
    hint = "run 02_split_data.py first"
    for path in (cp.train, cp.val):
        if not path.exists():
            raise UserError(f"{path} not found: {hint}")
    return records_from_json(cp.train, hint), records_from_json(cp.val, hint)


def _checked_data_hashes(cp: CheckpointDir, previous: dict | None) -> dict:
    data_hashes = {"train_sha256": sha256_file(cp.train), "val_sha256": sha256_file(cp.val)}
    if previous is not None and previous["data"].get("train_sha256") != data_hashes["train_sha256"]:
        raise UserError(f"{cp.train} changed since the run started: --resume would mix two datasets: "
                        "start over with --overwrite")
    return data_hashes


def _encode_checked(lm, records, path: Path, max_length: int):
    examples = encode(lm, records)
    long = [f"{record_name(i + 1)} has {len(e.input_ids)} tokens" for i, e in enumerate(examples)
            if len(e.input_ids) > max_length]
    if long:
        raise UserError(f"{path}: {'; '.join(long[:5])}{' ...' if len(long) > 5 else ''}, over --max-length "
                        f"{max_length}: raise --max-length or shorten those tweets")
    return examples


def _report_interrupt(cp: CheckpointDir, epoch: int, finished: int) -> None:
    if finished:
        what = (f"epochs 1-{finished} are saved in {cp.epochs_dir}. Continue with: uv run "
                f"03_train_model.py --resume --checkpoint-dir {cp.root}")
    else:  # nothing to resume: leave the folder as a fresh run can use it
        remove(cp.run_info)
        what = "no epoch finished, nothing saved; run the same command again to start over"
    print(f"\ninterrupted during epoch {epoch}: {what}", file=sys.stderr)
