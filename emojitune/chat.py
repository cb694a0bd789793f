"""Conversations as token ids: the prompt of a fresh [system?, user] chat, the answer the model should
give, and training examples with Hugging Face-style labels.

No chat history is ever sent: a model trained on single turns drifts into repeating one emoji when
earlier turns are in its context.
"""

from dataclasses import dataclass

IGNORE = -100  # the label of a position that carries no loss (PyTorch's and Hugging Face's convention)


def conversation(system: str | None, user: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def prompt_ids(tokenizer, system: str | None, user: str) -> list[int]:
    """Chat template straight to ids: rendering to a string and tokenizing it again would add a second
    <bos> (the template writes one, and the tokenizer adds its own)."""
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


def encode(lm, records) -> list[Example]:
    """Records (system, tweet, emoji) as training examples for this model's tokenizer."""
    return [Example.of(prompt_ids(lm.tokenizer, r.system, r.user),
                       answer_ids(lm.tokenizer, r.label, lm.end_of_turn_id)) for r in records]


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
