"""The one place that loads models: base or base + LoRA adapter, device, dtype, attention, errors."""

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

_SUGGEST = "or download the model and pass its folder with --model PATH"


@dataclass
class LoadedModel:
    model: object  # a transformers causal LM, possibly wrapped by PEFT
    tokenizer: object
    device: str
    dtype: object
    end_of_turn_id: int  # the token that closes the model's turn (<end_of_turn> for Gemma)
    model_id: str


def resolve_device(name: str) -> str:
    """auto → cuda, then mps, then cpu; an explicit device that is absent is a UserError."""
    import torch

    if name.startswith("cuda:"):  # a process's own GPU under accelerate launch
        return name
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no CUDA GPU visible"
        raise UserError(f"--device cuda: {build} on this machine: use --device cpu (or auto)")
    if name == "mps" and not has_mps:
        raise UserError("--device mps: Apple's MPS backend is not available here: use --device cpu (or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unknown device: use auto, cpu, cuda or mps")
    return name


def resolve_dtype(device: str):
    """float32 on CPU: CPUs without native bf16 run bf16 matmuls many times slower (measured on a 2-core
    AVX2 CPU: 0.5 vs 187 GFLOP/s). bf16 on CUDA GPUs that support it. float32 on MPS, where bf16 support varies."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_hub_id(model_id: str) -> bool:
    """owner/name that is not an existing path, such as google/gemma-3-270m-it; anything else is a folder."""
    return (not model_id.startswith((".", "/", "~")) and model_id.count("/") == 1
            and not Path(model_id).expanduser().exists())


def check_model_source(model_id: str) -> None:
    """Fail fast on a local path that is not a model folder, before anything heavy loads."""
    if is_hub_id(model_id):
        return
    p = Path(model_id).expanduser()
    if not p.exists():
        raise UserError(f"--model {model_id}: no such folder (and not a hub id like google/gemma-3-270m-it): "
                        "check the path")
    if not (p / "config.json").is_file():
        raise UserError(f"--model {model_id}: the folder has no config.json, so it is not a model folder: "
                        "pass the folder that holds config.json and the model's .safetensors")


def cached_snapshot(model_id: str) -> Path | None:
    """The complete local copy of a hub model in the Hugging Face cache, if there is one.

    Loading a hub id makes transformers ask the hub for newer files first; offline, its retries took
    almost 3 minutes here before it fell back to the cache. A model that is fully cached loads from
    its folder with no network at all (the cached revision: `hf download` refreshes it).
    """
    import json

    from huggingface_hub import snapshot_download

    if not is_hub_id(model_id):
        return None
    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached (or a cache layout we do not know): let transformers fetch it
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
    else:
        weights = {"model.safetensors"}
    needed = {"config.json", *weights}
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    return folder if has_tokenizer and all((folder / name).is_file() for name in needed) else None


def _explain_load_error(model_id: str, exc: BaseException) -> str:
    """Say why a hub model could not be loaded: gated, not found, or offline/not cached."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain, e = [], exc
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain).lower()
    if any(isinstance(x, GatedRepoError) for x in chain) or "gated repo" in text:
        return (f"--model {model_id} is a gated model: accept its licence on https://huggingface.co/{model_id} "
                f"while logged in, then run `hf auth login` with a token, {_SUGGEST}")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain) or "is not a valid model identifier" in text:
        return (f"--model {model_id}: no such model on the Hugging Face hub (or it is private): check the id, "
                f"{_SUGGEST}")
    if any(isinstance(x, (LocalEntryNotFoundError, ConnectionError)) for x in chain) or "connect" in text:
        return (f"--model {model_id}: not in the local Hugging Face cache and the hub cannot be reached "
                f"(offline?): connect once to download it, {_SUGGEST}")
    if "safetensors" in text:
        return (f"--model {model_id}: no .safetensors weights found; this tool does not load pickled "
                ".bin weights: convert the model to safetensors")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"--model {model_id} could not be loaded ({first}): {_SUGGEST}"


def end_of_turn_token(tokenizer) -> int:
    """The special token that closes an assistant turn in this model's chat template."""
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], return_dict=False)
    # Gemma lists <end_of_turn> among its added special tokens, not always among the named ones
    # (bos/eos/pad/extra), so both count.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    tail = [t for t in full[len(prompt):] if t in special]
    return tail[0] if tail else tokenizer.eos_token_id


def load_model(model_id: str, device: str = "auto", *, adapter: Path | None = None, lora=None,
               training: bool = False) -> LoadedModel:
    """Load a base model and tokenizer, optionally with a saved LoRA adapter or a new LoRA (`lora`)."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Library deprecation chatter and notes about generation flags we override are not the user's
    # business; real errors still raise.
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    check_model_source(model_id)
    device = resolve_device(device)
    dtype = resolve_dtype(device)
    source = cached_snapshot(model_id) or model_id
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            # Gemma 3 is trained with eager attention (its model card's advice); inference uses the
            # library default, as plain transformers code would.
            attn_implementation="eager" if training else None,
            use_safetensors=True,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as e:
        raise UserError(_explain_load_error(model_id, e)) from None
    if not tokenizer.chat_template:
        raise UserError(f"--model {model_id} has no chat template: use an instruction-tuned model such as "
                        "google/gemma-3-270m-it")
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_model.safetensors").is_file():
            raise UserError(f"{adapter}: no adapter_model.safetensors in it: pick a folder written by "
                            "03_train_model.py")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=training)
    elif lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    model.to(device)
    model.train(training)
    return LoadedModel(model, tokenizer, device, dtype, end_of_turn_token(tokenizer), model_id)
