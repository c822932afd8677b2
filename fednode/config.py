"""Node configuration: one TOML file per node, validated once at start.

Every problem is reported as a one-line `ConfigError` that names the key and the fix, so an
operator reading journald sees what to change without reading code.
"""

from __future__ import annotations

import difflib
import enum
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fednode.errors import ConfigError
from fednode.learning.files import DEFAULT_EXCLUDE, DEFAULT_MAX_FILE_KIB, check_languages, check_pattern


class ConfigChoice(enum.StrEnum):
    """A config value that is one of a fixed set: compares, formats and prints (repr too, so
    error messages read as the config does) as the string written in the TOML file."""

    def __repr__(self) -> str:
        return repr(self.value)


class Mode(ConfigChoice):
    """[learning] mode: what a site shares and whether the mesh negotiates the messenger's size."""

    ADAPTIVE = "adaptive"  # a messenger whose level the mesh negotiates
    STATIC = "static"  # a messenger at one fixed level
    FEDAVG = "fedavg"  # the whole model is averaged (the baseline)
    LOCAL = "local"  # nothing leaves the site (the other baseline)

    @property
    def shares(self) -> bool:
        return self is not Mode.LOCAL

    @property
    def has_messenger(self) -> bool:
        return self in (Mode.ADAPTIVE, Mode.STATIC)


class Family(ConfigChoice):
    """[learning] family: what a messenger is."""

    DISTILLED = "distilled"  # a small model distilled both ways; P never leaves
    SHARED_PREFIX = "shared-prefix"  # P's first layers travel
    LORA = "lora"  # a low-rank adapter on a frozen base travels


class Preset(ConfigChoice):
    """[model] preset: the site's private model."""

    MICRO = "micro"
    TINY = "tiny"
    SMALL = "small"
    SMOLLM2_135M = "smollm2-135m"
    LOCAL = "local"  # a Hugging Face model directory, [model] path

    @property
    def pretrained(self) -> bool:
        """Loaded from local files, not built from a config."""
        return self in (Preset.SMOLLM2_135M, Preset.LOCAL)


def _enum_value(where: str, kind: type[ConfigChoice], value: object) -> ConfigChoice:
    """`value` as a member of `kind`, or the one-line error naming the key and the close match."""
    if isinstance(value, kind):
        return value
    options = [m.value for m in kind]
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{where} {value!r} is unknown{_suggest(str(value), options)}")
    return kind(value)


@dataclass(frozen=True)
class NodeSection:
    name: str = ""
    data_dir: Path = Path("data")
    listen: str = "127.0.0.1:7700"
    advertise: str = ""  # address peers dial; defaults to `listen`
    operator_socket: Path | None = None  # defaults to DATA_DIR/operator.sock


@dataclass(frozen=True)
class MeshSection:
    seeds: tuple[str, ...] = ()
    gossip_interval_s: float = 1.0
    suspect_after_s: float = 6.0
    dead_after_s: float = 20.0
    fanout: int = 2
    reflection: bool = False  # gRPC server reflection on the peer port (lists the services to any member)


@dataclass(frozen=True)
class TlsSection:
    ca: Path = Path("ca.crt")
    cert: Path = Path("node.crt")
    key: Path = Path("node.key")
    crl: Path | None = None  # revocation list from `fednode ca revoke`; optional, it also arrives by gossip


@dataclass(frozen=True)
class ModelSection:
    preset: Preset = Preset.TINY
    seed: int = 0
    vocab_size: int = 4096
    tokenizer_cache: Path | None = None  # defaults to DATA_DIR/tokenizers
    path: Path | None = None  # preset "local": a Hugging Face model directory (never downloaded)
    cache: Path | None = None  # converted pretrained models (smollm2-135m); defaults to DATA_DIR/models

    def __post_init__(self) -> None:
        object.__setattr__(self, "preset", _enum_value("[model] preset", Preset, self.preset))


