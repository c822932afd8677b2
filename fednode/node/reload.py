"""What a reload (SIGHUP) may change in a running node: the live keys, and the split of a re-read
config into what is applied now and what waits for a restart.

Each live key is read where it is used, by the part that owns it (the gossiper its interval, seeds
and fanout, the peer service its limits, the round loop its timeouts, the membership its
liveness timeouts), so applying a reload is replacing the config those parts read;
tests/test_reload.py checks every key here against its owner.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fednode.config import Config

# What a reload (SIGHUP) applies to a running node; every other key needs a restart. A section
# mapped to None applies whole.
LIVE_KEYS: dict[str, frozenset[str] | None] = {
    # reflection is not here: the reflection service is registered when the listener starts
    "mesh": frozenset({"seeds", "gossip_interval_s", "suspect_after_s", "dead_after_s", "fanout"}),
    "tls": None,
    "limits": None,
    "train": frozenset({"round_timeout_s", "catchup_lag", "keep_checkpoints"}),
    "log": frozenset({"level"}),
}


def _config_sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def split_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, keys applied live, keys that need a restart) for a re-read config:
    live keys come from `new`, every other key keeps its running value."""
    applied: dict[str, Any] = {}
    live: list[str] = []
    restart: list[str] = []
    for section in _config_sections(old):
        before, after = getattr(old, section), getattr(new, section)
        keys = LIVE_KEYS.get(section, frozenset())
        take = {}
        for f in dataclasses.fields(before):
            if getattr(before, f.name) == getattr(after, f.name):
                continue
            if keys is None or f.name in keys:
                take[f.name] = getattr(after, f.name)
                live.append(f"[{section}] {f.name}")
            else:
                restart.append(f"[{section}] {f.name}")
        applied[section] = dataclasses.replace(before, **take) if take else before
    return dataclasses.replace(old, **applied), live, restart
