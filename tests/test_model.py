"""The tiny Gemma, the prompt path, answer-only labels, and the fast loss against the plain one."""

import pytest
from conftest import SYSTEM, c_compiler_on_path

from emojitune.chat import IGNORE, Example, answer_ids, collate, encode, pad_id, prompt_ids
from emojitune.data import Record
from emojitune.loss import answer_token_losses
from emojitune.modeling import load_model


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
    # Hugging Face convention: labels hold the token itself where it is scored, IGNORE elsewhere.
    assert ex.labels == [IGNORE] * len(prompt) + answer
    assert answer[-1] == lm.end_of_turn_id and ex.answer_tokens == len(answer)


def test_fast_loss_equals_the_models_own_loss(lm):
    """What a transformers user would write: model(input_ids, attention_mask, labels).loss."""
    import torch

    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
    with torch.no_grad():
        fast, correct, rows = answer_token_losses(lm.model, ids, mask, labels)
        out = lm.model(input_ids=ids, attention_mask=mask, labels=labels)
    assert fast.mean().item() == pytest.approx(out.loss.item(), abs=1e-5)
    # Argmax correctness per answer token, as read off the full logits.
    predicted = out.logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    assert correct.tolist() == (predicted[keep] == targets[keep]).tolist()
    assert rows.tolist() == keep.nonzero()[:, 0].tolist()


def test_scoring_leaves_out_the_last_position_and_training_keeps_it(lm):
    """The last position predicts no label and no other position reads it: in eval mode (evaluation
    passes, 05/06's scores) the decoder runs without it, with the numbers of the whole batch; in training
    mode it runs the whole batch, since dropout draws its masks for the shape it is given."""
    import torch

    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
    seen = []
    hook = lm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            scored, correct, rows = answer_token_losses(lm.model, ids, mask, labels)
            lm.model.train()  # the tiny model has no dropout: the same numbers, the whole batch
            whole, whole_correct, whole_rows = answer_token_losses(lm.model, ids, mask, labels)
    finally:
        lm.model.eval()
        hook.remove()
    assert seen == [ids.shape[1] - 1, ids.shape[1]]
    assert torch.allclose(scored, whole, atol=1e-5)
    assert torch.equal(correct, whole_correct) and torch.equal(rows, whole_rows)


def test_example_labels_follow_hugging_face():
    ex = Example.of([1, 2, 3], [7, 9])
    assert ex.input_ids == [1, 2, 3, 7, 9]
    assert ex.labels == [IGNORE, IGNORE, IGNORE, 7, 9]


def test_output_logits_of_a_trainable_head_keep_its_gradient_and_its_values_without_autograd():
    """The CPU speed path treats the output layer as frozen: a head that trains (full fine-tuning) must still
    get its gradient, and with autograd off (evaluation, 06's label scores) the path gives the head's numbers."""
    import torch

    from emojitune.loss import output_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 5000, bias=False)  # requires_grad, as a model loaded for inference has it
    lm = type("LM", (), {"get_output_embeddings": lambda self: head, "config": type("C", (), {})()})()
    rows = torch.randn(20, 64)
    output_logits(lm, rows).sum().backward()
    assert head.weight.grad is not None and torch.allclose(head.weight.grad, rows.sum(0).expand(5000, 64), atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(output_logits(lm, rows), head(rows), atol=1e-4)


@pytest.mark.parametrize("intel", [True, False])  # the row thresholds chosen for Intel CPUs and for others
@pytest.mark.parametrize("use_onednn", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8, 20, 64])  # batch 1 to batch 16 answer rows: every gradient path
def test_cpu_output_layer_matches_plain_linear_with_gradients(monkeypatch, request, rows, use_onednn, intel):
    import torch
    import torch.nn.functional as F

    from emojitune import loss, matmul
    from emojitune.loss import cpu_frozen_output_layer

    available = matmul.onednn()
    monkeypatch.setattr(matmul, "onednn", lambda: use_onednn and available)
    monkeypatch.setattr(loss, "intel_cpu", lambda: intel)
    loss._cpu_frozen_output_function.cache_clear()  # built again with this machine's thresholds after the test
    request.addfinalizer(loss._cpu_frozen_output_function.cache_clear)

    torch.manual_seed(0)
    weight = torch.randn(5000, 64)  # frozen, like the tied embedding under LoRA
    h = torch.randn(rows, 64, requires_grad=True)
    grad_out = torch.randn(rows, 5000)
    fast = cpu_frozen_output_layer(h, weight)
    (fast_grad,) = torch.autograd.grad(fast, h, grad_out)
    plain = F.linear(h, weight)
    (plain_grad,) = torch.autograd.grad(plain, h, grad_out)
    assert torch.allclose(fast, plain, atol=1e-4) and torch.allclose(fast_grad, plain_grad, atol=1e-3)


