"""07: the trained adapter as a standalone model: a merged Hugging Face folder, a GGUF file for
llama.cpp / Ollama / LM Studio, and an Ollama Modelfile."""

import copy
import dataclasses
import datetime
import shutil
from pathlib import Path

from .chat import conversation
from .checkpoints import CheckpointDir, atomic_dir, base_model, resolve_adapter, write_bytes
from .console import UserError, log
from .data import records_from_json
from .generation import generate_batch
from .modeling import cached_snapshot, check_model_source, is_hub_id, load_model
from .session import system_prompt

GGUF_TYPES = ("f16", "q8_0", "f32")
DEFAULT_GGUF_TYPE = "f16"
# What `ollama create` names the model in the printed commands and the README.
OLLAMA_NAME = "emoji-ja"
EXAMPLE_TWEET = "今日は最高の一日だった"
# The base model's SentencePiece file: the GGUF vocabulary (pieces, scores, types) comes from it, as
# llama.cpp's Gemma 3 support expects.
SENTENCEPIECE_FILE = "tokenizer.model"


class ExportDir:
    """The export folder's layout, defined once."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def gguf(self, gguf_type: str) -> Path:
        return self.root / f"model-{gguf_type}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.root / "Modelfile"

    def check_replaceable(self) -> None:
        """--overwrite replaces the whole folder: only ever one that 07 wrote, never a mistyped --out
        such as the checkpoint directory itself."""
        if not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not an export folder: choose another --out")
        ours = {self.merged.name, self.modelfile.name} | {self.gguf(t).name for t in GGUF_TYPES}
        other = sorted(p.name for p in self.root.iterdir() if p.name not in ours)
        if other:
            raise UserError(f"{self.root} is not an export folder (it holds {', '.join(other[:3])}): --overwrite "
                            "replaces only a folder 07_export_model.py wrote: choose another --out")


def export(cp: CheckpointDir, *, checkpoint: str = "last", out=None, gguf_type: str = DEFAULT_GGUF_TYPE,
           write_gguf: bool = True, overwrite: bool = False) -> ExportDir:
    """Merge the adapter into the base model and write DIR/export (or `out`) in one atomic move."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type}: unknown GGUF type: use one of {', '.join(GGUF_TYPES)}")
    adapter = resolve_adapter(cp, checkpoint, hint="run 03_train_model.py first")
    target = ExportDir(out if out is not None else cp.export_dir)
    if target.root.exists() and not overwrite:
        raise UserError(f"{target.root} already exists: pass --overwrite to replace it, or choose another --out")
    if target.root.exists():
        target.check_replaceable()
    model_id, model_from = base_model(cp, None)
    check_model_source(model_id)
    system, system_from = system_prompt(cp, None)
    tweets = validation_tweets(cp)
    log(f"exporting {model_id} ({model_from}) + adapter {adapter}")
    log(f"system prompt ({system_from}): {system or '(none)'}")

    log("loading the base model and the adapter (float32, CPU)")
    lm = load_model(model_id, "cpu", adapter=adapter)
    vocab = ollama = None
    if write_gguf:  # every reason to refuse the GGUF comes before the slow part
        check_gguf_support(lm.model.config, model_id)
        vocab = gguf_vocabulary(model_id, lm.tokenizer, lm.model.config.vocab_size)
        ollama = modelfile(target.gguf(gguf_type).name, system, lm.tokenizer)
    log(f"answering the {len(tweets)} validation tweets with the adapter (greedy)")
    adapter_answers = generate_batch(lm, system, tweets)
    log("merging the LoRA weights into the base weights (float32)")
    merged = dataclasses.replace(lm, model=lm.model.merge_and_unload())
    dtype, checks = choose_dtype(merged, source_dtype(model_id), system, tweets, adapter_answers)
    for line in checks:
        log(f"  {line}")

    with atomic_dir(target.root) as folder:
        tmp = ExportDir(folder)
        if write_gguf:
            log(f"writing {target.gguf(gguf_type).name} ({gguf_type})")
            write_gguf_file(tmp.gguf(gguf_type), merged, vocab, gguf_type, name=f"{model_id} + {adapter.name}")
            write_bytes(tmp.modelfile, ollama.encode("utf-8"))
        log(f"saving the merged model ({dtype_name(dtype)})")
        info = dict(model_id=model_id, adapter=adapter, checkpoint=checkpoint, system=system, dtype=dtype,
                    checks=checks, gguf=target.gguf(gguf_type) if write_gguf else None)
        save_merged(tmp.merged, merged, dtype, model_id, readme(target, info))
    report(target, gguf_type if write_gguf else None, system)
    return target



