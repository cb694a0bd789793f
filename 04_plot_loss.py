"""Step 4: plot train and validation loss per epoch from checkpoints/metrics.json to checkpoints/loss.png.

    uv run 04_plot_loss.py
    uv run 04_plot_loss.py --show     # also open a window
"""

import argparse

from emojitune.cli import add_checkpoint_dir, checkpoint_dir
from emojitune.console import run_main
from emojitune.plotting import plot_loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    p.add_argument("--show", action="store_true", help="open a window with the plot (default: only write the PNG)")
    args = p.parse_args()
    plot_loss(checkpoint_dir(args), show=args.show)


if __name__ == "__main__":
    run_main(main)