@pytest.mark.parametrize("layer", ["output", "decoder"])
def test_inference_linear_layers_go_through_onednn_with_linear_numbers(lm, monkeypatch, layer):
    """A model loaded for inference on CPU (05, 06, 07) runs its linear layers' products through oneDNN when
    autograd is off (generation), with nn.Linear's numbers; with autograd on it is nn.Linear itself; a deep
    copy of a layer (07 rounds a copy of the model to bfloat16) uses the copy's own weight."""
    import copy

    import torch
    import torch.nn.functional as F

    from emojitune import matmul

    calls, mm_t = [], matmul.mm_t
    monkeypatch.setattr(matmul, "mm_t", lambda *a: calls.append(1) or mm_t(*a))
    monkeypatch.setattr(matmul, "intel_cpu", lambda: False)  # on Intel only huge weights would take oneDNN
    linear = lm.model.get_output_embeddings() if layer == "output" else lm.model.model.layers[0].mlp.down_proj
    expected_calls = 1 if matmul.onednn() else 0
    torch.manual_seed(0)
    x = torch.randn(2, 1, linear.weight.shape[1])
    with torch.no_grad():
        fast = linear(x)
    assert len(calls) == expected_calls
    assert fast.shape == (2, 1, linear.weight.shape[0]) and torch.allclose(fast, F.linear(x, linear.weight), atol=1e-4)
    x.requires_grad_(True)
    trained = linear(x)
    assert len(calls) == expected_calls and trained.grad_fn is not None
    assert torch.equal(trained, F.linear(x, linear.weight))
    copied = copy.deepcopy(linear)
    with torch.no_grad():
        copied.weight.mul_(2)
        assert torch.allclose(copied(x), 2 * linear(x), atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 11, 16])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_output_pass_kernel_gives_cross_entropy_and_its_gradient_in_one_read(output_kernel, rows, spread):
    """output_pass's C kernel (built where a compiler is on the PATH; not with CC naming none): the loss and
    hidden-state gradient of F.cross_entropy on the full logits, for 1 to 16 rows, whether the vocabulary is
    passed over in one part or in several (one per thread) that are merged. With spread 30 each row's logits
    span thousands, so most of its exponents fall below output_pass.EXP_CUTOFF."""
    import threading

    import torch
    import torch.nn.functional as F

    from emojitune import output_pass

    expect_kernel = output_kernel == "kernel" and c_compiler_on_path()
    non_daemon = {t for t in threading.enumerate() if not t.daemon}
    assert output_pass.available() == expect_kernel
    if not expect_kernel:
        return
    torch.manual_seed(0)
    weight = torch.randn(9001, 64)  # logits of several units: the running maximum moves during the pass
    h = (torch.randn(rows, 64) * spread).requires_grad_(True)
    targets = torch.randint(0, 9001, (rows,))
    expected = F.cross_entropy(h @ weight.T, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), h)
    loss = output_pass.one_pass_loss(h, weight, targets)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5)
    # Logits in the thousands are rounded to ~1e-4 in float32, by the kernel and by torch in their own order:
    # where two top logits nearly tie, that moves their softmax weights, and the gradient with them, by ~1e-4.
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 if spread == 1 else 1e-3)
    one = output_pass._pass(output_pass._kernel(), h.detach(), weight, parts=1)
    three = output_pass._pass(output_pass._kernel(), h.detach(), weight, parts=3)
    for a, b in zip(one, three):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # No thread left that Python would wait for: a script still ends at once (console.exit_without_teardown).
    assert {t for t in threading.enumerate() if not t.daemon} == non_daemon


