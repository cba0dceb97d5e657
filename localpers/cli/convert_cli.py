"""`localpers convert DIR --out model.gguf`: a Hugging Face checkpoint (llama, qwen2, qwen3, gemma3) to GGUF."""
from __future__ import annotations

from pathlib import Path

from localpers.errors import UserError


def cmd_convert(args):
    from localpers.model.convert import convert

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    path = convert(args.dir, out, args.type)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); try: localpers info --model {path}")


def add_cli(sub):
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF",
                       description="Convert a Hugging Face checkpoint directory (config.json, *.safetensors, and a "
                                   "SentencePiece tokenizer.model or a BPE tokenizer.json) of a llama, qwen2, qwen3 "
                                   "or gemma3 model to a GGUF file that `localpers serve --model` serves and "
                                   "personalizes.")
    p.add_argument("dir", metavar="DIR", help="the checkpoint directory")
    p.add_argument("--out", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--type", default="f16", choices=["f16", "f32", "q8_0", "q4_1"],
                   help="matrix type (default: %(default)s; norms and biases stay F32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_convert)
