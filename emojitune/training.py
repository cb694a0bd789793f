"""03: LoRA training with loss on the answer only, a train-loss curve, evaluations during and after every
epoch, early stopping, adapters and resume.

A plain PyTorch loop (with accelerate for several processes) rather than TRL's SFTTrainer: on CPU TRL
projects the 262k-token output layer over every prompt position and computes full-vocabulary entropy
for its logs, which is much slower for the same numbers (benchmarks/bench_train.py measures both).
`--engine trl` trains with TRL instead (trl_engine.py), for FSDP, DeepSpeed and TRL's reporting.
"""

import contextlib
import importlib.metadata
import importlib.util
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import DEFAULT_MODEL
from .chat import collate, conversation_example, encode, pad_id
from .checkpoints import (CheckpointDir, atomic_dir, atomic_file, base_model, best_epoch, check_existing_run, remove,
                          sha256_file, write_json)
from .cli import option
from .console import UserError, log
from .data import record_name, records_from_json, training_system_prompt
from .launch import keep_freed_memory
from .loss import answer_loss_module, start_kernel_builds
from .modeling import check_model_source, enable_gradient_checkpointing, load_model, resolve_device
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
    multi_turn: int = option(1, "each epoch, chain the single-turn training tweets into conversations of 2..K "
                                "turns (every tweet still once per epoch), so the model learns to answer with "
                                "earlier turns in its context; 1 = every tweet alone")
    log_every: int = option(10, "record the mean train loss every N optimizer steps (and at the end of each "
                                "epoch) in metrics.json, for 04's curve")
    evals_per_epoch: int = option(4, "evaluate on val.json K times per epoch, evenly spaced, the last at the "
                                     "end of the epoch (that one picks the best epoch)")
    early_stopping: int = option(0, "stop after N end-of-epoch evaluations in a row without a lower val loss "
                                    "than the best so far (0 = off)")
    engine: str = option("fast", "fast: this project's loop (2-9x faster on CPU); trl: TRL's SFTTrainer "
                                 "(FSDP, DeepSpeed, --report-to), same files", choices=ENGINES)
    report_to: str = option("none", "with --engine trl: send TRL's training logs there (the package is an "
                                    "optional extra, see README)", choices=REPORT_TO)
    device: str = "auto"

    # What a resumed run must share with the run it continues (epochs and early_stopping may change).
    FIXED_ON_RESUME = ("model", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "max_length",
                       "seed", "weight_decay", "max_grad_norm", "multi_turn", "log_every", "evals_per_epoch", "engine")

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
        if self.multi_turn < 1:
            problems.append(f"--multi-turn {self.multi_turn} must be 1 (single turns) or more, for example 4")
        if self.log_every < 1:
            problems.append(f"--log-every {self.log_every} must be at least 1 step")
        if self.evals_per_epoch < 1:
            problems.append(f"--evals-per-epoch {self.evals_per_epoch} must be at least 1 (the end of the epoch)")
        if self.early_stopping < 0:
            problems.append(f"--early-stopping {self.early_stopping} must be 0 (off) or a number of epochs")
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine}: use {' or '.join(ENGINES)}")
        if self.report_to not in REPORT_TO:
            problems.append(f"--report-to {self.report_to}: use one of {', '.join(REPORT_TO)}")
        elif self.report_to != "none" and self.engine != "trl":
            problems.append(f"--report-to {self.report_to} reports through TRL: add --engine trl")
        if self.engine == "trl" and (self.multi_turn > 1 or self.early_stopping):
            problems.append("--multi-turn and --early-stopping are features of the fast engine: drop them, or "
                            "use --engine fast")
        if problems:
            raise UserError("; ".join(problems))


