"""Node configuration: parsing, path resolution, validation errors, the example and the TOML writer."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.config import (
    Config,
    DataSection,
    LimitsSection,
    LogSection,
    MeshSection,
    MetricsSection,
    ModelSection,
    NodeSection,
    TlsSection,
    TrainSection,
    example_config,
    load_config,
    parse_config,
    to_toml,
)
from fednode.errors import ConfigError, ExitCode


def full_raw() -> dict[str, dict]:
    """Every section and every key, each set to a non-default value."""
    return {
        "node": {"name": "site-b", "data_dir": "state", "listen": "0.0.0.0:7800", "advertise": "10.0.0.2:7800",
                 "operator_socket": "run/op.sock"},
        "mesh": {"seeds": ["10.0.0.1:7700", "seed.example:7701"], "gossip_interval_s": 0.5,
                 "suspect_after_s": 3, "dead_after_s": 9.5, "fanout": 3},
        "tls": {"ca": "pki/ca.crt", "cert": "pki/site-b.crt", "key": "/etc/fednode/site-b.key"},
        "model": {"preset": "micro", "seed": 7, "vocab_size": 512, "tokenizer_cache": "tok"},
        "data": {"dir": "src", "seq_len": 64, "max_tokens": 1000},
        "train": {"rounds": 5, "steps_per_round": 3, "batch_size": 2, "lr": 0.01, "threads": 2,
                  "round_timeout_s": 30, "catchup_lag": 4, "keep_checkpoints": 1},
        "limits": {"max_payload_mib": 64, "chunk_kib": 256},
        "metrics": {"listen": "127.0.0.1:9700"},
        "log": {"level": "debug", "format": "json"},
    }


def minimal(**sections: dict) -> dict[str, dict]:
    raw: dict[str, dict] = {"node": {"name": "site-a"}}
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return raw


def config_error(raw: dict, base: Path) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base)
    message = str(info.value)
    assert "\n" not in message, f"error message spans lines: {message!r}"
    assert info.value.exit_code == ExitCode.CONFIG
    return message


# ------------------------------------------------------------------------------------- valid input


def test_full_config_parses_every_value(tmp_path):
    cfg = parse_config(full_raw(), tmp_path, source=tmp_path / "node.toml")
    assert cfg.source == tmp_path / "node.toml"
    assert cfg.node == NodeSection(name="site-b", data_dir=tmp_path / "state", listen="0.0.0.0:7800",
                                   advertise="10.0.0.2:7800", operator_socket=tmp_path / "run/op.sock")
    assert cfg.mesh == MeshSection(seeds=("10.0.0.1:7700", "seed.example:7701"), gossip_interval_s=0.5,
                                   suspect_after_s=3.0, dead_after_s=9.5, fanout=3)
    assert isinstance(cfg.mesh.suspect_after_s, float)  # an integer in a float key becomes a float
    assert cfg.tls == TlsSection(ca=tmp_path / "pki/ca.crt", cert=tmp_path / "pki/site-b.crt",
                                 key=Path("/etc/fednode/site-b.key"))
    assert cfg.model == ModelSection(preset="micro", seed=7, vocab_size=512, tokenizer_cache=tmp_path / "tok")
    assert cfg.data == DataSection(dir=tmp_path / "src", seq_len=64, max_tokens=1000)
    assert cfg.train == TrainSection(rounds=5, steps_per_round=3, batch_size=2, lr=0.01, threads=2,
                                     round_timeout_s=30.0, catchup_lag=4, keep_checkpoints=1)
    assert cfg.limits == LimitsSection(max_payload_mib=64, chunk_kib=256)
    assert cfg.metrics == MetricsSection(listen="127.0.0.1:9700")
    assert cfg.log == LogSection(level="debug", format="json")
    assert cfg.advertise == "10.0.0.2:7800"
    assert cfg.operator_socket == tmp_path / "run/op.sock"
    assert cfg.tokenizer_cache == tmp_path / "tok"


def test_minimal_config_takes_defaults_and_derived_paths(tmp_path):
    cfg = parse_config(minimal(), tmp_path)
    assert cfg.node.name == "site-a"
    assert cfg.mesh == MeshSection() and cfg.train == TrainSection() and cfg.log == LogSection()
    assert cfg.advertise == "127.0.0.1:7700"  # defaults to listen
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.operator_socket == tmp_path / "data" / "operator.sock"
    assert cfg.tokenizer_cache == tmp_path / "data" / "tokenizers"


def test_relative_paths_resolve_against_the_config_directory_not_the_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "fednode"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = conf_dir / "node.toml"
    path.write_text(to_toml(full_raw()))
    cfg = load_config(Path("..") / "etc" / "fednode" / "node.toml")  # a relative path to the file itself
    assert cfg.node.data_dir == conf_dir / "state"
    assert cfg.tls.ca == conf_dir / "pki" / "ca.crt"
    assert cfg.tls.cert == conf_dir / "pki" / "site-b.crt"
    assert cfg.tls.key == Path("/etc/fednode/site-b.key")  # absolute stays absolute
    assert cfg.data.dir == conf_dir / "src"
    assert cfg.model.tokenizer_cache == conf_dir / "tok"
    assert cfg.operator_socket == conf_dir / "run" / "op.sock"
    for p in (cfg.node.data_dir, cfg.tls.ca, cfg.tls.cert, cfg.data.dir, cfg.operator_socket):
        assert p.is_absolute()


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse_config(minimal(tls={"key": "~/keys/n.key"}), tmp_path / "conf")
    assert cfg.tls.key == tmp_path / "home" / "keys" / "n.key"


def test_default_relative_paths_also_resolve_against_the_config_directory(tmp_path):
    cfg = parse_config(minimal(), tmp_path)  # no [tls] / [data]: their relative defaults apply
    assert cfg.tls.ca == tmp_path / "ca.crt"
    assert cfg.tls.cert == tmp_path / "node.crt"
    assert cfg.tls.key == tmp_path / "node.key"
    assert cfg.data.dir == tmp_path / "code"


# ------------------------------------------------------------------------------------ naming errors


def test_unknown_section_suggests_the_closest_name(tmp_path):
    message = config_error(minimal(mseh={"fanout": 2}), tmp_path)
    assert "[mseh]" in message and "did you mean 'mesh'" in message


def test_unknown_section_without_close_match_lists_the_known_ones(tmp_path):
    message = config_error(minimal(zzzzzz={}), tmp_path)
    assert "[zzzzzz]" in message and "known:" in message and "mesh" in message and "train" in message


def test_unknown_key_suggests_the_closest_name(tmp_path):
    message = config_error(minimal(mesh={"fanuot": 2}), tmp_path)
    assert "[mesh] fanuot" in message and "did you mean 'fanout'" in message
    message = config_error(minimal(train={"step_per_round": 2}), tmp_path)
    assert "did you mean 'steps_per_round'" in message


def test_section_that_is_not_a_table_is_refused(tmp_path):
    message = config_error({"node": {"name": "a"}, "mesh": 3}, tmp_path)
    assert "[mesh] must be a table" in message


# -------------------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(("section", "key", "value", "expect"), [
    ("model", "seed", "1", "must be an integer"),             # string for int
    ("mesh", "fanout", True, "must be an integer"),           # bool for int
    ("train", "steps_per_round", 2.5, "must be an integer"),  # float for int
    ("train", "lr", "0.1", "must be a number"),               # string for float
    ("train", "lr", True, "must be a number"),                # bool for float
    ("mesh", "seeds", [1, 2], "must be a list of strings"),   # list of non-strings
    ("mesh", "seeds", ["127.0.0.1:1", 2], "must be a list of strings"),
    ("mesh", "seeds", "127.0.0.1:7701", "must be a list of strings"),
    ("node", "listen", 7700, "must be a string"),
    ("log", "level", ["info"], "must be a string"),
    ("tls", "ca", 1, "must be a non-empty path string"),
    ("node", "data_dir", "", "must be a non-empty path string"),
])
def test_wrong_types_are_refused_with_the_key_named(tmp_path, section, key, value, expect):
    message = config_error(minimal(**{section: {key: value}}), tmp_path)
    assert f"[{section}] {key}" in message
    assert expect in message
    assert repr(value) in message  # the offending value is shown


# --------------------------------------------------------------------------------- semantic errors


@pytest.mark.parametrize(("key", "value"), [
    ("listen", "localhost"), ("listen", ":7700"), ("listen", "host:"), ("listen", "host:port"),
    ("listen", "host:70000"), ("listen", "host:-1"), ("advertise", "10.0.0.1"),
])
def test_bad_host_port_is_refused(tmp_path, key, value):
    message = config_error(minimal(node={key: value}), tmp_path)
    assert f"[node] {key}" in message and "is not HOST:PORT" in message and repr(value) in message


def test_bad_seed_and_metrics_addresses_are_refused(tmp_path):
    assert "[mesh] seeds entry" in config_error(minimal(mesh={"seeds": ["10.0.0.1:1", "nope"]}), tmp_path)
    assert "[metrics] listen" in config_error(minimal(metrics={"listen": "9700"}), tmp_path)


def test_good_addresses_are_accepted(tmp_path):
    cfg = parse_config(minimal(node={"listen": "[::1]:0", "advertise": "node.example.org:65535"},
                               metrics={"listen": ""}), tmp_path)
    assert cfg.advertise == "node.example.org:65535"


@pytest.mark.parametrize("mesh", [
    {"suspect_after_s": 20.0, "dead_after_s": 20.0},
    {"suspect_after_s": 30.0, "dead_after_s": 20.0},
    {"gossip_interval_s": 6.0, "suspect_after_s": 6.0},
    {"gossip_interval_s": 10.0},
])
def test_inconsistent_mesh_timeouts_are_refused(tmp_path, mesh):
    message = config_error(minimal(mesh=mesh), tmp_path)
    assert "gossip_interval_s < suspect_after_s < dead_after_s" in message


def test_non_positive_gossip_interval_and_fanout_are_refused(tmp_path):
    assert "gossip_interval_s must be > 0" in config_error(minimal(mesh={"gossip_interval_s": 0}), tmp_path)
    assert "fanout must be >= 1" in config_error(minimal(mesh={"fanout": 0}), tmp_path)


def test_unknown_preset_suggests_a_known_one(tmp_path):
    message = config_error(minimal(model={"preset": "tinny"}), tmp_path)
    assert "'tinny' is unknown" in message and "did you mean 'tiny'" in message
    message = config_error(minimal(model={"preset": "gpt-9"}), tmp_path)
    assert "known: local, micro, small, smollm2-135m, tiny" in message


def test_missing_node_name_and_missing_node_section(tmp_path):
    message = config_error({"node": {"listen": "127.0.0.1:1"}}, tmp_path)
    assert "[node] name is missing" in message and 'name = "' in message
    message = config_error({"mesh": {"fanout": 2}}, tmp_path)
    assert "section [node] is missing" in message and "fednode init" in message


@pytest.mark.parametrize(("raw", "expect"), [
    (minimal(train={"steps_per_round": 0}), "steps_per_round must be >= 1"),
    (minimal(train={"catchup_lag": 0}), "catchup_lag >= 1"),
    (minimal(train={"lr": 0}), "lr and round_timeout_s must be > 0"),
    (minimal(data={"seq_len": 4}), "seq_len must be >= 8"),
    (minimal(limits={"chunk_kib": 0}), "chunk_kib must be within"),
    (minimal(limits={"chunk_kib": 16 * 1024 + 1}), "chunk_kib must be within"),
    (minimal(log={"level": "verbose"}), "[log] level 'verbose' is unknown"),
    (minimal(log={"format": "xml"}), "[log] format 'xml' is unknown"),
    (minimal(learning={"update_codec": "int4"}), "[learning] update_codec 'int4' is unknown (did you mean 'int8'?)"),
    (minimal(learning={"frozen_base": "yes"}), "[learning] frozen_base 'yes' is unknown"),
    (minimal(learning={"frozen_base": "on"}), 'frozen_base = "on" needs family = "shared-prefix"'),
])
def test_out_of_range_values_are_refused(tmp_path, raw, expect):
    assert expect in config_error(raw, tmp_path)


# --------------------------------------------------------------------------------- example / TOML


def test_example_config_parses_and_validates(tmp_path):
    text = example_config(name="site-c", listen="127.0.0.1:7702", seeds=["127.0.0.1:7700", "127.0.0.1:7701"])
    cfg = parse_config(tomllib.loads(text), tmp_path)
    assert cfg.node.name == "site-c"
    assert cfg.node.listen == "127.0.0.1:7702"
    assert cfg.mesh.seeds == ("127.0.0.1:7700", "127.0.0.1:7701")
    assert cfg.tls.cert == tmp_path / "pki" / "site-c.crt"
    assert cfg.tls.key == tmp_path / "pki" / "site-c.key"
    assert cfg.tls.ca == tmp_path / "pki" / "ca.crt"
    assert cfg.data.dir == tmp_path / "code"
    # the example documents the defaults: apart from paths/name it matches the dataclass defaults
    assert cfg.mesh.fanout == MeshSection().fanout and cfg.train == TrainSection()
    assert cfg.limits == LimitsSection() and cfg.log == LogSection()


def test_example_config_with_defaults_loads_from_a_file(tmp_path):
    path = tmp_path / "fednode.toml"
    path.write_text(example_config())
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.node.name == "site-a" and cfg.mesh.seeds == ()
    assert cfg.source == path


def test_to_toml_round_trips_through_parse_config(tmp_path):
    raw = full_raw()
    raw["node"]["name"] = 'we"ird\\name é'  # quotes, backslashes and non-ASCII survive
    raw["train"]["lr"] = 1e-05
    text = to_toml(raw)
    assert tomllib.loads(text) == raw
    assert parse_config(tomllib.loads(text), tmp_path) == parse_config(raw, tmp_path)


@settings(max_examples=60, deadline=None)
@given(name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20),
       fanout=st.integers(1, 2**40), lr=st.floats(min_value=1e-12, max_value=1e6),
       seeds=st.lists(st.from_regex(r"[a-z0-9.\-]{1,12}:[0-9]{1,4}", fullmatch=True), max_size=3))
def test_to_toml_round_trips_arbitrary_values(name, fanout, lr, seeds):
    raw = {"node": {"name": name}, "mesh": {"fanout": fanout, "seeds": seeds}, "train": {"lr": lr}}
    assert tomllib.loads(to_toml(raw)) == raw


@pytest.mark.parametrize("value", ["line1\nline2", "tab\tok but bell\x07", "nul\x00"])
def test_to_toml_round_trips_strings_with_control_characters(tmp_path, value):
    raw = {"node": {"name": "a", "data_dir": f"dir {value}"}}
    assert tomllib.loads(to_toml(raw)) == raw


# ------------------------------------------------------------------------------------ load_config


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, f"error message spans lines: {message!r}"
    assert str(path) in message  # names the file
    return message


def test_load_missing_file_names_it_and_says_how_to_create_one(tmp_path):
    path = tmp_path / "absent.toml"
    message = _load_error(path)
    assert "does not exist" in message and f"fednode init --path {path}" in message


def test_load_invalid_toml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nname = "a"\nlisten = 127.0.0.1:7700\n')
    message = _load_error(path)
    assert "is not valid TOML" in message and "line 3" in message and "fix the syntax" in message


def test_load_non_utf8_file_names_it_and_the_encoding(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[node]\nname = "café"\n'.encode("latin-1"))
    message = _load_error(path)
    assert "cannot be read" in message and "encoding" in message


def test_load_a_directory_gives_a_config_error(tmp_path):
    message = _load_error(tmp_path)
    assert "cannot be read" in message


def test_load_reports_validation_errors_as_config_errors(tmp_path):
    path = tmp_path / "n.toml"
    path.write_text('[node]\nname = "a"\n[mesh]\nfanout = "2"\n')
    with pytest.raises(ConfigError, match=r"\[mesh\] fanout must be an integer"):
        load_config(path)


def test_local_preset_needs_a_model_path(tmp_path):
    message = config_error(minimal(model={"preset": "local"}), tmp_path)
    assert "[model] path" in message


def test_small_preset_needs_a_ladder_and_ladders_are_checked(tmp_path):
    from fednode.config import _BUILT_LADDERS
    from fednode.learning.messenger import LADDERS

    assert set(_BUILT_LADDERS) == set(LADDERS), "config's ladder list drifted from messenger.LADDERS"
    base = {"node": {"name": "a"}, "model": {"preset": "small"}}
    with pytest.raises(ConfigError, match='set \\[learning\\] ladder = "tiny"'):
        parse_config(base, tmp_path)
    assert parse_config({**base, "learning": {"ladder": "tiny"}}, tmp_path).learning.ladder == "tiny"
    assert parse_config({**base, "learning": {"mode": "fedavg"}}, tmp_path).model.preset == "small"
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        parse_config({**base, "learning": {"ladder": "tinyy"}}, tmp_path)


@pytest.mark.parametrize("preset,family,setting,frozen", [
    ("smollm2-135m", "shared-prefix", "auto", True), ("local", "shared-prefix", "auto", True),
    ("tiny", "shared-prefix", "auto", False), ("tiny", "shared-prefix", "on", True),
    ("smollm2-135m", "shared-prefix", "off", False), ("smollm2-135m", "distilled", "auto", False)])
def test_the_frozen_base_is_on_for_a_shared_prefix_over_a_pretrained_model(tmp_path, preset, family, setting, frozen):
    from fednode.config import uses_frozen_base

    model = {"preset": preset, **({"path": str(tmp_path)} if preset == "local" else {})}
    cfg = parse_config(minimal(model=model, learning={"family": family, "frozen_base": setting}), tmp_path)
    assert uses_frozen_base(cfg) is frozen


# ------------------------------------------------------------------------------------- choices

def test_modes_families_and_presets_are_enum_members_however_the_section_was_built(tmp_path):
    """One set of names for each choice: a parsed config and a section built in code both hold the
    enum member, which compares and prints as the word written in the TOML file."""
    from fednode.config import Family, LearningSection, Mode, Preset

    cfg = parse_config(minimal(learning={"mode": "static", "family": "shared-prefix"},
                               model={"preset": "smollm2-135m"}), tmp_path)
    assert cfg.learning.mode is Mode.STATIC and cfg.learning.family is Family.SHARED_PREFIX
    assert cfg.model.preset is Preset.SMOLLM2_135M and cfg.model.preset.pretrained
    assert LearningSection(mode="local").mode is Mode.LOCAL  # type: ignore[arg-type]
    assert f"{cfg.learning.mode} {cfg.learning.mode!r}" == "static 'static'"
    assert to_toml({"learning": {"mode": Mode.FEDAVG}}) == to_toml({"learning": {"mode": "fedavg"}})
    assert not Mode.LOCAL.shares and Mode.FEDAVG.shares and not Mode.FEDAVG.has_messenger
    assert [p for p in Preset if p.pretrained] == [Preset.SMOLLM2_135M, Preset.LOCAL]


@pytest.mark.parametrize("where, raw, expect", [
    ("[learning] mode", {"learning": {"mode": "adaptiv"}}, "did you mean 'adaptive'"),
    ("[learning] family", {"learning": {"family": "lorra"}}, "did you mean 'lora'"),
    ("[model] preset", {"model": {"preset": "smollm2"}}, "did you mean 'smollm2-135m'"),
])
def test_an_unknown_choice_is_one_line_naming_the_key_and_the_choices(tmp_path, where, raw, expect):
    message = config_error(minimal(**raw), tmp_path)
    assert message.startswith(where) and "is unknown" in message and expect in message


def test_a_section_built_in_code_with_an_unknown_choice_is_refused_the_same_way():
    from fednode.config import LearningSection

    with pytest.raises(ConfigError, match=r"\[learning\] mode 'bogus' is unknown"):
        LearningSection(mode="bogus")  # type: ignore[arg-type]
