"""03 with TRL's SFTTrainer (`--engine trl`): the recipe, files and report of the fast loop in training.py,
for what that loop does not do: FSDP and DeepSpeed under accelerate launch, and TRL's reporting
(`--report-to`). On a CPU it is 2.5x slower at batch 1, 6x at batch 16 (README: Speed).

The data is TRL's conversational prompt-completion format with completion-only loss. The validation loss
and accuracy after each epoch come from scoring.score, as in the fast loop, so the two engines' numbers
mean the same thing; the Trainer's checkpoint in DIR/trl is what --resume continues from.
"""

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

# A heavy import at the top, unlike the other modules: training.train imports this module only when
# --engine trl trains, and the callback class needs it as its base.
from transformers import TrainerCallback

from .chat import conversation, pad_id
from .checkpoints import CheckpointDir, atomic_dir, best_epoch, read_json, remove, write_json
from .console import UserError, log, warn
from .modeling import load_model, quiet_libraries, resolve_device, resolve_dtype
from .scoring import score
from .training import (REPORT_PACKAGES, TrainSettings, checked_data_hashes, deferred_interrupt, encode_checked,
                       finish_run, library_versions, progress, read_split, report_interrupt, report_start, start_run)


def train_with_trl(cp: CheckpointDir, settings: TrainSettings, previous: dict | None, model_note: str) -> dict:
    """training.train for --engine trl, after its preflight; `previous` is the run.json of the run to resume
    (None: a new run)."""
    train_records, val_records = read_split(cp)
    multi_turn = [r for r in train_records + val_records if r.history]
    if multi_turn:  # its prompt-completion data holds one turn per example
        raise UserError(f"{cp.data_dir} holds {len(multi_turn)} multi-turn conversation(s): --engine trl trains "
                        "on single tweets only: use --engine fast")
    data_hashes = checked_data_hashes(cp, previous)
    checkpoint = None
    if previous is not None:
        checkpoint = latest_trainer_checkpoint(cp)
        if checkpoint is None:
            raise UserError(f"{cp.root} holds no run to resume (no finished epoch): start one without --resume")
    done = trainer_epoch(checkpoint) if checkpoint else 0
    if done >= settings.epochs:
        raise UserError(f"the run already finished {done} epochs: pass --epochs above {done} to continue it")

    # The config comes before the model: under DeepSpeed ZeRO-3 it decides how the model is loaded.
    config = sft_config(cp, settings)
    # This process's device: its own GPU under accelerate launch ("cpu:0" on CPU means cpu).
    device = str(config.device) if config.device.type == "cuda" else config.device.type
    lm = load_model(settings.model, device, training=True)
    encode_checked(lm, train_records, cp.train, settings.max_length)  # the refusal; TRL tokenizes its own data
    val_examples = encode_checked(lm, val_records, cp.val, settings.max_length)
    epochs = [row for row in read_json(cp.metrics)["epochs"] if row["epoch"] <= done] if done else []
    reporter = EpochReport(cp, settings, val_examples, pad_id(lm.tokenizer), epochs)
    trainer = make_trainer(lm, settings, config, conversations(train_records), reporter)
    main, world = trainer.accelerator.is_main_process, trainer.accelerator.num_processes
    report = log if main else (lambda *_: None)
    sharding = sharded_engine(trainer.accelerator)
    asked = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
    if main and asked and not sharding:
        warn("accelerate is configured for FSDP or DeepSpeed, which it runs on GPUs only: these processes train "
             "with plain data parallelism (every process holds the whole model)")

    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 (DeepSpeed ZeRO-3 loads parameters empty)
    n_params = sum(size(p) for p in trainer.model.parameters())
    n_train = sum(size(p) for p in trainer.model.parameters() if p.requires_grad)
    report_start(report, cp, settings, model_note, lm, n_params, n_train, world, train_records, val_records, done,
                 sharding, ", engine trl (TRL's SFTTrainer)")
    versions = library_versions(("trl", "datasets", *REPORT_PACKAGES.get(settings.report_to, "").split()))
    run_info = start_run(cp, settings, previous, lm, world, train_records, val_records, data_hashes, versions, main)
    trainer.accelerator.wait_for_everyone()

    started = time.time()
    try:
        with warnings.catch_warnings():  # transformers' notes on names TRL still uses, once per step
            warnings.simplefilter("ignore", FutureWarning)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        if main:
            report_interrupt(cp, reporter.epoch, len(epochs))
            if not epochs:  # nothing to resume from: no Trainer state either
                remove(cp.trainer_dir)
        raise
    finally:
        reporter.close()

    save_adapter(trainer, lm.tokenizer, cp.adapter)
    if main:
        finish_run(cp, run_info, started, epochs, 0, cp.trainer_dir)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return {"epochs": epochs, "best_epoch": best_epoch(epochs)}


