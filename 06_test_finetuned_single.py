"""Step 6: ask the tuned model (or the base model) for the emoji of one tweet at a time.

Every input is sent as a fresh conversation (system prompt + that tweet only, no history), unless
--history N keeps the last N tweets and answers in the conversation.

    uv run 06_test_finetuned_single.py                      # interactive, tuned adapter
    uv run 06_test_finetuned_single.py --base               # the base model, same system prompt
    echo 今日は最高の一日だった | uv run 06_test_finetuned_single.py      # one answer line per input line
    uv run 06_test_finetuned_single.py --labels-only --top 3 < tweets.txt
    uv run 06_test_finetuned_single.py --history 8           # a continuing chat: the last 8 turns are kept
    uv run 06_test_finetuned_single.py --compare < tweets.txt      # base<TAB>tuned per line
"""

import argparse

from emojitune.cli import (add_checkpoint, add_checkpoint_dir, add_device, add_history, add_model, add_options,
                           add_system, checkpoint_dir, options_from_args)
from emojitune.console import run_main
from emojitune.generation import Sampling
from emojitune.tester import run_tester


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    add_model(p)
    add_device(p)
    add_checkpoint(p)
    p.add_argument("--base", action="store_true", help="test the base model without any adapter")
    p.add_argument("--compare", action="store_true",
                   help="answer every tweet with the base model and the tuned adapter (one model load), side by "
                        "side; piped: one line per input, the two answers separated by a tab")
    add_system(p)
    p.add_argument("--labels-only", action="store_true",
                   help="answer only with a label seen in training, the one the model finds most likely")
    p.add_argument("--top", type=int, default=0, metavar="K",
                   help="print the K most likely trained labels with probabilities (implies --labels-only)")
    add_history(p, "keep the last N tweets and answers in the conversation, as in a continuing chat")
    add_options(p, Sampling, group=True)
    args = p.parse_args()
    sampling, _ = options_from_args(Sampling, args)
    run_tester(checkpoint_dir(args), checkpoint=args.checkpoint, base=args.base, model=args.model,
               system=args.system, device=args.device, sampling=sampling, labels_only=args.labels_only,
               top=args.top, history=args.history, compare=args.compare)


if __name__ == "__main__":
    run_main(main)
