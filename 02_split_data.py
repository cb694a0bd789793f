"""Step 2: split checkpoints/data/prepared.json into train.json and val.json, stratified by label.

    uv run 02_split_data.py
    uv run 02_split_data.py --test-size 0.2 --seed 42
"""

import argparse

from emojitune.cli import add_checkpoint_dir, checkpoint_dir
from emojitune.errors import run_main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test-size", type=float, default=0.2,
                   help="share of each label that goes to validation, at least one per label (default: 0.2)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the split (default: 42)")
    p.add_argument("--overwrite", action="store_true",
                   help="change the split even though a trained adapter in --checkpoint-dir was made from it")
    add_checkpoint_dir(p)
    args = p.parse_args()

    from emojitune.split import split

    split(checkpoint_dir(args), test_size=args.test_size, seed=args.seed, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
