"""Local code data: finding source files, non-IID stdlib partitions, and token blocks.

Every node trains on its own directory of source files. The demo and the tests make those
directories from the CPython standard library (always present, no download), split by
top-level package so each node sees different code (non-IID, as in real federations).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fednode.errors import ConfigError
from fednode.learning.files import DEFAULT_EXCLUDE, DEFAULT_MAX_FILE_KIB, Selection, include_patterns, select_files

log = logging.getLogger(__name__)

# Directory names never searched for training code: caches, vendored installs and tests.
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules", "test", "tests", "testing"})
# Extra stdlib directories that are build artefacts or test-only (checked by prefix).
_STDLIB_SKIP_PREFIXES = ("config-", "lib-dynload")


def _skip_dir(name: str) -> bool:
    """Hidden, cache, vendored and test directories hold no code we want to learn from."""
    return name.startswith(".") or name in SKIP_DIRS or name.startswith("test_") or name.endswith(("_test", "_tests"))


def _is_text(path: Path) -> bool:
    """True for a readable UTF-8 file without NUL bytes (binary files are skipped)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return False
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def list_code_files(root: Path, suffixes: Sequence[str] = (".py",)) -> list[Path]:
    """All readable text source files under root, sorted by relative path (deterministic order)."""
    root = Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in filenames:
            if name.startswith(".") or not name.endswith(tuple(suffixes)):
                continue
            path = Path(dirpath) / name
            if path.is_file() and _is_text(path):
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (the offline corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib .py files without tests, site-packages, build directories or the public transfer
    set's modules (every site holds those: they must not be one site's private code), sorted."""
    from fednode.learning.public import PUBLIC_MODULES

    root = stdlib_root()
    public = {f"{name.replace('.', '/')}.py" for name in PUBLIC_MODULES}
    return [p for p in list_code_files(root) if not p.relative_to(root).parts[0].startswith(_STDLIB_SKIP_PREFIXES)
            and p.relative_to(root).as_posix() not in public]


@dataclass(frozen=True)
class _Group:
    """A unit of assignment: one top-level package, or a bundle of top-level modules."""

    name: str
    files: tuple[Path, ...]
    size: int


def _file_size(path: Path) -> int:
    return path.stat().st_size


def _stdlib_groups(files: list[Path], root: Path, n: int, seed: int) -> list[_Group]:
    """Whole packages stay together; loose modules are shuffled (by seed) into bundles."""
    packages: dict[str, list[Path]] = {}
    modules: list[Path] = []
    for path in files:
        parts = path.relative_to(root).parts
        if len(parts) == 1:
            modules.append(path)
        else:
            packages.setdefault(parts[0], []).append(path)
    groups = [_Group(name, tuple(paths), sum(_file_size(p) for p in paths)) for name, paths in sorted(packages.items())]
    total = sum(g.size for g in groups) + sum(_file_size(p) for p in modules)
    bundle_bytes = max(1, total // (3 * n))
    rng = random.Random(seed)
    shuffled = list(modules)
    rng.shuffle(shuffled)
    bundle: list[Path] = []
    for path in shuffled:
        bundle.append(path)
        if sum(_file_size(p) for p in bundle) >= bundle_bytes:
            groups.append(_bundle(len(groups), bundle))
            bundle = []
    if bundle:
        groups.append(_bundle(len(groups), bundle))
    return groups


def _bundle(index: int, paths: list[Path]) -> _Group:
    return _Group(f"modules-{index}", tuple(paths), sum(_file_size(p) for p in paths))


def _split_largest(groups: list[_Group]) -> list[_Group]:
    """Halve the largest splittable group (only needed when n exceeds the group count)."""
    splittable = [g for g in groups if len(g.files) > 1]
    big = max(splittable, key=lambda g: (g.size, g.name))
    half = len(big.files) // 2
    rest = [g for g in groups if g is not big]
    for suffix, part in (("a", big.files[:half]), ("b", big.files[half:])):
        rest.append(_Group(f"{big.name}/{suffix}", part, sum(_file_size(p) for p in part)))
    return rest


def assign_groups(sizes: Sequence[int], n: int) -> list[int]:
    """Greedy largest-first balancing: group i goes to partition result[i] (pure, deterministic)."""
    loads = [0] * n
    counts = [0] * n
    result = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(n), key=lambda k: (counts[k] > 0, loads[k], k))
        result[i] = target
        loads[target] += sizes[i]
        counts[target] += 1
    return result


def stdlib_partitions(n: int, seed: int = 0) -> list[list[Path]]:
    """Split the stdlib into n disjoint, non-empty, non-IID partitions of similar byte size."""
    files = stdlib_files()
    if n < 1 or n > len(files):
        raise ConfigError(f"cannot split the stdlib into {n} partitions: use between 1 and {len(files)} nodes")
    groups = _stdlib_groups(files, stdlib_root(), n, seed)
    while len(groups) < n:
        groups = _split_largest(groups)
    groups.sort(key=lambda g: g.name)
    owner = assign_groups([g.size for g in groups], n)
    parts: list[list[Path]] = [[] for _ in range(n)]
    for group, k in zip(groups, owner, strict=True):
        parts[k].extend(group.files)
    return [sorted(p, key=lambda path: path.as_posix()) for p in parts]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _flat_names(files: Sequence[Path]) -> list[str]:
    """Unique flat file names that keep the path (minus the common root) readable."""
    if not files:
        return []
    absolute = [f.resolve() for f in files]
    common = Path(os.path.commonpath([str(f.parent) for f in absolute]))
    names = []
    for i, path in enumerate(absolute):
        rel = "__".join(path.relative_to(common).parts)
        names.append(f"{i:05d}_{_UNSAFE.sub('_', rel)}")
    return names


def write_partition(files: list[Path], dest: Path, max_bytes: int | None = None) -> int:
    """Copy files into dest as flat names, skipping any that would overflow max_bytes.

    Returns the bytes written. Contents are copied unchanged, except when no whole file fits the
    budget: then the first non-empty file is cut at its last line break within max_bytes, so a small budget
    over a partition of large files still gives the node some code.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    names = _flat_names(files)
    for path, name in zip(files, names, strict=True):
        size = _file_size(path)
        if max_bytes is not None and written + size > max_bytes:
            continue
        shutil.copyfile(path, dest / name)
        written += size
    first = next((i for i, f in enumerate(files) if _file_size(f) > 0), None)
    if written == 0 and first is not None and max_bytes:
        head = files[first].read_bytes()[:max_bytes]
        head = head[: head.rfind(b"\n") + 1] or head
        (dest / names[first]).write_bytes(head)
        written = len(head)
    return written


