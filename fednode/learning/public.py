"""The public transfer set: code every site holds identically, for distillation across sites.

Private code never leaves a site, so P can only learn what other sites know through the merged
messenger's predictions. On a site's own text those predictions mostly repeat what P already
fits; on code that no site trained on, they carry what the mesh learned (FedDF, DS-FL and FedMD
distil on shared public data: papers.md). The set is a fixed list of CPython standard-library
modules, copied once into the package (`scripts/build_public_set.py`) so that every site reads
the same bytes whatever its interpreter; the handshake compares its hash (it is part of the
messenger family hash), and the benchmark partitions exclude these modules (`data.stdlib_files`).
Its overlap with HumanEval is measured and reported (`tools.humaneval.overlap`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fednode.errors import ConfigError

PUBLIC_MODULES = ("bisect", "calendar", "contextlib", "copy", "csv", "fnmatch", "fractions", "gettext", "glob",
                  "numbers", "operator", "pprint", "queue", "random", "sched", "selectors", "shlex", "statistics",
                  "textwrap")
ASSET = Path(__file__).parent / "assets" / "public" / "public_code.json"
PUBLIC_SHA256 = "6e84acae11d3a28fa5245c90ed052fb88d05df3f542cdddcda0ea859a2bc9bae"


def public_sources(path: Path = ASSET) -> dict[str, str]:
    """{module: source} of the shipped set, checked against PUBLIC_SHA256 (ConfigError otherwise)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"public transfer set {path} is unreadable ({exc.strerror}): reinstall fednode") from None
    if hashlib.sha256(raw).hexdigest() != PUBLIC_SHA256:
        raise ConfigError(f"public transfer set {path} does not match its pinned hash: reinstall fednode")
    return json.loads(raw.decode("utf-8"))


def public_hash() -> str:
    """What peers compare (through the messenger family hash): the pinned sha256 of the set."""
    return PUBLIC_SHA256


def _ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    out: list[int] = []
    for text in public_sources().values():
        out.extend(backend.encode(text, add_special_tokens=False).ids)
        out.append(eos)
    return out


def public_blocks(tokenizer, seq_len: int) -> torch.Tensor:
    """Every non-overlapping block of seq_len tokens of the set, [n, seq_len] int64 (deterministic)."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len} must be >= 2")
    ids = _ids(tokenizer)
    n = len(ids) // seq_len
    if n < 1:
        raise ValueError(f"the public set holds {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
