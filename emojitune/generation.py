"""The one generation path: a fresh [system?, user] conversation → token ids → the model's answer.

Used by 03 (through scoring), 05 and 06. No chat history is ever sent: a model trained on single
turns drifts into repeating one emoji when earlier turns are in its context.
"""

from dataclasses import dataclass


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
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_args(cls, args) -> "Sampling":
        return cls(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty)

    def check(self) -> None:
        from .errors import UserError

        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be 0 (off) or more")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty {self.repetition_penalty} must be above 0")


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


def generate(lm, system: str | None, user: str, sampling: Sampling = Sampling(), streamer=None) -> str:
    """Answer one tweet as a fresh conversation; the decoded answer, stripped, on one line."""
    return generate_batch(lm, system, [user], sampling, streamer=streamer)[0]


def generate_batch(lm, system: str | None, users: list[str], sampling: Sampling = Sampling(),
                   batch_size: int = 8, streamer=None) -> list[str]:
    """Answer many tweets, each as its own fresh conversation. Prompts are batched by length and
    left-padded (the attention mask hides the padding), so a batch of one is plain generation."""
    import torch

    prompts = [prompt_ids(lm.tokenizer, system, u) for u in users]
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
        with torch.no_grad():
            out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    generation_config=config, streamer=streamer)
        for row, i in enumerate(idx):
            answers[i] = decode_answer(lm.tokenizer, out[row, width:])
    return answers


def decode_answer(tokenizer, new_ids) -> str:
    # One line per answer keeps piped output aligned with the input lines.
    return " ".join(tokenizer.decode(new_ids, skip_special_tokens=True).split("\n")).strip()
