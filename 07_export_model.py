"""Step 7: export the tuned model for plain transformers, llama.cpp, Ollama and LM Studio.

Merges the adapter into the base model (checking its answers on the validation tweets) and writes
checkpoints/export/: merged/ (a Hugging Face model folder), model-f16.gguf and an Ollama Modelfile.

    uv run 07_export_model.py
    uv run 07_export_model.py --checkpoint best --gguf-type q8_0
    uv run 07_export_model.py --no-gguf --out ./my-emoji-model
"""

import argparse

from emojitune.cli import add_checkpoint, add_checkpoint_dir, checkpoint_dir
from emojitune.console import run_main
from emojitune.export import DEFAULT_GGUF_TYPE, GGUF_TYPES, export


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_dir(p)
    add_checkpoint(p, "the adapter to merge")
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="export folder (default: DIR/export, in --checkpoint-dir)")
    p.add_argument("--gguf-type", default=DEFAULT_GGUF_TYPE, metavar="TYPE",
                   help=f"GGUF weight type: {', '.join(GGUF_TYPES)} (default: {DEFAULT_GGUF_TYPE}; "
                        "q8_0 is about half the size)")
    p.add_argument("--no-gguf", action="store_true", help="write only the merged Hugging Face model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    args = p.parse_args()
    export(checkpoint_dir(args), checkpoint=args.checkpoint, out=args.out, gguf_type=args.gguf_type,
           write_gguf=not args.no_gguf, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)
