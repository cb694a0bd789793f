"""The original project's recipe, as its user ran it, for speed comparisons: TRL's SFTTrainer, batch 1,
gradient checkpointing, loss over the whole chat, LoRA r16/alpha32/dropout 0.05 on all linear layers,
lr 5e-5 constant, weight decay 0.01, float32 (bf16 off: TRL defaults to bf16, ~10x slower on CPU;
--bf16 turns TRL's default back on, for GPUs), eager attention, an evaluation on the validation tweets after
every epoch.

    uv run benchmarks/original_recipe.py --model PATH --checkpoint-dir checkpoints --epochs 1

Reads DIR/data/train.json and val.json (written by 01/02); writes to DIR/original-recipe/.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emojitune.checkpoints import CheckpointDir  # noqa: E402


def messages_dataset(path: Path):
    from datasets import Dataset

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    return Dataset.from_list([{"messages": r["messages"]} for r in records])


def build_trainer(model_path: str, train_path: Path, val_path: Path | None, out: Path, epochs: int = 1,
                  max_steps: int = -1, bf16: bool = False):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    config = SFTConfig(
        output_dir=str(out), num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=1,
        per_device_eval_batch_size=1, gradient_checkpointing=True, learning_rate=5e-5,
        lr_scheduler_type="constant", weight_decay=0.01, bf16=bf16, fp16=False, seed=42,
        eval_strategy="epoch" if val_path else "no", save_strategy="no", report_to="none",
        logging_steps=10, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=messages_dataset(train_path),
                      eval_dataset=messages_dataset(val_path) if val_path else None,
                      processing_class=tokenizer, peft_config=lora)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="TRL's default mixed precision (float32 weights, bf16 compute)")
    args = p.parse_args()
    cp = CheckpointDir(args.checkpoint_dir)
    out = cp.root / "original-recipe"  # the benchmark's own output, outside the layout 04-06 read
    start = time.time()
    trainer = build_trainer(args.model, cp.train, cp.val, out, args.epochs, bf16=args.bf16)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    print(f"original recipe: {time.time() - start:.1f}s after imports")


if __name__ == "__main__":
    main()
