"""03_train_model.py and 04_plot_loss.py on the tiny model."""

import math
from dataclasses import asdict

import pytest
from conftest import (SYSTEM, assert_same_epochs_and_adapter, assert_user_error, c_compiler_on_path, load_json,
                      run_script, shipped_subset, straight_and_resumed)


@pytest.fixture(scope="module")
def two_epochs(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("two-epochs")
    assert run_script("01_prepare_data.py", "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", "--model", tiny_model, "--epochs", 2, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r


def test_two_epoch_run_writes_its_files(two_epochs, tiny_model):
    d, r = two_epochs
    assert "epoch 1/2  train" in r.stdout and "epoch 2/2  train" in r.stdout
    metrics = load_json(d / "metrics.json")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert all(math.isfinite(e[k]) for k in ("train_loss", "val_loss", "val_accuracy"))
        assert 0 <= e["val_accuracy"] <= 1 and e["val_total"] == 50
    lowest = min(metrics["epochs"], key=lambda e: e["val_loss"])["epoch"]
    assert metrics["best_epoch"] == lowest and metrics["stopped_early"] is False
    # The curve: 200 steps per epoch at batch 1, a train-loss point every 10 steps, 4 evaluations per epoch.
    assert [s["step"] for s in metrics["steps"]] == list(range(10, 401, 10))
    assert all(s["epoch"] == s["step"] / 200 and math.isfinite(s["train_loss"]) for s in metrics["steps"])
    assert [(e["step"], e["epoch"]) for e in metrics["evals"]] == [(50 * i, i / 4) for i in range(1, 9)]
    for e in metrics["evals"]:
        assert set(e) == {"step", "epoch", "val_loss", "val_accuracy", "per_label"}
        assert sum(c["total"] for c in e["per_label"].values()) == 50 and len(e["per_label"]) == 25
        assert sum(c["correct"] for c in e["per_label"].values()) == round(e["val_accuracy"] * 50)
    for row in metrics["epochs"]:  # the end-of-epoch evaluation is the epoch's
        end = next(e for e in metrics["evals"] if e["epoch"] == row["epoch"])
        assert (end["val_loss"], end["val_accuracy"]) == (row["val_loss"], row["val_accuracy"])
        points = [s for s in metrics["steps"] if row["epoch"] - 1 < s["epoch"] <= row["epoch"]]
        assert row["train_loss"] == pytest.approx(sum(s["train_loss"] for s in points) / len(points), rel=0.2)
    assert sorted(p.name for p in d.iterdir()) == ["adapter", "data", "epochs", "metrics.json", "resume.pt",
                                                   "run.json"]
    assert sorted(p.name for p in (d / "epochs").iterdir()) == ["epoch-1", "epoch-2"]
    for folder in (d / "adapter", d / "epochs/epoch-1", d / "epochs/epoch-2"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
        assert not any(n.endswith(".bin") for n in names)
    run = load_json(d / "run.json")
    assert run["base_model"] == str(tiny_model) and run["finished"] is True
    from emojitune.training import TrainSettings

    recipe = asdict(TrainSettings(epochs=2))  # run.json records the settings the run used
    assert {k: run["settings"][k] for k in recipe if k not in ("model", "device")} == \
        {k: v for k, v in recipe.items() if k not in ("model", "device")}
    assert run["dtype"] == "float32" and run["system_prompt"] == SYSTEM
    assert len(run["data"]["train_sha256"]) == 64 and run["versions"]["transformers"]


def test_adapters_load_with_plain_peft_and_only_lora_changed(two_epochs, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, _ = two_epochs
    original = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for folder in ("epochs/epoch-1", "epochs/epoch-2", "adapter"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), d / folder)
        state = model.state_dict()
        lora_b = [v for k, v in state.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: trained if non-zero
        for k, v in state.items():
            if "lora_" not in k:
                plain = k.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(v, original[plain]), k
    from emojitune.training import TrainSettings

    last = load_json(d / "epochs/epoch-2/adapter_config.json")
    assert last["r"] == TrainSettings.lora_r and last["lora_alpha"] == TrainSettings.lora_alpha


def test_train_before_split_names_the_step(tmp_path, tiny_model):
    r = run_script("03_train_model.py", "--model", tiny_model, "--checkpoint-dir", tmp_path)
    assert_user_error(r, "run 02_split_data.py first")


def test_bad_flags_fail_fast(tmp_path, tiny_model):
    assert run_script("01_prepare_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", tmp_path).returncode == 0
    assert_user_error(run_script("03_train_model.py", "--model", tmp_path / "nope", "--checkpoint-dir", tmp_path),
                      "--model", "no such folder")
    assert_user_error(run_script("03_train_model.py", "--model", tmp_path / "data", "--checkpoint-dir", tmp_path),
                      "no config.json")
    assert_user_error(run_script("03_train_model.py", "--epochs", 0, "--lora-dropout", 1.5, "--weight-decay", -1,
                                 "--max-grad-norm", -1, "--checkpoint-dir", tmp_path),
                      "--epochs 0", "--lora-dropout 1.5", "--weight-decay -1", "--max-grad-norm -1")
    assert_user_error(run_script("03_train_model.py", "--model", "google/gemma-3-270m-it",
                                 "--checkpoint-dir", tmp_path, env={"HF_HUB_OFFLINE": "1"}),
                      "google/gemma-3-270m-it", "not in the local Hugging Face cache", "--model PATH")
    import torch

    if not torch.cuda.is_available():
        assert_user_error(run_script("03_train_model.py", "--model", tiny_model, "--device", "cuda",
                                     "--checkpoint-dir", tmp_path), "--device cuda", "--device cpu")
    assert not (tmp_path / "run.json").exists()


def test_no_silent_overwrite(two_epochs, tiny_model):
    d, _ = two_epochs
    before = (d / "metrics.json").read_bytes()
    assert_user_error(run_script("03_train_model.py", "--model", tiny_model, "--checkpoint-dir", d),
                      "already holds a trained adapter", "--overwrite", "--checkpoint-dir")
    assert_user_error(run_script("01_prepare_data.py", "--labels", "😀,😭", "--checkpoint-dir", d),
                      "would change", "--overwrite")
    assert_user_error(run_script("02_split_data.py", "--seed", 1, "--checkpoint-dir", d), "would change")
    # Re-running with the same data changes nothing and is allowed.
    assert run_script("01_prepare_data.py", "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    assert (d / "metrics.json").read_bytes() == before


def test_resume_reaches_the_same_metrics(tmp_path, tiny_model):
    straight, resumed, _ = straight_and_resumed(tmp_path, "--model", tiny_model, "--batch-size", 4, "--lr", "3e-3",
                                                "--log-every", 3)
    assert_same_epochs_and_adapter(straight, resumed, ("epoch", "train_loss", "val_loss", "val_accuracy"))
    # The curve continues exactly: 8 steps per epoch, points at steps 3, 6, 8 of each, 4 evaluations each.
    a, b = load_json(straight / "metrics.json"), load_json(resumed / "metrics.json")
    assert a["steps"] == b["steps"] and a["evals"] == b["evals"]
    assert [s["step"] for s in b["steps"]] == [3, 6, 8, 11, 14, 16, 19, 22, 24]
    assert [e["step"] for e in b["evals"]] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]
    bad = run_script("03_train_model.py", "--resume", "--lr", "1e-4", "--epochs", 4, "--checkpoint-dir", resumed)
    assert_user_error(bad, "--lr", "run used")


def test_early_stopping_on_a_run_that_overfits(tmp_path, tiny_model):
    """A learning rate far too high for 32 tweets: val loss bottoms out early and rises after."""
    d = tmp_path / "run"
    data = shipped_subset(tmp_path / "small.json", 40)
    assert run_script("01_prepare_data.py", "--input", data, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", "--model", tiny_model, "--epochs", 30, "--lr", "3e-2", "--batch-size", 8,
                   "--evals-per-epoch", 1, "--early-stopping", 2, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = load_json(d / "metrics.json")
    best, last = metrics["best_epoch"], metrics["epochs"][-1]["epoch"]
    assert last == best + 2 < 30
    assert metrics["stopped_early"] is True and metrics["stopped_after_epoch"] == last
    assert all(e["val_loss"] >= metrics["epochs"][best - 1]["val_loss"] for e in metrics["epochs"][best:])
    assert f"stopped early after epoch {last}" in r.stdout and f"val loss lowest at epoch {best}" in r.stdout
    assert sorted(p.name for p in (d / "epochs").iterdir()) == [f"epoch-{n}" for n in range(1, last + 1)]
    assert (d / "adapter/adapter_model.safetensors").read_bytes() == \
        (d / f"epochs/epoch-{last}/adapter_model.safetensors").read_bytes()
    assert load_json(d / "run.json")["finished"] is True
    # Resuming a stopped run would stop again at once: 03 says how to train it further instead.
    assert_user_error(run_script("03_train_model.py", "--resume", "--epochs", 40, "--checkpoint-dir", d),
                      f"stopped early after epoch {last}", "--early-stopping 0")


def test_evaluations_during_the_epoch_leave_training_unchanged(tmp_path, tiny_model):
    from emojitune.checkpoints import CheckpointDir
    from emojitune.data import prepare
    from emojitune.split import split
    from emojitune.training import TrainSettings, train

    data = shipped_subset(tmp_path / "s.json", 40)
    results = []
    for k in (1, 3):
        cp = CheckpointDir(tmp_path / f"evals-{k}")
        prepare(data, cp)
        split(cp)
        settings = TrainSettings(model=str(tiny_model), epochs=2, batch_size=4, lr=3e-3, device="cpu",
                                 evals_per_epoch=k, log_every=2)
        results.append(train(cp, settings))
    one, three = results
    assert [(e["train_loss"], e["val_loss"]) for e in one["epochs"]] == \
        [(e["train_loss"], e["val_loss"]) for e in three["epochs"]]
    assert one["steps"] == three["steps"]
    assert [e["step"] for e in one["evals"]] == [8, 16] and [e["step"] for e in three["evals"]] == [3, 6, 8, 11, 14, 16]


def tiny_lora(tiny_model, dropout: float, training: bool):
    """The tiny model with a new LoRA (seed 0) whose B matrices are not zero, so the LoRA path changes
    the outputs and gradients flow through every LoRA matrix."""
    import torch
    from peft import LoraConfig

    from emojitune.modeling import load_model

    torch.manual_seed(0)
    lm = load_model(str(tiny_model), "cpu", training=training,
                    lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return lm


@pytest.mark.parametrize("copies", [1, 5])  # 3 tweets: output_pass's kernel (or 2 passes); 15: the one-pass loss
def test_a_training_step_follows_the_gradient_of_the_plain_hugging_face_loss(tiny_model, copies, output_kernel):
    """03's loss path (answer rows only, CPU output layer) gives the gradient of the loss a plain
    transformers user would write, `model(..., labels=labels).loss`, for the same LoRA weights; below a
    dozen answer rows with output_pass's kernel and without it."""
    import torch

    from emojitune.chat import collate, encode, pad_id
    from emojitune.data import Record
    from emojitune.loss import answer_loss_module

    lm = tiny_lora(tiny_model, dropout=0.0, training=True)
    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    ids, mask, labels = collate(encode(lm, records * copies), pad_id(lm.tokenizer), "cpu")
    params = [p for p in lm.model.parameters() if p.requires_grad]
    ours = answer_loss_module(lm.model)(ids, mask, labels) / (labels != -100).sum()
    ours_grad = torch.autograd.grad(ours, params)
    plain = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    plain_grad = torch.autograd.grad(plain, params)
    assert ours.item() == pytest.approx(plain.item(), abs=1e-5)
    for a, b in zip(ours_grad, plain_grad):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_leaves_out_the_last_position_only_without_dropout(tiny_model, dropout):
    """The last position predicts no label: the training loss runs the decoder without it when no dropout
    mask is drawn (--lora-dropout 0; the gradient test above checks those numbers against the plain loss),
    and on the whole batch with dropout, whose masks are drawn for the shape they are given."""
    import torch

    from emojitune.chat import collate, encode, pad_id
    from emojitune.data import Record
    from emojitune.loss import answer_loss_module, causal_lm_of

    lm = tiny_lora(tiny_model, dropout=dropout, training=True)
    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️")]
    ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
    seen = []
    causal_lm_of(lm.model).get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[1]))
    loss = answer_loss_module(lm.model)(ids, mask, labels)
    loss.backward()
    assert seen == [ids.shape[1] - (dropout == 0)]


def kernel_expected() -> bool:
    """Whether dropout_masks' C kernel should be in use here: a C compiler on the PATH, and a PyTorch that
    draws bernoulli_ masks one element at a time from its Mersenne Twister, as the kernel does. That is
    checked against torch's own uniform draws: the mask is exactly `rand(float64) < keep` from the same
    state (PyTorch builds that draw these masks another way, such as through MKL, leave the kernel unused)."""
    import torch

    state = torch.get_rng_state()
    torch.manual_seed(5)
    mask = torch.empty(3000).bernoulli_(0.9)
    torch.manual_seed(5)
    serial = torch.equal(mask, (torch.rand(3000, dtype=torch.float64) < 0.9).float())
    torch.set_rng_state(state)
    return c_compiler_on_path() and serial


@pytest.fixture(params=["kernel", "torch"])
def mask_drawer(request, monkeypatch):
    """dropout_masks with its C kernel (where it builds here) and with torch's own draws (as without a C
    compiler: CC names none)."""
    from emojitune import dropout_masks

    dropout_masks._kernel.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("CC", "no-such-compiler")
    yield request.param
    dropout_masks._kernel.cache_clear()  # the next user compiles it again with the real environment


@pytest.mark.parametrize("keep", [0.95, 0.7, 0.5])
def test_dropout_masks_are_the_masks_torch_draws(mask_drawer, keep):
    """The masks of dropout_masks.masked_input are `empty_like(x).bernoulli_(keep)`'s from the same
    state, for shapes that end inside and across the generator's 624-word refills and from any position
    in its stream; x * mask comes with them, and the generator is left where torch's draw leaves it."""
    import torch

    from emojitune import dropout_masks

    assert dropout_masks.uses_kernel() == (mask_drawer == "kernel" and kernel_expected())
    torch.manual_seed(3)
    for shape in [(1, 1), (1, 5, 64), (2, 311, 3), (880, 40)]:
        for drawn_before in [0, 1, 5, 623]:
            torch.rand(drawn_before)  # one 32-bit word each: the masks start at odd and even positions
            x = torch.randn(shape)
            state = torch.get_rng_state()
            torch_mask = torch.empty_like(x).bernoulli_(keep)
            after = torch.get_rng_state()
            torch.set_rng_state(state)
            xm, mask = dropout_masks.masked_input(x, keep)
            assert torch.equal(mask.to(x.dtype), torch_mask), (shape, drawn_before)
            assert torch.equal(xm, x * torch_mask)
            assert torch.equal(torch.get_rng_state(), after)
    assert 0 < float(torch_mask.mean()) < 1 and torch.initial_seed() == 3


@pytest.mark.parametrize("products", ["transposed-copies", "weights-as-they-are", "mkl-packed"])
def test_fused_lora_layers_give_peft_numbers_with_the_same_dropout_masks(tiny_model, mask_drawer, monkeypatch,
                                                                         products):
    """fused_lora's CPU path draws the dropout masks PEFT's layers draw (same seed, same order) and gives
    their loss and gradients to float rounding; the random state after a step is the same too. With the
    C kernel's masks and with torch's; with the input gradient read from transposed copies of the weights
    (small batches on AMD CPUs), from the weights themselves (large ones), and with every frozen product
    from MKL's packed copies of the weights (Intel CPUs)."""
    import torch

    from emojitune import dropout_masks, fused_lora, matmul
    from emojitune.chat import collate, encode, pad_id
    from emojitune.data import Record

    assert dropout_masks.uses_kernel() == (mask_drawer == "kernel" and kernel_expected())
    if products == "mkl-packed":
        if matmul._mkl() is None:
            pytest.skip("this PyTorch does not export MKL's packing functions (Linux x86-64 wheels do)")
        assert matmul.mkl_packing()  # exported: then they must pass the check
    # packing is chosen on Intel CPUs by the batch size: batch 1 packs, batch 8 does not (checked below)
    monkeypatch.setattr(fused_lora, "intel_cpu", lambda: True)
    if products == "weights-as-they-are":
        monkeypatch.setattr(fused_lora, "TRANSPOSED_BACKWARD_ROWS", 0)
    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    results = []
    for fused in (False, True):
        lm = tiny_lora(tiny_model, dropout=0.3, training=True)
        batch_size = 1 if products == "mkl-packed" else 2 * fused_lora.PACKED_BATCH_SIZE
        routed = fused_lora.install(lm.model, batch_size) if fused else 0
        ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
        params = [p for p in lm.model.parameters() if p.requires_grad]
        torch.manual_seed(1)
        loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        results.append((routed, loss.item(), torch.autograd.grad(loss, params), torch.rand(3)))
        if fused:
            groups = {m._fused_group for m in lm.model.modules() if getattr(m, "_fused_group", None)}
            assert all((g.packed is not None) == (products == "mkl-packed") for g in groups)
    (_, plain_loss, plain_grad, plain_rng), (routed, fused_loss, fused_grad, fused_rng) = results
    layers = 2 * 7  # the tiny model's decoder layers x (q, k, v, o, gate, up, down)
    assert routed == layers
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)  # float32 rounding of a loss of ~17
    for a, b in zip(fused_grad, plain_grad):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert torch.equal(fused_rng, plain_rng)  # as many random numbers drawn: the next masks match too


def test_fused_norms_give_the_numbers_of_transformers_own(tiny_model):
    """fused_norm routes every Gemma 3 RMSNorm of the model through its kernel, and a training loss and its
    gradients are the ones transformers' own layers give, to float rounding."""
    import torch

    from emojitune import fused_lora, fused_norm
    from emojitune.chat import collate, encode, pad_id
    from emojitune.data import Record

    records = [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️"), Record(SYSTEM, "怖い", "😨")]
    results = []
    for fused in (False, True):
        lm = tiny_lora(tiny_model, dropout=0.0, training=True)
        fused_lora.install(lm.model)
        routed = fused_norm.install(lm.model) if fused else 0
        paths = []
        for name, module in lm.model.named_modules():
            if type(module).__name__ == "Gemma3RMSNorm":
                module.register_forward_hook(lambda m, args, out, name=name: paths.append(
                    (name.split(".")[-1], type(out.grad_fn).__name__)))
        ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
        params = [p for p in lm.model.parameters() if p.requires_grad]
        loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        results.append((routed, loss.item(), torch.autograd.grad(loss, params)))
    (_, plain_loss, plain_grad), (routed, fused_loss, fused_grad) = results
    # the tiny model's 2 decoder layers x (4 around attention and the MLP + queries' + keys') + the final norm
    assert routed == (2 * 6 + 1 if c_compiler_on_path() else 0)
    if routed:  # every one through the kernel, the queries and keys (views in the q/k/v product's output) too;
        # the first norm reads the frozen embeddings: its output needs no gradient
        assert paths[0] == ("input_layernorm", "NoneType")
        assert len(paths) == 13 and all(path == "FusedRmsNormBackward" for _, path in paths[1:]), paths
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(fused_grad, plain_grad):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_a_fused_norm_takes_the_layers_own_way_where_the_kernel_does_not_apply(tiny_model, monkeypatch):
    """The kernel normalizes contiguous inputs and the attention's per-head views of the queries inside the
    fused q/k/v product's output (rows at two levels of strides), with an output gradient in any layout; a
    strided last dimension, rows at more than two levels, float64 and a trained norm weight run transformers'
    own layer, with the same results; without a C compiler nothing is routed."""
    import torch

    from emojitune import fused_norm
    from emojitune.modeling import load_model

    if not c_compiler_on_path():
        pytest.skip("no C compiler here: nothing is routed (checked below)")
    norm = load_model(str(tiny_model), "cpu", training=True).model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    norm.weight.requires_grad_(False)
    d = norm.weight.shape[0]
    assert fused_norm.install(norm) == 1
    torch.manual_seed(0)
    cases = [(torch.randn(2, 5, d), "Fused"), (torch.randn(2, 5, 3, d).transpose(1, 2), "Fused"),
             (torch.randn(2, 5, 5 * d)[..., :3 * d].view(2, 5, 3, d).transpose(1, 2), "Fused"),
             (torch.randn(2, 5, 2 * d)[..., ::2], "Mul"), (torch.randn(2, 3, 3, 3, 2 * d)[:, :2, :2, :2, :d], "Mul"),
             (torch.randn(2, 5, d, dtype=torch.float64), "ToCopy")]
    for x, path in cases:
        x.requires_grad_(True)
        y = norm(x)
        assert type(y.grad_fn).__name__.startswith(path), (x.stride(), y.grad_fn)
        grad_y = torch.randn(y.shape[::-1], dtype=y.dtype).permute(*reversed(range(y.dim())))  # another layout
        expected = type(norm).forward(norm, x)
        assert torch.allclose(y, expected, atol=1e-6, rtol=1e-5)
        assert torch.allclose(torch.autograd.grad(y, x, grad_y)[0], torch.autograd.grad(expected, x, grad_y)[0],
                              atol=1e-5, rtol=1e-5)
    norm.weight.requires_grad_(True)
    y = norm(torch.randn(2, 5, d))
    assert type(y.grad_fn).__name__.startswith("Mul")  # transformers' layer: its weight gets a gradient
    fused_norm._kernel.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    try:
        assert fused_norm.install(norm) == 0
    finally:
        fused_norm._kernel.cache_clear()


@pytest.mark.skipif(not c_compiler_on_path(), reason="no C compiler on the PATH")
def test_training_on_cpu_starts_each_kernel_build_before_the_model_loads(tmp_path, tiny_model, monkeypatch):
    """Training on CPU starts its C kernels' builds (cbuild.start) before transformers is imported and the model
    loaded, so the compiler runs beside those, and each kernel's first use takes its started build: every
    source is compiled once. A build started under other compiler settings is not taken."""
    import shutil
    from pathlib import Path

    from emojitune import cbuild, dropout_masks, fused_norm, output_pass, training
    from emojitune.checkpoints import CheckpointDir
    from emojitune.data import prepare
    from emojitune.split import split

    real = next(shutil.which(c[0]) for c in cbuild.compilers() if shutil.which(c[0]))
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    kernels = (dropout_masks._kernel, fused_norm._kernel, output_pass._kernel)
    for kernel in kernels:
        kernel.cache_clear()
    monkeypatch.setenv("CC", str(wrapper))
    started_at_load = []  # the sources whose builds (with this compiler) were started when the model began to load
    real_load = training.load_model
    monkeypatch.setattr(training, "load_model", lambda *a, **k: started_at_load.extend(
        sorted(key[0].name for key in cbuild._started if key[2] == str(wrapper))) or real_load(*a, **k))
    try:
        cp = CheckpointDir(tmp_path / "run")
        prepare(shipped_subset(tmp_path / "s.json", 12), cp)
        split(cp)
        training.train(cp, training.TrainSettings(model=str(tiny_model), epochs=1, device="cpu"))
        assert all(kernel() is not None for kernel in kernels)
        compiles = [line.split() for line in log.read_text().splitlines()]
        sources = sorted(Path(args[-2]).name for args in compiles)
        assert sources == ["dropout_mask.c", "output_pass.c", "rms_norm.c"], compiles
        assert started_at_load == sources

        cbuild.start(dropout_masks.SOURCE)  # with the logging compiler
        monkeypatch.setenv("CC", "no-such-compiler")
        assert cbuild.build(dropout_masks.SOURCE) is None
    finally:
        for kernel in kernels:
            kernel.cache_clear()  # built again with the real environment by the next user


@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_fused_attention_gives_the_numbers_of_transformers_own(tiny_model, attention_dropout):
    """fused_attention routes every Gemma 3 attention layer, and a training loss and its gradients are the ones
    transformers' own layers give, to float rounding: a padded batch whose prompts are longer than the tiny
    model's sliding window (16 positions), so both kinds of mask are used. With attention dropout (which the
    fused function does not draw) the layers take their own forward, the same masks drawn."""
    import torch

    from emojitune import fused_attention, fused_lora, fused_norm
    from emojitune.chat import collate, encode, pad_id
    from emojitune.data import Record

    records = [Record(SYSTEM, "今日は最高の一日だった、ありがとう", "😀"), Record(None, "泣いた", "☹️"),
               Record(SYSTEM, "怖い", "😨")]
    results = []
    for fused in (False, True):
        lm = tiny_lora(tiny_model, dropout=0.0, training=True)
        lm.model.config.attention_dropout = attention_dropout
        for module in lm.model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = attention_dropout  # read from the config when the layer was built
        fused_lora.install(lm.model)
        fused_norm.install(lm.model)
        routed = fused_attention.install(lm.model) if fused else 0
        ids, mask, labels = collate(encode(lm, records), pad_id(lm.tokenizer), "cpu")
        assert ids.shape[1] > 16 and (mask == 0).any()
        params = [p for p in lm.model.parameters() if p.requires_grad]
        torch.manual_seed(1)
        # without a KV cache, as training runs the decoder (with one the layers take their own forward)
        loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        results.append((routed, loss.item(), torch.autograd.grad(loss, params), torch.rand(3)))
    (_, plain_loss, plain_grad, plain_rng), (routed, fused_loss, fused_grad, fused_rng) = results
    assert routed == 2  # the tiny model's decoder layers
    assert fused_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(fused_grad, plain_grad):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert torch.equal(fused_rng, plain_rng)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.01])
def test_a_training_step_clips_the_gradient_of_every_trainable_tensor(tiny_model, max_grad_norm):
    """--max-grad-norm: the optimizer steps with the LoRA gradients scaled to that total norm (0: as they
    are), every trainable tensor included."""
    import torch
    from accelerate import Accelerator

    from emojitune.chat import encode, pad_id
    from emojitune.data import Record
    from emojitune.loss import answer_loss_module
    from emojitune.training import TrainSettings, make_optimizer, train_step

    lm = tiny_lora(tiny_model, dropout=0.0, training=True)
    examples = encode(lm, [Record(SYSTEM, "今日は最高の一日", "😀"), Record(None, "泣いた", "☹️")])
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainSettings(), "cpu")
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append(
        (sum(p.grad is not None for p in params), float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params]))))))
    accelerator = Accelerator(cpu=True)
    train_step(accelerator, accelerator.prepare(answer_loss_module(lm.model)), optimizer, examples, [0, 1],
               [e.answer_tokens for e in examples], pad_id(lm.tokenizer), max_grad_norm)
    (with_grad, norm), = seen
    assert with_grad == len(params) == 2 * 7 * 2  # layers x LoRA layers x (A, B)
    assert norm == pytest.approx(0.01, rel=1e-3) if max_grad_norm else norm > 0.1