@dataclass(frozen=True)
class DataSection:
    dir: Path = Path("code")
    include: tuple[str, ...] = ()  # globs relative to dir; with languages empty: "**/*.py"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    languages: tuple[str, ...] = ()
    max_file_kib: int = DEFAULT_MAX_FILE_KIB
    seq_len: int = 128
    max_tokens: int = 400_000


@dataclass(frozen=True)
class TrainSection:
    rounds: int = 0  # 0 = run until stopped
    steps_per_round: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    threads: int = 0  # torch threads; 0 = torch's default
    device: str = "auto"  # auto (first CUDA GPU, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with gradient scaling)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    round_timeout_s: float = 60.0  # a round never waits on peers longer than this
    catchup_lag: int = 2  # fetch state from a peer this many rounds ahead
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class LearningSection:
    mode: Mode = Mode.ADAPTIVE
    ladder: str = ""  # messenger family; defaults to the model preset's ladder
    static_level: int = 0  # the level of `static` mode
    family: Family = Family.DISTILLED
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32)  # lora family: the shared adapter's rank at each level
    lora_private_rank: int = 8  # lora family: rank of the adapter that stays home (0 = none)
    frozen_base: str = "auto"  # shared-prefix: embedding/head frozen, never sent (auto: on for pretrained presets)
    distill_weight: str = "fixed"  # fixed: alpha itself | fedkd: alpha * 2 ln V / (CE_P + CE_M)
    distill_alpha: float = 1.0  # weight of the KL terms (0 = no distillation)
    distill_temperature: float = 1.0
    teacher: str = "frozen"  # P's teacher: frozen (merged messenger at the last commit) | live | both
    public_steps: int = 8  # per round: steps of P toward the merged messenger on the public set
    lr_messenger: float = 3e-3
    weighting: str = "data-size"  # uniform | data-size | fairness | qffl
    aggregation: str = "median"  # median | trimmed-mean | norm-clip | mean (bench/RESULTS.md "Insider poisoning")
    update_codec: str = "int8"  # int8 (block-wise, a float32 scale per 64 values: ~3.8x fewer bytes) | none
    # int8 by measurement: tiny-long, 3 seeds, final P NLL adaptive 2.421 vs 2.430 in fp32, fedavg 2.394 vs 2.399
    merge_loss_jump: float = 0.25  # refuse a merge that raises own held-out loss by more than this fraction; 0 = off
    qffl_q: float = 1.0
    curriculum: bool = True
    curriculum_buckets: int = 4
    curriculum_midpoint_rounds: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum_value("[learning] mode", Mode, self.mode))
        object.__setattr__(self, "family", _enum_value("[learning] family", Family, self.family))


@dataclass(frozen=True)
class BudgetSection:
    step_time_s: float = 0.0  # 0 = no time budget
    memory_mib: int = 0  # 0 = no memory budget
    max_level: int = -1  # -1 = no cap; else the ceiling never exceeds it


@dataclass(frozen=True)
class NegotiationSection:
    plateau_window: int = 3
    plateau_theta: float = 0.02
    js_threshold: float = 0.0005
    activation_delay: int = 3  # rounds: one to gossip the proposal, one for the acks to return, one spare
    min_round_gap: int = 3
    min_live_peers: int = 2
    quorum: float = 2 / 3
    growth_signal: str = "auto"  # plateau | budget | auto (the family's: FAMILY_GROWTH_SIGNAL)


@dataclass(frozen=True)
class LimitsSection:
    max_payload_mib: int = 8192
    chunk_kib: int = 1024


@dataclass(frozen=True)
class MetricsSection:
    listen: str = ""  # e.g. "127.0.0.1:9700"; empty = no HTTP endpoint