def train(cp: CheckpointDir, settings: TrainSettings, explicit: set[str] = frozenset(), resume: bool = False,
          overwrite: bool = False) -> dict:
    """Train a LoRA adapter on DIR/data/train.json, evaluating on val.json after every epoch.
    `explicit`: the settings given on the command line (a resumed or rerun run keeps the others)."""
    # The checks first: a mistake is reported before the libraries' imports (seconds) start.
    settings, previous, model_note = preflight(cp, settings, explicit, resume, overwrite)
    import torch

    if settings.engine != "trl":
        device = resolve_device(settings.device)
        if device == "cpu":
            # The compiler runs on another core while this one imports transformers and PEFT (~2.3 s): 0.55 s
            # less in the first step, where the three builds ran one after the other.
            start_kernel_builds(settings.batch_size, dropout=settings.lora_dropout > 0)
    from accelerate import Accelerator
    from peft import LoraConfig

    keep_freed_memory()  # every step reuses the last step's memory (no page faults)
    if settings.engine == "trl":  # same recipe, files and report, trained by TRL's SFTTrainer
        from .trl_engine import train_with_trl  # here: trl_engine builds on this module

        return train_with_trl(cp, settings, previous, model_note)
    train_records, val_records = read_split(cp)
    data_hashes = checked_data_hashes(cp, previous)
    accelerator = Accelerator(cpu=device == "cpu")
    check_data_parallel(accelerator)
    if accelerator.device.type == "cuda":  # under accelerate launch each process has its own GPU
        device = str(accelerator.device)
    main = accelerator.is_main_process
    report = log if main else (lambda *_: None)
    world = accelerator.num_processes

    state = torch.load(cp.resume_state, map_location="cpu", weights_only=True) if previous else None
    done = state["epoch"] if state else 0
    if state is not None and should_stop_early(state["metrics"], settings.early_stopping):
        best = best_epoch(state["metrics"])
        raise UserError(f"the run stopped early after epoch {done}: val loss was not below epoch {best}'s for "
                        f"{done - best} epochs (--early-stopping {settings.early_stopping}); to train it further "
                        f"pass --early-stopping 0 (off) or above {done - best}")
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
        enable_gradient_checkpointing(lm.model)
    train_examples = encode_checked(lm, train_records, cp.train, settings.max_length)
    val_examples = encode_checked(lm, val_records, cp.val, settings.max_length)
    # The single-turn val.json stays the measure comparable across runs; with --multi-turn the validation
    # tweets are also chained once (the same conversations after every epoch) and scored on every turn.
    chained_val = chained_examples(lm, val_records, settings, "val") if settings.multi_turn > 1 else None
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings, lm.device)
    epochs, steps, evals = [], [], []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        # A run saved before the curve existed has no steps/evals: its curve starts where it resumes.
        epochs, steps, evals = state["metrics"], state.get("steps", []), state.get("evals", [])
    loss_module = accelerator.prepare(answer_loss_module(lm.model, settings.batch_size))

    n_params, n_train = sum(p.numel() for p in lm.model.parameters()), sum(p.numel() for p in params)
    report_start(report, cp, settings, model_note, lm, n_params, n_train, world, train_records, val_records, done)
    run_info = start_run(cp, settings, previous, lm, world, train_records, val_records, data_hashes,
                         library_versions(), main)
    accelerator.wait_for_everyone()

    pad = pad_id(lm.tokenizer)
    val_labels = [r.label for r in val_records]
    started = time.time()
    epoch = done
    stopped_early = False

    def reduced(loss_sum, token_sum):
        """The mean answer-token loss over all processes (one host sync)."""
        totals = torch.tensor([loss_sum.item(), float(token_sum)], device=accelerator.device)
        if world > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        return totals[0].item() / totals[1].item()

    try:
        for epoch in range(done + 1, settings.epochs + 1):
            # One epoch: every training tweet once, in the seeded order of this epoch (with --multi-turn,
            # in this epoch's conversations, so the number of steps can differ from epoch to epoch).
            examples = (chained_examples(lm, train_records, settings, epoch) if settings.multi_turn > 1
                        else train_examples)
            answer_tokens = [e.answer_tokens for e in examples]
            batches = epoch_batches([len(e.input_ids) for e in examples], settings.batch_size * world,
                                    settings.seed, epoch)
            steps_before = steps[-1]["step"] if steps else 0  # the curve's last point ends the previous epoch
            eval_after = evaluation_steps(len(batches), settings.evals_per_epoch)
            loss_module.train()
            loss_sum, token_sum, epoch_start = torch.zeros((), device=accelerator.device), 0, time.time()
            window_loss, window_tokens, window_steps = torch.zeros((), device=accelerator.device), 0, 0
            eval_seconds, postfix = 0.0, {}
            bar = progress(batches, f"epoch {epoch}/{settings.epochs}", enabled=main)
            for step, batch in enumerate(bar, start=1):
                summed, tokens = train_step(accelerator, loss_module, optimizer, examples, batch,
                                            answer_tokens, pad, settings.max_grad_norm)
                loss_sum += summed
                token_sum += tokens
                window_loss += summed
                window_tokens += tokens
                window_steps += 1
                global_step = steps_before + step
                # A point of the curve every --log-every steps and at the end of the epoch, so every
                # point lies within one epoch (a resumed run starts at an epoch boundary with nothing pending).
                if window_steps == settings.log_every or step == len(batches):
                    steps.append({"step": global_step, "epoch": epoch - 1 + step / len(batches),
                                  "train_loss": reduced(window_loss, window_tokens)})
                    window_loss, window_tokens, window_steps = torch.zeros((), device=accelerator.device), 0, 0
                    postfix["loss"] = f"{steps[-1]['train_loss']:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                if step in eval_after:
                    # Loss and exact-match accuracy on the validation tweets in one teacher-forced pass
                    # (eval mode: no dropout, so the training's random stream is not touched).
                    eval_start = time.time()
                    scores = score(lm.model, val_examples, pad, lm.device)
                    eval_seconds += time.time() - eval_start
                    evals.append({"step": global_step, "epoch": epoch - 1 + step / len(batches),
                                  "val_loss": scores.mean_loss, "val_accuracy": scores.accuracy,
                                  "per_label": per_label_correct(val_labels, scores.exact)})
                    postfix["val"] = f"{scores.mean_loss:.4f}"
                    bar.set_postfix(postfix, refresh=False)
            bar.close()
            train_loss = reduced(loss_sum, token_sum)
            seconds = time.time() - epoch_start - eval_seconds

            # The end-of-epoch evaluation (the last of the epoch's) is the one that picks the best epoch.
            row = {"epoch": epoch, "train_loss": train_loss, "seconds": seconds,
                   "val_loss": scores.mean_loss, "val_accuracy": scores.accuracy,
                   "val_correct": scores.correct, "val_total": scores.total}
            chained = ""
            if chained_val is not None:
                eval_start = time.time()
                every_turn = score(lm.model, chained_val, pad, lm.device)
                eval_seconds += time.time() - eval_start
                row |= {"chained_val_loss": every_turn.mean_loss, "chained_val_accuracy": every_turn.accuracy,
                        "chained_val_correct": every_turn.correct, "chained_val_total": every_turn.total}
                chained = (f"  chained val {every_turn.mean_loss:.4f}  acc {every_turn.accuracy:.2f} "
                           f"({every_turn.correct}/{every_turn.total})")
            row["eval_seconds"] = eval_seconds
            epochs.append(row)
            report(f"epoch {epoch}/{settings.epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                   f"acc {row['val_accuracy']:.2f} ({row['val_correct']}/{row['val_total']}){chained}  "
                   f"[{seconds:.0f}s]")
            stopped_early = should_stop_early(epochs, settings.early_stopping)

            # Save: this epoch's adapter, then the state to resume from, then the metrics that name them.
            if main:
                with deferred_interrupt():
                    save_adapter(lm, cp.epoch_dir(epoch))
                    with atomic_file(cp.resume_state) as tmp:
                        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                                    "rng_cpu": torch.get_rng_state(), "metrics": epochs,
                                    "steps": steps, "evals": evals,
                                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                    else None}, tmp)
                    write_json(cp.metrics, metrics_json(epochs, steps, evals, stopped_early))
            accelerator.wait_for_everyone()
            if stopped_early:
                break
    except KeyboardInterrupt:
        if main:
            report_interrupt(cp, epoch, len(epochs))
        raise

    if main:
        with deferred_interrupt():  # the final adapter and the finished run.json together
            save_adapter(lm, cp.adapter)
            finish_run(cp, run_info, started, epochs, settings.early_stopping if stopped_early else 0,
                       cp.resume_state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics_json(epochs, steps, evals, stopped_early)


def report_start(report, cp: CheckpointDir, settings: TrainSettings, model_note: str, lm, n_params: int, n_train: int,
                 world: int, train_records, val_records, done: int, sharding: str = "", engine: str = "") -> None:
    """The lines both engines print before training: model, device, data, settings, where it resumes."""
    report(f"model {settings.model}{model_note}: {n_params / 1e6:.1f}M parameters, LoRA trains "
           f"{n_train / 1e6:.2f}M ({100 * n_train / n_params:.2f}%)")
    processes = f", {world} processes (global batch {settings.batch_size * world}{sharding})" if world > 1 else ""
    report(f"device {lm.device}, {lm.dtype_name}{processes}{engine}")
    report(f"data {len(train_records)} train / {len(val_records)} val from {cp.data_dir}")
    report("settings " + "  ".join(f"{k}={v}" for k, v in asdict(settings).items() if k not in ("model", "device")))
    if done:
        report(f"resuming after epoch {done} of {settings.epochs}")


def start_run(cp: CheckpointDir, settings: TrainSettings, previous: dict | None, lm, world: int, train_records,
              val_records, data_hashes: dict, versions: dict, main: bool) -> dict:
    """run.json of a run that starts or resumes now (unfinished), written by the main process. A new run
    first removes the old one; a resumed run removes what was made from its unfinished state (the plot,
    05's results, the export), as both would no longer match it."""
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
        "versions": versions,
        "finished": False,
    }
    if main:
        for path in cp.training_outputs() if previous is None else cp.derived_outputs():
            remove(path)
        write_json(cp.run_info, run_info)
    return run_info


