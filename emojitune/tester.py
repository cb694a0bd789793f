"""06: the history-free tester. Every input is a fresh conversation: [system?, user], nothing else."""

import sys

from .data import read_lines
from .errors import UserError
from .runs import base_model, resolve_checkpoint, system_prompt, trained_labels


def note(*args) -> None:
    """Notes go to stderr so that piped stdout holds only answers."""
    print(*args, file=sys.stderr, flush=True)


def format_top(ranked: list[tuple[str, float]], k: int) -> str:
    return "  ".join(f"{label} {p:.2f}" for label, p in ranked[:k])


def run_tester(cp, *, checkpoint: str = "last", base: bool = False, model: str | None = None,
               system: str | None = None, device: str = "auto", sampling=None, labels_only: bool = False,
               top: int = 0, stdin=None, stdout=None) -> None:
    from .generation import Sampling, generate
    from .modeling import check_model_source, load_model, resolve_device
    from .scoring import label_probabilities

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    sampling = sampling or Sampling()
    sampling.check()
    if top < 0:
        raise UserError(f"--top {top} must be 0 (off) or a number of labels to show")
    labels_only = labels_only or top > 0
    adapter = None if base else resolve_checkpoint(cp, checkpoint)
    model_id, model_from = base_model(cp, model)
    check_model_source(model_id)
    resolve_device(device)
    system, system_from = system_prompt(cp, system)
    labels = trained_labels(cp) if labels_only else None

    lm = load_model(model_id, device, adapter=adapter)
    what = f"base model {model_id} (no adapter)" if base else f"{model_id} + adapter {adapter}"
    note(f"testing {what} on {lm.device} ({model_from})")
    note(f"system prompt ({system_from}): {system if system else '(none)'}")
    if labels:
        note(f"answers restricted to the {len(labels)} trained labels: {' '.join(labels)}")

    def answer(text: str, stream: bool) -> str:
        if labels:
            ranked = label_probabilities(lm, system, text, labels)
            return format_top(ranked, top) if top else ranked[0][0]
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
            return generate(lm, system, text, sampling, streamer=streamer)
        return generate(lm, system, text, sampling)

    if not stdin.isatty():
        for line in read_lines(stdin.buffer):
            text = line.strip()
            if text:
                print(answer(text, stream=False), file=stdout, flush=True)
        return
    note("type a tweet and press Enter; each one is a new conversation. Ctrl+D or Ctrl+C to quit.")
    while True:
        try:
            text = input("> ").strip()
            if not text:
                continue
            if labels:
                print(answer(text, stream=False), file=stdout, flush=True)
            else:
                answer(text, stream=True)  # the streamer prints the answer as it is generated
        except (EOFError, KeyboardInterrupt):
            print(file=stdout)
            return