@dataclass(frozen=True)
class LogSection:
    level: str = "info"
    format: str = "auto"  # auto | json | text


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    tls: TlsSection = field(default_factory=TlsSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    learning: LearningSection = field(default_factory=LearningSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    negotiation: NegotiationSection = field(default_factory=NegotiationSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None

    @property
    def advertise(self) -> str:
        return self.node.advertise or self.node.listen

    @property
    def operator_socket(self) -> Path:
        return self.node.operator_socket or self.node.data_dir / "operator.sock"

    @property
    def model_cache(self) -> Path:
        return self.model.cache or self.node.data_dir / "models"

    @property
    def tokenizer_cache(self) -> Path:
        return self.model.tokenizer_cache or self.node.data_dir / "tokenizers"


_SECTION_TYPES = {
    "node": NodeSection, "mesh": MeshSection, "tls": TlsSection, "model": ModelSection,
    "data": DataSection, "train": TrainSection, "learning": LearningSection, "budget": BudgetSection,
    "negotiation": NegotiationSection, "limits": LimitsSection, "metrics": MetricsSection,
    "log": LogSection,
}
_PATH_KEYS = {("node", "data_dir"), ("node", "operator_socket"), ("tls", "ca"), ("tls", "cert"),
              ("tls", "key"), ("tls", "crl"), ("model", "tokenizer_cache"), ("data", "dir"),
              ("model", "path"), ("model", "cache")}
PRETRAINED_PRESETS = tuple(p for p in Preset if p.pretrained)
FROZEN_BASE = ("auto", "on", "off")  # [learning] frozen_base
# fednode.learning.messenger.LADDERS (kept here so config imports no torch)
_BUILT_LADDERS = ("micro", "tiny", "tiny-wide")
MODES = tuple(Mode)
WEIGHTINGS = ("uniform", "data-size", "fairness", "qffl")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "norm-clip")
FAMILIES = tuple(Family)
MAX_LORA_RANK = 4096
DISTILL_WEIGHTS = ("fixed", "fedkd")  # fednode.learning.distill.WEIGHTS / TEACHERS (no torch import here)
TEACHERS = ("frozen", "live", "both")
PRECISIONS = ("fp32", "bf16", "fp16")  # fednode.learning.device.PRECISIONS (no torch import here)
CODECS = ("none", "int8")  # [learning] update_codec: fednode.learning.compress
GROWTH_SIGNALS = ("plateau", "budget")  # fednode.mesh.negotiation.Params.growth_signal ([negotiation] adds auto)
# [negotiation] growth_signal = "auto": "budget" (grow whenever a quorum's ceilings afford the next
# level, after the cooldown) for both families, as measured on tiny-long seed 0: the distilled arm
# grown on budget ended at P 2.405 (grew at rounds 5, 11, 17), on the loss plateau at 2.577 (grew
# at round 25), static-3 at 2.515; a shared prefix is P itself, whose loss improves as long as P
# trains, so a plateau never came (bench/RESULTS.md "Knowledge transfer").
FAMILY_GROWTH_SIGNAL = {Family.DISTILLED: "budget", Family.SHARED_PREFIX: "budget", Family.LORA: "budget"}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(section: str, key: str, value: Any, default: Any, base: Path) -> Any:
    where = f"[{section}] {key}"
    if (section, key) in _PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty path string, got {value!r}: set it to a path")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # "~user/..." for a user this machine does not have
            raise ConfigError(f"{where} = {value!r}: the home directory in it does not exist here; "
                              "write the path out in full") from None
        return path if path.is_absolute() else (base / path)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}: write it without quotes or decimals")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}: write it without quotes")
        return float(value)
    if isinstance(default, tuple) and default and isinstance(default[0], int):
        if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
            raise ConfigError(f"{where} must be a non-empty list of integers, e.g. [4, 8, 16], got {value!r}")
        return tuple(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{where} must be a list of strings, e.g. ["127.0.0.1:7701"], got {value!r}')
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}: put it in quotes")
    return value