def validation_tweets(cp) -> list[str]:
    if not cp.val.exists():
        raise UserError(f"{cp.val} not found: the export checks its answers on the validation tweets: "
                        "run 02_split_data.py first")
    return [r.user for r in records_from_json(cp.val, "run 02_split_data.py again")]


# ---- float32 merge, and the dtype it is saved in --------------------------------------------------

def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_dtype(model_id: str):
    """The dtype the base model's weights are stored in (its config's dtype; float32 when unset)."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(cached_snapshot(model_id) or model_id), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def choose_dtype(merged, base_dtype, system, tweets, adapter_answers):
    """Keep the base model's own dtype unless rounding the merged weights to it changes an answer on the
    validation tweets; then float32. Returns the dtype and the lines that say what was checked.

    The rounded weights are checked in float32, as our scripts run a model on CPU: that is the effect of
    storing them in the smaller dtype (a LoRA update can be smaller than one bfloat16 step of a weight)."""
    import torch

    n = len(tweets)
    log("checking the merged model's answers against the adapter's (float32)")
    same = sum(a == b for a, b in zip(generate_batch(merged, system, tweets), adapter_answers))
    checks = [f"float32 merge: {same}/{n} greedy answers on the validation tweets equal the adapter's"]
    if base_dtype == torch.float32:
        return torch.float32, checks + ["saved in float32, the base model's own dtype"]
    name = dtype_name(base_dtype)
    log(f"checking the answers with the merged weights rounded to {name}, the base model's dtype")
    rounded = copy.deepcopy(merged.model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(base_dtype))
    answers = generate_batch(dataclasses.replace(merged, model=rounded), system, tweets)
    same_rounded = sum(a == b for a, b in zip(answers, adapter_answers))
    checks.append(f"rounded to {name}: {same_rounded}/{n} answers equal the adapter's")
    if same_rounded == n:
        return base_dtype, checks + [f"saved in {name}, the base model's own dtype: no answer changed"]
    return torch.float32, checks + [f"saved in float32: rounding to {name} changed {n - same_rounded} answer(s)"]


def save_merged(folder: Path, merged, dtype, model_id: str, readme_text: str) -> None:
    """A plain transformers folder: safetensors weights, tokenizer, chat template, greedy generation."""
    from transformers import GenerationConfig

    model = merged.model.to(dtype)
    model.config.dtype = dtype
    tok = merged.tokenizer
    eos = [tok.eos_token_id, merged.end_of_turn_id]
    # Gemma's own generation_config samples; this one answers like 06 does: greedy, stop at the turn's end.
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=16, bos_token_id=tok.bos_token_id,
        eos_token_id=list(dict.fromkeys(eos)), pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    sentencepiece = base_file(model_id, SENTENCEPIECE_FILE)
    if sentencepiece is not None and not (folder / SENTENCEPIECE_FILE).exists():
        shutil.copyfile(sentencepiece, folder / SENTENCEPIECE_FILE)  # what llama.cpp's own converter reads
    (folder / "README.md").write_text(readme_text, encoding="utf-8")


# ---- GGUF -----------------------------------------------------------------------------------------

def check_gguf_support(config, model_id: str) -> None:
    """The GGUF writer knows Gemma 3 text models; say which property of another model it cannot carry."""
    fix = "pass --no-gguf to write only the merged model"
    if config.model_type != "gemma3_text":
        raise UserError(f"--model {model_id} is a {config.model_type} model; the GGUF export writes Gemma 3 "
                        f"text models (gemma3_text) only: {fix}")
    # llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim), and by 1/sqrt(hidden/heads) for the 27B
    # (62 layers); transformers by query_pre_attn_scalar ** -0.5. Another value would change every answer.
    scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else config.head_dim
    problems = []
    if config.query_pre_attn_scalar != scale:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from the {scale} "
                        "llama.cpp scales attention with")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attention logit soft-capping is set, which llama.cpp's Gemma 3 does not apply")
    if config.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {config.hidden_activation} is not Gemma 3's gelu_pytorch_tanh")
    for kind, params in rope_parameters(config).items():
        if params.get("rope_type", "default") not in ("default", "linear"):
            problems.append(f"{kind} RoPE type {params['rope_type']} is not supported here")
    if problems:
        raise UserError(f"--model {model_id}: {'; '.join(problems)}: {fix}")


def rope_parameters(config) -> dict:
    """{'full_attention': {...}, 'sliding_attention': {...}}: transformers 5 keeps one set per layer type."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" not in params:
        params = {"full_attention": params}
    return params


