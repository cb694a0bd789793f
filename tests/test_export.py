"""07_export_model.py on a trained tiny model with a Gemma-like SentencePiece tokenizer: the merged model
answers like the adapter, the GGUF answers like the merged model in llama.cpp, the Modelfile holds what
llama.cpp was tested with, and every refusal is one line with nothing half-written."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import SYSTEM, assert_user_error, load_json, run_script

# More labels than the other tests' learning run, so that the validation set (2 tweets per label) is big
# enough to count agreement on, and the trained model answers different tweets differently.
EXPORT_LABELS = "😀,🤣,😭,😨,😍,😤,😴,🤮"
F16_LOGIT_TOLERANCE = 0.05  # measured 0.014 (f16 weights) on logits of magnitude ~15
# Two float32 implementations (llama.cpp's kernels, PyTorch's) differ by rounding that grows with the logits'
# size: measured 0.003 (EXPORT_NOTES) and 0.0101 on two tiny models trained the same way with float-rounding
# differences between them, with logits up to ~16: 2e-4 and 6e-4 of the largest logit. A conversion mistake
# (the attention-scale trap) is off by whole units.
F32_RELATIVE_LOGIT_TOLERANCE = 2e-3


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    from tiny_gemma import build_tiny_gemma

    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma-sp"), tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def export_run(sp_model, tmp_path_factory):
    """A trained tiny model (many epochs at a high learning rate), exported as f16 (DIR/export), q8_0 and f32."""
    d = tmp_path_factory.mktemp("export-run")
    assert run_script("01_prepare_data.py", "--labels", EXPORT_LABELS, "--checkpoint-dir", d).returncode == 0
    assert run_script("02_split_data.py", "--checkpoint-dir", d).returncode == 0
    r = run_script("03_train_model.py", "--model", sp_model, "--epochs", 30, "--lr", "1e-2", "--batch-size", 8,
                   "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("07_export_model.py", "--checkpoint-dir", d)
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "07.stdout").write_text(r.stdout, encoding="utf-8")
    for gguf_type in ("q8_0", "f32"):
        r = run_script("07_export_model.py", "--checkpoint-dir", d, "--gguf-type", gguf_type, "--out",
                       d / f"export-{gguf_type}")
        assert r.returncode == 0, r.stderr[-3000:]
    return d


def val_tweets(run):
    return [r["messages"][1]["content"] for r in load_json(run / "data/val.json")]


def answers_with(model_id, tweets, adapter=None):
    """06's generation path (greedy, each tweet a fresh conversation)."""
    from emojitune.generation import generate_batch
    from emojitune.modeling import load_model

    return generate_batch(load_model(str(model_id), "cpu", adapter=adapter), SYSTEM, tweets)


# ---- the merged Hugging Face model -----------------------------------------------------------------