def _check_address(where: str, value: str, *, allow_empty: bool = False) -> None:
    if allow_empty and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} = {value!r} is not HOST:PORT: write it like \"127.0.0.1:7700\"")


def _validate(cfg: Config) -> None:
    n = cfg.node
    if not n.name:
        raise ConfigError("[node] name is missing: set it to this site's certificate name, e.g. name = \"site-a\"")
    _check_address("[node] listen", n.listen)
    _check_address("[node] advertise", n.advertise, allow_empty=True)
    for seed in cfg.mesh.seeds:
        _check_address("[mesh] seeds entry", seed)
    tls = cfg.tls
    if tls.crl is not None and tls.crl in (tls.ca, tls.cert, tls.key):
        raise ConfigError(f"[tls] crl = {str(tls.crl)!r} is also the CA, certificate or key file: point it at the "
                          "revocation list that `fednode ca revoke` writes (revoked.crl), or remove the key")
    m = cfg.mesh
    if m.gossip_interval_s <= 0:
        raise ConfigError("[mesh] gossip_interval_s must be > 0: try 1.0")
    if not m.gossip_interval_s < m.suspect_after_s < m.dead_after_s:
        raise ConfigError("[mesh] needs gossip_interval_s < suspect_after_s < dead_after_s: try 1, 6, 20")
    if m.fanout < 1:
        raise ConfigError("[mesh] fanout must be >= 1: try 2")
    if cfg.model.preset is Preset.LOCAL and cfg.model.path is None:
        raise ConfigError('[model] preset "local" needs [model] path: the directory of a Hugging Face causal LM')
    ladder = cfg.learning.ladder
    if ladder and ladder not in _BUILT_LADDERS:
        raise ConfigError(f"[learning] ladder {ladder!r} is unknown{_suggest(ladder, list(_BUILT_LADDERS))}")
    if (not ladder and cfg.model.preset not in _BUILT_LADDERS and not cfg.model.preset.pretrained
            and cfg.learning.mode.has_messenger and cfg.learning.family is Family.DISTILLED):
        raise ConfigError(f"[model] preset {cfg.model.preset!r} has no messenger ladder of its own: "
                          f'set [learning] ladder = "tiny"')
    t = cfg.train
    for key in ("steps_per_round", "batch_size", "keep_checkpoints"):
        if getattr(t, key) < 1:
            raise ConfigError(f"[train] {key} must be >= 1")
    if t.rounds < 0 or t.threads < 0 or t.catchup_lag < 1:
        raise ConfigError("[train] rounds and threads must be >= 0 and catchup_lag >= 1")
    if t.lr <= 0 or t.round_timeout_s <= 0:
        raise ConfigError("[train] lr and round_timeout_s must be > 0")
    device = t.device.strip().lower()
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f'[train] device {t.device!r} is unknown: use "auto", "cpu", "cuda", "cuda:N" or "mps"')
    if t.precision not in PRECISIONS:
        raise ConfigError(f"[train] precision {t.precision!r} is unknown{_suggest(t.precision, list(PRECISIONS))}")
    if not 1 <= t.grad_accum <= 1024:
        raise ConfigError(f"[train] grad_accum {t.grad_accum} must be in 1..1024 (micro-batches per step)")
    lrn = cfg.learning
    if lrn.weighting not in WEIGHTINGS:
        hint = _suggest(lrn.weighting, list(WEIGHTINGS))
        raise ConfigError(f"[learning] weighting {lrn.weighting!r} is unknown{hint}")
    if lrn.aggregation not in AGGREGATIONS:
        hint = _suggest(lrn.aggregation, list(AGGREGATIONS))
        raise ConfigError(f"[learning] aggregation {lrn.aggregation!r} is unknown{hint}")
    for key, options in (("distill_weight", DISTILL_WEIGHTS), ("teacher", TEACHERS),
                         ("update_codec", CODECS), ("frozen_base", FROZEN_BASE)):
        value = getattr(lrn, key)
        if value not in options:
            raise ConfigError(f"[learning] {key} {value!r} is unknown{_suggest(value, list(options))}")
    if lrn.frozen_base == "on" and lrn.family is not Family.SHARED_PREFIX:
        raise ConfigError('[learning] frozen_base = "on" needs family = "shared-prefix" (a distilled messenger has '
                          'its own embedding): set the family or frozen_base = "auto"')
    ranks = lrn.lora_ranks
    if not all(0 < r <= MAX_LORA_RANK for r in ranks) or any(a >= b for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ConfigError(f"[learning] lora_ranks {list(ranks)} must rise strictly, each in 1..{MAX_LORA_RANK} "
                          f"(one rank per messenger level), e.g. [4, 8, 16, 32]")
    if not 0 <= lrn.lora_private_rank <= MAX_LORA_RANK:
        raise ConfigError(f"[learning] lora_private_rank {lrn.lora_private_rank} must be in 0..{MAX_LORA_RANK} "
                          f"(0 = no adapter of the site's own)")
    if not 0 <= lrn.merge_loss_jump <= 100:
        raise ConfigError(f"[learning] merge_loss_jump {lrn.merge_loss_jump} must be in [0, 100] (a fraction of the "
                          f"held-out loss; 0 = never refuse a merge for its loss)")
    if lrn.static_level < 0 or lrn.curriculum_buckets < 1 or lrn.distill_alpha < 0 or lrn.lr_messenger <= 0:
        raise ConfigError("[learning] static_level and distill_alpha must be >= 0, curriculum_buckets >= 1, "
                          "lr_messenger > 0")
    if not 0 < lrn.distill_temperature <= 100 or lrn.public_steps < 0:
        raise ConfigError("[learning] distill_temperature must be in (0, 100] and public_steps >= 0")
    neg = cfg.negotiation
    if neg.plateau_window < 1 or neg.min_round_gap < 0 or neg.min_live_peers < 1:
        raise ConfigError("[negotiation] plateau_window and min_live_peers must be >= 1, min_round_gap >= 0")
    if neg.activation_delay < 3:
        raise ConfigError(f"[negotiation] activation_delay {neg.activation_delay} is too short: a proposal needs a "
                          f"round to spread and one for the acks to return; use 3 or more")
    if neg.growth_signal not in ("auto", *GROWTH_SIGNALS):
        hint = _suggest(neg.growth_signal, ["auto", *GROWTH_SIGNALS])
        raise ConfigError(f"[negotiation] growth_signal {neg.growth_signal!r} is unknown{hint}: use auto, "
                          f"{' or '.join(GROWTH_SIGNALS)}")
    if not 0.5 < neg.quorum <= 1:
        raise ConfigError(f"[negotiation] quorum {neg.quorum} must be in (0.5, 1]: 2/3 is the default")
    if cfg.data.seq_len < 8 or cfg.data.max_tokens < cfg.data.seq_len:
        raise ConfigError("[data] seq_len must be >= 8 and max_tokens >= seq_len")
    for key in ("include", "exclude"):
        for pattern in getattr(cfg.data, key):
            check_pattern(f"[data] {key}", pattern)
    check_languages(cfg.data.languages)
    if cfg.data.max_file_kib < 1:
        raise ConfigError(f"[data] max_file_kib {cfg.data.max_file_kib} must be >= 1 (KiB): try 1024")
    if not 1 <= cfg.limits.chunk_kib <= 16 * 1024:
        raise ConfigError("[limits] chunk_kib must be within 1..16384: 1024 (1 MiB) is the fast default")
    if cfg.limits.max_payload_mib < 1:
        raise ConfigError("[limits] max_payload_mib must be >= 1")
    _check_address("[metrics] listen", cfg.metrics.listen, allow_empty=True)
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"[log] level {cfg.log.level!r} is unknown: use debug, info, warning or error")
    if cfg.log.format not in ("auto", "json", "text"):
        raise ConfigError(f"[log] format {cfg.log.format!r} is unknown: use auto, json or text")