@dataclasses.dataclass
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def base_file(model_id: str, name: str) -> Path | None:
    """A file of the base model's folder (local folder or Hugging Face cache/hub); None if it has none.

    transformers fetches only the files it loads (not tokenizer.model), so a hub model's cache may lack it:
    the cache is tried first, then the hub (without the network, the same message as 03's)."""
    if not is_hub_id(model_id):
        path = Path(model_id).expanduser() / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError)

    try:
        return Path(hf_hub_download(model_id, name, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(hf_hub_download(model_id, name))
    except RemoteEntryNotFoundError:
        return None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError):
        raise UserError(f"--model {model_id}: {name} is not in the local Hugging Face cache and the hub cannot "
                        "be reached (offline?): connect once to download it, or pass --no-gguf") from None
    except HfHubHTTPError as e:
        raise UserError(f"--model {model_id}: could not fetch {name} ({str(e).splitlines()[0]}): "
                        "check the connection, or pass --no-gguf") from None


def gguf_vocabulary(model_id: str, tokenizer, n_vocab: int) -> Vocabulary:
    """Pieces, scores and token types from the SentencePiece model, with the tokenizer's added tokens
    typed as transformers treats them: special ones as control tokens, the others as user-defined."""
    import gguf
    import sentencepiece

    path = base_file(model_id, SENTENCEPIECE_FILE)
    if path is None:
        raise UserError(f"--model {model_id}: no {SENTENCEPIECE_FILE} (the SentencePiece tokenizer Gemma ships "
                        "and the GGUF vocabulary is read from): use the model's complete folder "
                        "(hf download google/gemma-3-270m-it), or pass --no-gguf")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    T = gguf.TokenType
    vocab = Vocabulary([], [], [])
    for i in range(min(sp.vocab_size(), n_vocab)):
        kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
                else T.BYTE if sp.is_byte(i) else T.NORMAL)
        vocab.tokens.append(sp.id_to_piece(i))
        vocab.scores.append(sp.get_score(i))
        vocab.types.append(int(kind))
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < len(vocab.tokens)}
    for i, token in added.items():  # transformers' reading of these wins, as for the model's training
        vocab.tokens[i] = token.content
        vocab.types[i] = int(T.CONTROL if token.special else T.USER_DEFINED)
    # Every other piece must be the transformers tokenizer's token of the same id, or llama.cpp would
    # read other ids than the model was trained on.
    hf_pieces = tokenizer.convert_ids_to_tokens(list(range(len(vocab.tokens))))
    mismatch = next((i for i, (a, b) in enumerate(zip(vocab.tokens, hf_pieces)) if a != b and i not in added), None)
    if mismatch is not None:
        raise UserError(f"{path} and the model's tokenizer.json disagree (token {mismatch}: "
                        f"{vocab.tokens[mismatch]!r} vs {hf_pieces[mismatch]!r}): use the model's original "
                        "tokenizer files, or pass --no-gguf")
    # Embedding rows past the tokenizer's pieces get placeholder tokens that never match text.
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(-1000.0)
        vocab.types.append(int(T.UNUSED))
    return vocab


def write_gguf_file(path: Path, merged, vocab: Vocabulary, gguf_type: str, name: str) -> None:
    """The merged model in llama.cpp's format, from the float32 merge: hyperparameters, vocabulary,
    special tokens, chat template and the tensors under the gguf library's Gemma 3 names."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, merged.model.config)
    add_tokenizer(writer, vocab, merged)
    for gguf_name, data, qtype in gguf_tensors(merged.model, len(vocab.tokens), gguf_type):
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer, config) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["full_attention"].get("rope_theta", 1_000_000.0))
    if rope["full_attention"].get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
    if "sliding_attention" in rope:
        writer.add_rope_freq_base_swa(rope["sliding_attention"].get("rope_theta", 10_000.0))
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        # Which layers slide, one flag per layer: without it llama.cpp assumes every 6th layer is global,
        # which holds for the real Gemma 3 models but not for other layer counts.
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def add_tokenizer(writer, vocab: Vocabulary, merged) -> None:
    tok = merged.tokenizer
    writer.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece tokenizer
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(False)  # Gemma's SentencePiece model adds no dummy prefix
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_eot_token_id(merged.end_of_turn_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tok.chat_template)


def gguf_tensors(model, n_vocab: int, gguf_type: str):
    """(GGUF name, data, GGML type) for each weight. Gemma's RMSNorm multiplies by (1 + weight) and
    llama.cpp's by the weight, so norms are stored + 1; the output layer is the tied embedding and is
    left out; 1-D tensors stay float32 in every type, as llama.cpp's own files keep them."""
    import gguf
    import torch

    Q = gguf.GGMLQuantizationType
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
    tied = model.config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"the model has a tensor {hf_name} that the Gemma 3 GGUF layout has no place for: "
                            "pass --no-gguf")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("norm.weight"):
            data = data + 1.0
        if hf_name.endswith("embed_tokens.weight"):
            data = data[:n_vocab]
        qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[gguf_type] if data.ndim > 1 else Q.F32
        if qtype == Q.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            qtype = Q.F16  # rows must be whole Q8_0 blocks (32 values); none are in Gemma 3
        yield gguf_name, gguf.quants.quantize(data, qtype), qtype


