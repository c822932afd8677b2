"""What the demo's summary compares: each node's federated private model against the same model
trained alone (same data, seed, steps and rounds, nothing exchanged), on the node's own held-out
code and on every other site's. The alone-trained twin is trained in the demo process after the
mesh stops (`local` mode is cheap: P only), so the comparison costs seconds, not a second mesh.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from fednode.config import Config, Mode, load_config


@dataclass(frozen=True)
class NodeGain:
    name: str
    own_local: float  # held-out loss (nats/token) of P trained alone, on the node's own code
    own_federated: float  # of the federated P, same data
    others_local: float  # mean over the other sites' held-out code
    others_federated: float


def _private_of(cfg: Config):
    """The federated node's private model as of its last committed round."""
    from fednode.learning.models import load_state_tensors
    from fednode.learning.optim_state import model_tensors
    from fednode.node.learner import load_private_model
    from fednode.store.checkpoint import latest_good_round
    from fednode.store.journal import Journal

    journal = Journal.open(cfg.node.data_dir / "journal.db")
    try:
        found = latest_good_round(journal, cfg.node.data_dir / "checkpoints")
    finally:
        journal.close()
    if found is None:
        raise RuntimeError(f"{cfg.node.name} committed no round")
    _rec, tensors, _meta = found
    model, tok, _ = load_private_model(cfg)
    private = {k[8:]: v for k, v in tensors.items() if k.startswith("private.")} or model_tensors(tensors)
    load_state_tensors(model, private)
    return model, tok


def compare(config_paths: list[Path], rounds: int) -> list[NodeGain]:
    """Federated P vs P trained alone, per node (`rounds` local rounds for the twin)."""
    from fednode.learning.trainer import evaluate
    from fednode.node.learner import LocalModelLearner

    configs = [load_config(p) for p in config_paths]
    federated, alone, heldout = {}, {}, {}
    for cfg in configs:
        model, _tok = _private_of(cfg)
        federated[cfg.node.name] = model
        twin = LocalModelLearner(replace(cfg, learning=replace(cfg.learning, mode=Mode.LOCAL)))
        for r in range(1, rounds + 1):
            twin.train_round(r)
        alone[cfg.node.name] = twin.model
        heldout[cfg.node.name] = twin.dataset.heldout_batches(cfg.train.batch_size)  # the node's own split
    out = []
    for cfg in configs:
        me = cfg.node.name
        others = [n for n in heldout if n != me]

        def loss(model, names):
            return statistics.fmean(evaluate(model, heldout[n]) for n in names)

        out.append(NodeGain(me, loss(alone[me], [me]), loss(federated[me], [me]),
                            loss(alone[me], others), loss(federated[me], others)))
    return out
