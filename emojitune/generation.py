"""Generating answers: each tweet as a fresh [system?, user] conversation, or after the earlier turns of a
running one (--history); greedy unless asked to sample. Used by 05 and 06."""

from collections import deque
from dataclasses import dataclass

from .chat import prompt_ids
from .cli import option
from .console import UserError
from .modeling import quiet_libraries


@dataclass
class Sampling:
    """generation (greedy unless --temperature > 0)"""

    max_new_tokens: int = option(16, "answer length limit in tokens")
    temperature: float = option(0.0, "0 = greedy; above 0 samples")
    top_p: float = option(1.0, "nucleus sampling share, used only when sampling (1.0 = off)")
    top_k: int = option(0, "sample from the k most likely tokens, used only when sampling (0 = off)")
    repetition_penalty: float = option(1.0, "penalty for repeating tokens (1.0 = off)")

    def problems(self) -> list[str]:
        found = []
        if self.max_new_tokens < 1:
            found.append(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if not self.temperature >= 0:
            found.append(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            found.append(f"--top-k {self.top_k} must be 0 (off) or more")
        if not self.repetition_penalty > 0:
            found.append(f"--repetition-penalty {self.repetition_penalty} must be above 0")
        return found

    def check(self) -> None:
        if self.problems():
            raise UserError("; ".join(self.problems()))


def generation_config(lm, sampling: Sampling):
    """An explicit config: Gemma's own generation_config samples, and ours must be greedy by default."""
    from transformers import GenerationConfig

    eos = lm.model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    eos = list(dict.fromkeys(eos + [lm.tokenizer.eos_token_id, lm.end_of_turn_id]))
    sample = sampling.temperature > 0
    extra = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k) if sample else {}
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=sample, eos_token_id=eos,
        pad_token_id=lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else eos[0],
        repetition_penalty=sampling.repetition_penalty, **extra,
    )


def generate(lm, system: str | None, user: str, sampling: Sampling = Sampling(), streamer=None,
             history=()) -> str:
    """Answer one tweet, as a fresh conversation or after the (tweet, answer) turns in `history`;
    the decoded answer, stripped, on one line."""
    return generate_batch(lm, system, [user], sampling, streamer=streamer, history=history)[0]


def generate_batch(lm, system: str | None, users: list[str], sampling: Sampling = Sampling(),
                   batch_size: int = 8, streamer=None, history=()) -> list[str]:
    """Answer many tweets, each as its own conversation (after the same `history`, if any). Prompts are
    batched by length and left-padded (the attention mask hides the padding), so a batch of one is plain
    generation."""
    import torch

    prompts = [prompt_ids(lm.tokenizer, system, u, history, lm.end_of_turn_id) for u in users]
    config = generation_config(lm, sampling)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad(), quiet_libraries():  # no notes on Gemma's sampling flags we switch off
            out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    generation_config=config, streamer=streamer)
        for row, i in enumerate(idx):
            answers[i] = decode_answer(lm.tokenizer, out[row, width:])
    return answers


def converse(lm, system: str | None, users: list[str], keep: int, sampling: Sampling = Sampling()) -> list[str]:
    """Answer the tweets one after another as one running conversation that keeps the last `keep`
    tweets with the model's own answers (0 = each tweet alone, as generate_batch does, only slower)."""
    history, answers = deque(maxlen=keep), []
    for user in users:
        answers.append(generate(lm, system, user, sampling, history=list(history)))
        history.append((user, answers[-1]))
    return answers


def decode_answer(tokenizer, new_ids) -> str:
    # One line per answer keeps piped output aligned with the input lines.
    return " ".join(tokenizer.decode(new_ids, skip_special_tokens=True).split("\n")).strip()