# ---- Ollama ---------------------------------------------------------------------------------------

# Gemma 3's turn format in Ollama's template language: the system prompt is folded into the user turn,
# as Gemma's chat template does; <bos> comes from the GGUF (add_bos_token).
OLLAMA_TEMPLATE = ("<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
                   "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n")


def modelfile(gguf_name: str, system: str | None, tokenizer) -> str:
    """For `ollama create NAME -f Modelfile`: the GGUF beside it, the turn format, the training system
    prompt, greedy answers that stop at the end of the model's turn."""
    for text in (system or "", OLLAMA_TEMPLATE):
        if '"""' in text:
            raise UserError('the system prompt contains """, which a Modelfile cannot quote: '
                            "export with --no-gguf, or train with another system prompt")
    lines = [f"# Ollama: ollama create {OLLAMA_NAME} -f Modelfile", f"FROM ./{gguf_name}",
             f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    end_of_turn = "<end_of_turn>"
    if end_of_turn not in tokenizer.get_vocab():
        raise UserError(f"the tokenizer has no {end_of_turn} token, which the Modelfile stops at: pass --no-gguf")
    lines += [f'PARAMETER stop "{end_of_turn}"', "PARAMETER temperature 0", "PARAMETER num_predict 16"]
    return "\n".join(lines) + "\n"


# ---- what is written and said ---------------------------------------------------------------------

def readme(target: ExportDir, info: dict) -> str:
    system = info["system"] or "(none)"
    messages = conversation(info["system"], EXAMPLE_TWEET)
    gguf_line = (f"- `../{info['gguf'].name}`: the same model as GGUF for llama.cpp, and `../Modelfile` for "
                 f"Ollama (`ollama create {OLLAMA_NAME} -f Modelfile` in that folder).\n" if info["gguf"] else "")
    checks = "\n".join(f"- {line}" for line in info["checks"])
    return f"""# Merged emoji model

A standalone Hugging Face model: the LoRA adapter merged into its base model's weights. It loads with plain
transformers (no PEFT) and answers a Japanese tweet with one emoji.

- base model: `{info['model_id']}`
- adapter: `{info['adapter']}` (`--checkpoint {info['checkpoint']}`)
- system prompt it was trained with: `{system}`
- exported: {datetime.date.today().isoformat()} by 07_export_model.py
- weights: {dtype_name(info['dtype'])}, merged in float32

Checked on the validation tweets:
{checks}

{gguf_line}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(target.merged)!r})
model = AutoModelForCausalLM.from_pretrained({str(target.merged)!r})
msgs = {messages!r}
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tok.decode(model.generate(**ids)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

`generation_config.json` makes `generate` greedy and stop at `<end_of_turn>`. Send each tweet as a new
conversation (system prompt + that tweet): with earlier turns in the context the model drifts into repeating
one emoji.
"""


def report(target: ExportDir, gguf_type: str | None, system: str | None) -> None:
    def size(path: Path) -> str:
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        return f"{total / 1e6:.1f} MB"

    log(f"wrote {target.root}/")
    log(f"  {target.merged}/  ({size(target.merged)})  Hugging Face model: transformers, no PEFT needed")
    if gguf_type:
        log(f"  {target.gguf(gguf_type)}  ({size(target.gguf(gguf_type))})  GGUF for llama.cpp, Ollama, LM Studio")
        log(f"  {target.modelfile}  Ollama Modelfile")
    log("use it:")
    log(f"  transformers: AutoModelForCausalLM.from_pretrained(\"{target.merged}\")  "
        f"(snippet in {target.merged / 'README.md'})")
    if gguf_type:
        sys_flag = f" -sys \"{system}\"" if system else ""
        log(f"  llama.cpp:    llama-cli -m {target.gguf(gguf_type)}{sys_flag} -p \"{EXAMPLE_TWEET}\" -st --temp 0")
        log(f"  Ollama:       ollama create {OLLAMA_NAME} -f {target.modelfile}")
        log(f"                ollama run {OLLAMA_NAME} \"{EXAMPLE_TWEET}\"")