def test_export_writes_exactly_its_files(export_run, sp_model):
    out = export_run / "export"
    assert {p.name for p in out.iterdir()} == {"merged", "model-f16.gguf", "Modelfile"}
    assert {p.name for p in (out / "merged").iterdir()} == {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "tokenizer.model", "README.md"}
    assert not [p for p in export_run.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    from safetensors import safe_open

    with safe_open(out / "merged/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # still tied
    assert not [k for k in keys if "lora" in k or "base_model" in k]
    generation = load_json(out / "merged/generation_config.json")
    assert generation["do_sample"] is False and 5 in generation["eos_token_id"]  # 5 = <end_of_turn> here
    readme = (out / "merged/README.md").read_text(encoding="utf-8")
    n = len(val_tweets(export_run))
    for fact in (str(sp_model), str(export_run / "adapter"), SYSTEM, "saved in float32", f"{n}/{n} greedy answers"):
        assert fact in readme, fact
    stdout = (export_run / "07.stdout").read_text(encoding="utf-8")
    for line in (str(out / "merged"), str(out / "model-f16.gguf"), str(out / "Modelfile"),
                 f"ollama create emoji-ja -f {out / 'Modelfile'}", "ollama run emoji-ja", "llama-cli -m"):
        assert line in stdout, line


def test_merged_model_answers_exactly_like_the_adapter(export_run, sp_model):
    tweets = val_tweets(export_run)
    adapter = answers_with(sp_model, tweets, adapter=export_run / "adapter")
    merged = answers_with(export_run / "export/merged", tweets)
    assert merged == adapter
    assert len(set(adapter)) > 2, adapter  # a trained model: different tweets, different answers


def test_merged_model_needs_only_plain_transformers(export_run):
    """No PEFT, no generation flags: generation_config.json makes generate() greedy and stop at the turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export_run / "export/merged"
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    tweets = val_tweets(export_run)
    plain = []
    for t in tweets:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**ids)[0, ids["input_ids"].shape[1]:]
        assert new[-1].item() == 5, new  # stopped at <end_of_turn>
        plain.append(tok.decode(new, skip_special_tokens=True).strip())
    assert plain == answers_with(folder, tweets)


def test_dtype_is_kept_unless_rounding_changes_an_answer(export_run):
    """The choice is really checked: bfloat16 rounding keeps this model's answers; rounding that ruins the
    weights changes some, and then float32 is kept. float8_e8m0fnu keeps only a power of two of each weight's
    size (no mantissa, no sign). float8_e5m2 (2-bit mantissa) was used here before: it changed 2 of the 16
    answers on the first machines and none on a 2-core AVX-512 EPYC with one thread per test worker, so
    whether it changes one depends on the float rounding of the tiny model's training."""
    import dataclasses

    import torch

    from emojitune.export import choose_dtype
    from emojitune.generation import generate_batch
    from emojitune.modeling import load_model

    tweets = val_tweets(export_run)
    lm = load_model(load_json(export_run / "run.json")["base_model"], "cpu", adapter=export_run / "adapter")
    adapter = generate_batch(lm, SYSTEM, tweets)
    merged = dataclasses.replace(lm, model=lm.model.merge_and_unload())
    dtype, lines = choose_dtype(merged, torch.bfloat16, SYSTEM, tweets, adapter)
    assert dtype == torch.bfloat16 and "no answer changed" in lines[-1], lines
    dtype, lines = choose_dtype(merged, torch.float8_e8m0fnu, SYSTEM, tweets, adapter)
    assert dtype == torch.float32 and "rounding to float8_e8m0fnu changed" in lines[-1], lines


def test_merged_folder_saved_in_bfloat16_loads_in_bfloat16(export_run, tmp_path):
    import dataclasses

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from emojitune.export import save_merged
    from emojitune.modeling import load_model

    lm = load_model(str(export_run / "export/merged"), "cpu")
    save_merged(tmp_path / "m", dataclasses.replace(lm), torch.bfloat16, str(export_run / "export/merged"), "x")
    with safe_open(tmp_path / "m/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.bfloat16


# ---- the GGUF in llama.cpp -------------------------------------------------------------------------

def parse_modelfile(path):
    text = path.read_text(encoding="utf-8")
    quoted = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, flags=re.S | re.M))
    params = dict(re.findall(r"^PARAMETER (\w+) (.+)$", text, flags=re.M))
    [source] = re.findall(r"^FROM (.+)$", text, flags=re.M)
    return source, quoted["TEMPLATE"], quoted.get("SYSTEM"), params


def render_ollama_prompt(template: str, system: str | None, prompt: str) -> str:
    """Ollama's rendering of the template constructs the Modelfile uses, up to where the answer goes."""
    text = template.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda m: m.group(1) if system else "", text,
                  flags=re.S)
    text = text.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt)
    assert "{{" not in text, text
    return text


class LlamaCpp:
    """A GGUF in llama.cpp (through llama-cpp-python), prompted as the Modelfile says."""

    def __init__(self, gguf_path, modelfile):
        try:
            import llama_cpp
        except ImportError:  # a failure, not a skip: the GGUF must be proven in llama.cpp
            pytest.fail("llama-cpp-python is not installed: run the tests with `uv run --group llamacpp pytest` "
                        "(README, Tests)", pytrace=False)

        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, logits_all=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.is_end = lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)
        _, self.template, self.system, self.params = parse_modelfile(modelfile)
        [self.stop_id] = self.llm.tokenize(json.loads(self.params["stop"]).encode(), add_bos=False, special=True)

    def prompt_ids(self, tweet: str) -> list[int]:
        text = render_ollama_prompt(self.template, self.system, tweet)
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def last_logits(self, ids) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[len(ids) - 1])

    def greedy(self, tweet: str) -> list[int]:
        ids = self.prompt_ids(tweet)
        logits, new = self.last_logits(ids), []
        while len(new) < int(self.params["num_predict"]):
            token = int(np.argmax(logits))
            if self.is_end(token) or token == self.stop_id:
                break
            new.append(token)
            self.llm.eval([token])
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1])
        return new

    def close(self):
        self.llm.close()


