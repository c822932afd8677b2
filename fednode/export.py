"""Take the model home: rebuild a node's models from a round checkpoint and save them in the
Hugging Face format (`fednode export`), so `AutoModelForCausalLM.from_pretrained(DIR)` runs them
with no fednode code.

A round checkpoint holds tensors only (`private.*` / `messenger.*` in the messenger modes, the
whole model in fedavg/local mode, `optim.*` for Adam); the architecture comes from the node's
config: the preset built from its seed (or the pretrained base it loads) for P, the messenger
ladder at the checkpoint's level for M. `checkpoint_models` is that rebuild, shared by the export
and by `fednode-bench humaneval nll --config`, so what is exported is exactly what is scored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fednode.config import Config, Family, Mode
from fednode.errors import ConfigError, StoreError
from fednode.learning.optim_state import model_tensors

WHATS = ("private", "messenger", "merged")
EXPORT_INFO = "fednode_export.json"  # provenance beside the HF files (ignored by transformers)


def private_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """P's tensors from a checkpoint: `private.*` where the learner keeps a messenger or a shared
    prefix beside P, else the whole model (fedavg/local), never the optimizer state."""
    private = {k[8:]: v for k, v in tensors.items() if k.startswith("private.")}
    return private or {k: v for k, v in model_tensors(tensors).items() if not k.startswith("messenger.")}


def messenger_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged messenger's tensors (distilled family); {} where the checkpoint has none."""
    return {k[10:]: v for k, v in tensors.items() if k.startswith("messenger.")}


def available(tensors: dict[str, torch.Tensor], mode: str) -> tuple[str, ...]:
    """What a checkpoint can export: the distilled family has P and its merged messenger M; the
    shared-prefix family and fedavg have one model that is both the site's and the merged one;
    local mode only the site's own model (nothing was ever merged)."""
    if messenger_state(tensors):
        return ("private", "messenger")
    if mode == Mode.LOCAL:
        return ("private",)
    return ("private", "merged")


def describe(what: str, family: str) -> str:
    """Words for what was exported."""
    if what == "merged":
        if family == Family.LORA:
            return "the mesh's model (the base with the shared adapter merged in)"
        return "the model itself (its shared prefix merged)" if family == Family.SHARED_PREFIX else "the averaged model"
    if what == "messenger":
        return "the merged messenger"
    return "the private model P"