def parse_config(raw: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Build a validated Config from parsed TOML; relative paths are relative to `base`."""
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"unknown section [{name}]{_suggest(name, list(_SECTION_TYPES))}: remove or rename it")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table: write it as a [{name}] section")
        cls = _SECTION_TYPES[name]
        defaults = cls()
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"unknown key [{name}] {key}{_suggest(key, sorted(known))}: remove or rename it")
            values[key] = _coerce(name, key, value, getattr(defaults, key), base)
        sections[name] = cls(**values)
    if "node" not in sections:
        raise ConfigError("section [node] is missing: run `fednode init` for a commented example")
    # relative defaults (sections or keys left out) are relative to the config's directory too
    for name, cls in _SECTION_TYPES.items():
        section = sections.get(name) or cls()
        moved = {key: base / getattr(section, key) for (sec, key) in _PATH_KEYS
                 if sec == name and getattr(section, key) is not None and not getattr(section, key).is_absolute()}
        sections[name] = cls(**{**section.__dict__, **moved})
    cfg = Config(**sections, source=source)
    _validate(cfg)
    return cfg


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: create one with `fednode init --path {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc}): check its permissions and encoding") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix the syntax at that line") from None
    return parse_config(raw, path.resolve().parent, source=path)


EXAMPLE = """\
# fednode node configuration. Relative paths are relative to this file.

[node]
name = "{name}"                      # must equal the CN of this node's certificate
data_dir = "{data_dir}"              # journal, checkpoints, payload key, operator socket
listen = "{listen}"                  # peer service (mutual TLS)
# advertise = "{listen}"             # address other peers dial, if not `listen`
# operator_socket = "{data_dir}/operator.sock"

[mesh]
seeds = [{seeds}]                    # any live members; the mesh has no central server
gossip_interval_s = 1.0
suspect_after_s = 6.0                # no heartbeat growth for this long: suspect
dead_after_s = 20.0                  # ... and for this long: dead (skipped by rounds)
fanout = 2                           # peers a round's update is pushed to
reflection = false                   # gRPC server reflection on the peer port (debugging with grpcurl)

[tls]                                # made by `fednode ca init` / `fednode ca issue`
ca = "{ca}"
cert = "{cert}"
key = "{key}"
# crl = "pki/revoked.crl"            # revocation list from `fednode ca revoke` (optional: it also spreads by gossip)

[model]
preset = "tiny"                      # tiny (~1M params), small (4M; needs ladder), micro (tests), smollm2-135m, local
# path = "/models/my-code-lm"        # preset "local": a Hugging Face model directory
seed = 0                             # the same on every site: the mesh starts from one model

[data]
dir = "{data}"                        # this site's private code; it never leaves the node
# include = ["src/**/*.py", "*.rs"]  # globs relative to dir ("*.x" = at any depth); default: **/*.py
# languages = ["python", "rust"]     # adds each language's file globs to include (python, rust, go, ...)
# exclude = ["**/*_pb2.py"]          # replaces the default (hidden, cache, vendored and test dirs)
max_file_kib = 1024                  # larger files are skipped (generated, minified or data)
seq_len = 128
max_tokens = 400000

[train]
rounds = 0                           # 0 = run until stopped
steps_per_round = 20
batch_size = 8
lr = 0.003
threads = 0                          # torch threads; 0 = default
device = "auto"                      # auto = first CUDA GPU, else CPU; or cpu, cuda, cuda:N, mps
precision = "fp32"                   # bf16 on a GPU trains several times faster; fp16 scales gradients
grad_accum = 1                       # micro-batches per optimizer step (effective batch = x batch_size)
round_timeout_s = 60.0               # stragglers never hold a round longer than this
catchup_lag = 2                      # rounds behind a peer before fetching its state
keep_checkpoints = 3

[learning]
mode = "adaptive"                    # adaptive | static | fedavg | local
# ladder = "tiny"                    # messenger family (default: the model preset's)
static_level = 0                     # the messenger level in static mode
family = "distilled"                 # distilled (P never leaves) | shared-prefix (P's first layers travel)
                                     # | lora (a shared LoRA adapter on a frozen base; pip install "fednode[lora]")
# lora_ranks = [4, 8, 16, 32]        # lora: the shared adapter's rank at each messenger level
# lora_private_rank = 8              # lora: rank of the site's own adapter, never sent (0 = none)
frozen_base = "auto"                 # shared-prefix: embedding/head frozen, never sent (auto: pretrained)
distill_weight = "fixed"             # fixed: alpha itself | fedkd: alpha * 2 ln V / (CE_P + CE_M)
distill_alpha = 1.0                  # KL weight; distill_weight = "fedkd" rescales it by FedKD's factor
distill_temperature = 1.0            # softmax temperature of the KL terms (scaled by T^2)
teacher = "frozen"                   # P learns from the merged messenger frozen at the last commit
public_steps = 8                     # per round, P distils from it on the shipped public code
weighting = "data-size"              # uniform | data-size | fairness | qffl
aggregation = "median"               # median | trimmed-mean | norm-clip | mean (one bad member cannot steer a median)
update_codec = "int8"                # int8 (a scale per 64 values, ~3.8x fewer bytes, no quality lost) | none
merge_loss_jump = 0.25               # a merge raising own held-out loss by > 25 % is refused (own state kept)
curriculum = true

[budget]                             # this site's resources: they set its messenger ceiling
step_time_s = 0.0                    # max seconds per training step; 0 = unlimited
memory_mib = 0                       # max MiB per training step; 0 = unlimited
max_level = -1                       # cap the ceiling by hand; -1 = no cap

[negotiation]                        # when the mesh grows its messenger (same on every site)
plateau_window = 3
plateau_theta = 0.02
js_threshold = 0.0005
min_live_peers = 2
growth_signal = "auto"               # budget | plateau; auto = budget (grow whenever a quorum affords it)

[limits]
max_payload_mib = 8192
chunk_kib = 1024

[metrics]
listen = ""                          # e.g. "127.0.0.1:9700" for Prometheus /metrics

[log]
level = "info"
format = "auto"                      # auto: text on a terminal, JSON lines otherwise
"""


def example_config(name: str = "site-a", listen: str = "127.0.0.1:7700", seeds: list[str] | None = None,
                   data_dir: str | None = None, ca: str = "pki/ca.crt", cert: str | None = None,
                   key: str | None = None, data: str = "code") -> str:
    """A commented config; its data_dir is per site (data/NAME), so two sites set up side by side
    (a test bed, one host) never share a journal, keys or checkpoints."""
    seed_list = ", ".join(f'"{s}"' for s in (seeds or []))
    return EXAMPLE.format(name=name, listen=listen, seeds=seed_list, data_dir=data_dir or f"data/{name}", ca=ca,
                          cert=cert or f"pki/{name}.crt", key=key or f"pki/{name}.key", data=data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON strings are valid TOML basic strings


def to_toml(raw: dict[str, dict[str, Any]]) -> str:
    """Render flat sections (the shape parse_config reads) as TOML; used by demo and harness."""
    out = []
    for section, table in raw.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        out.append("")
    return "\n".join(out)


def uses_frozen_base(cfg: Config) -> bool:
    """Whether P's embedding and untied head are a frozen public base (never trained or sent): on
    request, or by default for a shared-prefix family over a pretrained model, whose embedding is
    most of its parameters and identical at every site."""
    lrn = cfg.learning
    if lrn.family is not Family.SHARED_PREFIX or lrn.frozen_base == "off":
        return False
    return lrn.frozen_base == "on" or cfg.model.preset.pretrained
