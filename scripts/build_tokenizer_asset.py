"""Rebuild the shipped tokenizer asset: python scripts/build_tokenizer_asset.py [--vocab 4096]

The asset is what every site loads, so rebuilding it changes the tokenizer hash: a mesh must
upgrade all its nodes together (the handshake refuses mixed tokenizers with TOKENIZER_MISMATCH).
"""

import argparse
import shutil
from pathlib import Path

from fednode.learning.tokenizer import ASSETS, train_tokenizer

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096)
    ns = parser.parse_args()
    out = ASSETS / f"bpe-{ns.vocab}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_tokenizer(Path(out), ns.vocab)
    print(f"wrote {out}")