def sharded_engine(accelerator) -> str:
    """", FSDP" or ", DEEPSPEED" for the report when accelerate shards the model; "" for plain DDP."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    return f", {kind}" if kind in ("FSDP", "DEEPSPEED") else ""


def sft_config(cp: CheckpointDir, settings: TrainSettings):
    """TRL's config for the recipe of TrainSettings, flag by flag."""
    import torch
    from trl import SFTConfig

    device = resolve_device(settings.device)
    # TRL defaults to bf16 mixed precision even on CPUs, where it is many times slower: set it from the
    # dtype every script uses on this device (float32 on CPU, bf16 on CUDA GPUs that support it).
    bf16 = resolve_dtype(device) == torch.bfloat16
    with quiet_libraries():  # transformers 5 renames gradient_checkpointing, which TRL still sets
        return SFTConfig(
            output_dir=str(cp.trainer_dir),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr,
            lr_scheduler_type="constant",
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            seed=settings.seed,
            max_length=settings.max_length,
            completion_only_loss=True,
            gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=bf16,
            fp16=False,
            use_cpu=device == "cpu",
            dataloader_pin_memory=device != "cpu",
            eval_strategy="no",  # EpochReport evaluates with the fast engine's scorer
            save_strategy="epoch",
            save_total_limit=1,  # the last epoch's state is all --resume needs
            report_to=settings.report_to,
            ddp_find_unused_parameters=False,  # LoRA uses every trainable weight in every step
        )


def conversations(records):
    """TRL's conversational prompt-completion dataset: the prompt is the fresh chat 05/06 send (system
    prompt if any, then the tweet), the completion the assistant's emoji."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": conversation(r.system, r.user),
                               "completion": [{"role": "assistant", "content": r.label}]} for r in records])


def make_trainer(lm, settings: TrainSettings, config, train_dataset, reporter: "EpochReport"):
    from datasets.utils.logging import disable_progress_bar
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    class AnswerLossTrainer(SFTTrainer):
        """SFTTrainer that also sums each step's answer-token loss, for the epoch's train loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                reporter.add_step(self, loss[0] if return_outputs else loss, inputs["labels"], num_items_in_batch)
            return loss

    disable_progress_bar()  # the dataset's tokenizing bars; EpochReport shows one bar per epoch
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    with quiet_libraries():  # transformers' notes on the gradient_checkpointing names TRL still reads
        trainer = AnswerLossTrainer(model=lm.model, args=config, train_dataset=train_dataset,
                                    processing_class=lm.tokenizer, peft_config=lora, callbacks=[reporter])
    # The report is 03's own (one line per epoch); the Trainer's log dicts still reach --report-to.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    reporter.trainer, reporter.tokenizer = trainer, lm.tokenizer
    return trainer


