"""Copy the public transfer set's stdlib modules into the package and pin their hash.

Run once when PUBLIC_MODULES changes: `python scripts/build_public_set.py`. It writes
fednode/learning/assets/public/public_code.json and updates PUBLIC_SHA256 in public.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from fednode.learning.data import stdlib_root
from fednode.learning.public import ASSET, PUBLIC_MODULES


def main() -> None:
    root = stdlib_root()
    sources = {name: (root / f"{name.replace('.', '/')}.py").read_text(encoding="utf-8") for name in PUBLIC_MODULES}
    raw = json.dumps(sources, sort_keys=True, ensure_ascii=False, indent=0).encode("utf-8")
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_bytes(raw)
    digest = hashlib.sha256(raw).hexdigest()
    module = Path(__file__).resolve().parents[1] / "fednode" / "learning" / "public.py"
    text = re.sub(r'PUBLIC_SHA256 = "[^"]*"', f'PUBLIC_SHA256 = "{digest}"', module.read_text())
    module.write_text(text)
    print(f"{ASSET}: {len(raw)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
