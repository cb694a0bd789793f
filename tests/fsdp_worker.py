"""Run by tests/test_trl_engine.py under torchrun, 2 CPU processes with gloo: trl_engine's code for FSDP on a
LoRA model sharded with FSDP2 by hand (accelerate runs FSDP on GPUs only, so 03 cannot shard on a CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py MODEL VAL_JSON OUT_DIR
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(model_dir: str, val_json: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from peft import LoraConfig
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from emojitune.chat import encode, pad_id
    from emojitune.data import records_from_json
    from emojitune.modeling import load_model
    from emojitune.scoring import score
    from emojitune.trl_engine import whole_weights

    dist.init_process_group("gloo")
    main_process = dist.get_rank() == 0
    torch.manual_seed(0)
    lm = load_model(model_dir, "cpu", training=True,
                    lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: give it values so the adapter matters
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    val, pad = encode(lm, records_from_json(Path(val_json), "")), pad_id(lm.tokenizer)
    whole = score(lm.model, val, pad, "cpu").mean_loss
    if main_process:
        lm.model.save_pretrained(out / "whole", safe_serialization=True)

    # As accelerate's FSDP2 plugin wraps it: each decoder layer one unit, then the whole model.
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in lm.model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(lm.model, mesh=mesh)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    with whole_weights(accelerator, lm.model):
        sharded = score(lm.model, val, pad, "cpu").mean_loss
    # What accelerator.get_state_dict returns under FSDP2, saved as trl_engine.save_adapter saves it.
    state = get_model_state_dict(lm.model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                     cpu_offload=True))
    if main_process:
        lm.model.save_pretrained(out / "sharded", state_dict=state, safe_serialization=True)
        (out / "scores.json").write_text(json.dumps({"whole": whole, "sharded": sharded}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    # End as the numbered scripts end (console.run_main), without the interpreter's teardown: after the
    # process group is destroyed, that teardown crashed a gloo process here in about 1 run of 30 ("terminate
    # called without an active exception", or a segmentation fault, after main() had returned on both ranks).
    from emojitune.console import exit_without_teardown
    exit_without_teardown()