def test_fused_lora_steps_aside_when_the_adapter_is_off(tiny_model):
    """05 --compare answers as the base model through PEFT's disable_adapter(): the fused layers then
    give the base model's outputs, as PEFT's do."""
    import torch

    from emojitune import fused_lora

    lm = tiny_lora(tiny_model, dropout=0.05, training=False)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        with lm.model.disable_adapter():
            base = lm.model(input_ids=ids).logits
        tuned = lm.model(input_ids=ids).logits
        assert fused_lora.install(lm.model) > 0
        with lm.model.disable_adapter():
            assert torch.allclose(lm.model(input_ids=ids).logits, base, atol=1e-5)
        assert torch.allclose(lm.model(input_ids=ids).logits, tuned, atol=1e-5)
        assert not torch.allclose(base, tuned, atol=1e-3)


def test_plot_from_hand_made_metrics(tmp_path):
    """A metrics.json written before steps/evals existed still plots, from its epochs alone."""
    from emojitune.checkpoints import write_json

    write_json(tmp_path / "metrics.json", {"epochs": [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 1.22, "val_accuracy": 0.3},
        {"epoch": 2, "train_loss": 1.1, "val_loss": 1.24, "val_accuracy": 0.4},
        {"epoch": 3, "train_loss": 0.4, "val_loss": 1.71, "val_accuracy": 0.38}], "best_epoch": 1})
    r = run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "← best" in r.stdout and "1.7100" in r.stdout
    assert_user_error(run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path / "empty"),
                      "metrics.json not found", "run 03_train_model.py first")


