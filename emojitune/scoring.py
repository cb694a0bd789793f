"""Teacher-forced scoring of answers: the training loss, val loss + exact-match accuracy, label odds.

The greedy answer equals the label exactly when, at every answer position (the closing end-of-turn
included), the argmax of the logits is the label's next token. So one forward pass over prompt + label
gives both the loss and the accuracy, with no generate loop.
"""

import contextlib
import functools
from dataclasses import dataclass

IGNORE = -100


@dataclass
class Example:
    """Token ids of prompt + answer; `targets` aligns with positions: targets[t] is the token position t
    must predict when it is an answer token, IGNORE elsewhere (prompt positions carry no loss)."""
    input_ids: list[int]
    targets: list[int]

    @classmethod
    def build(cls, prompt: list[int], answer: list[int]) -> "Example":
        ids = prompt + answer
        return cls(ids, [IGNORE] * (len(prompt) - 1) + answer + [IGNORE])


def encode(lm, records) -> list[Example]:
    from .generation import answer_ids, prompt_ids

    return [Example.build(prompt_ids(lm.tokenizer, r.system, r.user),
                          answer_ids(lm.tokenizer, r.label, lm.end_of_turn_id)) for r in records]


def collate(examples: list[Example], pad_id: int, device):
    """Right-padded batch tensors: input_ids, attention_mask, targets."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        targets[i, :n] = torch.tensor(e.targets)
    return ids.to(device), mask.to(device), targets.to(device)


def answer_logits(causal_lm, input_ids, attention_mask, targets, full_logits: bool = False, cache=None):
    """Logits at the answer positions only, shape (n_answer_tokens, vocab), in float32.

    The output layer of Gemma 3 is the 262k-token embedding: projecting every prompt position is most
    of a training step's work. We run the decoder, gather the few hidden states that carry loss, and
    project only those. `full_logits=True` projects every position first (the plain way), for checks.
    `cache`: keys and values of earlier tokens that `input_ids` continue (attention_mask covers both).
    """
    import torch

    hidden = run_decoder(causal_lm, input_ids, attention_mask, cache)
    keep = targets != IGNORE
    head = causal_lm.get_output_embeddings()
    if full_logits:
        logits = head(hidden)[keep]
    elif hidden.device.type == "cpu" and head.bias is None and not head.weight.requires_grad:
        logits = frozen_head_cpu(hidden[keep], head.weight)
    else:
        logits = head(hidden[keep])
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def run_decoder(causal_lm, input_ids, attention_mask, cache=None):
    """Last hidden states of the decoder; with `cache`, it continues the cached tokens and extends it."""
    import inspect

    decoder = causal_lm.get_decoder()
    extra = {}
    if cache is not None:
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns until it is removed).
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        extra = {name: cache}
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=cache is not None,
                   **extra).last_hidden_state


def frozen_head_cpu(h, weight):
    """h @ weight.T for the few answer positions, on CPU, with the output layer frozen (LoRA).

    With 2-3 rows, the BLAS path of F.linear streams the 262k x 640 matrix once per row; written as
    weight @ h.T it streams it once (measured on 2 cores: 2-4x faster). The input gradient is
    weight.T @ grad.T: below a dozen rows (batch 1) only a contiguous copy of weight.T makes it fast
    (35 vs 145 ms at 3 rows); that copy costs 0.6-1.6 s once, which from a dozen rows on (batch 8 and
    up) BLAS does not need (55-100 ms either way), so it is made only for small batches. Same
    products, summed in another order: results agree to float32 rounding.
    """
    return _frozen_head_function().apply(h, weight)


SMALL_HEAD_ROWS = 12  # from this many answer tokens in a batch on, the input gradient needs no copy of W.T


@functools.cache
def _frozen_head_function():
    import torch

    transposed = {}

    class FrozenHead(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(w)
            return (w @ x.T).T

        @staticmethod
        def backward(ctx, grad):
            (w,) = ctx.saved_tensors
            if grad.shape[0] >= SMALL_HEAD_ROWS:
                return (w.T @ grad.T).T, None
            key = (w.data_ptr(), tuple(w.shape), w._version)
            if key not in transposed:
                transposed.clear()  # one model at a time: keep a single copy
                transposed[key] = w.T.contiguous()
            return (transposed[key] @ grad.T).T, None

    return FrozenHead


def token_losses(causal_lm, input_ids, attention_mask, targets, full_logits: bool = False, cache=None):
    """Per-answer-token cross-entropy and argmax correctness, plus the batch row of each token."""
    import torch.nn.functional as F

    logits = answer_logits(causal_lm, input_ids, attention_mask, targets, full_logits, cache)
    keep = targets != IGNORE
    wanted = targets[keep]
    rows = keep.nonzero()[:, 0]
    return F.cross_entropy(logits, wanted, reduction="none"), logits.argmax(-1) == wanted, rows


@dataclass
class Scores:
    loss: list[float]  # summed answer-token loss per example
    tokens: list[int]  # answer tokens per example
    exact: list[bool]  # greedy answer == label

    @property
    def mean_loss(self) -> float:
        return sum(self.loss) / max(1, sum(self.tokens))

    @property
    def accuracy(self) -> float:
        return sum(self.exact) / max(1, len(self.exact))


def causal_lm_of(model):
    """The transformers causal LM inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def inference(lm_model):
    """Eval mode (no dropout) and no autograd for a scoring pass; the model's mode is restored after."""
    import torch

    was_training = lm_model.training
    lm_model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        lm_model.train(was_training)