class EpochReport(TrainerCallback):
    """After each epoch: the fast engine's report line, scored by scoring.score, and its files.

    Files are written in the fast engine's order: the epoch's adapter (on_epoch_end), the state to resume
    from (the Trainer's checkpoint, saved next), then metrics.json that names them (on_save). Ctrl+C is
    held from the first to the last, so an epoch's files are all there or none.
    """

    def __init__(self, cp: CheckpointDir, settings: TrainSettings, val_examples, pad: int, epochs: list[dict]):
        self.cp, self.settings, self.val_examples, self.pad, self.epochs = cp, settings, val_examples, pad, epochs
        self.trainer = self.tokenizer = None
        self.epoch, self.bar, self.held = len(epochs) + 1, None, contextlib.ExitStack()
        self.loss_sum = self.token_sum = None
        self.epoch_start = time.time()

    def add_step(self, trainer, loss, labels, num_items_in_batch) -> None:
        """Add one step's summed answer-token loss (this process's share) and its answer-token count.

        TRL's loss is the step's summed token loss divided by the step's answer tokens over all processes
        (num_items_in_batch) and multiplied by the number of processes (DDP then averages the gradients),
        or, without num_items_in_batch, divided by this process's own answer tokens."""
        tokens = (labels[..., 1:] != -100).sum()  # a causal LM scores position t against label t + 1
        if num_items_in_batch is None:
            summed = loss.detach() * tokens
        elif trainer.args.average_tokens_across_devices:
            summed = loss.detach() * num_items_in_batch / trainer.accelerator.num_processes
        else:
            summed = loss.detach() * num_items_in_batch
        self.loss_sum = summed if self.loss_sum is None else self.loss_sum + summed
        self.token_sum = tokens if self.token_sum is None else self.token_sum + tokens

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = int(round(state.epoch or 0)) + 1
        self.loss_sum = self.token_sum = None
        steps = state.max_steps // max(1, int(args.num_train_epochs))
        main = self.trainer.accelerator.is_main_process
        self.bar = progress(range(steps), f"epoch {self.epoch}/{self.settings.epochs}", enabled=main)
        self.epoch_start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, args, state, control, **kwargs):
        import torch

        seconds = time.time() - self.epoch_start
        self.close_bar()
        trainer, main = self.trainer, self.trainer.accelerator.is_main_process
        device = trainer.accelerator.device
        totals = torch.stack([torch.as_tensor(x if x is not None else 0.0, device=device, dtype=torch.float32)
                              for x in (self.loss_sum, self.token_sum)])
        totals = trainer.accelerator.reduce(totals, reduction="sum")

        eval_start = time.time()
        scores = validation_scores(trainer, self.val_examples, self.pad)
        row = {"epoch": self.epoch, "train_loss": totals[0].item() / max(1.0, totals[1].item()), "seconds": seconds,
               "val_loss": scores.mean_loss, "val_accuracy": scores.accuracy,
               "val_correct": sum(scores.exact), "val_total": len(scores.exact),
               "eval_seconds": time.time() - eval_start}
        self.epochs.append(row)
        # To --report-to too (TensorBoard shows them as eval/loss and eval/accuracy), beside TRL's step logs.
        trainer.log({"eval_loss": row["val_loss"], "eval_accuracy": row["val_accuracy"]})
        if main:
            log(f"epoch {self.epoch}/{self.settings.epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                f"acc {row['val_accuracy']:.2f} ({row['val_correct']}/{row['val_total']})  [{seconds:.0f}s]")
        self.held.enter_context(deferred_interrupt())  # released in on_save, after the Trainer's checkpoint
        save_adapter(trainer, self.tokenizer, self.cp.epoch_dir(self.epoch))

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.accelerator.is_main_process:
            write_json(self.cp.metrics, {"epochs": self.epochs, "best_epoch": best_epoch(self.epochs)})
        self.trainer.accelerator.wait_for_everyone()
        self.held.close()  # a Ctrl+C held since on_epoch_end is raised here

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        """After training, even when it failed between on_epoch_end and on_save: the bar, and Ctrl+C's hold."""
        self.close_bar()
        self.held.close()


def validation_scores(trainer, examples, pad: int):
    """scoring.score on the model being trained, as the fast engine scores it after each epoch."""
    with whole_weights(trainer.accelerator, trainer.model):
        return score(trainer.accelerator.unwrap_model(trainer.model), examples, pad, trainer.args.device)


@contextlib.contextmanager
def whole_weights(accelerator, model):
    """Every weight whole on every process for the block. FSDP and DeepSpeed ZeRO-3 keep only shards
    between forward passes and gather them in the model's own forward; the scorer calls the decoder and
    the output layer directly, so it needs them gathered first. Plain DDP has them whole already."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind == "FSDP" and accelerator.is_fsdp2:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
    elif kind == "FSDP":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    elif kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


def save_adapter(trainer, tokenizer, folder: Path) -> None:
    """The adapter as the fast engine saves it (adapter_config.json, adapter_model.safetensors, tokenizer),
    without the Trainer's training_args.bin. Every process must call it: under FSDP and DeepSpeed ZeRO-3
    gathering the weights is collective; the main process writes."""
    accelerator = trainer.accelerator
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        with atomic_dir(folder) as tmp:
            accelerator.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state_dict,
                                                                   safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def latest_trainer_checkpoint(cp: CheckpointDir) -> Path | None:
    """The Trainer's last complete checkpoint in DIR/trl (trainer_state.json is the last file it writes)."""
    found = [p for p in cp.trainer_dir.glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def trainer_epoch(checkpoint: Path) -> int:
    """The number of finished epochs a Trainer checkpoint holds (saved at epoch ends only)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(math.floor(state["epoch"] + 1e-6))