def curve_metrics(epochs: int, val: list[float], steps_per_epoch: int = 20, log_every: int = 5) -> dict:
    """metrics.json as 03 writes it, with 4 evaluations per epoch whose val losses are `val`."""
    steps = [{"step": s, "epoch": s / steps_per_epoch, "train_loss": 2.0 / (1 + s / steps_per_epoch) + 0.1 * (s % 3)}
             for s in range(log_every, epochs * steps_per_epoch + 1, log_every)]
    evals = [{"step": steps_per_epoch * (i + 1) // 4, "epoch": (i + 1) / 4, "val_loss": v, "val_accuracy": 0.1 + i / 100,
              "per_label": {"😀": {"correct": 1, "total": 2}}} for i, v in enumerate(val)]
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": val[4 * e - 1], "val_accuracy": 0.1 + (4 * e - 1) / 100,
             "val_correct": 1, "val_total": 2} for e in range(1, epochs + 1)]
    best = min(rows, key=lambda r: (r["val_loss"], r["epoch"]))["epoch"]
    return {"epochs": rows, "best_epoch": best, "steps": steps, "evals": evals, "stopped_early": False}


@pytest.mark.parametrize("epochs", [1, 30])
def test_plot_of_a_curve(tmp_path, epochs):
    from emojitune.checkpoints import write_json

    val = [1.5 - 0.1 * i if i < 6 else 1.0 + 0.05 * (i - 6) for i in range(4 * epochs)]
    write_json(tmp_path / "metrics.json", curve_metrics(epochs, val))
    r = run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG") and "Traceback" not in r.stderr
    assert len(r.stdout.splitlines()) == epochs + 2  # header, one row per epoch, wrote ...


