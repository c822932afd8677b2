"""The shared code tokenizer: a byte-level BPE trained offline, deterministically, on the stdlib.

Peers must share one tokenizer (the handshake compares `tokenizer_hash`), and nothing may be
downloaded. The default (4096 tokens) ships with the package (fednode/learning/assets/, made by
scripts/build_tokenizer_asset.py), so sites on different CPython versions still agree; other
vocab sizes are trained from a fixed slice of the local standard library and cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from fednode.errors import ConfigError
from fednode.learning.data import stdlib_files, stdlib_root

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
CORPUS_BYTES = 3_000_000  # ~3 MB keeps training to a few seconds on 2 cores
MIN_FREQUENCY = 2
RECIPE = "fednode-bpe-v1"  # bump when the training recipe changes, so old caches are not reused


def select_corpus(entries: list[tuple[str, int]], budget: int = CORPUS_BYTES) -> list[tuple[str, int]]:
    """Pick (relative path, size) entries up to `budget` bytes, returned sorted by path.

    Files are taken in the order of the sha256 of their path (a fixed pseudo-random order), so
    the slice samples the whole stdlib instead of only the alphabetically first modules.
    """
    ranked = sorted(entries, key=lambda e: (hashlib.sha256(e[0].encode()).hexdigest(), e[0]))
    chosen, total = [], 0
    for rel, size in ranked:
        if size == 0 or total + size > budget:
            continue
        chosen.append((rel, size))
        total += size
    return sorted(chosen)


def corpus_fingerprint(entries: list[tuple[str, int]], vocab_size: int) -> str:
    """sha256 over the recipe, vocab size and the sorted (path, size) list of the corpus."""
    h = hashlib.sha256(f"{RECIPE}\0{vocab_size}\0{MIN_FREQUENCY}\0".encode())
    for rel, size in sorted(entries):
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def _corpus() -> tuple[Path, list[tuple[str, int]]]:
    root = stdlib_root()
    entries = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in stdlib_files()]
    if not entries:
        raise ConfigError(f"no stdlib .py files under {root}: install a full CPython (with its Lib/)")
    return root, select_corpus(entries)


def _train(root: Path, entries: list[tuple[str, int]], vocab_size: int, out_dir: Path) -> None:
    texts = [(root / rel).read_text(encoding="utf-8") for rel, _ in entries]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
    )
    tok.save_pretrained(str(out_dir))


def _load(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_tokenizer_dir(vocab_size: int) -> Path | None:
    path = ASSETS / f"bpe-{vocab_size}"
    return path if (path / "tokenizer.json").is_file() else None


def train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train the BPE from the local stdlib into out_dir (used to make the shipped asset)."""
    root, entries = _corpus()
    _train(root, entries, vocab_size, out_dir)


def build_tokenizer(cache_dir: Path, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """The shipped tokenizer for this vocab size, else train (or reuse from cache_dir) one;
    safe when processes race."""
    shipped = shipped_tokenizer_dir(vocab_size)
    if shipped is not None:
        return _load(shipped)
    if vocab_size < 512:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE: use at least 512")
    cache_dir = Path(cache_dir)
    root, entries = _corpus()
    final = cache_dir / f"bpe-{vocab_size}-{corpus_fingerprint(entries, vocab_size)[:12]}"
    if final.is_dir():
        return _load(final)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create tokenizer cache dir {cache_dir} ({exc}): pick a writable path") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the node's processes
        _train(root, entries, vocab_size, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished first: its copy is identical, use it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def tokenizer_hash(tok) -> str:
    """sha256 of the canonical tokenizer JSON: equal exactly when two tokenizers encode alike."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