def finish_run(cp: CheckpointDir, run_info: dict, started: float, epochs: list[dict], stopped_by: int,
               resume_from: Path) -> None:
    """The main process's end of a run, for both engines: run.json marked finished (Ctrl+C held), the
    best-epoch advice, what was written (`resume_from`: the engine's state for --resume) and the next step."""
    with deferred_interrupt():
        write_json(cp.run_info, {**run_info, "finished": True, "train_seconds": round(time.time() - started, 1),
                                 "best_epoch": best_epoch(epochs)})
    log(advice(epochs, cp, stopped_by))
    first, last = epochs[0]["epoch"], epochs[-1]["epoch"]
    folders = str(cp.epoch_dir(last)) if first == last else f"{cp.epoch_dir(first)} … epoch-{last}"
    log("wrote " + ", ".join(str(p) for p in (cp.run_info, cp.metrics, folders, cp.adapter, resume_from)))
    log(f"next: uv run 04_plot_loss.py --checkpoint-dir {cp.root}")


def metrics_json(epochs: list[dict], steps: list[dict], evals: list[dict], stopped_early: bool) -> dict:
    metrics = {"epochs": epochs, "best_epoch": best_epoch(epochs), "steps": steps, "evals": evals,
               "stopped_early": stopped_early}
    if stopped_early:
        metrics["stopped_after_epoch"] = epochs[-1]["epoch"]
    return metrics


