"""03_train_model.py --engine trl (TRL's SFTTrainer) on the tiny model: the fast engine's files, numbers,
messages and resume behaviour."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import (LEARN_LABELS, ROOT, SYSTEM, assert_same_epochs_and_adapter, assert_user_error,
                      interrupt_after_first_epoch, load_json, one_and_two_processes, run_script, small_run_dir)

TRL = ("--engine", "trl")
RECIPE = ("--batch-size", 4, "--lr", "3e-3")
# What the fast engine writes (tests/test_training.py), with DIR/trl, the Trainer's state, for resume.pt.
RUN_FILES = ["adapter", "data", "epochs", "metrics.json", "run.json", "trl"]
ROW_KEYS = {"epoch", "train_loss", "val_loss", "val_accuracy", "val_correct", "val_total", "seconds", "eval_seconds"}
RUN_KEYS = {"base_model", "engine", "settings", "device", "dtype", "processes", "global_batch_size", "system_prompt",
            "data", "versions", "finished", "train_seconds", "best_epoch"}


@pytest.fixture(scope="module")
def trl_run(tiny_model, tmp_path_factory):
    """Three epochs with TRL on 40 shipped tweets (32 train / 8 validation)."""
    d = small_run_dir(tmp_path_factory.mktemp("trl"), "run")
    r = run_script("03_train_model.py", *TRL, "--model", tiny_model, *RECIPE, "--epochs", 3, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r


def test_trl_run_writes_the_fast_engines_files_and_report(trl_run, tiny_model):
    d, r = trl_run
    for n in (1, 2, 3):
        assert f"epoch {n}/3  train " in r.stdout
    assert "val loss lowest at" in r.stdout and "engine trl" in r.stdout
    assert "{'loss'" not in r.stdout + r.stderr  # the Trainer's log dicts are not printed
    assert sorted(p.name for p in d.iterdir()) == RUN_FILES
    assert sorted(p.name for p in (d / "epochs").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
    metrics = load_json(d / "metrics.json")
    assert set(metrics) == {"epochs", "best_epoch"} and [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    for row in metrics["epochs"]:
        assert set(row) == ROW_KEYS and row["val_total"] == 8 and 0 <= row["val_accuracy"] <= 1
    assert metrics["best_epoch"] == min(metrics["epochs"], key=lambda e: e["val_loss"])["epoch"]
    run = load_json(d / "run.json")
    assert set(run) == RUN_KEYS and run["finished"] is True and run["engine"] == "trl"
    assert run["settings"]["engine"] == "trl" and run["settings"]["batch_size"] == 4
    assert run["base_model"] == str(tiny_model) and run["dtype"] == "float32" and run["system_prompt"] == SYSTEM
    assert run["versions"]["trl"] and run["versions"]["datasets"] and run["versions"]["transformers"]
    for folder in (d / "adapter", *(d / "epochs").iterdir()):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert [p.name for p in (d / "trl").glob("checkpoint-*")] == ["checkpoint-24"]  # 3 epochs x 8 steps
    assert not list(d.rglob("*.tmp"))


def test_trl_adapters_load_with_plain_peft_and_the_next_steps_use_them(trl_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d, _ = trl_run
    original = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    for folder in ("epochs/epoch-1", "epochs/epoch-3", "adapter"):
        state = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), d / folder).state_dict()
        lora_b = [v for k, v in state.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: trained if non-zero
        for k, v in state.items():
            if "lora_" not in k:
                assert torch.equal(v, original[k.replace("base_model.model.", "").replace(".base_layer", "")]), k
    assert (d / "adapter/adapter_model.safetensors").read_bytes() == \
        (d / "epochs/epoch-3/adapter_model.safetensors").read_bytes()
    r = run_script("06_test_finetuned_single.py", "--checkpoint-dir", d, input="今日は最高の一日だった\n怖い夢を見た\n")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr[-2000:]
    r = run_script("06_test_finetuned_single.py", "--checkpoint", "best", "--top", 2, "--checkpoint-dir", d,
                   input="今日は最高の一日だった\n")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    r = run_script("05_test_base.py", "--compare", "--checkpoint-dir", d)
    assert r.returncode == 0 and (d / "eval_compare.json").exists(), r.stderr[-2000:]
    r = run_script("04_plot_loss.py", "--checkpoint-dir", d)
    assert r.returncode == 0 and (d / "loss.png").exists(), r.stderr[-2000:]


def test_trl_trains_on_the_fast_engines_examples_and_reports_with_its_scorer(tiny_model, tmp_path):
    """The untrained model gets the same val loss from both engines; TRL's training sequences are the fast
    engine's plus the newline the chat template writes after <end_of_turn>; the epoch's train loss is the
    mean answer-token loss of those sequences (a learning rate too small to move the weights)."""
    import torch
    from peft import LoraConfig

    from emojitune import trl_engine
    from emojitune.chat import Example, encode, pad_id
    from emojitune.checkpoints import CheckpointDir
    from emojitune.modeling import load_model
    from emojitune.scoring import score
    from emojitune.training import TrainSettings, read_split

    cp = CheckpointDir(small_run_dir(tmp_path, "run", 20))
    settings = TrainSettings(model=str(tiny_model), engine="trl", device="cpu", epochs=1, batch_size=4, lr=1e-9,
                             lora_dropout=0.0)
    train_records, val_records = read_split(cp)
    lm = load_model(settings.model, "cpu", training=True)
    val = encode(lm, val_records)
    reporter = trl_engine.EpochReport(cp, settings, val, pad_id(lm.tokenizer), [])
    trainer = trl_engine.make_trainer(lm, settings, trl_engine.sft_config(cp, settings),
                                      trl_engine.conversations(train_records), reporter)

    torch.manual_seed(settings.seed)
    fast = load_model(settings.model, "cpu", training=True, lora=LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM"))
    fast_scores = score(fast.model, encode(fast, val_records), pad_id(fast.tokenizer), "cpu")
    trl_scores = trl_engine.validation_scores(trainer, val, pad_id(lm.tokenizer))
    assert trl_scores.mean_loss == pytest.approx(fast_scores.mean_loss, abs=1e-4)
    assert trl_scores.exact == fast_scores.exact

    trl_examples = [Example(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    tail = None
    for ours, theirs, record in zip(encode(lm, train_records), trl_examples, train_records, strict=True):
        assert theirs.input_ids[:len(ours.input_ids)] == ours.input_ids
        assert theirs.labels[:len(ours.labels)] == ours.labels
        assert tail in (None, theirs.input_ids[len(ours.input_ids):])
        tail = theirs.input_ids[len(ours.input_ids):]
    assert lm.tokenizer.decode(tail) == "\n"
    expected = score(trainer.model, trl_examples, pad_id(lm.tokenizer), "cpu").mean_loss
    trainer.train()
    assert reporter.epochs[0]["train_loss"] == pytest.approx(expected, abs=1e-4)


def test_trl_learns_four_labels(tiny_model, tmp_path):
    """The learning run of conftest.learned_run, trained by TRL: 06 answers the training tweets."""
    d = tmp_path / "learned"
    assert run_script("01_prepare_data.py", "--labels", LEARN_LABELS, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", *TRL, "--model", tiny_model, "--epochs", 40, "--lr", "1e-2",
                   "--batch-size", 8, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    train = load_json(d / "data/train.json")
    tweets = [rec["messages"][1]["content"] for rec in train]
    r = run_script("06_test_finetuned_single.py", "--checkpoint-dir", d, input="\n".join(tweets) + "\n")
    assert r.returncode == 0, r.stderr[-2000:]
    right = sum(a == rec["messages"][2]["content"] for a, rec in zip(r.stdout.splitlines(), train, strict=True))
    assert right / len(train) >= 0.9, (right, len(train))


def test_trl_ctrl_c_keeps_finished_epochs_and_resume_matches(trl_run, tiny_model, tmp_path):
    straight, _ = trl_run
    d = small_run_dir(tmp_path, "interrupted")
    flags = [*TRL, "--model", tiny_model, *RECIPE, "--epochs", 3]
    done = interrupt_after_first_epoch(d, *flags)
    assert len(done) < 3
    assert_user_error(run_script("03_train_model.py", *flags, "--checkpoint-dir", d), "unfinished run", "--resume")
    assert_user_error(run_script("03_train_model.py", "--resume", "--engine", "fast", "--checkpoint-dir", d),
                      "--engine fast (run used trl)")

    r = run_script("03_train_model.py", "--resume", "--checkpoint-dir", d)  # the engine comes from run.json
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming after epoch {len(done)} of 3" in r.stdout
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy")
    assert_same_epochs_and_adapter(straight, d, keys)

    assert_user_error(run_script("03_train_model.py", "--resume", "--checkpoint-dir", d), "already finished 3 epochs")
    (d / "loss.png").write_bytes(b"old plot")  # made from the 3-epoch run: outdated once it trains on
    r = run_script("03_train_model.py", "--resume", "--epochs", 4, "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (d / "loss.png").exists()
    longer, a = load_json(d / "metrics.json")["epochs"], load_json(straight / "metrics.json")["epochs"]
    assert [{k: e[k] for k in keys} for e in longer[:3]] == [{k: e[k] for k in keys} for e in a]
    assert [e["epoch"] for e in longer] == [1, 2, 3, 4] and load_json(d / "run.json")["finished"] is True


def test_trl_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model):
    one_and_two_processes(tmp_path, *TRL, "--model", tiny_model)


def test_engine_refusals(trl_run, tiny_model, tmp_path):
    d, _ = trl_run
    assert_user_error(run_script("03_train_model.py", *TRL, "--model", tiny_model, "--checkpoint-dir", d),
                      "already holds a trained adapter", "--overwrite")
    assert_user_error(run_script("03_train_model.py", "--report-to", "tensorboard", "--checkpoint-dir", tmp_path),
                      "--report-to tensorboard reports through TRL: add --engine trl")
    r = run_script("03_train_model.py", "--engine", "deepspeed", "--checkpoint-dir", tmp_path)
    assert r.returncode == 2 and "invalid choice: 'deepspeed'" in r.stderr
    missing = [name for name in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(name) is None]
    if missing:
        r = run_script("03_train_model.py", *TRL, "--report-to", missing[0], "--checkpoint-dir", tmp_path)
        assert_user_error(r, f"--report-to {missing[0]} needs the", f"uv sync --extra {missing[0]}")
    assert not list(tmp_path.iterdir())


def test_the_fast_engine_points_sharded_configs_to_trl():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from emojitune.console import UserError
    from emojitune.training import check_data_parallel

    with pytest.raises(UserError, match="--engine trl"):
        check_data_parallel(SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_fsdp_scoring_and_adapter_saving_on_sharded_weights(tiny_model, tmp_path):
    """trl_engine's FSDP code on 2 CPU processes with a model sharded by FSDP2 (accelerate shards on GPUs
    only): the scorer on the sharded model gives the unsharded numbers, and the adapter gathered from the
    shards is the unsharded one."""
    from safetensors.torch import load_file

    from emojitune.launch import free_port

    d = small_run_dir(tmp_path, "run", 20)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(ROOT / "tests/fsdp_worker.py"), str(tiny_model),
                        str(d / "data/val.json"), str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = load_json(tmp_path / "scores.json")
    assert scores["sharded"] == pytest.approx(scores["whole"], abs=1e-6)
    whole, sharded = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "sharded"))
    assert whole.keys() == sharded.keys() and all(whole[k].equal(sharded[k]) for k in whole)
