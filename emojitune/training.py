"""03: LoRA training with loss on the answer only, per-epoch evaluation, adapters and resume state.

A plain PyTorch loop (with accelerate for multi-process runs) rather than TRL's SFTTrainer: on CPU
TRL projects the 262k-token output layer over every prompt position and computes full-vocabulary
entropy for its logs: much slower for the same numbers (benchmarks/bench_train.py measures it).
"""

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import DEFAULT_MODEL
from .errors import UserError
from .files import read_json, remove, replace_dir, sha256_file, write_json
from .runs import best_epoch, common_system_prompt
from .scoring import IGNORE, pad_id


@dataclass
class TrainSettings:
    """Hyperparameters; defaults are the original project's recipe."""
    model: str = DEFAULT_MODEL
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 1  # per process; the global batch is batch_size x processes
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    max_length: int = 512
    seed: int = 42
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False  # same numbers, less memory, about 30% slower
    device: str = "auto"

    # Settings a resumed run must share with the run it continues (epochs may grow).
    FIXED_ON_RESUME = ("model", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "max_length",
                       "seed", "weight_decay", "max_grad_norm")

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs {self.epochs} must be at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            problems.append(f"--lr {self.lr} must be a positive number, for example 5e-5")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.lora_r < 1:
            problems.append(f"--lora-r {self.lora_r} must be at least 1")
        if not self.lora_alpha > 0:
            problems.append(f"--lora-alpha {self.lora_alpha} must be above 0")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        if self.max_length < 8:
            problems.append(f"--max-length {self.max_length} must be at least 8 tokens")
        if problems:
            raise UserError("; ".join(problems))


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


def answer_loss_module(peft_model):
    """The model as a module whose forward returns the summed answer-token loss of a batch.
    Training goes through it so that DDP sees the forward pass (its gradient sync hangs on forward)."""
    import torch

    from .scoring import causal_lm_of, token_losses

    class AnswerLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, targets):
            losses, _, _ = token_losses(causal_lm_of(self.model), input_ids, attention_mask, targets)
            return losses.sum()

    return AnswerLoss(peft_model)