def evaluation_steps(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """The steps (from 1) of an epoch after which to evaluate: evenly spaced, the last at the epoch's end;
    fewer when the epoch has fewer steps than evaluations."""
    return {math.ceil(j * steps_per_epoch / evals_per_epoch) for j in range(1, evals_per_epoch + 1)}


def per_label_correct(labels: list[str], exact: list[bool]) -> dict:
    counts = {}
    for label, right in zip(labels, exact):
        entry = counts.setdefault(label, {"correct": 0, "total": 0})
        entry["correct"] += right
        entry["total"] += 1
    return counts


def should_stop_early(epochs: list[dict], patience: int) -> bool:
    """--early-stopping N: the last N end-of-epoch evaluations had no val loss below the best before them."""
    return patience > 0 and epochs[-1]["epoch"] - best_epoch(epochs) >= patience


def preflight(cp: CheckpointDir, settings: TrainSettings, explicit: set[str], resume: bool, overwrite: bool):
    """The checks that need no model: settings, the run folder, the data, the model's path, the device.
    Run before anything heavy, and before several processes start, so a mistake is reported once.
    Returns the settings of this run, the run.json of the run to resume (or None), and a note on the model."""
    settings = replace(settings)  # the caller's object stays as it was
    settings.check()
    check_report_to(settings.report_to)
    previous = check_existing_run(cp, resume, overwrite)
    settings, model_note = _settings_for_this_run(cp, settings, explicit, previous)
    read_split(cp)
    checked_data_hashes(cp, previous)
    check_model_source(settings.model)
    resolve_device(settings.device)
    return settings, previous, model_note


# --report-to NAME needs this package, installed by the optional extra of the same name (pyproject.toml).
REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(report_to: str) -> None:
    package = REPORT_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {report_to} needs the {package} package, which is not installed: run "
                        f"`uv sync --extra {report_to}` (or `uv run --extra {report_to} 03_train_model.py ...`)")


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
        # The optimizer holds the trainable parameters in the model's order (train() builds it from that
        # list): listing them takes microseconds, where loss_module.parameters() walks the model's ~1,600
        # modules (4 ms a step). Frozen parameters have no gradient, so the norm is the same.
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return summed.detach() * weight, (sum(answer_tokens[i] for i in mine) if weight else 0)


