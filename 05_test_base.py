"""Step 5: test the base model (before any training) on the validation tweets; --compare adds the tuned one.

    uv run 05_test_base.py
    uv run 05_test_base.py --compare            # base and tuned side by side
    uv run 05_test_base.py --input my_tweets.json --limit 20

Writes checkpoints/eval_base.json (checkpoints/eval_compare.json with --compare).
"""

import argparse
from pathlib import Path

from emojitune.cli import add_checkpoint_dir, add_device, add_generation, add_model, checkpoint_dir
from emojitune.errors import run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    add_model(p, default=None, help_extra=" (default: the base model in checkpoints/run.json, "
                                          "else google/gemma-3-270m-it)")
    add_device(p)
    p.add_argument("--input", type=Path, default=None,
                   help="messages file to test on (default: checkpoints/data/val.json)")
    p.add_argument("--limit", type=int, default=None, help="test only the first N tweets")
    p.add_argument("--compare", action="store_true", help="also run the tuned adapter and show both")
    p.add_argument("--checkpoint", default="last", help="adapter for --compare: last, best or epoch-N")
    p.add_argument("--system", default=None,
                   help="system prompt for every tweet (default: the training data's; '' sends none)")
    add_generation(p)
    args = p.parse_args()

    from emojitune.evaluation import evaluate
    from emojitune.generation import Sampling

    evaluate(checkpoint_dir(args), input_path=args.input, limit=args.limit, compare=args.compare,
             model=args.model, checkpoint=args.checkpoint, system=args.system, device=args.device,
             sampling=Sampling.from_args(args))


if __name__ == "__main__":
    run_main(main)
