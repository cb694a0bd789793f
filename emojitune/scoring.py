"""Scoring answers without generating them: validation loss + exact-match accuracy (03), and the
probability of each trained label (06 --labels-only / --top).

The greedy answer equals the label exactly when, at every answer position (the closing end-of-turn
included), the argmax of the logits is the label's next token. So one teacher-forced pass over
prompt + label gives both the loss and the accuracy, with no generate loop. In a conversation of
several turns each answer is counted on its own, its earlier turns given as in the data.
"""

import contextlib
import math
from dataclasses import dataclass

from .chat import IGNORE, Example, answer_ids, collate, pad_id, prompt_ids
from .loss import answer_token_losses, cache_argument, causal_lm_of


@dataclass
class Scores:
    loss: list[float]  # summed answer-token loss per example
    tokens: list[int]  # answer tokens per example
    exact: list[bool]  # greedy answer == label (in a conversation: for every turn)
    answers: list[int]  # answers (turns) per example
    right: list[int]  # answers whose greedy answer == label, per example

    @property
    def mean_loss(self) -> float:
        return sum(self.loss) / max(1, sum(self.tokens))

    @property
    def correct(self) -> int:
        return sum(self.right)

    @property
    def total(self) -> int:
        return sum(self.answers)

    @property
    def accuracy(self) -> float:
        """The share of answers that are right (for single-turn examples: of examples)."""
        return self.correct / max(1, self.total)


@contextlib.contextmanager
def inference(model):
    """Eval mode (no dropout) and no autograd; the model's mode is restored after, even on error."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def score(model, examples: list[Example], pad: int, device, batch_size: int = 16) -> Scores:
    """Teacher-forced loss and exact match per example and per answer, in batches sorted by length
    (little padding)."""
    import torch

    causal_lm = causal_lm_of(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    n = len(examples)
    loss, tokens, exact, answers, right = [0.0] * n, [0] * n, [False] * n, [0] * n, [0] * n
    with inference(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, labels = collate([examples[i] for i in idx], pad, device)
            token_loss, correct, rows = answer_token_losses(causal_lm, ids, mask, labels)
            # Each answer is a run of scored positions; number them in the order of token_loss (row-major).
            scored = labels[:, 1:] != IGNORE
            first = scored & ~torch.nn.functional.pad(scored, (1, 0))[:, :-1]
            answer_of = first[scored].cumsum(0) - 1
            wrong_tokens = torch.zeros(int(first.sum()), device=token_loss.device)
            wrong_tokens.index_add_(0, answer_of, (~correct).float())
            per_row = torch.zeros((5, len(idx)), device=token_loss.device)
            per_row[0].index_add_(0, rows, token_loss)
            per_row[1].index_add_(0, rows, torch.ones_like(token_loss))
            per_row[2].index_add_(0, rows, (~correct).float())
            answer_rows = first.nonzero()[:, 0]
            per_row[3].index_add_(0, answer_rows, torch.ones_like(wrong_tokens))
            per_row[4].index_add_(0, answer_rows, (wrong_tokens == 0).float())
            for j, (row_loss, row_tokens, row_wrong, row_answers, row_right) in enumerate(per_row.T.tolist()):
                i = idx[j]
                loss[i], tokens[i], exact[i] = row_loss, int(row_tokens), row_wrong == 0
                answers[i], right[i] = int(row_answers), int(row_right)
    return Scores(loss, tokens, exact, answers, right)


def shared_prompt_losses(model, prompt: list[int], answers: list[list[int]], pad: int, device) -> list[float]:
    """Summed answer-token loss of each answer after one shared prompt: what `score` gives for the
    examples prompt + answer, with the prompt run once instead of once per answer.

    The prompt goes through the model once; its last position gives every answer's first token, and its
    keys and values are copied for every answer, whose row then runs only its own tokens.
    """
    import torch
    from transformers import DynamicCache

    causal_lm = causal_lm_of(model)
    with inference(model):
        cache = DynamicCache(config=causal_lm.config)
        ids = torch.tensor([prompt], device=device)
        logits = causal_lm(input_ids=ids, use_cache=True, logits_to_keep=1,
                           **cache_argument(causal_lm, cache)).logits[0, -1].float()
        first = -torch.log_softmax(logits, -1)[[a[0] for a in answers]]
        if max(map(len, answers)) == 1:
            return first.tolist()
        cache.batch_repeat_interleave(len(answers))
        # Each row is its answer; its first token was scored from the prompt above.
        rows = [Example(a, [IGNORE] + a[1:]) for a in answers]
        ids, mask, labels = collate(rows, pad, device)
        mask = torch.cat([torch.ones((len(rows), len(prompt)), dtype=mask.dtype, device=device), mask], 1)
        token_loss, _, row_of = answer_token_losses(causal_lm, ids, mask, labels, cache=cache)
        summed = first.index_add(0, row_of, token_loss)
    return summed.tolist()


def label_probabilities(lm, system: str | None, user: str, labels: list[str],
                        history=()) -> list[tuple[str, float]]:
    """The model's own probability of each label as its whole answer (label + end of turn), after the
    earlier (tweet, answer) turns in `history`, normalised over the label set; highest first."""
    prompt = prompt_ids(lm.tokenizer, system, user, history, lm.end_of_turn_id)
    answers = [answer_ids(lm.tokenizer, label, lm.end_of_turn_id) for label in labels]
    logp = [-x for x in shared_prompt_losses(lm.model, prompt, answers, pad_id(lm.tokenizer), lm.device)]
    top = max(logp)
    weights = [math.exp(x - top) for x in logp]
    total = sum(weights)
    return sorted(((label, w / total) for label, w in zip(labels, weights)), key=lambda x: -x[1])