@pytest.mark.parametrize("rows", [12, 48])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_one_pass_output_loss_matches_log_softmax_with_gradients(rows, spread):
    """Training's one-pass cross-entropy (online softmax over vocabulary chunks, the last one partial)
    gives the loss and input gradient of F.cross_entropy on the full logits. With spread 30 each row's logits
    span thousands: most exponents fall below output_pass.EXP_CUTOFF."""
    import torch
    import torch.nn.functional as F

    from emojitune.loss import cpu_frozen_output_loss

    torch.manual_seed(0)
    weight = torch.randn(5000, 64)  # frozen, like the tied embedding under LoRA
    h = (torch.randn(rows, 64) * spread).requires_grad_(True)
    targets = torch.randint(0, 5000, (rows,))
    scale = torch.rand(rows)  # a different upstream gradient per row
    fast = cpu_frozen_output_loss(h, weight, targets, chunk=512)
    (fast_grad,) = torch.autograd.grad((fast * scale).sum(), h)
    plain = F.cross_entropy(F.linear(h, weight), targets, reduction="none")
    (plain_grad,) = torch.autograd.grad((plain * scale).sum(), h)
    # Logits in the thousands round to ~1e-4 in float32 (see the kernel's test above): the gradient to ~1e-3.
    assert torch.allclose(fast, plain, atol=1e-4)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-5 if spread == 1 else 1e-3)


@pytest.mark.parametrize("use_onednn", [True, False])
def test_cpu_speed_path_products_equal_torch_mm(monkeypatch, use_onednn):
    """The products of the fused LoRA layers and the one-pass loss (oneDNN on x86-64, torch.mm elsewhere)
    are x @ w.T (+ add) for every layout they are called with: a weight, a transposed view of one, and rows
    from 1 (a one-token answer) to a batch's hundreds."""
    import platform

    import torch

    from emojitune import matmul

    if use_onednn and platform.machine().lower() not in matmul.ONEDNN_MACHINES:
        pytest.skip("oneDNN's path is taken on x86-64 only")
    if use_onednn:
        assert matmul.onednn()  # PyTorch's x86-64 builds ship oneDNN: the fast path is the one tested
    monkeypatch.setattr(matmul, "onednn", lambda: use_onednn)
    monkeypatch.setattr(matmul, "intel_cpu", lambda: False)  # on Intel only huge weights would take oneDNN
    torch.manual_seed(0)
    for rows in (1, 3, 55, 300):
        x = torch.randn(rows, 96)
        w = torch.randn(40, 96)
        w_t = torch.randn(96, 40).T  # non-contiguous, as the backward passes read the layers' weights
        add = torch.randn(rows, 40)
        expected = x @ w.T
        assert torch.allclose(matmul.mm_t(x, w), expected, atol=1e-4)
        assert torch.allclose(matmul.mm_t(x, w_t), x @ w_t.T, atol=1e-4)
        assert torch.allclose(matmul.mm_t(x, w, add.clone()), expected + add, atol=1e-4)
        assert torch.allclose(matmul.mm_t(x.T.contiguous().T, w), expected, atol=1e-4)  # transposed input


def test_mkl_packed_weights_give_torch_mm_products():
    """MKL's packed copies of frozen weights (matmul.PackedWeight, the fused LoRA layers' products on Intel CPUs)
    give x @ w.T and g @ w, plus an addition, for rows from 1 to a large batch's and inputs of any layout; one
    copy serves every row count. A copy that moved in memory (a deep copy) says so, to be packed again."""
    import copy

    import torch

    from emojitune import matmul

    if matmul._mkl() is None:
        pytest.skip("this PyTorch does not export MKL's packing functions (Linux x86-64 wheels do)")
    assert matmul.mkl_packing()  # exported: then they must pass the check
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    forward, backward = matmul.PackedWeight(w, transposed=True), matmul.PackedWeight(w, transposed=False)
    for rows in (1, 3, 55, 300, 900):
        x, g = torch.randn(rows, 96), torch.randn(rows, 40)
        add, grad_add = torch.randn(rows, 40), torch.randn(rows, 96)
        assert torch.allclose(forward.mm(x), x @ w.T, atol=1e-4)
        assert torch.allclose(forward.mm(x.T.contiguous().T), x @ w.T, atol=1e-4)  # column-major rows
        wide = torch.randn(rows, 200)
        assert torch.allclose(forward.mm(wide[:, 50:146]), wide[:, 50:146] @ w.T, atol=1e-4)  # rows in a wider one
        assert torch.allclose(forward.mm(x, add.clone()), x @ w.T + add, atol=1e-4)
        assert torch.allclose(backward.mm(g), g @ w, atol=1e-4)
        assert torch.allclose(backward.mm(g, grad_add.clone()), g @ w + grad_add, atol=1e-4)
    assert forward.valid() and not copy.deepcopy(forward).valid()


