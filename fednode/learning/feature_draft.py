"""A feature-level self-draft (EAGLE, Li et al. 2024): one decoder layer over P's own top features.

An early exit (`early_exit`) must rebuild P's prediction from a shallow prefix, so it pays k of P's
layers per drafted token and still agrees rarely. P's last hidden state (after its final norm, the
input of its head) already holds P's next-token prediction; what a draft has to add is one step:
given P's feature f_t and the token x_{t+1} P chose from it, predict the feature f_{t+1} and so the
token after. `FeatureDraft` does that with one decoder layer of P's class (initialised from P's
last layer) over `fc([f_t; embed(x_{t+1})])`, P's embedding and P's head (shared, or a subset head);
it drafts further by feeding its own predicted features back. Its cost per token is one layer and
the head, a few percent of P, where an exit after 8 of 30 layers costs ~0.28.

The draft needs P's features for the committed tokens; the speculative loop gets them from the
verification forward it runs anyway (`tools.throughput.speculative.feature_speculative_greedy`).
Training (`fit_feature_draft`) runs on cached features of P's own greedy continuations: the loss
is a smooth-L1 regression to P's next feature plus cross-entropy to P's next argmax (EAGLE's).

P is never changed; every committed token is still P's argmax, so the output is P's greedy output.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fednode.learning.early_exit import SubsetHead

IGNORE = -100
FILE_FORMAT = "fednode-feature-draft-1"
TOKEN_LOSS_WEIGHT = 0.1  # EAGLE's weight of the token cross-entropy beside the feature regression
MIX_INIT = 0.5  # fc starts as the mean of the feature and the embedding: a finite, scale-matched input


def _decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise ValueError(f"{type(model).__name__} is not a Llama-style causal LM (model.layers, model.embed_tokens)")
    return inner


class FeatureDraft(torch.nn.Module):
    """fc + one decoder layer of P's class, over P's features and P's embedding, exiting through P's head.

    `forward(features, input_ids, cache)`: features (B, T, H) are P's at positions t, input_ids
    (B, T) the tokens at t + 1; returns the predicted features of t + 1 (B, T, H). `logits(hidden)`
    applies the head (full-vocabulary logits, as P's).
    """

    def __init__(self, private) -> None:
        super().__init__()
        inner = _decoder(private)
        hidden = private.config.hidden_size
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        config = copy.deepcopy(private.config)
        config.num_hidden_layers = 1
        with torch.device("meta"):
            body = type(inner)(config)
        layer = copy.deepcopy(inner.layers[-1])
        layer.self_attn.layer_idx = 0  # slot 0 of the draft's own KV cache
        body.layers = torch.nn.ModuleList([layer])
        body.norm = torch.nn.Identity()  # the features are post-norm already; the head reads them as they are
        body.rotary_emb = inner.rotary_emb
        body.embed_tokens = None
        self.body = body
        self.config = config  # P's, one layer deep: the token space (vocab, BOS/EOS/pad ids) is P's
        self.embed = inner.embed_tokens  # shared with P, not a parameter of the draft's own
        self.head = private.lm_head
        like = next(private.parameters())  # P's device and dtype
        self.fc.to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.fc.weight.zero_()
            eye = torch.eye(hidden, device=like.device, dtype=like.dtype) * MIX_INIT
            self.fc.weight[:, :hidden] += eye
            self.fc.weight[:, hidden:] += eye

    def own_parameters(self) -> list[torch.nn.Parameter]:
        """What training changes: fc and the layer (P's embedding and head stay P's)."""
        return [*self.fc.parameters(), *self.body.layers.parameters()]

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, cache=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mixed = self.fc(torch.cat([features, self.embed(input_ids)], -1))
        out = self.body(inputs_embeds=mixed, attention_mask=attention_mask, cache=cache,
                        use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def row_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the head's own rows only (a subset head's ids in its order): what training needs."""
        head = self.head
        return hidden @ head.rows.T if isinstance(head, SubsetHead) else head(hidden)

    def row_ids(self) -> torch.Tensor | None:
        head = self.head
        return head.index if isinstance(head, SubsetHead) else None

    def use_subset_head(self, keep: torch.Tensor) -> FeatureDraft:
        """Draft over `keep` token ids only (FR-Spec): the head costs len(keep) rows, not the vocabulary."""
        self.head = SubsetHead(self.head.weight, keep)
        return self


def features(private, input_ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """P's top features (its head's input) at every position of `input_ids` (a 4D `attention_mask` with
    `position_ids` reads a token tree: each token sees the cache, its ancestors and itself)."""
    out = _decoder(private)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


@dataclass
class FeatureSet:
    """Cached training pairs: P's features (N, T, H), tokens (N, T), P's argmax (N, T), counted (N, T - 1).

    Input position j is (features[:, j], tokens[:, j + 1]); its targets are features[:, j + 1] and
    argmax[:, j + 1]; `counted[:, j]` says whether position j is trained on / scored.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    argmax: torch.Tensor
    counted: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, private, sequences: list[list[int]], starts: list[int], pad: int, batch: int = 16) -> FeatureSet:
        """P over each sequence once; positions predicting tokens at index >= start + 1 count (P's own output).

        `starts[i]` is where P's generated tokens begin in `sequences[i]` (the prompt before it is
        context only); sequences are right-padded with `pad`, which causal attention never reads.
        """
        if len(sequences) != len(starts) or not sequences:
            raise ValueError(f"{len(sequences)} sequences and {len(starts)} starts: need one start per sequence")
        width = max(map(len, sequences))
        if width < 2:
            raise ValueError("feature-draft sequences need at least 2 tokens")
        tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
        counted = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= start <= len(seq):
                raise ValueError(f"sequence {i}: start {start} outside 1..{len(seq)}")
            tokens[i, :len(seq)] = torch.tensor(seq)
            counted[i, start - 1:len(seq) - 1] = True  # j: (f_j, x_{j+1}) with x_{j+1} P's own -> argmax[j + 1]
        device = next(private.parameters()).device
        feats, best = [], []
        for chunk in tokens.split(batch):
            f = features(private, chunk.to(device)).float().cpu()
            feats.append(f)
            best.append(private.lm_head(f.to(device, next(private.parameters()).dtype)).argmax(-1).cpu())
        return cls(torch.cat(feats), tokens, torch.cat(best), counted)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def join(self, other: FeatureSet, pad: int) -> FeatureSet:
        """Both sets' sequences in one, the narrower right-padded (`pad` tokens, zero features, not counted)."""
        width = max(self.tokens.shape[1], other.tokens.shape[1])

        def widen(s: FeatureSet) -> FeatureSet:
            extra = width - s.tokens.shape[1]
            if not extra:
                return s
            return FeatureSet(F.pad(s.features, (0, 0, 0, extra)), F.pad(s.tokens, (0, extra), value=pad),
                              F.pad(s.argmax, (0, extra), value=pad), F.pad(s.counted, (0, extra), value=False))

        a, b = widen(self), widen(other)
        return FeatureSet(torch.cat([a.features, b.features]), torch.cat([a.tokens, b.tokens]),
                          torch.cat([a.argmax, b.argmax]), torch.cat([a.counted, b.counted]))

    def split(self, held: int) -> tuple[FeatureSet, FeatureSet]:
        """(train, held-out): the first `held` sequences held out."""
        if not 0 < held < len(self):
            raise ValueError(f"cannot hold out {held} of {len(self)} sequences")
        a = FeatureSet(self.features[held:], self.tokens[held:], self.argmax[held:], self.counted[held:])
        b = FeatureSet(self.features[:held], self.tokens[:held], self.argmax[:held], self.counted[:held])
        return a, b


def _step_inputs(draft: FeatureDraft, data: FeatureSet, pick: torch.Tensor | slice):
    device = draft.fc.weight.device
    dtype = draft.fc.weight.dtype
    f = data.features[pick].to(device, dtype)
    x = data.tokens[pick].to(device)
    return f, x, data.argmax[pick].to(device), data.counted[pick].to(device)


def _row_labels(draft: FeatureDraft, argmax: torch.Tensor) -> torch.Tensor:
    ids = draft.row_ids()
    if ids is None:
        return argmax
    lookup = torch.full((int(draft.head.vocab_size),), IGNORE, dtype=torch.long, device=argmax.device)
    lookup[ids] = torch.arange(ids.numel(), device=argmax.device)
    return lookup[argmax]


@torch.no_grad()
def feature_agreement(draft: FeatureDraft, data: FeatureSet, batch: int = 16) -> float:
    """Fraction of counted positions where the draft's first token is P's argmax (acceptance at length 1)."""
    was = draft.training
    draft.eval()
    hits = total = 0
    for start in range(0, len(data), batch):
        f, x, best, counted = _step_inputs(draft, data, slice(start, start + batch))
        hidden = draft(f[:, :-1], x[:, 1:])
        guess = draft.logits(hidden).argmax(-1)
        hits += int(((guess == best[:, 1:]) & counted).sum())
        total += int(counted.sum())
    draft.train(was)
    return hits / total if total else 0.0


@dataclass(frozen=True)
class FeatureFit:
    steps: int
    sequences: int
    seconds: float
    lr: float
    agreement_before: float
    agreement_after: float
    final_loss: float | None


def fit_feature_draft(draft: FeatureDraft, train: FeatureSet, held: FeatureSet, *, steps: int, batch: int,
                      lr: float, seed: int, progress: Callable[[str], None] | None = None) -> FeatureFit:
    """Train fc and the layer for `steps` batches: smooth-L1 to P's next feature + 0.1 x CE to its argmax."""
    params = draft.own_parameters()
    before = feature_agreement(draft, held)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    frozen = [p for p in [*draft.embed.parameters(), *draft.head.parameters()] if p.requires_grad]
    for p in frozen:  # P's embedding and head: no gradient
        p.requires_grad_(False)
    started, last = time.perf_counter(), None
    draft.train()
    try:
        for step in range(1, steps + 1):
            pick = torch.randint(0, len(train), (min(batch, len(train)),), generator=g)
            f, x, best, counted = _step_inputs(draft, train, pick)
            if not counted.any():
                continue
            hidden = draft(f[:, :-1], x[:, 1:])
            reg = F.smooth_l1_loss(hidden.float(), f[:, 1:].float(), reduction="none").mean(-1)
            reg = (reg * counted).sum() / counted.sum()
            labels = _row_labels(draft, best[:, 1:]).masked_fill(~counted, IGNORE)
            ce = F.cross_entropy(draft.row_logits(hidden).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            loss = reg + TOKEN_LOSS_WEIGHT * ce if torch.isfinite(ce) else reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            last = float(loss.detach())
            if progress is not None and step % 100 == 0:
                progress(f"feature draft fit: step {step}/{steps}, loss {last:.3f}, held-out agreement "
                         f"{feature_agreement(draft, held):.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        draft.eval()
    return FeatureFit(steps, len(train), time.perf_counter() - started, lr, before, feature_agreement(draft, held),
                      last)


def _own_state(draft: FeatureDraft) -> dict[str, torch.Tensor]:
    return {**{f"fc.{k}": v for k, v in draft.fc.state_dict().items()},
            **{f"layer.{k}": v for k, v in draft.body.layers[0].state_dict().items()}}


def _shape_of(private) -> dict[str, str]:
    c = private.config
    return {"hidden_size": str(c.hidden_size), "vocab_size": str(c.vocab_size), "model_type": str(c.model_type)}


def save_feature_draft(draft: FeatureDraft, private, path: Path) -> None:
    """The draft's own weights (fc, layer) and subset-head ids as safetensors, written atomically."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in _own_state(draft).items()}
    ids = draft.row_ids()
    if ids is not None:
        tensors["head_index"] = ids.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": FILE_FORMAT, **_shape_of(private)})
    os.replace(tmp, path)


def load_feature_draft(private, path: Path) -> FeatureDraft:
    """A draft saved by `save_feature_draft` for a model of P's shape; ValueError naming what is wrong."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable feature-draft file ({exc}): delete it to train a new one") from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FILE_FORMAT!r}: delete it to train anew")
    if {k: meta.get(k) for k in _shape_of(private)} != _shape_of(private):
        raise ValueError(f"{path}: trained for another model ({meta}): delete it to train one for this model")
    draft = FeatureDraft(private)
    index = tensors.pop("head_index", None)
    if index is not None:
        draft.use_subset_head(index)
    own = _own_state(draft)
    if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
        raise ValueError(f"{path}: its tensors do not fit this model's feature draft: delete it to train anew")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ValueError(f"{path}: holds non-finite weights: delete it to train anew")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k].to(v.dtype))
    return draft.eval()
