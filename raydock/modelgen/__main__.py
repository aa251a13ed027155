"""``python -m raydock.modelgen --size tiny --out DIR [--zip FILE]``."""

from __future__ import annotations

import argparse
import sys

from raydock.modelgen import SIZES, build_model_zip, generate_model
from raydock.modelgen.quantized import METHODS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raydock.modelgen",
        description="Generate a small random-weight Llama model (Hugging Face layout).",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory to write the model files into")
    parser.add_argument("--zip", dest="zip_path", help="also (or only) write a .zip of the model")
    parser.add_argument("--top-level-dir", help="put the zip entries under this single folder")
    parser.add_argument(
        "--quantize", choices=METHODS, help="zip a 4-bit checkpoint of the model instead"
    )
    args = parser.parse_args(argv)
    if not args.out and not args.zip_path:
        parser.error("give --out DIR and/or --zip FILE")
    if args.out:
        print(generate_model(args.out, size=args.size, seed=args.seed))
    if args.zip_path:
        print(
            build_model_zip(
                args.zip_path,
                size=args.size,
                seed=args.seed,
                top_level_dir=args.top_level_dir,
                quantization=args.quantize,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