def score(lm_model, examples: list[Example], pad_id: int, device, batch_size: int = 16) -> Scores:
    """Teacher-forced loss and exact match per example, in batches sorted by length (little padding)."""
    import torch

    causal_lm = causal_lm_of(lm_model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    loss, tokens, exact = [0.0] * len(examples), [0] * len(examples), [False] * len(examples)
    with inference(lm_model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], pad_id, device)
            tok_loss, correct, rows = token_losses(causal_lm, *batch)
            n = len(idx)
            row_loss = torch.zeros(n, device=tok_loss.device).index_add_(0, rows, tok_loss)
            row_tokens = torch.zeros(n, device=tok_loss.device).index_add_(0, rows, torch.ones_like(tok_loss))
            row_wrong = torch.zeros(n, device=tok_loss.device).index_add_(0, rows, (~correct).float())
            for j, i in enumerate(idx):
                loss[i], tokens[i] = row_loss[j].item(), int(row_tokens[j].item())
                exact[i] = bool(row_wrong[j].item() == 0)
    return Scores(loss, tokens, exact)


def shared_prompt_losses(lm_model, prompt: list[int], answers: list[list[int]], pad: int, device) -> list[float]:
    """Summed answer-token loss of each answer after one shared prompt: what `score` gives for the
    examples prompt + answer, with the prompt run once instead of once per answer.

    The prompt goes through the model once; its last position gives every answer's first token, and its
    keys and values are copied for every answer, whose row then runs only its own tokens. For 25 labels
    after a ~50-token prompt, measured on 2 cores: 2.4 s → 0.7 s per tweet.
    """
    import torch
    from transformers import DynamicCache

    if min(map(len, answers)) < 2:  # not our answers (label + end of turn): the plain way
        return score(lm_model, [Example.build(prompt, a) for a in answers], pad, device, len(answers)).loss
    causal_lm = causal_lm_of(lm_model)
    with inference(lm_model):
        cache = DynamicCache(config=causal_lm.config)
        ids = torch.tensor([prompt], device=device)
        last = torch.full_like(ids, IGNORE)
        last[0, -1] = 0  # any token: it only marks the one position whose logits we need
        logits = answer_logits(causal_lm, ids, torch.ones_like(ids), last, cache=cache)
        first = -torch.log_softmax(logits[0], -1)[[a[0] for a in answers]]
        cache.batch_repeat_interleave(len(answers))
        rows = [Example(a[:-1], a[1:]) for a in answers]  # row position t predicts answer token t + 1
        ids, mask, targets = collate(rows, pad, device)
        mask = torch.cat([torch.ones((len(rows), len(prompt)), dtype=mask.dtype, device=device), mask], 1)
        tok_loss, _, row_of = token_losses(causal_lm, ids, mask, targets, cache=cache)
        summed = first.index_add(0, row_of, tok_loss)
    return summed.tolist()


def label_probabilities(lm, system: str | None, user: str, labels: list[str]) -> list[tuple[str, float]]:
    """The model's own probability of each label as its whole answer (label + end of turn), normalised
    over the label set; highest first. Used by 06 --labels-only / --top."""
    import math

    from .generation import answer_ids, prompt_ids

    prompt = prompt_ids(lm.tokenizer, system, user)
    answers = [answer_ids(lm.tokenizer, label, lm.end_of_turn_id) for label in labels]
    logp = [-x for x in shared_prompt_losses(lm.model, prompt, answers, pad_id(lm.tokenizer), lm.device)]
    top = max(logp)
    weights = [math.exp(x - top) for x in logp]
    total = sum(weights)
    return sorted(((label, w / total) for label, w in zip(labels, weights)), key=lambda x: -x[1])


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
