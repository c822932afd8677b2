"""`[data]` file selection: globs, languages and excludes (a pure function), what the start-up log
reports, and the three distinct errors for a missing, unreadable and empty data dir."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from fednode.config import DataSection, parse_config
from fednode.errors import ConfigError
from fednode.learning.data import TokenDataset, list_code_files, select_data_files, stdlib_root
from fednode.learning.files import DEFAULT_EXCLUDE, LANGUAGES, glob_match, include_patterns, select_files
from fednode.learning.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=4096)


def _tree(root: Path) -> Path:
    files = {
        "b.py": "x = 1\n", "pkg/a.py": "y = 2\n", "pkg/tests/test_a.py": "assert True\n",
        "pkg/test_b.py": "assert 1\n", ".hidden/c.py": "z = 3\n", "pkg/__pycache__/d.py": "w = 4\n",
        "node_modules/m/index.js": "x\n", "src/lib.rs": "fn main() {}\n", "src/deep/mod.rs": "mod x;\n",
        "web/app.ts": "let a = 1;\n", "gen/api_pb2.py": "# generated\n", "notes.txt": "hello\n", ".env.py": "k=1\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "bin.py").write_bytes(b"\x00\x01\x02")
    (root / "latin.py").write_bytes("caf\xe9".encode("latin-1"))
    (root / "big.py").write_text("#" * 3000 + "\n")
    return root


def _rel(sel, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sel.files]


@pytest.mark.parametrize(("pattern", "path", "hit"), [
    ("*.py", "a.py", True), ("*.py", "x/y/a.py", True), ("*.py", "a.pyc", False),
    ("**/*.py", "a.py", True), ("**/*.py", "x/y/a.py", True),
    ("src/*.rs", "src/lib.rs", True), ("src/*.rs", "src/deep/mod.rs", False), ("src/**/*.rs", "src/deep/mod.rs", True),
    ("src/**", "src/a/b.c", True), ("src/**", "lib/src/a.c", False),
    ("**/tests/**", "pkg/tests/t.py", True), ("**/tests/**", "tests/t.py", True),
    ("**/tests/**", "pkg/tests.py", False),
    ("?.py", "a.py", True), ("?.py", "ab.py", False), ("[ab].py", "b.py", True), ("[!ab].py", "b.py", False),
    ("**/.*", ".env", True), ("**/.*", "a/.env", True), ("**/.*", "a/b.env", False),
    ("a+b(1).py", "a+b(1).py", True),  # regex characters are literal
])
def test_glob_semantics(pattern, path, hit):
    assert glob_match(pattern, path) is hit


def test_defaults_select_what_fednode_always_selected(tmp_path):
    root = _tree(tmp_path)
    sel = select_files(root, include_patterns((), ()), DEFAULT_EXCLUDE, max_file_bytes=None)
    assert _rel(sel, root) == [p.relative_to(root).as_posix() for p in list_code_files(root)]
    assert _rel(sel, root) == ["b.py", "big.py", "gen/api_pb2.py", "pkg/a.py", "pkg/test_b.py"]
    assert sel.binary == 2 and sel.excluded == 1 and sel.excluded_dirs == 4  # .env.py; .hidden, caches, tests
    email = stdlib_root() / "email"  # a real package tree: the same files as before, in the same order
    assert select_files(email, ("**/*.py",), DEFAULT_EXCLUDE, None).files == list_code_files(email)


def test_include_languages_exclude_and_size_limit(tmp_path):
    root = _tree(tmp_path)
    rust = select_files(root, include_patterns((), ("rust",)), DEFAULT_EXCLUDE)
    assert _rel(rust, root) == ["src/deep/mod.rs", "src/lib.rs"]
    both = select_files(root, include_patterns(("web/**",), ("Rust",)), DEFAULT_EXCLUDE)
    assert _rel(both, root) == ["src/deep/mod.rs", "src/lib.rs", "web/app.ts"]
    own = select_files(root, ("**/*.py",), ("**/*_pb2.py", "**/.*"), max_file_bytes=1000)
    # exclude replaces the default: test, cache and hidden directories are read now
    assert _rel(own, root) == [".hidden/c.py", "b.py", "pkg/__pycache__/d.py", "pkg/a.py", "pkg/test_b.py",
                               "pkg/tests/test_a.py"]
    assert own.too_large == 1 and own.examples["too_large"] == ["big.py"]
    assert own.excluded == 2 and own.examples["excluded"] == [".env.py", "gen/api_pb2.py"]
    assert "too large" in own.skipped_text() and "binary or not UTF-8" in own.skipped_text()
    node = select_files(root, include_patterns((), ("javascript",)), ())  # no exclude: node_modules is read
    assert _rel(node, root) == ["node_modules/m/index.js"]
    assert set(LANGUAGES) >= {"python", "rust", "go", "typescript", "java", "c", "cpp"}


def test_missing_unreadable_and_empty_are_three_different_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"\[data\] dir .*nope does not exist: create it"):
        select_data_files(missing, ("**/*.py",))
    a_file = tmp_path / "file.py"
    a_file.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        select_data_files(a_file, ("**/*.py",))

    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.py").write_text("x = 1\n")
    real = os.scandir

    def refuse(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", refuse)  # root may read anything: refuse it the way chmod 000 would
    with pytest.raises(ConfigError, match=r"\[data\] dir .*locked cannot be read \(Permission denied\): give"):
        select_data_files(locked, ("**/*.py",))
    monkeypatch.undo()

    empty = tmp_path / "empty"
    (empty / "tests").mkdir(parents=True)
    (empty / "tests" / "t.py").write_text("x = 1\n")
    (empty / "README.md").write_text("hi\n")
    with pytest.raises(ConfigError, match=r"has no code files matching include \['\*\*/\*\.py'\] \(skipped: "
                                          r"1 excluded directories, 1 not matching include\): put"):
        select_data_files(empty, ("**/*.py",))


def test_an_unreadable_subdirectory_is_skipped_and_counted(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    real = os.scandir

    def refuse(path="."):
        if Path(path) == root / "pkg":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", refuse)
    sel = select_files(root, ("**/*.py",), DEFAULT_EXCLUDE)
    assert "pkg/a.py" not in _rel(sel, root) and sel.unreadable == 1 and sel.examples["unreadable"] == ["pkg/"]


def test_dataset_logs_files_tokens_skips_and_truncation(tok, tmp_path, caplog):
    root = tmp_path / "code"
    root.mkdir()
    for i in range(6):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    (root / "blob.py").write_bytes(b"\x00" * 10)
    with caplog.at_level(logging.INFO, logger="fednode.learning.data"):
        TokenDataset.from_dir(root, tok, seq_len=32, max_tokens=600)
    line = next(r for r in caplog.records if r.getMessage().startswith("data: "))
    text = line.getMessage()
    assert "6 files" in text and "600 tokens" in text and "1 binary or not UTF-8" in text and "blob.py" in text
    assert "truncated at max_tokens 600" in text and "not read" in text
    assert line.data_files == 6 and line.data_binary == 1 and line.data_truncated_files > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fednode.learning.data"):
        TokenDataset.from_dir(root, tok, seq_len=32)
    assert "truncated" not in next(r for r in caplog.records if r.getMessage().startswith("data: ")).getMessage()


def _cfg(tmp_path, data: dict):
    from fednode.config import to_toml

    return parse_config(tomllib.loads(to_toml({"node": {"name": "a"}, "data": data})), tmp_path)


def test_config_keys_and_their_errors(tmp_path):
    cfg = _cfg(tmp_path, {"include": ["src/**/*.py"], "languages": ["go"], "exclude": [], "max_file_kib": 64})
    assert cfg.data.include == ("src/**/*.py",) and cfg.data.languages == ("go",) and cfg.data.exclude == ()
    assert cfg.data.max_file_kib == 64
    assert _cfg(tmp_path, {}).data.exclude == DataSection().exclude == DEFAULT_EXCLUDE
    with pytest.raises(ConfigError, match=r"\[data\] languages: 'cobol' is unknown \(known: .*python"):
        _cfg(tmp_path, {"languages": ["cobol"]})
    with pytest.raises(ConfigError, match="is absolute"):
        _cfg(tmp_path, {"include": ["/srv/code/*.py"]})
    with pytest.raises(ConfigError, match=r"leaves \[data\] dir"):
        _cfg(tmp_path, {"exclude": ["../x/**"]})
    with pytest.raises(ConfigError, match="max_file_kib"):
        _cfg(tmp_path, {"max_file_kib": 0})
