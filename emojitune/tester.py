"""06: the tester. Every input is a fresh conversation, [system?, user], unless --history N keeps the last
N tweets and answers in it (to see how the model behaves in a continuing chat)."""

import sys
from collections import deque

from .checkpoints import CheckpointDir
from .console import UserError, log
from .data import read_lines
from .generation import Sampling, generate
from .scoring import label_probabilities
from .session import as_base_model, load, resolve_setup, trained_labels


def enable_line_editing() -> None:
    """Arrow keys, editing and ↑ history in input(), where Python has readline (Linux, macOS): without
    it the terminal sends the tweet `abc` ← ← `X` as `abc\x1b[D\x1b[DX`. Elsewhere input() stays plain."""
    try:
        import readline  # noqa: F401  (importing it is what gives input() line editing)
    except ImportError:
        pass


def format_top(ranked: list[tuple[str, float]], k: int) -> str:
    return "  ".join(f"{label} {p:.2f}" for label, p in ranked[:k])


def run_tester(cp: CheckpointDir, *, checkpoint: str = "last", base: bool = False, model: str | None = None,
               system: str | None = None, device: str = "auto", sampling: Sampling = Sampling(),
               labels_only: bool = False, top: int = 0, history: int = 0, compare: bool = False, stdin=None,
               stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    sampling.check()
    if top < 0:
        raise UserError(f"--top {top} must be 0 (off) or a number of labels to show")
    if history < 0:
        raise UserError(f"--history {history} must be 0 (each tweet alone) or more")
    if compare and base:
        raise UserError("--compare already shows the base model's answer beside the tuned one: drop --base")
    labels_only = labels_only or top > 0
    setup = resolve_setup(cp, model=model, checkpoint=None if base else checkpoint, system=system)
    labels = trained_labels(cp) if labels_only else None
    lm = load(setup, device)
    # Notes go to stderr so that piped stdout holds only answers.
    what = f"base model {setup.model_id} (no adapter)" if base else f"{setup.model_id} + adapter {setup.adapter}"
    if compare:
        what = f"base model {setup.model_id} and, from the same load, + adapter {setup.adapter}"
    log(f"testing {what} on {lm.device} ({setup.model_from})", err=True)
    log(f"system prompt ({setup.system_from}): {setup.system or '(none)'}", err=True)
    if labels:
        log(f"answers restricted to the {len(labels)} trained labels: {' '.join(labels)}", err=True)
    log(f"history: the conversation keeps your last {history} tweets and the answers to them" if history
        else "history: none, each tweet is a new conversation (--history N keeps the last N)", err=True)
    past = deque(maxlen=history)  # (tweet, answer) pairs; maxlen 0 keeps none

    def answer(text: str, stream: bool) -> str:
        earlier = list(past)
        if labels:
            ranked = label_probabilities(lm, setup.system, text, labels, history=earlier)
            past.append((text, ranked[0][0]))
            return format_top(ranked, top) if top else ranked[0][0]
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate(lm, setup.system, text, sampling, streamer=streamer, history=earlier)
        past.append((text, reply))
        return reply

    def both(text: str) -> tuple[str, str]:
        """--compare: the base model's answer (adapter switched off) and the tuned one."""
        with as_base_model(lm):
            base_answer = answer(text, stream=False)
        return base_answer, answer(text, stream=False)

    if not stdin.isatty():
        for line in read_lines(stdin.buffer):
            text = line.strip()
            if text:
                # With --compare, one line per input still: the two answers separated by a tab.
                print("\t".join(both(text)) if compare else answer(text, stream=False), file=stdout, flush=True)
        return
    enable_line_editing()
    alone = "; each one is a new conversation" if not history else ""
    log(f"type a tweet and press Enter (↑ brings back the last ones){alone}. Ctrl+D or Ctrl+C to quit.", err=True)
    while True:
        try:
            text = input("> ").strip()
            if not text:
                continue
            if compare:
                base_answer, tuned_answer = both(text)
                print(f"base {base_answer or '(empty)'}   tuned {tuned_answer or '(empty)'}", file=stdout, flush=True)
            elif labels:
                print(answer(text, stream=False), file=stdout, flush=True)
            else:
                answer(text, stream=True)  # the streamer prints the answer as it is generated
        except (EOFError, KeyboardInterrupt):
            print(file=stdout)
            return
