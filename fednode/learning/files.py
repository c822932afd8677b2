"""Which of a site's files are its training code: `[data]` include/exclude globs and languages.

Pure and torch-free (fednode.config validates language names with it). Patterns are matched
against the path relative to `[data] dir`, with `/` separators:

- a pattern without `/` matches a file name at any depth (like .gitignore): `*.py`, `*_pb2.py`;
- a pattern with `/` is anchored at the data dir: `src/**/*.rs`, `**/tests/**`;
- `*` and `?` never cross a `/`; `**` spans directories; `[abc]`/`[!abc]` are character classes.

A directory matched by an exclude pattern ending in `/**` is not entered at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fednode.errors import ConfigError

DEFAULT_INCLUDE = ("**/*.py",)  # neither include nor languages set: Python, as before
# Today's skipped directories, as globs an operator can see and change: hidden files and
# directories, caches, vendored installs and test directories.
DEFAULT_EXCLUDE = (
    "**/.*", "**/.*/**", "**/__pycache__/**", "**/site-packages/**", "**/dist-packages/**",
    "**/node_modules/**", "**/test/**", "**/tests/**", "**/testing/**", "**/test_*/**", "**/*_test/**",
    "**/*_tests/**",
)
DEFAULT_MAX_FILE_KIB = 1024  # bigger files are generated, minified or data, rarely anyone's own code

LANGUAGES: dict[str, tuple[str, ...]] = {
    "python": ("*.py", "*.pyi"),
    "javascript": ("*.js", "*.mjs", "*.cjs", "*.jsx"),
    "typescript": ("*.ts", "*.mts", "*.cts", "*.tsx"),
    "rust": ("*.rs",),
    "go": ("*.go",),
    "java": ("*.java",),
    "kotlin": ("*.kt", "*.kts"),
    "scala": ("*.scala",),
    "c": ("*.c", "*.h"),
    "cpp": ("*.cc", "*.cpp", "*.cxx", "*.hh", "*.hpp", "*.hxx", "*.h"),
    "csharp": ("*.cs",),
    "swift": ("*.swift",),
    "ruby": ("*.rb",),
    "php": ("*.php",),
    "shell": ("*.sh", "*.bash"),
    "sql": ("*.sql",),
    "lua": ("*.lua",),
    "r": ("*.R", "*.r"),
    "julia": ("*.jl",),
    "haskell": ("*.hs",),
    "ocaml": ("*.ml", "*.mli"),
    "elixir": ("*.ex", "*.exs"),
    "erlang": ("*.erl", "*.hrl"),
    "dart": ("*.dart",),
    "zig": ("*.zig",),
}


def check_pattern(where: str, pattern: str) -> None:
    """ConfigError unless `pattern` is a usable relative glob."""
    if not pattern or pattern.strip() != pattern:
        raise ConfigError(f"{where} has an empty or space-padded pattern {pattern!r}: write globs like \"**/*.py\"")
    if pattern.startswith("/") or re.match(r"^[A-Za-z]:", pattern):
        raise ConfigError(f"{where} pattern {pattern!r} is absolute: patterns are relative to [data] dir, "
                          f"e.g. \"{pattern.lstrip('/')}\"")
    if ".." in pattern.split("/"):
        raise ConfigError(f"{where} pattern {pattern!r} leaves [data] dir ('..'): point [data] dir higher instead")
    if pattern.count("[") != pattern.count("]"):
        raise ConfigError(f"{where} pattern {pattern!r} has an unclosed [ ]: close the character class")


def check_languages(languages: Sequence[str]) -> None:
    for lang in languages:
        if lang.lower() not in LANGUAGES:
            raise ConfigError(f"[data] languages: {lang!r} is unknown (known: {', '.join(sorted(LANGUAGES))}): "
                              "use one of those, or list its files in [data] include")


def include_patterns(include: Sequence[str], languages: Sequence[str]) -> tuple[str, ...]:
    """The include globs in force: `include` plus each language's, or Python when neither is set."""
    out = list(include)
    for lang in languages:
        out.extend(p for p in LANGUAGES[lang.lower()] if p not in out)
    return tuple(out) if out else DEFAULT_INCLUDE


def _translate(pattern: str) -> str:
    """A glob (see the module docstring) as a regex over a relative POSIX path."""
    if "/" not in pattern:
        pattern = "**/" + pattern
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\").replace("/", "") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def compile_globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{_translate(p)})" for p in patterns), re.DOTALL)


def glob_match(pattern: str, rel: str) -> bool:
    """Whether one glob matches a relative POSIX path (a helper for tests and docs)."""
    return re.fullmatch(_translate(pattern), rel, re.DOTALL) is not None


@dataclass
class Selection:
    """The files chosen under a data dir, and what was passed over and why."""

    root: Path
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    excluded: int = 0  # files matched by an exclude pattern
    excluded_dirs: int = 0  # directories not entered (an exclude pattern ending in /**)
    unmatched: int = 0  # files no include pattern matches
    binary: int = 0  # NUL bytes, or not UTF-8
    too_large: int = 0  # larger than max_file_bytes
    unreadable: int = 0  # a file or directory that could not be read
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few relative paths

    def note(self, reason: str, rel: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(rel)

    def skipped_text(self) -> str:
        parts = [(self.excluded, "excluded"), (self.excluded_dirs, "excluded directories"),
                 (self.binary, "binary or not UTF-8"), (self.too_large, "too large"),
                 (self.unreadable, "unreadable"), (self.unmatched, "not matching include")]
        return ", ".join(f"{n} {what}" for n, what in parts if n) or "nothing"


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def select_files(root: Path, include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 max_file_bytes: int | None = DEFAULT_MAX_FILE_KIB * 1024) -> Selection:
    """Walk `root` (no symlinked directories) and choose the readable UTF-8 text files that an
    include pattern matches and no exclude pattern does, up to `max_file_bytes` each, sorted by
    relative path. Raises OSError only when `root` itself cannot be listed."""
    root = Path(root)
    inc, exc = compile_globs(include), compile_globs(exclude)
    prune = compile_globs([p[:-3] for p in exclude if p.endswith("/**")])
    sel = Selection(root)
    found: list[tuple[str, Path]] = []
    errors: list[OSError] = []

    def onerror(err: OSError) -> None:
        errors.append(err)

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        base = Path(dirpath).relative_to(root).as_posix()
        base = "" if base == "." else base + "/"
        keep = []
        for d in sorted(dirnames):
            if prune is not None and prune.fullmatch(base + d):
                sel.note("excluded_dirs", base + d + "/")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            rel = base + name
            if inc is None or not inc.fullmatch(rel):
                sel.unmatched += 1
                continue
            if exc is not None and exc.fullmatch(rel):
                sel.note("excluded", rel)
                continue
            path = Path(dirpath) / name
            try:
                if not path.is_file():
                    continue
                size = path.stat().st_size
                if max_file_bytes is not None and size > max_file_bytes:
                    sel.note("too_large", rel)
                    continue
                data = path.read_bytes()
            except OSError:
                sel.note("unreadable", rel)
                continue
            if not _is_text(data):
                sel.note("binary", rel)
                continue
            found.append((rel, path))
            sel.bytes += len(data)
    for err in errors:
        where = Path(err.filename or root)
        if where == root:  # os.walk reports the root's own failure here and yields nothing
            raise err
        try:  # a subdirectory that could not be listed
            sel.note("unreadable", where.relative_to(root).as_posix() + "/")
        except ValueError:
            sel.note("unreadable", str(where))
    found.sort(key=lambda item: item[0])
    sel.files = [path for _, path in found]
    return sel
