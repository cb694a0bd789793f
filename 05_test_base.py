"""Step 5: test the base model (before any training) on the validation tweets; --compare adds the tuned one.

    uv run 05_test_base.py
    uv run 05_test_base.py --compare            # base and tuned side by side
    uv run 05_test_base.py --input my_tweets.json --limit 20
    uv run 05_test_base.py --compare --history 8    # one running conversation: does the model repeat itself?
    uv run 05_test_base.py --compare --labels-only --groups my_groups.json

Writes checkpoints/eval_base.json (checkpoints/eval_compare.json with --compare) and checkpoints/confusion.png.
"""

import argparse
from pathlib import Path

from emojitune.cli import (add_checkpoint, add_checkpoint_dir, add_device, add_history, add_model, add_options,
                           add_system, checkpoint_dir, options_from_args)
from emojitune.console import log, run_main
from emojitune.evaluation import evaluate
from emojitune.generation import Sampling


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    add_model(p)
    add_device(p)
    p.add_argument("--input", type=Path, default=None,
                   help="messages file to test on (default: DIR/data/val.json)")
    p.add_argument("--limit", type=int, default=None, help="test only the first N tweets")
    p.add_argument("--compare", action="store_true", help="also run the tuned adapter and show both")
    p.add_argument("--labels-only", action="store_true",
                   help="answer each tweet with the trained label the model finds most likely (no generation): "
                        "the report is then of that restricted classifier")
    p.add_argument("--groups", type=Path, default=None, metavar="FILE",
                   help="emotion groups for group accuracy, as in emotion_groups.json: {\"group\": [\"emoji\", ...]} "
                        "(default: the shipped emotion_groups.json, when it has every label)")
    add_checkpoint(p, "the adapter --compare runs (giving it implies --compare)", default_none=True)
    add_system(p)
    add_history(p, "ask the tweets in file order as one running conversation that keeps the last N tweets and "
                   "the model's own answers, and compare how often an answer repeats the previous one")
    add_options(p, Sampling, group=True)
    args = p.parse_args()
    sampling, _ = options_from_args(Sampling, args)
    if args.checkpoint is not None and not args.compare:
        log(f"--checkpoint {args.checkpoint}: comparing the base model with that adapter (implies --compare)")
    evaluate(checkpoint_dir(args), input_path=args.input, limit=args.limit,
             compare=args.compare or args.checkpoint is not None, model=args.model,
             checkpoint=args.checkpoint or "last", system=args.system, device=args.device, sampling=sampling,
             history=args.history, labels_only=args.labels_only, groups=args.groups)


if __name__ == "__main__":
    run_main(main)
