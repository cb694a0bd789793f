"""Step 1: read and validate the tweets, write checkpoints/data/prepared.json.

    uv run 01_prepare_data.py
    uv run 01_prepare_data.py --input my_tweets.csv --labels 😀,😭,🤣,😨
"""

import argparse

from emojitune import DEFAULT_SYSTEM_PROMPT
from emojitune.cli import add_checkpoint_dir, checkpoint_dir
from emojitune.console import run_main
from emojitune.data import prepare

DEFAULT_INPUT = "training_data_emotion_jp.json"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help="JSON array or JSONL of {'messages': [...]} records (one tweet, or a conversation of "
                        "user/assistant turns), or CSV/TSV with a header that has a text column and an emoji "
                        f"column (default: {DEFAULT_INPUT})")
    p.add_argument("--system", default=None,
                   help="replace the system prompt of every record (CSV/TSV default: "
                        f"{DEFAULT_SYSTEM_PROMPT}); --system '' removes it")
    p.add_argument("--labels", default=None, help="keep only these labels, comma-separated, e.g. 😀,😭,🤣")
    p.add_argument("--overwrite", action="store_true",
                   help="change the data even though a trained adapter in --checkpoint-dir was made from it")
    add_checkpoint_dir(p)
    args = p.parse_args()
    prepare(args.input, checkpoint_dir(args), system=args.system, labels=args.labels, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