def optimizer_and_schedule(params, settings: TrainSettings, device: str):
    """AdamW (fused on CUDA) with a constant learning rate, as in the original recipe."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  fused=device.startswith("cuda"))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class TrainStep:
    """One optimizer step on one global batch, shared by 03 and the benchmark."""

    def __init__(self, acc, module, optimizer, scheduler, examples, pad: int, max_grad_norm: float):
        self.acc, self.module, self.optimizer, self.scheduler = acc, module, optimizer, scheduler
        self.examples, self.pad, self.max_grad_norm = examples, pad, max_grad_norm
        self.answer_len = [sum(t != IGNORE for t in e.targets) for e in examples]

    def __call__(self, batch: list[int]):
        """Train on the global batch; return this process's summed loss (a tensor, no host sync) and
        its answer-token count."""
        from .scoring import collate

        acc = self.acc
        world = acc.num_processes
        mine, weight = batch[acc.process_index::world], 1.0
        if not mine:  # a short last batch: this process joins the step with a zero-weight example
            mine, weight = batch[:1], 0.0
        tokens = sum(self.answer_len[i] for i in batch)  # over the global batch: known on every process
        ids, mask, targets = collate([self.examples[i] for i in mine], self.pad, acc.device)
        summed = self.module(ids, mask, targets)
        # DDP averages gradients over processes; scaling by world / global tokens makes the step the
        # mean over all answer tokens of the global batch, as in a single process.
        acc.backward(summed * (weight * world / tokens))
        if self.max_grad_norm:
            acc.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed.detach() * weight, (sum(self.answer_len[i] for i in mine) if weight else 0)


def check_data_parallel(acc) -> None:
    """03 trains with plain data parallelism (DDP: a whole model copy per process), which suits Gemma 3
    270M/1B on any GPU. Sharded engines need the optimizer and the adapter saving done their way, which
    this loop does not do and we cannot test here: refuse them instead of training wrongly."""
    sharded = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}
    kind = getattr(acc.distributed_type, "value", str(acc.distributed_type))
    if kind in sharded:
        raise UserError(f"accelerate is configured for {kind}, which 03_train_model.py does not support: it trains "
                        "with plain data parallelism. Run `accelerate config` and choose multi-GPU without "
                        "FSDP/DeepSpeed, or launch with `accelerate launch --multi_gpu --num_processes N`")


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


def _records(cp):
    from .data import records_from_json

    hint = "run 02_split_data.py first"
    for path in (cp.train, cp.val):
        if not path.exists():
            raise UserError(f"{path} not found: {hint}")
    return records_from_json(cp.train, hint), records_from_json(cp.val, hint)


def _check_existing_run(cp, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to overwrite a finished or unfinished run; return the run info to resume, if any."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if resume:
        if not cp.resume_state.exists() or not cp.run_info.exists():
            raise UserError(f"{cp.root} holds no run to resume (no finished epoch): start one without --resume")
        return read_json(cp.run_info)
    if overwrite:
        return None
    if cp.adapter.exists():
        raise UserError(f"{cp.adapter} already holds a trained adapter: pass --overwrite to replace the run, "
                        "--resume to continue it with more --epochs, or use another --checkpoint-dir")
    if cp.metrics.exists() or cp.epochs_dir.exists():
        raise UserError(f"{cp.root} holds an unfinished run: pass --resume to continue it, --overwrite to start "
                        "over, or use another --checkpoint-dir")
    return None


def _settings_for_resume(settings: TrainSettings, explicit: set[str], previous: dict) -> TrainSettings:
    saved = previous["settings"]
    clashes = [f"--{k.replace('_', '-')} {getattr(settings, k)} (run used {saved[k]})"
               for k in TrainSettings.FIXED_ON_RESUME if k in explicit and getattr(settings, k) != saved[k]]
    if clashes:
        raise UserError("--resume continues the run with its own settings; these differ: " + ", ".join(clashes)
                        + ": drop them, or start a new run with --overwrite")
    merged = {k: saved[k] for k in TrainSettings.FIXED_ON_RESUME}
    merged["epochs"] = settings.epochs if "epochs" in explicit else saved["epochs"]
    merged["device"] = settings.device
    merged["gradient_checkpointing"] = settings.gradient_checkpointing
    return TrainSettings(**merged)


def _encode_all(lm, records, path: Path, max_length: int):
    from .data import where
    from .scoring import encode

    examples = encode(lm, records)
    long = [f"{where(i + 1)} has {len(e.input_ids)} tokens" for i, e in enumerate(examples)
            if len(e.input_ids) > max_length]
    if long:
        raise UserError(f"{path}: {'; '.join(long[:5])}{' ...' if len(long) > 5 else ''}, over --max-length "
                        f"{max_length}: raise --max-length or shorten those tweets")
    return examples


def _versions() -> dict:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def advice(epochs: list[dict], cp) -> str:
    best, last = best_epoch(epochs), epochs[-1]["epoch"]
    if best < last:
        return (f"val loss lowest at epoch {best}: later epochs overfit. Rerun with --epochs {best}, "
                f"or use {cp.epoch_dir(best).relative_to(cp.root)} (06_test_finetuned_single.py "
                f"--checkpoint best)")
    return f"val loss lowest at the last epoch ({last}): more --epochs may still help"


def train(cp, settings: TrainSettings, explicit: set[str] = frozenset(), resume: bool = False,
          overwrite: bool = False, log=print) -> dict:
    """Train a LoRA adapter on DIR/data/train.json; evaluate on val.json after every epoch."""
    from .modeling import check_model_source, resolve_device

    settings.check()
    if Path(settings.model).expanduser().is_dir():  # so 05/06 find it from any working folder
        settings.model = str(Path(settings.model).expanduser().resolve())
    previous = _check_existing_run(cp, resume, overwrite)
    if previous is not None:
        settings = _settings_for_resume(settings, explicit, previous)
        settings.check()
    train_records, val_records = _records(cp)
    data_hashes = {"train_sha256": sha256_file(cp.train), "val_sha256": sha256_file(cp.val)}
    if previous is not None and previous["data"].get("train_sha256") != data_hashes["train_sha256"]:
        raise UserError(f"{cp.train} changed since the run started: --resume would mix two datasets: "
                        "start over with --overwrite")
    check_model_source(settings.model)
    resolve_device(settings.device)
    return _Trainer(cp, settings, previous, train_records, val_records, data_hashes, log).run()


class _Trainer:
    def __init__(self, cp, settings, previous, train_records, val_records, data_hashes, log):
        self.cp, self.s, self.previous, self.log = cp, settings, previous, log
        self.train_records, self.val_records, self.data_hashes = train_records, val_records, data_hashes

    def say(self, *args):
        if self.acc.is_main_process:
            self.log(*args)

    def run(self) -> dict:
        import torch
        from accelerate import Accelerator
        from peft import LoraConfig

        from .modeling import load_model, resolve_device

        s, cp = self.s, self.cp
        device = resolve_device(s.device)
        self.acc = acc = Accelerator(cpu=device == "cpu")
        check_data_parallel(acc)
        if acc.device.type == "cuda":  # under accelerate launch each process has its own GPU
            device = str(acc.device)
        state = None
        if self.previous is not None:
            state = torch.load(cp.resume_state, map_location="cpu", weights_only=True)
            if state["epoch"] >= s.epochs:
                raise UserError(f"the run already finished {state['epoch']} epochs: pass --epochs above "
                                f"{state['epoch']} to continue it")
        torch.manual_seed(s.seed)  # the LoRA initialisation and dropout masks follow from the seed
        start_epoch = 0
        if state is None:
            lora = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            lm = load_model(s.model, device, lora=lora, training=True)
        else:
            start_epoch = state["epoch"]
            lm = load_model(s.model, device, adapter=cp.epoch_dir(start_epoch), training=True)
        self.lm = lm
        if s.gradient_checkpointing:
            lm.model.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        train_ex = _encode_all(lm, self.train_records, cp.train, s.max_length)
        val_ex = _encode_all(lm, self.val_records, cp.val, s.max_length)
        params = [p for p in lm.model.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule(params, s, lm.device)
        epochs = []
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if torch.cuda.is_available() and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            epochs = state["metrics"]
        module = acc.prepare(answer_loss_module(lm.model))
        n_params = sum(p.numel() for p in lm.model.parameters())
        n_train = sum(p.numel() for p in params)
        self._announce(lm, n_params, n_train, start_epoch)
        if acc.is_main_process:
            if self.previous is None:
                for path in cp.training_outputs():
                    remove(path)
            self._write_run_info(lm, finished=False)
        acc.wait_for_everyone()

        t0 = time.time()
        epoch = start_epoch
        try:
            for epoch in range(start_epoch + 1, s.epochs + 1):
                row = self._train_epoch(module, optimizer, scheduler, train_ex, epoch)
                row.update(self._evaluate(val_ex))
                epochs.append(row)
                self.say(f"epoch {epoch}/{s.epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                         f"acc {row['val_accuracy']:.2f} ({row['val_correct']}/{row['val_total']})  "
                         f"[{row['seconds']:.0f}s]")
                if acc.is_main_process:
                    with deferred_interrupt():
                        self._save_epoch(epoch, optimizer, scheduler, epochs)
                acc.wait_for_everyone()
        except KeyboardInterrupt:
            if acc.is_main_process:
                done = len(epochs)
                if done:
                    what = (f"epochs 1-{done} are saved in {cp.epochs_dir}. Continue with: uv run "
                            f"03_train_model.py --resume --checkpoint-dir {cp.root}")
                else:  # nothing to resume: leave the folder as a fresh run can use it
                    remove(cp.run_info)
                    what = "no epoch finished, nothing saved; run the same command again to start over"
                print(f"\ninterrupted during epoch {epoch}: {what}", file=sys.stderr)
            raise
        if acc.is_main_process:
            with deferred_interrupt():
                self._finish(epochs, time.time() - t0)
        acc.wait_for_everyone()
        acc.end_training()
        return {"epochs": epochs, "best_epoch": best_epoch(epochs)}

    def _announce(self, lm, n_params, n_train, start_epoch):
        s, acc = self.s, self.acc
        procs = f", {acc.num_processes} processes (global batch {s.batch_size * acc.num_processes})" \
            if acc.num_processes > 1 else ""
        dtype = str(lm.dtype).replace("torch.", "")
        self.say(f"model {s.model}: {n_params / 1e6:.1f}M parameters, LoRA trains {n_train / 1e6:.2f}M "
                 f"({100 * n_train / n_params:.2f}%)")
        self.say(f"device {lm.device}, {dtype}{procs}")
        self.say(f"data {len(self.train_records)} train / {len(self.val_records)} val from {self.cp.data_dir}")
        self.say("settings " + "  ".join(f"{k}={v}" for k, v in asdict(s).items() if k not in ("model", "device")))
        if start_epoch:
            self.say(f"resuming after epoch {start_epoch} of {s.epochs}")

    def _train_epoch(self, module, optimizer, scheduler, examples, epoch) -> dict:
        import torch
        from tqdm.auto import tqdm

        acc, s = self.acc, self.s
        batches = epoch_batches([len(e.input_ids) for e in examples], s.batch_size * acc.num_processes,
                                s.seed, epoch)
        step = TrainStep(acc, module, optimizer, scheduler, examples, pad_id(self.lm.tokenizer), s.max_grad_norm)
        module.train()
        loss_sum = torch.zeros((), device=acc.device)
        token_sum = 0
        start = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", unit="step", leave=False,
                   disable=not acc.is_main_process, file=sys.stderr)
        for i, batch in enumerate(bar):
            summed, tokens = step(batch)
            loss_sum += summed
            token_sum += tokens
            if i % 10 == 9 and acc.is_main_process:  # a host sync every 10 steps, not every step
                bar.set_postfix(loss=f"{loss_sum.item() / max(token_sum, 1):.4f}", refresh=False)
        bar.close()
        totals = torch.tensor([loss_sum.item(), float(token_sum)], device=acc.device)
        totals = acc.reduce(totals, reduction="sum") if acc.num_processes > 1 else totals
        return {"epoch": epoch, "train_loss": totals[0].item() / totals[1].item(),
                "seconds": time.time() - start}

    def _evaluate(self, val_ex) -> dict:
        from .scoring import score

        start = time.time()
        scores = score(self.lm.model, val_ex, pad_id(self.lm.tokenizer), self.lm.device)
        return {"val_loss": scores.mean_loss, "val_accuracy": scores.accuracy,
                "val_correct": sum(scores.exact), "val_total": len(scores.exact),
                "eval_seconds": time.time() - start}

    def _save_adapter(self, final: Path):
        tmp = final.with_name(f".{final.name}.tmp")
        remove(tmp)
        self.lm.model.save_pretrained(tmp, safe_serialization=True)
        self.lm.tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)

    def _save_epoch(self, epoch, optimizer, scheduler, epochs):
        import torch

        cp = self.cp
        self._save_adapter(cp.epoch_dir(epoch))
        state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "metrics": epochs,
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        tmp = cp.resume_state.with_name(f".{cp.resume_state.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(cp.resume_state)
        write_json(cp.metrics, {"epochs": epochs, "best_epoch": best_epoch(epochs)})

    def _finish(self, epochs, seconds):
        cp = self.cp
        self._save_adapter(cp.adapter)
        self._write_run_info(self.lm, finished=True, seconds=seconds, best=best_epoch(epochs))
        self.log(advice(epochs, cp))
        first, last = epochs[0]["epoch"], epochs[-1]["epoch"]
        folders = str(cp.epoch_dir(last)) if first == last else f"{cp.epoch_dir(first)} … epoch-{last}"
        written = [cp.run_info, cp.metrics, folders, cp.adapter, cp.resume_state]
        self.log("wrote " + ", ".join(str(p) for p in written))
        self.log(f"next: uv run 04_plot_loss.py --checkpoint-dir {cp.root}")

    def _write_run_info(self, lm, finished: bool, seconds: float | None = None, best: int | None = None):
        info = {
            "base_model": self.s.model,
            "settings": asdict(self.s),
            "device": lm.device,
            "dtype": str(lm.dtype).replace("torch.", ""),
            "processes": self.acc.num_processes,
            "global_batch_size": self.s.batch_size * self.acc.num_processes,
            "system_prompt": common_system_prompt(self.train_records),
            "data": {**self.data_hashes, "train_size": len(self.train_records), "val_size": len(self.val_records)},
            "versions": _versions(),
            "finished": finished,
        }
        if seconds is not None:
            info["train_seconds"] = round(seconds, 1)
        if best is not None:
            info["best_epoch"] = best
        write_json(self.cp.run_info, info)
