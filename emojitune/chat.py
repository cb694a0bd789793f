"""Conversations as token ids: the prompt of a [system?, user] chat (with earlier turns, if any), the
answer the model should give, and training examples with Hugging Face-style labels.

A conversation of several turns is built turn by turn: each turn's prompt as the chat template writes
it, each answer as the model itself produces it (answer_ids). Training, 05 and 06 --history all build
earlier turns this way, so a model sees at test time the same ids it was trained on.
"""

from dataclasses import dataclass

from .console import UserError

IGNORE = -100  # the label of a position that carries no loss (PyTorch's and Hugging Face's convention)


def conversation(system: str | None, user: str, history=()) -> list[dict]:
    """Chat messages: the system prompt, the earlier (tweet, answer) turns, then the new tweet."""
    messages = [{"role": "system", "content": system}] if system else []
    for tweet, answer in history:
        messages += [{"role": "user", "content": tweet}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user}]


def prompt_ids(tokenizer, system: str | None, user: str, history=(), end_of_turn_id: int | None = None) -> list[int]:
    """Chat template straight to ids: rendering to a string and tokenizing it again would add a second
    <bos> (the template writes one, and the tokenizer adds its own). With `history`, the earlier
    (tweet, answer) turns come first, built as in training (conversation_example)."""
    if history:
        return conversation_example(tokenizer, system, [*history, (user, None)], end_of_turn_id).input_ids
    return list(tokenizer.apply_chat_template(conversation(system, user), add_generation_prompt=True,
                                              return_dict=False))


def answer_ids(tokenizer, answer: str, end_of_turn_id: int) -> list[int]:
    """The tokens the model should produce after the prompt: the answer, then the end of its turn."""
    return tokenizer.encode(answer, add_special_tokens=False) + [end_of_turn_id]


@dataclass
class Example:
    """A training example. As in Hugging Face models, labels[t] is input_ids[t] where that token is
    part of the answer and IGNORE elsewhere; the logits at position t - 1 are scored against it."""
    input_ids: list[int]
    labels: list[int]

    @classmethod
    def of(cls, prompt: list[int], answer: list[int]) -> "Example":
        """Loss on the answer only: the system prompt and the tweet carry none."""
        return cls(prompt + answer, [IGNORE] * len(prompt) + answer)

    @property
    def answer_tokens(self) -> int:
        return sum(t != IGNORE for t in self.labels)

    @property
    def answers(self) -> int:
        """How many answers (turns) carry loss: runs of labelled positions."""
        return sum(t != IGNORE and before == IGNORE for before, t in zip([IGNORE] + self.labels, self.labels))


def conversation_example(tokenizer, system: str | None, turns, end_of_turn_id: int) -> Example:
    """A conversation of (tweet, answer) turns as one example with loss on every answer (its tokens and
    its end of turn); the system prompt, the tweets and the template's turn markers carry none. A last
    answer of None stops at that turn's prompt (to generate the answer). One turn gives exactly
    Example.of(prompt_ids(...), answer_ids(...)).

    The chat template is rendered once per turn, up to that turn's tweet. It writes the earlier turns
    again, their answers tokenized in the middle of the text; those ids are already built (the answers
    as answer_ids, the way the model generates them), so only what follows the end of the last answer
    is taken: the template's turn markers and the new tweet.
    """
    input_ids, labels, ends_before = [], [], 0
    for k, (tweet, answer) in enumerate(turns):
        rendered = list(tokenizer.apply_chat_template(conversation(system, tweet, turns[:k]),
                                                      add_generation_prompt=True, return_dict=False))
        prompt = rendered[_after(rendered, end_of_turn_id, ends_before + 1):] if k else rendered
        ends_before = rendered.count(end_of_turn_id)
        input_ids += prompt
        labels += [IGNORE] * len(prompt)
        if answer is None:
            break
        answer_tokens = answer_ids(tokenizer, answer, end_of_turn_id)
        input_ids += answer_tokens
        labels += answer_tokens
    return Example(input_ids, labels)


def _after(ids: list[int], token: int, n: int) -> int:
    """The position just after the n-th `token` in ids."""
    seen = 0
    for i, t in enumerate(ids):
        seen += t == token
        if seen == n:
            return i + 1
    raise UserError("the model's chat template does not end each answer with its end-of-turn token, so "
                    "conversations of several turns cannot be built for it: use single-turn data and --history 0")


def encode(lm, records) -> list[Example]:
    """Records (system, tweet(s), emoji(s)) as training examples for this model's tokenizer."""
    return [conversation_example(lm.tokenizer, r.system, r.turns, lm.end_of_turn_id) for r in records]


def pad_id(tokenizer) -> int:
    """The id that fills batches out to one width (never attended to, never scored)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(examples: list[Example], pad: int, device):
    """Right-padded batch tensors: input_ids, attention_mask, labels."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)