@dataclass
class NodeModel:
    """One model of a node at a committed round, ready to save or score."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # its PreTrainedTokenizer
    what: str
    round: int
    level: int
    mode: str
    checkpoint: Path
    checkpoint_sha256: str
    node: str


def checkpoint_models(cfg: Config, tensors: dict[str, torch.Tensor], level: int,
                      want: tuple[str, ...] = ("private", "messenger")) -> tuple[dict[str, torch.nn.Module], object]:
    """({"private": P, "messenger": M}, tokenizer) rebuilt from a checkpoint's tensors: the node's
    private architecture (its preset from the config's seed, or its pretrained base) with P's
    tensors loaded, and, where the checkpoint has one and it is wanted, the messenger at `level`
    of the node's ladder. Models are fp32, in eval mode. ValueError when tensors do not fit."""
    from fednode.learning import messenger
    from fednode.learning.models import load_state_tensors
    from fednode.node.learner import load_private_model, messenger_ladder

    private, tok, _family = load_private_model(cfg)
    private = private.float()
    if any(".lora_A." in k for k in tensors):  # the lora family: adapters on the frozen base, merged into it
        return _lora_models(cfg, private, private_state(tensors), want), tok
    load_state_tensors(private, private_state(tensors))
    private.eval()
    out = {"private": private}
    m_state = messenger_state(tensors)
    if "messenger" in want and m_state:
        ladder = messenger_ladder(cfg, private)
        m = messenger.build_messenger(ladder, level, tok, seed=cfg.model.seed)
        load_state_tensors(m, m_state)
        m.eval()
        out["messenger"] = m
    return out, tok


def _lora_models(cfg: Config, base: torch.nn.Module, adapters: dict[str, torch.Tensor],
                 want: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """P (the base with both adapters merged) and, when wanted, the mesh's model (the shared adapter
    alone): plain transformers models that load with no peft."""
    from fednode.learning import lora
    from fednode.node.learner import load_private_model

    lrn = cfg.learning
    out = {}
    for role, with_private in (("private", True), ("merged", False)):
        if role == "private" or role in want:
            model = base if role == "private" else load_private_model(cfg)[0].float()
            out[role] = lora.merged_model(model, adapters, lrn.lora_ranks[-1], lrn.lora_private_rank, with_private)
            out[role].eval()
    return out


def _rounds_text(recs) -> str:
    if not recs:
        return "none"
    nums = [r.round for r in recs]
    return f"{nums[0]}..{nums[-1]}" if len(nums) > 3 else ", ".join(map(str, nums))


def load_node_model(cfg: Config, what: str = "private", round_: int | None = None) -> NodeModel:
    """The `what` model of the node's newest committed round (or round `round_`), from its journal
    and checkpoint (verified against the journal's hash). One-line FednodeErrors otherwise."""
    from fednode.store.checkpoint import load_checkpoint
    from fednode.store.journal import Journal

    if what not in WHATS:
        raise ConfigError(f"--what {what!r} is unknown: use one of {', '.join(WHATS)}")
    data_dir = cfg.node.data_dir
    journal_path = data_dir / "journal.db"
    if not journal_path.is_file():
        raise StoreError(f"no checkpoint: {journal_path} does not exist (the node has committed no round in "
                         f"{data_dir}): run the node first, or pass the config of a node that has trained")
    with Journal.open(journal_path) as journal:
        recs = journal.rounds()
    if not recs:
        raise StoreError(f"no checkpoint: the journal {journal_path} has no committed round yet: let the node "
                         "finish a round first")
    found = recs[-1] if round_ is None else next((r for r in recs if r.round == round_), None)
    if found is None:
        raise StoreError(f"round {round_} is not in the journal {journal_path} (committed rounds: "
                         f"{_rounds_text(recs)}): pass one of those to --round")
    rec = found
    path = data_dir / "checkpoints" / rec.checkpoint
    if not path.is_file():
        kept = [r for r in recs if (data_dir / "checkpoints" / r.checkpoint).is_file()]
        raise StoreError(f"the checkpoint of round {rec.round} ({path}) is gone: older rounds are pruned "
                         f"([train] keep_checkpoints = {cfg.train.keep_checkpoints}); rounds still on disk: "
                         f"{_rounds_text(kept)}")
    tensors, meta = load_checkpoint(path, rec.checkpoint_sha256)
    if (mismatch := config_mismatch(meta, cfg)) is not None:
        raise ConfigError(f"the round {rec.round} checkpoint {path} was written {mismatch}: use the config "
                          f"the node trained with")
    mode = meta.get("mode") or cfg.learning.mode
    level = int(meta.get("level", rec.level))
    have = available(tensors, mode)
    if what not in have:
        family = f" of the {cfg.learning.family} family" if mode in (Mode.ADAPTIVE, Mode.STATIC) else ""
        raise ConfigError(f"--what {what}: a {mode}-mode checkpoint{family}"
                          f" has no {what} model; available: {', '.join(have)}")
    try:
        models, tok = checkpoint_models(cfg, tensors, level, want=(what,) if what != "private" else ())
    except ValueError as exc:
        raise ConfigError(f"the round {rec.round} checkpoint {path} does not fit the model of "
                          f"{cfg.source or 'the config'} ({exc}): use the config the node trained with") from None
    model = models.get(what, models["private"])  # shared-prefix / fedavg: the merged model is P itself
    return NodeModel(model=model, tokenizer=tok, what=what, round=rec.round, level=level, mode=mode,
                     checkpoint=path, checkpoint_sha256=rec.checkpoint_sha256, node=meta.get("node", cfg.node.name))


def config_mismatch(meta: dict[str, str], cfg: Config) -> str | None:
    """How a self-describing checkpoint's metadata contradicts `cfg` (None: it fits, or it is an
    older checkpoint that does not say). Checked before any tensor is loaded into a model."""
    said = {"preset": cfg.model.preset, "family": cfg.learning.family, "ladder": cfg.learning.ladder}
    if cfg.model.path is not None:
        said["model_path"] = str(cfg.model.path)
    if cfg.learning.family is Family.LORA:  # the adapters' shapes: a config with other ranks cannot rebuild them
        said["lora_ranks"] = ",".join(map(str, cfg.learning.lora_ranks))
        said["lora_private_rank"] = str(cfg.learning.lora_private_rank)
    for key, value in said.items():
        whole_model = meta.get("mode") in (Mode.FEDAVG, Mode.LOCAL)  # no messenger: its family is moot
        if key in meta and meta[key] != value and not (key == "family" and whole_model):
            return f"with {key} {meta[key]!r}, but {cfg.source or 'the config'} says {value!r}"
    return None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty: pass a new or empty directory "
                          "(an export never overwrites files)")


def save_pretrained(node_model: NodeModel, out: Path) -> list[str]:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files into
    `out` (new or empty) atomically: a failed export leaves no half-written directory."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    out = Path(out)
    _check_out(out)
    model, tok = node_model.model, node_model.tokenizer
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"cannot create {out} ({exc.strerror or exc}): pass a writable --out") from None
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one summary line is the CLI's output, not a shard progress bar
    try:
        tmp.chmod(0o755)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        info = {"what": node_model.what, "round": node_model.round, "level": node_model.level,
                "mode": node_model.mode, "node": node_model.node, "checkpoint": node_model.checkpoint.name,
                "checkpoint_sha256": node_model.checkpoint_sha256}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above): rename cannot replace a directory on every platform
        os.rename(tmp, out)
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out} ({exc.strerror or exc}): pass a writable --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bar:
            hf_logging.enable_progress_bar()
    return sorted(p.name for p in out.iterdir())


def export(cfg: Config, what: str, out: Path, round_: int | None = None) -> tuple[NodeModel, list[str]]:
    """`fednode export`: the node's `what` model at a round, saved in the Hugging Face format."""
    _check_out(Path(out))  # before the (slower) rebuild
    node_model = load_node_model(cfg, what, round_)
    return node_model, save_pretrained(node_model, Path(out))