def make_optimizer(params, settings: TrainSettings, device: str):
    """AdamW with a constant learning rate, as in the original recipe; fused (one kernel for all tensors)
    on CUDA and CPU: on CPU 16 -> 10.5 ms per step for the 252 LoRA tensors of Gemma-3-270M, with clipping."""
    import torch

    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                             fused=device.startswith(("cuda", "cpu")))


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


def chain_turns(records, max_turns: int, seed: int, draw) -> list[list[int]]:
    """The record indices of each conversation: the single-turn records shuffled and cut into conversations
    of 2..max_turns turns (lengths drawn uniformly; the last one of a system prompt may be shorter), each
    within one system prompt. Every record is in exactly one conversation; a record that is already a
    conversation stays as it is. Drawn from (seed, draw) alone, so each epoch has its own and a resumed
    run the same ones."""
    rng = random.Random(f"{seed}/{draw}/conversations")
    chains = [[i] for i, r in enumerate(records) if r.history]
    by_system: dict[str | None, list[int]] = {}
    for i, r in enumerate(records):
        if not r.history:
            by_system.setdefault(r.system, []).append(i)
    for indices in by_system.values():
        rng.shuffle(indices)
        while indices:
            n = rng.randint(2, max_turns)
            chains.append(indices[:n])
            indices = indices[n:]
    return chains


def chained_examples(lm, records, settings: TrainSettings, draw) -> list:
    """Training examples of the conversations chain_turns draws. A conversation that would pass
    --max-length is cut before the turn that passes it, and the rest starts a new conversation."""
    examples = []
    for chain in chain_turns(records, settings.multi_turn, settings.seed, draw):
        while chain:
            take = len(chain)
            while True:
                turns = [turn for i in chain[:take] for turn in records[i].turns]
                example = conversation_example(lm.tokenizer, records[chain[0]].system, turns, lm.end_of_turn_id)
                if len(example.input_ids) <= settings.max_length or take == 1:
                    break
                take -= 1
            examples.append(example)
            chain = chain[take:]
    return examples


