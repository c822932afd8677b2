"""Heterogeneity signal for capacity negotiation: how differently peers' models predict a fixed probe.

Every peer runs its model on the same public probe blocks (cut from a fixed list of CPython
stdlib modules, never from an evaluation set such as HumanEval) and gossips a compact
*probe signature*; the mean pairwise Jensen-Shannon divergence of the signatures is the
heterogeneity term of the negotiation (papers.md 4.2/4.4).

Signature design: the per-token next-token distributions themselves (what distillation moves),
at `positions` fixed positions of every probe block, each kept as its top-k (token id, prob)
plus the remaining tail mass, which is spread evenly over the other tokens when decoded.
A decoded entry is a proper distribution, so JS stays exact on it and bounded by ln 2.
Averaging over positions would be smaller but blurs into unigram statistics that hide how
two models differ; a random projection breaks the JS bounds. Default 8 blocks x 8 positions
x top-16 with uint16 ids and float16 probs is 64 * (16 * 4 + 2) bytes + header ~= 4.3 KiB.
The even tail makes the signature JS smaller than the full-vocabulary JS (about 0.4-0.7x on
briefly trained micro models) but it kept the order of every pair tried, and every peer uses the
same estimator: calibrate negotiation thresholds on signature JS, not on the dense one.

The probe text comes from the local stdlib. The chosen modules are identical in CPython 3.11-3.13
and the default tokenizer ships with the package, so peers agree on the probe; should a future
CPython change one, the signature carries the probe's hash and different probes are never compared.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from fednode.errors import ConfigError
from fednode.learning.data import stdlib_root, tokenize_files

# Pure-Python modules whose source is byte-identical in CPython 3.11, 3.12 and 3.13 (checked:
# PROBE_TEXT_SHA256), so sites on different interpreters build the same probe.
PROBE_MODULES = ("abc", "difflib", "graphlib", "heapq", "json", "json.scanner", "py_compile", "string", "weakref")
PROBE_TEXT_SHA256 = "e7ab41f18d94e77f093ed52f0d81c6fe239a902a50111a9d93f9bf339f180417"
DEFAULT_BLOCKS = 8
DEFAULT_SEQ_LEN = 64
DEFAULT_POSITIONS = 8
DEFAULT_TOP_K = 16
MAX_SIGNATURE_BYTES = 8192
_MAGIC = b"FNPS1"


def probe_files(root: Path | None = None) -> list[Path]:
    """The probe modules' source files, in PROBE_MODULES order."""
    root = stdlib_root() if root is None else Path(root)
    files = []
    for name in PROBE_MODULES:
        rel = name.replace(".", "/")
        for candidate in (root / f"{rel}.py", root / rel / "__init__.py"):
            if candidate.is_file():
                files.append(candidate)
                break
        else:
            raise ConfigError(f"probe module {name!r} not found under {root}: install a full CPython (with its Lib/)")
    return files


