"""Step 2: split checkpoints/data/prepared.json into train.json and val.json, stratified by label.

    uv run 02_split_data.py
    uv run 02_split_data.py --test-size 0.2 --seed 42
"""

import argparse

from emojitune.cli import add_checkpoint_dir, add_options, checkpoint_dir, options_from_args
from emojitune.console import run_main
from emojitune.split import SplitSettings, split


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, SplitSettings)
    p.add_argument("--overwrite", action="store_true",
                   help="change the split even though a trained adapter in --checkpoint-dir was made from it")
    add_checkpoint_dir(p)
    args = p.parse_args()
    settings, _ = options_from_args(SplitSettings, args)
    split(checkpoint_dir(args), settings, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
