"""The tiny Gemma, the prompt path, answer-only targets, and the fast loss against the plain one."""

import pytest
from conftest import SYSTEM

from emojitune.data import Record
from emojitune.generation import answer_ids, prompt_ids
from emojitune.modeling import load_model
from emojitune.scoring import IGNORE, Example, collate, encode, pad_id, token_losses


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), "cpu")


def test_tiny_tokenizer_behaves_like_gemma(lm, tiny_model):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = prompt_ids(tok, SYSTEM, "今日は最高")
    assert tok.decode(ids) == (f"<bos><start_of_turn>user\n{SYSTEM}\n\n今日は最高<end_of_turn>\n"
                               "<start_of_turn>model\n")
    assert ids.count(tok.bos_token_id) == 1  # no second <bos>
    assert lm.end_of_turn_id == tok.convert_tokens_to_ids("<end_of_turn>")
    for text in ("☹️", "🫠", "👨‍👩‍👧", "漢字とカタカナ", "ｗｗｗ"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    gen = GenerationConfig.from_pretrained(tiny_model)
    assert gen.do_sample is True and lm.end_of_turn_id in gen.eos_token_id


def test_end_of_turn_found_when_it_is_only_an_added_special_token(tiny_model, tmp_path):
    """A tokenizer may mark <end_of_turn> special without naming it among bos/eos/pad/extra tokens:
    training must still end answers with it, not with <eos>."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from emojitune.modeling import end_of_turn_token
    from tiny_gemma import CHAT_TEMPLATE

    full = AutoTokenizer.from_pretrained(tiny_model)
    plain = PreTrainedTokenizerFast(tokenizer_object=full.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                    pad_token="<pad>", unk_token="<unk>")
    plain.chat_template = CHAT_TEMPLATE
    eot = plain.convert_tokens_to_ids("<end_of_turn>")
    assert eot not in plain.all_special_ids
    assert end_of_turn_token(plain) == eot


def test_only_the_answer_and_end_of_turn_carry_loss(lm):
    [ex] = encode(lm, [Record(SYSTEM, "今日は最高", "😀")])
    prompt = prompt_ids(lm.tokenizer, SYSTEM, "今日は最高")
    answer = answer_ids(lm.tokenizer, "😀", lm.end_of_turn_id)
    assert ex.input_ids == prompt + answer
    # Position t predicts token t+1: the prompt's own tokens are never targets.
    supervised = [(t, y) for t, y in enumerate(ex.targets) if y != IGNORE]
    assert [y for _, y in supervised] == answer
    assert answer[-1] == lm.end_of_turn_id
    assert all(ex.input_ids[t + 1] == y for t, y in supervised)
    assert supervised[0][0] == len(prompt) - 1


def test_fast_loss_equals_full_logits_masked_loss(lm):
    import torch
    import torch.nn.functional as F

    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    ids, mask, targets = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
    with torch.no_grad():
        fast, _, _ = token_losses(lm.model, ids, mask, targets)
        # The plain way: logits at every position, HF-style shift, masked mean.
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        labels = torch.full_like(ids, IGNORE)
        labels[:, 1:] = targets[:, :-1]
        plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert fast.mean().item() == pytest.approx(plain.item(), abs=1e-5)


def test_example_build_alignment():
    ex = Example.build([1, 2, 3], [7, 9])
    assert ex.input_ids == [1, 2, 3, 7, 9]
    assert ex.targets == [IGNORE, IGNORE, 7, 9, IGNORE]


@pytest.mark.parametrize("rows", [3, 20])  # below and above SMALL_HEAD_ROWS: both gradient paths
def test_cpu_output_layer_matches_plain_linear_with_gradients(rows):
    import torch
    import torch.nn.functional as F

    from emojitune.scoring import SMALL_HEAD_ROWS, frozen_head_cpu

    assert 3 < SMALL_HEAD_ROWS <= 20
    torch.manual_seed(0)
    weight = torch.randn(5000, 64)  # frozen, like the tied embedding under LoRA
    h = torch.randn(rows, 64, requires_grad=True)
    grad_out = torch.randn(rows, 5000)
    fast = frozen_head_cpu(h, weight)
    (fast_grad,) = torch.autograd.grad(fast, h, grad_out)
    plain = F.linear(h, weight)
    (plain_grad,) = torch.autograd.grad(plain, h, grad_out)
    assert torch.allclose(fast, plain, atol=1e-4) and torch.allclose(fast_grad, plain_grad, atol=1e-3)