def progress(items, description: str, enabled: bool):
    """A progress bar in a terminal; in a log file (stderr redirected) plain lines, no carriage returns."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return _PlainProgress(items, description)
    return tqdm(items, desc=description, unit="step", leave=False, disable=not enabled, file=sys.stderr)


class _PlainProgress:
    """The part of tqdm's interface the loops use, as one line at every tenth of the steps."""

    def __init__(self, items, description: str):
        self.items, self.description, self.postfix = list(items), description, ""
        self.done, self.every = 0, max(1, len(self.items) // 10)

    def __iter__(self):
        for item in self.items:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == len(self.items):
            print(f"{self.description}: step {self.done}/{len(self.items)}{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        self.postfix = "".join(f"  {k} {v}" for k, v in {**(ordered_dict or {}), **values}.items())

    def close(self) -> None:
        pass


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


def advice(epochs: list[dict], cp: CheckpointDir, stopped_by: int = 0) -> str:
    """The closing advice; stopped_by is the --early-stopping patience that ended the run (0: it did not)."""
    best, last = best_epoch(epochs), epochs[-1]["epoch"]
    stopped = (f"stopped early after epoch {last}: val loss not below epoch {best}'s for {last - best} "
               f"epoch(s) (--early-stopping {stopped_by}); {cp.adapter} is epoch {last}'s. ") if stopped_by else ""
    if best < last:
        return (f"{stopped}val loss lowest at epoch {best}: later epochs overfit. Rerun with --epochs {best}, "
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
        # epochs and early_stopping may change on resume; not given, they stay the run's.
        may_change = {k: getattr(settings, k) if k in explicit else saved.get(k, getattr(settings, k))
                      for k in ("epochs", "early_stopping")}
        settings = replace(settings, **kept, **may_change)
        settings.check()
        base_model(cp, None)  # the model folder run.json names must still be there
    elif "model" not in explicit and cp.run_info.exists():
        settings = replace(settings, model=base_model(cp, None)[0])
        note = f" (from {cp.run_info}; --model picks another)"
    return settings, note


def read_split(cp: CheckpointDir):
    hint = "run 02_split_data.py first"
    for path in (cp.train, cp.val):
        if not path.exists():
            raise UserError(f"{path} not found: {hint}")
    return records_from_json(cp.train, hint), records_from_json(cp.val, hint)


def checked_data_hashes(cp: CheckpointDir, previous: dict | None) -> dict:
    data_hashes = {"train_sha256": sha256_file(cp.train), "val_sha256": sha256_file(cp.val)}
    if previous is not None and previous["data"].get("train_sha256") != data_hashes["train_sha256"]:
        raise UserError(f"{cp.train} changed since the run started: --resume would mix two datasets: "
                        "start over with --overwrite")
    return data_hashes


def encode_checked(lm, records, path: Path, max_length: int):
    examples = encode(lm, records)
    long = [f"{record_name(i + 1)} has {len(e.input_ids)} tokens" for i, e in enumerate(examples)
            if len(e.input_ids) > max_length]
    if long:
        raise UserError(f"{path}: {'; '.join(long[:5])}{' ...' if len(long) > 5 else ''}, over --max-length "
                        f"{max_length}: raise --max-length or shorten those tweets")
    return examples


def report_interrupt(cp: CheckpointDir, epoch: int, finished: int) -> None:
    if finished:
        which = "epoch 1 is" if finished == 1 else f"epochs 1-{finished} are"
        what = (f"{which} saved in {cp.epochs_dir}. Continue with: uv run "
                f"03_train_model.py --resume --checkpoint-dir {cp.root}")
    else:  # nothing to resume: leave the folder as a fresh run can use it
        remove(cp.run_info)
        what = "no epoch finished, nothing saved; run the same command again to start over"
    print(f"\ninterrupted during epoch {epoch}: {what}", file=sys.stderr)
