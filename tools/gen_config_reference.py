"""Generate the config reference table of docs/operations.md from the config schema itself.

    python -m tools.gen_config_reference            # print the table
    python -m tools.gen_config_reference --check    # exit 1 if docs/operations.md is out of date
    python -m tools.gen_config_reference --write    # rewrite the table in docs/operations.md

Rows come from the section dataclasses of fednode.config (key, type, default); the meaning comes
from the comment on the key's line in `fednode.config.EXAMPLE` (what `fednode init` writes), else
from the comment on the dataclass field, else from `_MORE` below. tests/test_docs_operations.py
fails when the embedded table differs from `render_reference()`, so it cannot drift.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from fednode import config as config_module

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
UNDESCRIBED = "(undescribed: add a comment on this key in fednode.config.EXAMPLE)"

# Meanings for keys that neither EXAMPLE nor the dataclass comments describe. A stale entry (a key
# that no longer exists) is an error, so this cannot rot either.
_MORE: dict[tuple[str, str], str] = {
    ("mesh", "gossip_interval_s"): "seconds between gossip ticks (heartbeat growth, push-pull with peers)",
    ("train", "steps_per_round"): "local optimizer steps per round",
    ("train", "batch_size"): "sequences per training step",
    ("train", "lr"): "learning rate of the local optimizer",
    ("tls", "ca"): "the mesh CA certificate (`ca.crt`), the only root trusted for peers",
    ("tls", "cert"): "this node's certificate (`SITE.crt`); its CN is the node name",
    ("tls", "key"): "this node's private key (`SITE.key`, mode 0600, owned by the daemon's user)",
    ("model", "vocab_size"): "tokenizer vocabulary size; 4096 ships with fednode, others are trained once "
                             "into the tokenizer cache; the same on every site",
    ("model", "tokenizer_cache"): "where trained tokenizers are kept; defaults to DATA_DIR/tokenizers",
    ("data", "seq_len"): "tokens per training sequence",
    ("data", "max_tokens"): "at most this many tokens of the code are used",
    ("train", "keep_checkpoints"): "round checkpoints kept in DATA_DIR/checkpoints (older ones are pruned)",
    ("learning", "lr_messenger"): "learning rate of the messenger (the small model exchanged with peers)",
    ("learning", "qffl_q"): "q of q-FFL weighting (weighting = \"qffl\"): higher q favours peers with higher loss",
    ("learning", "curriculum"): "train on easy code blocks first and unlock harder ones round by round",
    ("learning", "curriculum_buckets"): "difficulty buckets of the curriculum",
    ("learning", "curriculum_midpoint_rounds"): "bucket k is half unlocked at round k times this",
    ("negotiation", "plateau_window"): "rounds over which the loss must have stopped improving before the "
                                       "messenger grows",
    ("negotiation", "plateau_theta"): "relative loss drop over plateau_window below which the loss has plateaued",
    ("negotiation", "js_threshold"): "grow only if peers' predictions differ at least this much (mean pairwise "
                                     "Jensen-Shannon divergence)",
    ("negotiation", "activation_delay"): "rounds between proposing a level and activating it",
    ("negotiation", "min_round_gap"): "rounds after an activation before the next growth",
    ("negotiation", "min_live_peers"): "with fewer live peers a node neither proposes, acks nor commits",
    ("negotiation", "quorum"): "fraction of live peers whose ack commits a proposal (> 0.5)",
    ("limits", "max_payload_mib"): "largest update or state transfer accepted from a peer, MiB",
    ("limits", "chunk_kib"): "plaintext bytes per sealed chunk, KiB (1..16384)",
    ("log", "level"): "debug, info, warning or error",
}


def _sections() -> list[tuple[str, type]]:
    """(section name, dataclass) in the order of `Config`'s fields."""
    out = []
    hints = typing.get_type_hints(config_module.Config)
    for f in dataclasses.fields(config_module.Config):
        cls = hints.get(f.name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            out.append((f.name, cls))
    return out


def _example_comments(example: str) -> dict[tuple[str, str], str]:
    """(section, key) -> the trailing comment of that key's line in EXAMPLE (commented-out keys too)."""
    comments: dict[tuple[str, str], str] = {}
    section = ""
    for line in example.splitlines():
        text = line.strip()
        header = re.match(r"\[(\w+)\]", text)
        if header:
            section = header.group(1)
            continue
        assignment = re.match(r"#?\s*(\w+)\s*=\s*(.*)$", text)
        if not assignment or not section:
            continue
        key, rest = assignment.groups()
        comment = _trailing_comment(rest)
        if comment:
            comments[(section, key)] = comment
    return comments


def _trailing_comment(value_and_comment: str) -> str:
    """The `# ...` after a TOML value, ignoring '#' inside quoted strings."""
    quote = None
    for i, ch in enumerate(value_and_comment):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return value_and_comment[i + 1:].strip()
    return ""


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the trailing `# comment` on its line in the dataclass source."""
    try:
        source, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    text = "".join(source)
    comments_by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                        if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.walk(ast.parse(inspect.cleandoc(text) if text.startswith((" ", "\t")) else text)):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = comments_by_line.get(node.lineno)
            if comment:
                out[node.target.id] = comment
    return out


def _type_name(annotation: Any) -> str:
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.StrEnum)):
        return "string"  # an enum is written as one of its values
    if annotation is Path:
        return "path"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple and args and args[0] is str:
        return "list of strings"
    if origin is tuple and args and args[0] is int:
        return "list of integers"
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} (optional)" if len(inner) == 1 else "optional"
    return getattr(annotation, "__name__", str(annotation))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path | str):
        return f'`"{value}"`'
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(str(v) if isinstance(v, int) else f'"{v}"' for v in value) + "]`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_rows() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, meaning) for every config key, in schema order."""
    example = _example_comments(config_module.EXAMPLE)
    rows = []
    known = set()
    for section, cls in _sections():
        hints = typing.get_type_hints(cls)
        from_fields = _field_comments(cls)
        for f in dataclasses.fields(cls):
            known.add((section, f.name))
            meaning = (example.get((section, f.name)) or from_fields.get(f.name)
                       or _MORE.get((section, f.name)) or UNDESCRIBED)
            rows.append((section, f.name, _type_name(hints[f.name]), _default(f), meaning))
    stale = sorted(set(_MORE) - known)
    if stale:
        raise ValueError(f"tools/gen_config_reference.py describes keys the schema no longer has: {stale}; "
                         "remove them from _MORE")
    return rows


def render_reference() -> str:
    """The Markdown table embedded in docs/operations.md between the config-reference markers."""
    lines = [
        "| section | key | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for section, key, type_name, default, meaning in reference_rows():
        lines.append(f"| `[{section}]` | `{key}` | {type_name} | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def embedded_reference(text: str) -> str:
    """The table currently between the markers of a document."""
    try:
        start = text.index(START) + len(START)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"the document lacks the markers {START} ... {END}") from None
    return text[start:end].strip("\n") + "\n"


def replace_reference(text: str, table: str) -> str:
    start = text.index(START) + len(START)
    end = text.index(END, start)
    return text[:start] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="config reference table for docs/operations.md")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in the document")
    mode.add_argument("--check", action="store_true", help="exit 1 if the document's table is out of date")
    parser.add_argument("--doc", type=Path, default=DOCS, help=f"document (default {DOCS})")
    args = parser.parse_args(argv)
    table = render_reference()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    text = args.doc.read_text(encoding="utf-8")
    if embedded_reference(text) == table:
        print(f"{args.doc}: config reference is up to date")
        return 0
    if args.check:
        print(f"{args.doc}: config reference is out of date: run `python -m tools.gen_config_reference --write`",
              file=sys.stderr)
        return 1
    args.doc.write_text(replace_reference(text, table), encoding="utf-8")
    print(f"{args.doc}: config reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
