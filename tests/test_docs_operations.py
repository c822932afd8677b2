"""docs/operations.md cannot drift from the code: the config reference is generated from the schema,
and the metrics, exit codes and example config it documents are checked against the real ones."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fednode.config import parse_config
from fednode.errors import ExitCode
from fednode.observability.metrics import NodeMetrics
from tools import gen_config_reference as ref

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
FIX = "run `python -m tools.gen_config_reference --write` and commit docs/operations.md"


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_config_reference_matches_the_schema():
    assert ref.embedded_reference(_doc()) == ref.render_reference(), f"config reference is stale: {FIX}"


def test_every_config_key_is_described():
    undescribed = [f"[{section}] {key}" for section, key, _, _, meaning in ref.reference_rows()
                   if meaning == ref.UNDESCRIBED]
    assert not undescribed, (f"config keys without a description: {undescribed}; add a trailing comment on "
                             f"their line in fednode.config.EXAMPLE (or an entry in tools/gen_config_reference.py "
                             f"_MORE), then {FIX}")


def test_reference_covers_every_section_and_key():
    import dataclasses

    from fednode.config import Config

    rows = {(section, key) for section, key, *_ in ref.reference_rows()}
    cfg = Config()
    expected = {(f.name, k.name) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(cfg, f.name))
                for k in dataclasses.fields(getattr(cfg, f.name))}
    assert rows == expected


def test_check_and_write_modes(tmp_path: Path, capsys):
    stale = tmp_path / "ops.md"
    stale.write_text(f"intro\n{ref.START}\n| old | table |\n{ref.END}\noutro\n", encoding="utf-8")
    assert ref.main(["--check", "--doc", str(stale)]) == 1
    assert ref.main(["--write", "--doc", str(stale)]) == 0
    text = stale.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith(f"{ref.END}\noutro\n")
    assert ref.embedded_reference(text) == ref.render_reference()
    assert ref.main(["--check", "--doc", str(stale)]) == 0
    capsys.readouterr()


def test_trailing_comment_ignores_hash_in_strings():
    assert ref._trailing_comment('"a#b"  # real') == "real"
    assert ref._trailing_comment("'#'") == ""


def _metric_names() -> tuple[set[str], set[str]]:
    """(names as documented, every series name Prometheus sees) of a node's metrics."""
    documented, series = set(), set()
    for family in NodeMetrics("doc-test").registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        documented.add(name)
        series.add(name)
        if family.type == "histogram":
            series |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
    return documented, series


def test_every_metric_is_documented():
    documented, _ = _metric_names()
    missing = sorted(name for name in documented if f"`{name}`" not in _doc())
    assert not missing, f"metrics missing from docs/operations.md (section Metrics): {missing}"


def test_alert_rules_parse_and_use_real_metrics():
    import pytest

    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: the alert rules are not parsed")
    section = _doc().split("## Alerts worth having", 1)[1].split("\n## ", 1)[0]
    rules = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))["groups"][0]["rules"]
    assert rules and all({"alert", "expr"} <= set(rule) for rule in rules)
    _, series = _metric_names()
    used = {name for rule in rules for name in re.findall(r"\bfednode_[a-z_]+", rule["expr"])}
    assert used and used <= series, f"alerts use metrics that do not exist: {sorted(used - series)}"


def test_every_exit_code_is_documented():
    section = _doc().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == {int(code) for code in ExitCode}


def test_systemd_example_config_is_valid_and_matches_the_unit():
    section = _doc().split("## Configure a site", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block, "the systemd example config is missing"
    cfg = parse_config(tomllib.loads(block.group(1)), Path("/etc/fednode"))
    site = cfg.node.name
    assert cfg.node.data_dir == Path(f"/var/lib/fednode/{site}")  # StateDirectory=fednode/%i
    assert cfg.operator_socket == Path(f"/run/fednode/{site}/operator.sock")  # RuntimeDirectory=fednode/%i
    assert cfg.tls.key == Path(f"/etc/fednode/pki/{site}.key")


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_internal_links_point_at_headings():
    text = _doc()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links <= anchors, f"broken links: {sorted(links - anchors)}"