def test_smoothing_follows_the_points_without_lag():
    from emojitune.plotting import smoothed, smoothing_window

    assert smoothed([1.0, 3.0, 1.0, 3.0, 1.0], 3) == pytest.approx([2.0, 5 / 3, 7 / 3, 5 / 3, 2.0])
    assert smoothing_window(20, 1) == 5 and smoothing_window(600, 30) == 25 and smoothing_window(3, 1) == 1


def test_show_without_a_display_says_why(tmp_path):
    from emojitune.checkpoints import write_json

    write_json(tmp_path / "metrics.json", curve_metrics(1, [1.4, 1.3, 1.2, 1.1]))
    r = run_script("04_plot_loss.py", "--show", "--checkpoint-dir", tmp_path, env={"MPLBACKEND": "agg"})
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --show opened no window: MPLBACKEND=agg")
    assert str(tmp_path / "loss.png") in warnings[0] and (tmp_path / "loss.png").exists()


def test_compare_runs(tmp_path):
    from emojitune.checkpoints import write_json

    settings = {"epochs": 2, "lr": 5e-05, "batch_size": 1, "seed": 42, "device": "auto"}
    runs = {"base-recipe": ([1.5, 1.3, 1.2, 1.1, 1.15, 1.2, 1.3, 1.4], {}),
            "fast": ([1.4, 1.2, 1.0, 0.95, 0.9, 0.85, 0.88, 0.9], {"lr": 2e-4, "batch_size": 16}),
            "old": ([1.6, 1.5, 1.4, 1.3, 1.35, 1.3, 1.25, 1.2], None)}  # no run.json: a hand-made folder
    for name, (val, changed) in runs.items():
        write_json(tmp_path / name / "metrics.json", curve_metrics(2, val))
        if changed is not None:
            write_json(tmp_path / name / "run.json", {"settings": {**settings, **changed}})
    r = run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path / "base-recipe", "--compare", tmp_path / "fast",
                   tmp_path / "old")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:4]}
    assert rows["base-recipe"][1:5] == ["(lr=5e-05,", "batch-size=1)", "1", "1.1000"]
    assert rows["fast"][1:5] == ["(lr=0.0002,", "batch-size=16)", "2", "0.9000"]
    assert rows["old"][1:3] == ["2", "1.2000"]
    assert (tmp_path / "base-recipe/compare.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "base-recipe/loss.png").exists()
    r = run_script("04_plot_loss.py", "--checkpoint-dir", tmp_path / "fast", "--compare", tmp_path / "nope1",
                   tmp_path / "nope2")
    assert_user_error(r, "nope1/metrics.json not found", "nope2/metrics.json not found", "run 03_train_model.py first")


def test_epoch_batches_cover_every_example_once_and_are_stable():
    from emojitune.training import epoch_batches

    lengths = [10 + (i * 7) % 40 for i in range(200)]
    for batch in (1, 8, 16):
        a = epoch_batches(lengths, batch, seed=42, epoch=2)
        assert sorted(i for b in a for i in b) == list(range(200))
        assert a == epoch_batches(lengths, batch, seed=42, epoch=2)
        assert a != epoch_batches(lengths, batch, seed=42, epoch=3)
    # Grouping by length keeps padding small compared with random batches of the same size.
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    grouped = epoch_batches(lengths, 16, seed=42, epoch=1)
    ungrouped = [[i for b in epoch_batches(lengths, 1, seed=42, epoch=1) for i in b][j:j + 16]
                 for j in range(0, 200, 16)]
    assert padded(grouped) < padded(ungrouped)


def test_gradient_checkpointing_gives_the_same_numbers(tmp_path, tiny_model):
    from emojitune.checkpoints import CheckpointDir
    from emojitune.data import prepare
    from emojitune.split import split
    from emojitune.training import TrainSettings, train

    data = shipped_subset(tmp_path / "s.json", 30)
    results = []
    for gc in (False, True):
        cp = CheckpointDir(tmp_path / f"gc-{gc}")
        prepare(data, cp)
        split(cp)
        settings = TrainSettings(model=str(tiny_model), epochs=1, batch_size=4, lr=3e-3, device="cpu",
                                 lora_dropout=0.0, gradient_checkpointing=gc)
        results.append(train(cp, settings)["epochs"][0])
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"], abs=1e-5)
    assert results[0]["val_loss"] == pytest.approx(results[1]["val_loss"], abs=1e-5)


def test_gradient_checkpointing_is_switched_on_without_a_deprecation_note(tiny_model):
    """03 --gradient-checkpointing turns it on in every decoder layer, through the name the installed
    transformers does not warn about (5.2x renamed gradient_checkpointing_enable)."""
    import warnings

    from emojitune.modeling import enable_gradient_checkpointing

    lm = tiny_lora(tiny_model, dropout=0.0, training=True)
    layers = lm.model.get_base_model().model.layers
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_gradient_checkpointing(lm.model)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not [w for w in caught if "checkpointing" in str(w.message)]


def test_sharded_engines_are_refused_with_the_way_out():
    """FSDP/DeepSpeed configs would leave the optimizer on unsharded parameters: 03 says so instead."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from emojitune.console import UserError
    from emojitune.training import check_data_parallel

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_data_parallel(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match=f"{kind.value}.*accelerate launch --multi_gpu"):
            check_data_parallel(SimpleNamespace(distributed_type=kind))


def test_a_rerun_keeps_the_runs_model_and_stale_files_go(tmp_path, tiny_model):
    """`03 --overwrite` without --model trains the model run.json names (the README's advice after
    overfitting); --resume removes the plot and 05 results made from the unfinished run; a moved model
    folder is named as run.json's; a missing epoch names the saved ones."""
    import shutil

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model, model)
    d = tmp_path / "run"
    data = shipped_subset(tmp_path / "s.json", 20)
    assert run_script("01_prepare_data.py", "--input", data, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", "--model", model, "--epochs", 1, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("03_train_model.py", "--epochs", 1, "--overwrite", "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"model {model}" in r.stdout and "run.json" in r.stdout
    assert load_json(d / "run.json")["base_model"] == str(model)
    (d / "loss.png").write_bytes(b"old plot")
    (d / "eval_compare.json").write_text("{}")
    r = run_script("03_train_model.py", "--resume", "--epochs", 2, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (d / "loss.png").exists() and not (d / "eval_compare.json").exists()
    data = (d / "data/train.json").read_bytes()
    (d / "data/train.json").write_bytes(data.replace(b"]", b" ]", 1))  # other bytes, the same records
    assert_user_error(run_script("03_train_model.py", "--resume", "--epochs", 3, "--checkpoint-dir", d),
                      "train.json changed since the run started", "--overwrite")
    (d / "data/train.json").write_bytes(data)
    assert_user_error(run_script("06_test_finetuned_single.py", "--checkpoint", "epoch-5", "--checkpoint-dir", d,
                                 input="x\n"), "epoch-5 not found", "saved epochs are epoch-1, epoch-2",
                      "--checkpoint epoch-N")
    shutil.rmtree(model)
    for script in ("06_test_finetuned_single.py", "05_test_base.py", "03_train_model.py"):
        extra = ["--overwrite"] if script.startswith("03") else []
        assert_user_error(run_script(script, *extra, "--checkpoint-dir", d, input="x\n"),
                          "run.json names the base model folder", str(model), "--model PATH")


def test_chained_conversations_use_every_tweet_once_per_epoch():
    from emojitune.data import Record
    from emojitune.training import chain_turns

    records = [Record(SYSTEM if i % 3 else "別のプロンプト", f"tweet {i}", "😀") for i in range(40)]
    records += [Record(SYSTEM, "last", "😭", history=[("first", "😀")])]  # already a conversation
    for k in (2, 4):
        for epoch in (1, 2):
            chains = chain_turns(records, k, 42, epoch)
            assert sorted(i for c in chains for i in c) == list(range(len(records)))
            assert [40] in chains  # a conversation from the data stays as it is
            singles = [c for c in chains if c != [40]]
            assert all(len(c) <= k and len({records[i].system for i in c}) == 1 for c in singles)
            assert sum(len(c) < 2 for c in singles) <= 2  # only a system prompt's leftover is alone
            assert chains == chain_turns(records, k, 42, epoch)  # seeded: a resumed run draws the same
        assert chain_turns(records, k, 42, 1) != chain_turns(records, k, 42, 2)
    assert {len(c) for c in chain_turns(records, 4, 42, 1)} >= {2, 3, 4}


def test_multi_turn_training_resumes_exactly_and_is_recorded(tmp_path, tiny_model):
    straight, resumed, r = straight_and_resumed(tmp_path, "--model", tiny_model, "--batch-size", 4, "--lr", "3e-3",
                                                "--multi-turn", 3)
    assert "multi_turn=3" in r.stdout and "  chained val " in r.stdout
    assert load_json(straight / "run.json")["settings"]["multi_turn"] == 3
    assert_same_epochs_and_adapter(straight, resumed, ("epoch", "train_loss", "val_loss", "val_accuracy",
                                                       "chained_val_loss", "chained_val_accuracy"))
    a = load_json(straight / "metrics.json")
    # The chained measure scores every validation tweet once, like the single-turn one.
    assert all(e["chained_val_total"] == e["val_total"] == 8 for e in a["epochs"])
    assert a["epochs"][0]["chained_val_loss"] != a["epochs"][0]["val_loss"]  # history changes the numbers
    bad = run_script("03_train_model.py", "--resume", "--multi-turn", 2, "--epochs", 4, "--checkpoint-dir", resumed)
    assert_user_error(bad, "--multi-turn 2 (run used 3)")
    assert_user_error(run_script("03_train_model.py", "--multi-turn", 0, "--checkpoint-dir", tmp_path / "x"),
                      "--multi-turn 0 must be 1")
