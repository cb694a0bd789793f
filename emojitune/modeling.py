"""The one place that loads models: base or base + LoRA adapter, device, dtype, attention, errors."""

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from . import DEFAULT_MODEL
from .console import UserError

_SUGGEST = "or download the model and pass its folder with --model PATH"


@dataclass
class LoadedModel:
    model: object  # a transformers causal LM, possibly wrapped by PEFT
    tokenizer: object
    device: str
    dtype: object
    end_of_turn_id: int  # the token that closes the model's turn (<end_of_turn> for Gemma)
    model_id: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


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
    """float32 on CPU: CPUs without native bf16 run bf16 matmuls many times slower. bf16 on CUDA GPUs
    that support it. float32 on MPS, where bf16 support varies."""
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
        raise UserError(f"--model {model_id}: no such folder (and not a hub id like {DEFAULT_MODEL}): "
                        "check the path")
    if not (p / "config.json").is_file():
        raise UserError(f"--model {model_id}: the folder has no config.json, so it is not a model folder: "
                        "pass the folder that holds config.json and the model's .safetensors")
    if not any(p.glob("*.safetensors")):
        raise UserError(f"--model {model_id}: no .safetensors weights found; this tool does not load pickled "
                        ".bin weights: convert the model to safetensors")


def cached_snapshot(model_id: str) -> Path | None:
    """The complete local copy of a hub model in the Hugging Face cache, if there is one.

    Loading a hub id makes transformers ask the hub for newer files first, and offline it retries for
    minutes before falling back to the cache. A fully cached model loads from its folder with no network
    at all (the cached revision: `hf download` refreshes it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not is_hub_id(model_id):
        return None
    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except LocalEntryNotFoundError:  # not cached: transformers will download it
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):  # a damaged index: let transformers decide
            return None
    else:
        weights = {"model.safetensors"}
    needed = {"config.json", *weights}
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    return folder if has_tokenizer and all((folder / name).is_file() for name in needed) else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the hub be reached at all? Without this check an offline download retries for about a minute
    before it fails. Behind a proxy only the hub client knows the way, so we do not guess."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:  # no route, no DNS, refused, timed out
        return False
    return True


def _offline_message(model_id: str) -> str:
    return (f"--model {model_id}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline?): connect once to download it, {_SUGGEST}")


def _explain_load_error(model_id: str, error: OSError) -> str:
    """Say why a hub model could not be loaded, from the hub client's exception in the cause chain."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, GatedRepoError) for x in chain):
        return (f"--model {model_id} is a gated model: accept its licence on https://huggingface.co/{model_id} "
                f"while logged in, then run `hf auth login` with a token, {_SUGGEST}")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain):
        return (f"--model {model_id}: no such model on the Hugging Face hub (or it is private): check the id, "
                f"{_SUGGEST}")
    if any(isinstance(x, (LocalEntryNotFoundError, ConnectionError)) for x in chain):
        return _offline_message(model_id)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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


@contextlib.contextmanager
def quiet_libraries():
    """Hide the libraries' deprecation notes and their notes on generation flags we set on purpose,
    for the duration of a load or a generation only; real errors still raise."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (PyTorch's non-reentrant checkpoint).
    transformers 5.2x renamed gradient_checkpointing_enable to activation_checkpointing_enable and warns on
    the old name; older 5.x releases only have the old one."""
    from .loss import causal_lm_of

    base = causal_lm_of(model)
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def route_cpu_layers(model, layer_class, forward, ready) -> int:
    """Bind `forward(layer, ...)` as the forward of every module of exactly `layer_class` in a model on CPU (the
    CPU speed paths of fused_norm and fused_attention). Returns how many; 0 where layer_class is None (another
    transformers), the model is elsewhere, or ready() is false: it is called last, as it may build or check
    something."""
    import types

    parameter = next(model.parameters(), None)
    if layer_class is None or parameter is None or parameter.device.type != "cpu" or not ready():
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is layer_class:
            # A method bound to the layer, not a closure over it: a deep copy gets one that reads its own weight.
            module.forward = types.MethodType(forward, module)
            routed += 1
    return routed


def load_model(model_id: str, device: str = "auto", *, adapter: Path | None = None, lora=None,
               training: bool = False) -> LoadedModel:
    """Load a base model and tokenizer, optionally with a saved LoRA adapter or a new LoRA (`lora`)."""
    check_model_source(model_id)
    device = resolve_device(device)
    if adapter is not None and not (Path(adapter) / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter}: no adapter_model.safetensors in it: pick a folder written by "
                        "03_train_model.py")
    source = model_id
    if is_hub_id(model_id):
        source = cached_snapshot(model_id)
        if source is None and not hub_reachable():
            raise UserError(_offline_message(model_id))
        source = source or model_id

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(device)
    with quiet_libraries():
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
        except OSError as e:  # the hub client's errors and missing files are all OSErrors
            raise UserError(_explain_load_error(model_id, e)) from None
        if not tokenizer.chat_template:
            raise UserError(f"--model {model_id} has no chat template: use an instruction-tuned model such as "
                            f"{DEFAULT_MODEL}")
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=training)
        elif lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora)
    model.to(device)
    model.train(training)
    if not training and device == "cpu":
        from .matmul import speed_up_cpu_inference

        speed_up_cpu_inference(model)
    return LoadedModel(model, tokenizer, device, dtype, end_of_turn_token(tokenizer), model_id)
