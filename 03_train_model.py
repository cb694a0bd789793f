"""Step 3: train a LoRA adapter on checkpoints/data/train.json, evaluating on val.json every epoch.

    uv run 03_train_model.py --epochs 2
    uv run 03_train_model.py --model /path/to/gemma-3-270m-it --batch-size 16 --lr 2e-4
    uv run 03_train_model.py --processes 2                 # several processes (CPU cores or GPUs)
    uv run accelerate launch --num_processes 2 03_train_model.py      # the same through accelerate
    uv run 03_train_model.py --engine trl                              # TRL's SFTTrainer (FSDP, DeepSpeed)

Writes checkpoints/metrics.json, checkpoints/epochs/epoch-N/, checkpoints/adapter/, checkpoints/run.json.
"""

import argparse
import sys

from emojitune.cli import add_checkpoint_dir, add_device, add_model, add_options, checkpoint_dir, options_from_args
from emojitune.console import UserError, run_main
from emojitune.launch import is_worker, run_processes, started_alone_by_accelerate
from emojitune.training import TrainSettings, preflight, train


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model(p, for_training=True)
    add_device(p)
    add_checkpoint_dir(p)
    # Flags default to None so that --resume (and a rerun in the same folder) can tell which were given.
    add_options(p, TrainSettings, defaults_after_parse=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir after its last "
                                                         "finished epoch (raise --epochs to train longer)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --checkpoint-dir")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="train with N processes on this machine, each on its share of every batch: CPU cores "
                        "or one GPU each; the global batch is --batch-size x N (default: 1)")
    args = p.parse_args()
    extra = {"device": args.device} | ({"model": args.model} if args.model else {})
    settings, explicit = options_from_args(TrainSettings, args, **extra)
    explicit |= {"model"} if args.model else set()
    cp = checkpoint_dir(args)
    if args.processes < 1:
        raise UserError(f"--processes {args.processes} must be at least 1")
    processes = args.processes if args.processes > 1 else started_alone_by_accelerate()
    if processes and not is_worker():
        preflight(cp, settings, explicit, args.resume, args.overwrite)  # a mistake is reported once, not N times
        sys.exit(run_processes(processes))
    train(cp, settings, explicit=explicit, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
