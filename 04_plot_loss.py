"""Step 4: plot the train-loss curve and validation loss from checkpoints/metrics.json to checkpoints/loss.png.

    uv run 04_plot_loss.py
    uv run 04_plot_loss.py --show     # also open a window
    uv run 04_plot_loss.py --checkpoint-dir run-a --compare run-b run-c     # run-a/compare.png
"""

import argparse
from pathlib import Path

from emojitune.cli import add_checkpoint_dir, checkpoint_dir
from emojitune.console import run_main
from emojitune.plotting import plot_compare, plot_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    p.add_argument("--show", action="store_true", help="open a window with the plot (default: only write the PNG)")
    p.add_argument("--compare", nargs="+", type=Path, metavar="DIR2",
                   help="overlay the validation loss and accuracy of these checkpoint folders on DIR's, print "
                        "their best epochs and write DIR/compare.png (instead of loss.png)")
    args = p.parse_args()
    if args.compare:
        plot_compare(checkpoint_dir(args), args.compare, show=args.show)
    else:
        plot_loss(checkpoint_dir(args), show=args.show)


if __name__ == "__main__":
    run_main(main)
