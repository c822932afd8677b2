"""Trained models from a run: the newest round checkpoint of a node data dir (or of a results dir).

A daemon checkpoint (`fednode/store/checkpoint.py`) is `DATA_DIR/checkpoints/round-NNNNNNNN.safetensors`
holding `private.*` and `messenger.*` tensors, with the messenger's ladder level in its metadata.
A draft trained by the real mesh is the honest one to measure, so this is preferred over the
benchmark's own short distillation whenever a run exists.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from fednode.errors import StoreError
from fednode.learning import messenger as msg
from fednode.learning.models import PRESETS, build_model, load_state_tensors
from fednode.store.checkpoint import load_checkpoint
from tools.throughput.errors import BenchFailure
from tools.throughput.presets import Pair

_ROUND = re.compile(r"round-(\d{8,})\.safetensors")
_HINT = "pass a node data dir (holding checkpoints/round-*.safetensors) or a results dir of node data dirs"


def _rounds_in(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _ROUND.fullmatch(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return found


def find_checkpoint(run_dir: Path) -> Path:
    """The newest round checkpoint under run_dir (itself, checkpoints/, or */checkpoints/; first node by name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BenchFailure(f"--from-run {run_dir} is not a directory: {_HINT}")
    for candidate in (run_dir, run_dir / "checkpoints"):
        rounds = _rounds_in(candidate)
        if rounds:
            return max(rounds)[1]
    for node in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        rounds = _rounds_in(node / "checkpoints")
        if rounds:
            return max(rounds)[1]
    raise BenchFailure(f"--from-run {run_dir} holds no round-*.safetensors checkpoint: {_HINT}")


def _split(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fits(model, state: dict[str, Any]) -> bool:
    try:
        load_state_tensors(model, state)
    except ValueError:
        return False
    return True


def _built_private(pair: Pair, state: dict[str, Any]):
    """A built-from-config private model matching the checkpoint (the run may use another size)."""
    for name, spec in PRESETS.items():
        if spec.vocab_size != pair.ladder.vocab_size:
            continue
        model = build_model(spec, pair.tokenizer, seed=pair.seed)
        if _fits(model, state):
            return model.eval(), f"{name} (from run)"
    return None, None


def _ladder_for(pair: Pair, state: dict[str, Any], level: int) -> msg.Ladder | None:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    ladders = [pair.ladder] + ([] if pair.pretrained else list(msg.LADDERS.values()))
    for ladder in ladders:
        if level <= ladder.top and msg.level_shapes(ladder, level) == shapes:
            return ladder
    return None


def load_run(run_dir: Path, pair: Pair) -> tuple[Pair, Any, dict[str, Any]]:
    """(pair with the run's private model, the run's messenger, what was loaded) from run_dir."""
    path = find_checkpoint(run_dir)
    try:
        tensors, meta = load_checkpoint(path)
    except StoreError as exc:
        raise BenchFailure(f"--from-run: {exc}") from None
    private_state, messenger_state = _split(tensors, "private."), _split(tensors, "messenger.")
    if not private_state or not messenger_state:
        raise BenchFailure(f"checkpoint {path} holds no private model and messenger (mode {meta.get('mode', '?')}): "
                           "use a run in adaptive or static mode")
    level = int(meta.get("level", "0"))
    if _fits(pair.private, private_state):
        private, name = pair.private.eval(), f"{pair.private_name} (from run)"
    elif not pair.pretrained:
        private, name = _built_private(pair, private_state)
    else:
        private, name = None, None
    if private is None:
        raise BenchFailure(f"the private model in {path} does not match preset {pair.preset!r} "
                           f"({pair.private_name}): pass the --preset that run used")
    ladder = _ladder_for(pair, messenger_state, level)
    if ladder is None:
        raise BenchFailure(f"the messenger in {path} is not level {level} of preset {pair.preset!r}'s ladder: "
                           "pass the --preset that run used")
    run_pair = replace(pair, private=private, ladder=ladder, private_name=name,
                       daemon_config=f"{pair.daemon_config} (weights from {path})")
    draft = msg.build_messenger(ladder, level, pair.tokenizer, seed=pair.seed)
    load_state_tensors(draft, messenger_state)
    info = {"checkpoint": str(path), "round": meta.get("round"), "node": meta.get("node"), "mode": meta.get("mode"),
            "level": level}
    return run_pair, draft.eval(), info
