"""A tiny, random-weight model of the real Gemma 3 text architecture, with a Gemma-like tokenizer,
built locally (no hub access) and saved like a downloaded model, so tests load it by path.

    uv run python tests/tiny_gemma.py /tmp/tiny-gemma    # build one to try the scripts by hand
    uv run python tests/tiny_gemma.py /tmp/tiny-gemma --sentencepiece   # with tokenizer.model, for 07's GGUF
"""

import json
import sys
from pathlib import Path

EMBED_STD = 0.3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Gemma 3's chat format: the system message is folded into the first user turn, the assistant
# speaks as "model", and every turn ends with <end_of_turn>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Text to learn BPE merges from: the shipped tweets and labels, so that emojis and common
    Japanese become single tokens as in the real tokenizer. Any other text still encodes, byte by byte."""
    shipped = Path(__file__).resolve().parent.parent / "training_data_emotion_jp.json"
    lines = ["user", "model", "\n\n", "このツイートを絵文字で感情分類してください"]
    if shipped.exists():
        for record in json.loads(shipped.read_text(encoding="utf-8")):
            lines += [m["content"] for m in record["messages"]]
    return lines


def build_tokenizer(path: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Gemma's tokenizer, plain encoding adds <bos>; the chat template writes its own <bos>.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


SENTENCEPIECE_VOCAB = 1500  # covers every character of the shipped tweets, so none falls back to bytes
# Gemma's vocabulary has the space (as "▁") and ASCII as pieces; the tweets alone would leave them to bytes.
ASCII = " ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?.,")


def build_sentencepiece_tokenizer(path: Path, vocab_size: int = SENTENCEPIECE_VOCAB):
    """A tokenizer built like Gemma's real one: a SentencePiece BPE model with byte fallback
    (`tokenizer.model`, which llama.cpp's Gemma 3 support reads) and the matching transformers
    GemmaTokenizer (`tokenizer.json`). Ids as in Gemma: pad 0, eos 1, bos 2, unk 3."""
    import io

    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() + [ASCII]), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, split_digits=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=SPECIAL_TOKENS[4:], minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    extracted = SentencePieceExtractor(str(path / "tokenizer.model")).extract(BPE)
    # Gemma's own tokenizer marks the turn markers special (kept whole, skipped when decoding answers);
    # no <mask> token, so the embedding has exactly the SentencePiece vocabulary's rows.
    tok = GemmaTokenizer(vocab=extracted["vocab"], merges=extracted["merges"], mask_token=None,
                         extra_special_tokens=SPECIAL_TOKENS[4:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_tiny_gemma(path, seed: int = 0, layers: int = 2, tokenizer: str = "bpe") -> Path:
    """Save a tiny Gemma3ForCausalLM + tokenizer + generation_config to path; return path.

    tokenizer: "bpe" (a byte-level BPE tokenizer.json, fast to build) or "sentencepiece" (Gemma's
    real kind, with tokenizer.model, for tests that run the model in llama.cpp)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if tokenizer not in ("bpe", "sentencepiece"):
        raise ValueError(f"tokenizer={tokenizer!r}: use 'bpe' or 'sentencepiece'")
    tokenizer = build_tokenizer(path) if tokenizer == "bpe" else build_sentencepiece_tokenizer(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=16, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A trained model's (tied) embeddings are large enough for confident predictions; the default
    # init (std 0.02) caps a 64-wide model's logits near 1, which LoRA on the linear layers cannot lift.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBED_STD)
    # Gemma's own generation_config samples by default: our tools must ask for greedy explicitly.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        do_sample=True, top_k=64, top_p=0.95,
    )
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sentencepiece"]
    kind = "sentencepiece" if "--sentencepiece" in sys.argv[1:] else "bpe"
    out = build_tiny_gemma(args[0] if args else "tiny-gemma", tokenizer=kind)
    print(f"wrote a tiny Gemma 3 model ({kind} tokenizer) to {out}")