def hf_reference(run):
    """The merged model in transformers: prompt ids, last-position logits and greedy new tokens per tweet."""
    import torch

    from emojitune.chat import prompt_ids
    from emojitune.modeling import load_model

    lm = load_model(str(run / "export/merged"), "cpu")
    rows = []
    for tweet in val_tweets(run):
        ids = prompt_ids(lm.tokenizer, SYSTEM, tweet)
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].numpy()
            out = lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16)[0, len(ids):].tolist()
        rows.append((tweet, ids, logits, [t for t in out if t not in (1, lm.end_of_turn_id)]))
    return rows


@pytest.fixture(scope="session")
def reference(export_run):
    return hf_reference(export_run)


def compare_gguf(run, gguf_path, reference):
    """(share of same greedy answers, max |Δlogit|) of a GGUF against the merged model."""
    llama = LlamaCpp(gguf_path, run / "export/Modelfile")
    try:
        same, worst = 0, 0.0
        for tweet, ids, logits, answer in reference:
            assert llama.prompt_ids(tweet) == ids  # same template, same tokenizer, same ids
            worst = max(worst, float(np.abs(llama.last_logits(ids) - logits).max()))
            same += llama.greedy(tweet) == answer
        return same / len(reference), worst
    finally:
        llama.close()


def test_gguf_f16_answers_exactly_like_the_merged_model(export_run, reference, capsys):
    agreement, worst = compare_gguf(export_run, export_run / "export/model-f16.gguf", reference)
    with capsys.disabled():
        print(f"\n[export] f16 GGUF in llama.cpp: same answer on {agreement:.0%} of "
              f"{len(reference)} validation tweets, max |Δlogit| {worst:.4f}")
    assert agreement == 1.0
    assert worst < F16_LOGIT_TOLERANCE


def test_gguf_f32_logits_match_transformers(export_run, reference):
    agreement, worst = compare_gguf(export_run, export_run / "export-f32/model-f32.gguf", reference)
    largest = max(float(np.abs(logits).max()) for _, _, logits, _ in reference)
    assert agreement == 1.0 and worst < F32_RELATIVE_LOGIT_TOLERANCE * largest, (worst, largest)


def test_gguf_q8_0_agreement(export_run, reference, capsys):
    agreement, worst = compare_gguf(export_run, export_run / "export-q8_0/model-q8_0.gguf", reference)
    with capsys.disabled():
        print(f"\n[export] q8_0 GGUF in llama.cpp: same answer on {agreement:.0%} of "
              f"{len(reference)} validation tweets, max |Δlogit| {worst:.4f}")
    assert agreement >= 0.8  # 8-bit weights may flip a near tie, not most answers
    assert (export_run / "export-q8_0/model-q8_0.gguf").stat().st_size < \
        0.7 * (export_run / "export/model-f16.gguf").stat().st_size


def test_gguf_carries_gemma3_metadata(export_run):
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(export_run / "export/model-f16.gguf")
    config = load_json(export_run / "export/merged/config.json")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "gemma3"
    assert field("gemma3.block_count") == config["num_hidden_layers"]
    assert field("gemma3.attention.key_length") == config["head_dim"]
    assert field("gemma3.attention.sliding_window") == config["sliding_window"]
    assert field("gemma3.attention.sliding_window_pattern") == [t == "sliding_attention" for t in config["layer_types"]]
    assert field("gemma3.rope.freq_base_swa") == 10_000.0
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"] and tokens[:6] == ["<pad>", "<eos>", "<bos>", "<unk>",
                                                                   "<start_of_turn>", "<end_of_turn>"]
    types = field("tokenizer.ggml.token_type")
    assert types[5] == gguf.TokenType.CONTROL and types[10] == gguf.TokenType.BYTE  # <0x04>
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.padding_token_id"), field("tokenizer.ggml.eot_token_id")) == (2, 1, 0, 5)
    template = (export_run / "export/merged/chat_template.jinja").read_text(encoding="utf-8")
    assert field("tokenizer.chat_template") == template
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to token_embd
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with safe_open(export_run / "export/merged/model.safetensors", "np") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"].data, norm + 1.0, rtol=1e-6)


