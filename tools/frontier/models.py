"""The models a site could serve at one checkpoint, rebuilt from the checkpoint alone.

A daemon checkpoint says what it fits (`preset`, `family`, `ladder`, `level`, `mode` in its
metadata), so nothing but the checkpoint is needed. Per family:
- distilled: P, the messenger M at its level (its own model), the P+M ensemble, P drafted by M;
- shared-prefix: P, and M = P's own embedding + first `level` layers exiting through P's final
  norm and head (`fednode.learning.early_exit`, untrained exit: the messenger as the mesh shares
  it), which also drafts P (self-speculation, no second model); the top level is P itself;
- fedavg / local: P only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednode.errors import StoreError
from fednode.learning import messenger as msg
from fednode.learning.early_exit import early_exit_draft
from fednode.learning.models import PRESETS, build_model, load_state_tensors
from fednode.learning.optim_state import model_tensors
from fednode.learning.tokenizer import build_tokenizer
from fednode.store.checkpoint import load_checkpoint
from tools.throughput.errors import BenchFailure


@dataclass
class Site:
    """One node's models at one round."""

    round: int
    preset: str  # the private model's preset, as the checkpoint names it
    mode: str
    family: str
    level: int
    private: Any
    messenger: Any | None  # None: no messenger (fedavg, local, or the shared prefix at its top level)


class Loader:
    """Builds each preset's skeleton once and loads checkpoints into it (one P in memory at a time)."""

    def __init__(self, cache: Path, seed: int) -> None:
        self.cache, self.seed = Path(cache), seed
        self._private: dict[str, tuple[Any, Any]] = {}

    def private(self, preset: str) -> tuple[Any, Any]:
        """(model, tokenizer) of a built-from-config preset."""
        if preset not in self._private:
            if preset not in PRESETS:
                raise BenchFailure(f"checkpoints of model preset {preset!r}: the frontier measures built-from-config "
                                   f"presets ({', '.join(PRESETS)}); pretrained ones are not supported yet")
            spec = PRESETS[preset]
            tok = build_tokenizer(self.cache / "tokenizers", vocab_size=spec.vocab_size)
            self._private[preset] = (build_model(spec, tok, seed=self.seed).eval(), tok)
        return self._private[preset]

    def site(self, path: Path) -> tuple[Site, Any]:
        """(the site's models at this checkpoint, tokenizer)."""
        try:
            tensors, meta = load_checkpoint(path)
        except StoreError as exc:
            raise BenchFailure(f"--from-run: {exc}") from None
        family, mode = meta.get("family", "distilled"), meta.get("mode", "")
        if family == "lora":
            raise BenchFailure(f"{path}: lora-family checkpoints are not supported by the frontier yet: "
                               "measure distilled or shared-prefix runs")
        preset = meta.get("preset", "")
        private, tok = self.private(preset)
        level = int(meta.get("level", "0"))
        shares = mode in ("adaptive", "static")
        state = {k[8:]: v for k, v in tensors.items() if k.startswith("private.")} if shares \
            else model_tensors(tensors)
        try:
            load_state_tensors(private, state)
        except ValueError as exc:
            raise BenchFailure(f"{path}: the private model does not fit preset {meta.get('preset')!r}: {exc}") from None
        messenger = None
        if shares and family == "distilled":
            ladder = msg.LADDERS.get(meta.get("ladder", "")) or msg.LADDERS.get(meta.get("preset", ""))
            if ladder is None:
                raise BenchFailure(f"{path}: unknown messenger ladder {meta.get('ladder')!r}")
            messenger = msg.build_messenger(ladder, level, tok, seed=self.seed)
            try:
                load_state_tensors(messenger, {k[10:]: v for k, v in tensors.items() if k.startswith("messenger.")})
            except ValueError as exc:
                raise BenchFailure(f"{path}: the messenger is not level {level} of ladder {ladder!r}: {exc}") from None
            messenger.eval()
        elif shares and family == "shared-prefix" and level < private.config.num_hidden_layers:
            messenger = early_exit_draft(private, level, exit="norm")
        return Site(int(meta.get("round", "0")), preset, mode, family, level, private, messenger), tok
