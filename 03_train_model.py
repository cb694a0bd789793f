"""Step 3: train a LoRA adapter on checkpoints/data/train.json, evaluating on val.json every epoch.

    uv run 03_train_model.py --epochs 2
    uv run 03_train_model.py --model /path/to/gemma-3-270m-it --batch-size 16 --lr 2e-4
    uv run accelerate launch --num_processes 2 03_train_model.py      # several processes / GPUs

Writes checkpoints/metrics.json, checkpoints/epochs/epoch-N/, checkpoints/adapter/, checkpoints/run.json.
"""

import argparse

from emojitune.cli import add_checkpoint_dir, add_device, add_model, checkpoint_dir
from emojitune.errors import run_main
from emojitune.training import TrainSettings

D = TrainSettings()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p)
    add_device(p)
    add_checkpoint_dir(p)
    # Defaults are applied after parsing so that --resume can tell which flags were given.
    p.add_argument("--epochs", type=int, help=f"passes over the training tweets (default: {D.epochs})")
    p.add_argument("--lr", type=float, help=f"learning rate, constant (default: {D.lr})")
    p.add_argument("--batch-size", type=int,
                   help=f"tweets per step and process (default: {D.batch_size}); try 16 with --lr 2e-4 for speed (see README: Speed)")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {D.lora_r})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default: {D.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, help=f"LoRA dropout (default: {D.lora_dropout})")
    p.add_argument("--max-length", type=int, help=f"longest tweet + prompt in tokens (default: {D.max_length})")
    p.add_argument("--seed", type=int, help=f"seed of LoRA init, dropout and batch order (default: {D.seed})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {D.weight_decay})")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, about 30%% slower")
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir after its last "
                                                         "finished epoch (raise --epochs to train longer)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --checkpoint-dir")
    args = p.parse_args()

    from emojitune.launch import ensure_requested_processes
    from emojitune.training import train

    ensure_requested_processes(__file__)
    tunable = ["epochs", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "max_length", "seed",
               "weight_decay"]
    explicit = {k for k in tunable if getattr(args, k) is not None}
    if args.model != D.model:
        explicit.add("model")
    settings = TrainSettings(model=args.model, device=args.device,
                             gradient_checkpointing=args.gradient_checkpointing,
                             **{k: getattr(args, k) for k in explicit if k != "model"})
    train(checkpoint_dir(args), settings, explicit=explicit, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