def test_modelfile_holds_what_llama_cpp_was_tested_with(export_run):
    """The Modelfile's template, system prompt and stop token are the ones the llama.cpp tests prompt with;
    here: its prompt is exactly the chat template's, for the training system prompt."""
    from emojitune.chat import prompt_ids
    from emojitune.modeling import load_model

    modelfile = export_run / "export/Modelfile"
    source, template, system, params = parse_modelfile(modelfile)
    assert (modelfile.parent / source).is_file() and source == "./model-f16.gguf"
    assert system == load_json(export_run / "run.json")["system_prompt"] == SYSTEM
    assert params == {"stop": '"<end_of_turn>"', "temperature": "0", "num_predict": "16"}
    tok = load_model(str(export_run / "export/merged"), "cpu").tokenizer
    for tweet in val_tweets(export_run)[:3]:
        expected = tok.decode(prompt_ids(tok, SYSTEM, tweet))
        assert "<bos>" + render_ollama_prompt(template, system, tweet) == expected
    assert render_ollama_prompt(template, None, "x") == "<start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n"


# ---- refusals: one line, nothing written -------------------------------------------------------------

def test_refusals(export_run, tmp_path):
    empty = tmp_path / "empty"
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", empty), "adapter not found",
                      "run 03_train_model.py first")
    assert not empty.exists()
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", export_run, "--gguf-type", "q4_k"),
                      "--gguf-type q4_k", "f16, q8_0, f32")
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", export_run, "--checkpoint", "epoch-99"),
                      "epoch-99 not found", "the saved epochs are", "--checkpoint epoch-N")
    before = sorted(p.name for p in (export_run / "export").iterdir())
    r = run_script("07_export_model.py", "--checkpoint-dir", export_run)
    assert_user_error(r, f"{export_run / 'export'} already exists", "--overwrite")
    assert r.stderr.count("\n") == 1
    assert sorted(p.name for p in (export_run / "export").iterdir()) == before


def test_unfinished_run_and_missing_base_model(export_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(export_run, d, ignore=shutil.ignore_patterns("export*", "adapter"))
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", d), "--checkpoint best", "--resume")
    run = load_json(d / "run.json")
    run["base_model"] = str(tmp_path / "moved-away")
    (d / "run.json").write_text(json.dumps(run), encoding="utf-8")
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", d, "--checkpoint", "best"),
                      "run.json names the base model folder", "moved-away", "--model PATH")  # as 05/06 and 03
    assert not (d / "export").exists()


def test_overwrite_and_best_checkpoint(export_run, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_script("07_export_model.py", "--checkpoint-dir", export_run, "--out", out, "--overwrite", "--no-gguf")
    assert_user_error(r, f"{out} is not an export folder (it holds notes.txt)")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "model-q8_0.gguf").write_text("an older export")
    best = load_json(export_run / "metrics.json")["best_epoch"]
    r = run_script("07_export_model.py", "--checkpoint-dir", export_run, "--checkpoint", "best", "--out", out,
                   "--overwrite", "--no-gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"merged"}  # no GGUF, so no Modelfile either
    assert f"epoch-{best}" in (out / "merged/README.md").read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_while_writing_leaves_nothing(export_run, tmp_path, monkeypatch):
    from emojitune import export as export_module
    from emojitune.checkpoints import CheckpointDir

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_gguf_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_module.export(CheckpointDir(export_run), out=tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []


def test_model_without_sentencepiece_file_is_refused_for_gguf(learned_run, tmp_path):
    """The other tests' tiny model has only tokenizer.json: the GGUF needs tokenizer.model, --no-gguf works."""
    r = run_script("07_export_model.py", "--checkpoint-dir", learned_run, "--out", tmp_path / "a")
    assert_user_error(r, "no tokenizer.model", "--no-gguf")
    assert not (tmp_path / "a").exists()
    r = run_script("07_export_model.py", "--checkpoint-dir", learned_run, "--out", tmp_path / "b", "--no-gguf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "b/merged/model.safetensors").is_file()


def test_sentencepiece_file_that_disagrees_with_the_tokenizer_is_refused(export_run, sp_model, tmp_path):
    """A tokenizer.model whose pieces are not tokenizer.json's would make llama.cpp read other token ids."""
    from tiny_gemma import build_sentencepiece_tokenizer

    model = tmp_path / "model"
    shutil.copytree(sp_model, model)
    build_sentencepiece_tokenizer(tmp_path / "other", vocab_size=1400)
    shutil.copyfile(tmp_path / "other/tokenizer.model", model / "tokenizer.model")
    run = tmp_path / "run"
    shutil.copytree(export_run, run, ignore=shutil.ignore_patterns("export*"))
    info = load_json(run / "run.json")
    info["base_model"] = str(model)
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    assert_user_error(run_script("07_export_model.py", "--checkpoint-dir", run), "tokenizer.model and the model's "
                      "tokenizer.json disagree", "--no-gguf")
    assert not (run / "export").exists()