class TokenDataset:
    """A node's code as fixed-length token blocks, with a deterministic held-out split."""

    def __init__(self, train_blocks: torch.Tensor, heldout_blocks: torch.Tensor):
        if train_blocks.ndim != 2 or heldout_blocks.ndim != 2:
            raise ValueError("token blocks must be 2-D [blocks, seq_len]")
        self.train_blocks = train_blocks
        self.heldout_blocks = heldout_blocks

    @classmethod
    def from_dir(
        cls,
        root: Path,
        tokenizer,
        seq_len: int,
        max_tokens: int | None = None,
        holdout_fraction: float = 0.02,
        seed: int = 0,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        languages: Sequence[str] = (),
        max_file_kib: int | None = DEFAULT_MAX_FILE_KIB,
    ) -> TokenDataset:
        """Tokenize the code files under root that `[data]` selects (eos between files) and cut
        them into blocks; logs what was used, skipped and truncated."""
        if seq_len < 2:
            raise ConfigError(f"seq_len {seq_len} is too short: use at least 2 tokens")
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction {holdout_fraction} must lie strictly between 0 and 1")
        patterns = include_patterns(include, languages)
        sel = select_data_files(Path(root), patterns, exclude, max_file_kib)
        cut: dict[str, int] = {}
        ids = tokenize_files(sel.files, tokenizer, max_tokens, report=cut)
        n_blocks = len(ids) // seq_len
        if n_blocks < 2:
            raise ConfigError(
                f"data dir {root} holds only {len(ids)} tokens: add code or lower seq_len below {len(ids) // 2}"
            )
        _log_selection(sel, patterns, len(ids), cut, max_tokens)
        blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.int32).view(n_blocks, seq_len)
        n_hold = min(n_blocks - 1, max(1, round(n_blocks * holdout_fraction)))
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
        held = order[:n_hold].sort().values
        train = order[n_hold:].sort().values
        return cls(blocks[train], blocks[held])

    @property
    def seq_len(self) -> int:
        return int(self.train_blocks.shape[1])

    @property
    def num_tokens(self) -> int:
        """Training tokens (held-out excluded): the data size used by weighting policies."""
        return int(self.train_blocks.numel())

    def train_batches(self, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """`steps` batches of random training blocks (with replacement), reproducible from seed."""
        gen = torch.Generator().manual_seed(seed)
        n = self.train_blocks.shape[0]
        for _ in range(steps):
            idx = torch.randint(n, (batch_size,), generator=gen)
            yield self.train_blocks[idx].long()

    def heldout_batches(self, batch_size: int) -> list[torch.Tensor]:
        """The held-out blocks in fixed order; the last batch may be short."""
        return [b.long() for b in torch.split(self.heldout_blocks, batch_size)]


def select_data_files(root: Path, include: Sequence[str], exclude: Sequence[str] = DEFAULT_EXCLUDE,
                      max_file_kib: int | None = DEFAULT_MAX_FILE_KIB) -> Selection:
    """The site's code files under `[data] dir`, or one of three ConfigErrors: the directory is
    missing, cannot be read, or holds no file that the globs select."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"[data] dir {root} does not exist: create it and put this site's code in it, "
                          "or point [data] dir at the directory that holds the code")
    if not root.is_dir():
        raise ConfigError(f"[data] dir {root} is a file, not a directory: point [data] dir at the directory "
                          "that holds the code")
    try:
        sel = select_files(root, include, exclude, None if max_file_kib is None else max_file_kib * 1024)
    except OSError as exc:
        raise ConfigError(f"[data] dir {root} cannot be read ({exc.strerror or exc}): give the daemon's user read "
                          "access to it (e.g. chmod -R o+rX, or a group the user is in)") from None
    if not sel.files:
        raise ConfigError(f"[data] dir {root} has no code files matching include {list(include)} (skipped: "
                          f"{sel.skipped_text()}): put this site's code there, or change [data] include, "
                          "languages or exclude")
    return sel


def _log_selection(sel: Selection, patterns: Sequence[str], tokens: int, cut: dict[str, int],
                   max_tokens: int | None) -> None:
    examples = "; ".join(f"{reason}: {', '.join(paths)}" for reason, paths in sel.examples.items())
    truncated = ""
    if cut.get("unused_files") or cut.get("dropped_tokens"):
        truncated = (f"; truncated at max_tokens {max_tokens}: {cut['used_files']} of {len(sel.files)} files used, "
                     f"{cut['unused_files']} not read, {cut['dropped_tokens']} tokens of the last one read dropped")
    log.info("data: %d files (%.1f KiB), %d tokens from %s (include %s); skipped: %s%s%s",
             len(sel.files), sel.bytes / 1024, tokens, sel.root, list(patterns), sel.skipped_text(),
             f" (e.g. {examples})" if examples else "", truncated,
             extra={"data_files": len(sel.files), "data_tokens": tokens, "data_excluded": sel.excluded,
                    "data_binary": sel.binary, "data_too_large": sel.too_large, "data_unreadable": sel.unreadable,
                    "data_truncated_files": cut.get("unused_files", 0)})


def tokenize_files(files: Sequence[Path], tokenizer, max_tokens: int | None,
                    report: dict[str, int] | None = None) -> list[int]:
    """Concatenate file token ids with eos after each file, stopping at max_tokens; `report`
    gets used_files, unused_files (never read) and dropped_tokens (cut from the tail)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("tokenizer has no eos token: build it with fednode.learning.tokenizer")
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    chunk = 64
    for start in range(0, len(files), chunk):
        texts = [(j, p.read_text(encoding="utf-8")) for j, p in enumerate(files[start : start + chunk])]
        texts = [(j, t) for j, t in texts if t]
        for (j, _), enc in zip(texts, backend.encode_batch([t for _, t in texts], add_special_tokens=False),
                               strict=True):
            ids.extend(enc.ids)
            ids.append(eos)
            if max_tokens is not None and len(ids) >= max_tokens:
                if report is not None:
                    used = start + j + 1
                    report.update(used_files=min(used, len(files)), unused_files=max(0, len(files) - used),
                                  dropped_tokens=len(ids) - max_tokens)
                return ids[:max_tokens]
    if report is not None:
        report.update(used_files=len(files), unused_files=0, dropped_tokens=0)
    return ids