@pytest.mark.parametrize("intel", [True, False])
def test_on_intel_cpus_only_a_streamed_weight_goes_through_onednn(monkeypatch, intel):
    """Where oneDNN is used (x86-64), an Intel CPU sends it only products whose weight is larger than the
    caches (Gemma's 262k-row output layer); MKL computes the decoder's and LoRA's. Other CPUs send all."""
    import torch

    from emojitune import matmul

    monkeypatch.setattr(matmul, "onednn", lambda: True)
    monkeypatch.setattr(matmul, "intel_cpu", lambda: intel)
    x = torch.randn(3, 640)
    decoder_weight = torch.randn(2048, 640)
    output_layer = torch.zeros(1, 640).expand(262144, 640)  # 262k x 640 elements, no memory
    assert matmul.uses_onednn(x, output_layer)
    assert matmul.uses_onednn(x, decoder_weight) == (not intel)
    assert not matmul.uses_onednn(x.double(), output_layer.double())  # float32 only


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_three_turn_conversation_carries_loss_on_every_answer_token_by_token(lm, system):
    """The ids of a 3-turn conversation are those of the chat template for the whole conversation, and the
    labels are set exactly on each answer's emoji and its <end_of_turn>: the spans the template itself puts
    between the prompt asking for an answer and the end of that turn."""
    from emojitune.chat import conversation_example

    tok = lm.tokenizer
    turns = [("今日は最高の一日", "😀"), ("電車で寝過ごした…", "😭"), ("夜道で足音がついてくる", "😨")]
    ex = conversation_example(tok, system, turns, lm.end_of_turn_id)
    messages = [{"role": "system", "content": system}] if system else []
    for tweet, emoji in turns:
        messages += [{"role": "user", "content": tweet}, {"role": "assistant", "content": emoji}]
    whole = list(tok.apply_chat_template(messages, return_dict=False))
    assert ex.input_ids == whole[:len(ex.input_ids)]
    assert tok.decode(whole[len(ex.input_ids):]) == "\n"  # the template's newline after the last turn
    expected = [IGNORE] * len(ex.input_ids)
    first_user = 1 if system else 0
    for k in range(len(turns)):
        asking = messages[:first_user + 2 * k + 1]  # everything up to this turn's tweet
        start = len(tok.apply_chat_template(asking, add_generation_prompt=True, return_dict=False))
        end = whole.index(lm.end_of_turn_id, start)
        expected[start:end + 1] = whole[start:end + 1]
    assert ex.labels == expected
    scored = [tok.convert_ids_to_tokens(t) if t == lm.end_of_turn_id else tok.decode([t])
              for t in ex.labels if t != IGNORE]
    assert "".join(scored) == "😀<end_of_turn>😭<end_of_turn>😨<end_of_turn>"
    assert ex.answers == 3
    # One turn is exactly the single-turn example.
    [single] = encode(lm, [Record(system, *turns[0])])
    assert conversation_example(tok, system, turns[:1], lm.end_of_turn_id) == single
    assert single == Example.of(prompt_ids(tok, system, turns[0][0]), answer_ids(tok, "😀", lm.end_of_turn_id))


def test_prompt_with_history_continues_the_training_ids(lm):
    """05/06 --history build the earlier turns exactly as training does, then ask for the next answer."""
    from emojitune.chat import conversation_example

    history = [("今日は最高", "😀"), ("泣いた", "😭")]
    trained = conversation_example(lm.tokenizer, SYSTEM, history + [("怖い", "😨")], lm.end_of_turn_id)
    prompt = prompt_ids(lm.tokenizer, SYSTEM, "怖い", history, lm.end_of_turn_id)
    answer = answer_ids(lm.tokenizer, "😨", lm.end_of_turn_id)
    assert trained.input_ids == prompt + answer


def test_fast_loss_equals_the_models_own_loss_on_conversations(lm):
    """Several answers per row, rows of different lengths: the answer-only path still equals the plain loss."""
    import torch

    records = [Record(SYSTEM, "怖い", "😨", history=[("今日は最高の一日", "😀"), ("泣いた", "☹️")]),
               Record(None, "笑った", "🤣"), Record(SYSTEM, "寝過ごした", "😭", history=[("眠い", "😴")])]
    examples = encode(lm, records)
    assert [e.answers for e in examples] == [3, 1, 2]
    ids, mask, labels = collate(examples, pad_id(lm.tokenizer), "cpu")
    with torch.no_grad():
        fast, _, rows = answer_token_losses(lm.model, ids, mask, labels)
        out = lm.model(input_ids=ids, attention_mask=mask, labels=labels)
    assert fast.mean().item() == pytest.approx(out.loss.item(), abs=1e-5)
    assert rows.bincount().tolist() == [e.answer_tokens for e in examples]