def probe_text_sha256(root: Path | None = None) -> str:
    """sha256 over (module name, source) of the probe modules; equals PROBE_TEXT_SHA256 on CPython 3.11-3.13."""
    h = hashlib.sha256()
    for name, path in zip(PROBE_MODULES, probe_files(root), strict=True):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def probe_blocks(tokenizer, n: int = DEFAULT_BLOCKS, seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """n evenly spaced blocks [n, seq_len] of the tokenized probe modules (deterministic)."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"need n >= 1 blocks ({n}) of seq_len >= 2 tokens ({seq_len})")
    ids = tokenize_files(probe_files(), tokenizer, None)
    total = len(ids) // seq_len
    if total < n:
        raise ValueError(f"the probe text holds {total} blocks of {seq_len} tokens: ask for at most that many")
    blocks = torch.tensor(ids[: total * seq_len], dtype=torch.long).view(total, seq_len)
    pick = [(i * total) // n for i in range(n)]
    return blocks[pick]


def probe_hash(blocks: torch.Tensor) -> str:
    """sha256 of the probe token ids: peers compare signatures only when this matches."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def next_token_distributions(model, blocks: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary at every position, [n, seq, vocab] float32 (no grad, eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=blocks.long().to(next(model.parameters()).device), use_cache=False).logits
    finally:
        model.train(was_training)
    return torch.softmax(logits.float(), dim=-1).cpu()


def probe_positions(seq_len: int, positions: int) -> list[int]:
    """Evenly spaced positions ending at the last one (later positions have more context)."""
    positions = min(positions, seq_len)
    return [((i + 1) * seq_len) // positions - 1 for i in range(positions)]


@dataclass(frozen=True)
class ProbeSignature:
    """Top-k next-token distributions at fixed probe positions; ids/probs are [entries, k]."""

    probe: str  # probe_hash of the blocks it was computed on
    vocab: int
    ids: torch.Tensor  # int64
    probs: torch.Tensor  # float32, as rounded to float16 on the wire
    tail: torch.Tensor  # float32 [entries]: mass outside the top-k

    def dense(self) -> torch.Tensor:
        """[entries, vocab] float64 distributions: top-k exact, the tail spread over the other tokens."""
        entries, k = self.ids.shape
        rest = max(self.vocab - k, 1)
        out = (self.tail.double() / rest).unsqueeze(1).expand(entries, self.vocab).clone()
        out.scatter_(1, self.ids, self.probs.double())
        return out / out.sum(dim=1, keepdim=True)

    def to_bytes(self) -> bytes:
        """Wire form: header, uint16 ids (uint32 past 65536 tokens), float16 probs and tails."""
        entries, k = self.ids.shape
        wide = self.vocab > 65536
        header = _MAGIC + bytes.fromhex(self.probe)[:16] + struct.pack("<IHHB", self.vocab, entries, k, int(wide))
        ids = self.ids.numpy().astype("<u4" if wide else "<u2").tobytes()
        probs = self.probs.numpy().astype("<f2").tobytes()
        tail = self.tail.numpy().astype("<f2").tobytes()
        return header + ids + probs + tail

    @classmethod
    def from_bytes(cls, data: bytes) -> ProbeSignature:
        """Parse to_bytes output (ValueError on anything malformed); probe keeps its 16-byte prefix."""
        import numpy as np

        head = len(_MAGIC) + 16 + struct.calcsize("<IHHB")
        if len(data) < head or not data.startswith(_MAGIC):
            raise ValueError("not a probe signature")
        vocab, entries, k, wide = struct.unpack("<IHHB", data[len(_MAGIC) + 16 : head])
        id_size = 4 if wide else 2
        if len(data) != head + entries * k * (id_size + 2) + entries * 2 or k > vocab:
            raise ValueError("probe signature has the wrong length for its header")
        pos = head
        ids = np.frombuffer(data, "<u4" if wide else "<u2", entries * k, pos)
        pos += entries * k * id_size
        probs = np.frombuffer(data, "<f2", entries * k, pos)
        tail = np.frombuffer(data, "<f2", entries, pos + entries * k * 2)
        if ids.size and int(ids.max()) >= vocab:
            raise ValueError("probe signature names a token outside its vocabulary")
        if not (np.isfinite(probs).all() and np.isfinite(tail).all()) or (probs < 0).any() or (tail < 0).any():
            raise ValueError("probe signature holds negative or non-finite probabilities")
        return cls(
            probe=data[len(_MAGIC) : len(_MAGIC) + 16].hex(),
            vocab=vocab,
            ids=torch.from_numpy(ids.astype(np.int64)).view(entries, k),
            probs=torch.from_numpy(probs.astype(np.float32)).view(entries, k),
            tail=torch.from_numpy(tail.astype(np.float32)),
        )


def probe_signature(
    model, blocks: torch.Tensor, *, positions: int = DEFAULT_POSITIONS, top_k: int = DEFAULT_TOP_K
) -> ProbeSignature:
    """This peer's compact signature on the probe (probabilities rounded through float16, as sent)."""
    dist = next_token_distributions(model, blocks)[:, probe_positions(blocks.shape[1], positions)]
    dist = dist.reshape(-1, dist.shape[-1])
    k = min(top_k, dist.shape[-1])
    probs, ids = torch.topk(dist, k, dim=-1)
    probs = probs.half().float()
    tail = (1.0 - probs.sum(dim=-1)).clamp_min(0.0).half().float()
    return ProbeSignature(probe_hash(blocks)[:32], int(dist.shape[-1]), ids, probs, tail)


def _as_dense(x: torch.Tensor | ProbeSignature) -> torch.Tensor:
    return x.dense() if isinstance(x, ProbeSignature) else x.double()


def js_divergence(p: torch.Tensor | ProbeSignature, q: torch.Tensor | ProbeSignature) -> float:
    """Jensen-Shannon divergence in nats (0 .. ln 2), averaged over leading dims / signature entries.

    Tensors are distributions over their last dim (renormalised); signatures must share probe and vocab.
    """
    if isinstance(p, ProbeSignature) and isinstance(q, ProbeSignature):
        if (p.probe, p.vocab, tuple(p.ids.shape)) != (q.probe, q.vocab, tuple(q.ids.shape)):
            raise ValueError("signatures were computed on different probes, vocabularies or sizes")
    a, b = _as_dense(p), _as_dense(q)
    if a.shape != b.shape:
        raise ValueError(f"distribution shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if bool((a < 0).any() or (b < 0).any()):
        raise ValueError("distributions hold negative probabilities")
    a = a / a.sum(dim=-1, keepdim=True)
    b = b / b.sum(dim=-1, keepdim=True)
    m = 0.5 * (a + b)
    kl_am = torch.where(a > 0, a * (a.log() - m.log()), torch.zeros_like(a)).sum(-1)
    kl_bm = torch.where(b > 0, b * (b.log() - m.log()), torch.zeros_like(b)).sum(-1)
    js = (0.5 * (kl_am + kl_bm)).mean()
    return float(js.clamp(0.0, math.log(2.0)))


def mean_pairwise_js(signatures: Sequence[torch.Tensor | ProbeSignature]) -> float:
    """Mean JS over all unordered pairs; 0.0 for a single peer (nothing to differ from)."""
    if not signatures:
        raise ValueError("mean_pairwise_js needs at least one signature")
    pairs = list(combinations(signatures, 2))
    if not pairs:
        return 0.0
    return sum(js_divergence(p, q) for p, q in pairs) / len(pairs)
