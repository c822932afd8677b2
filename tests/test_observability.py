"""What an operator reads: log fields that never collide with the base ones, no progress bars in
the daemon's log, and the metrics a dashboard needs (and none it does not)."""

from __future__ import annotations

import ast
import io
import json
import logging
from pathlib import Path

from fednode.observability.logs import JsonFormatter, quiet_progress_bars
from fednode.observability.metrics import NodeMetrics

PACKAGE = Path(__file__).resolve().parents[1] / "fednode"
BASE_FIELDS = {"ts", "level", "node", "logger", "msg", "exc"}  # JsonFormatter's own keys


def _extra_keys() -> list[tuple[str, int, str]]:
    """(file, line, key) of every literal key passed as a log call's `extra=` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "extra" and isinstance(kw.value, ast.Dict):
                    found += [(str(path.relative_to(PACKAGE)), node.lineno, k.value) for k in kw.value.keys
                              if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return found


def test_no_structured_log_field_collides_with_a_base_field():
    """A collision is renamed `key_` in JSON (e.g. a messenger level logged as `level` became
    `level_`): every field must have its own name, as docs/operations.md lists them."""
    keys = _extra_keys()
    assert len(keys) > 20  # the scan sees the package's log calls
    assert [k for k in keys if k[2] in BASE_FIELDS] == []


def test_json_lines_keep_the_base_fields_and_carry_the_extras():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("site-a"))
    logger = logging.getLogger("fednode.test_observability")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("grew", extra={"messenger_level": 2, "round": 7})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    line = json.loads(out.getvalue())
    assert (line["level"], line["node"], line["msg"], line["messenger_level"], line["round"]) == (
        "warning", "site-a", "grew", 2, 7)
    assert "level_" not in line


def test_the_daemon_turns_transformers_progress_bars_off(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        quiet_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()
        import os

        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        hf_logging.enable_progress_bar()


def test_the_metrics_an_operator_needs_and_no_created_series():
    metrics = NodeMetrics("site-a")
    metrics.sent("site-b", 10, 1)
    metrics.reject("MALFORMED")
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    for needed in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                   "fednode_last_commit_timestamp_seconds", "fednode_merged_updates",
                   "fednode_train_tokens_per_second", "fednode_round", "fednode_level",
                   "fednode_bytes_sent_total", "fednode_rejected_messages_total"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith("_created")]
