"""[train] device, precision and grad_accum: resolution and one-line errors, accumulation equal to one
large batch, mixed precision that trains and keeps fp32 state on the wire, a real learner that
grows its messenger under them. CPU here; the CUDA path runs where a GPU is lent (bench/RESULTS.md)."""

from __future__ import annotations

import tomllib

import pytest
import torch

from fednode.config import parse_config, to_toml
from fednode.errors import ConfigError
from fednode.learning.data import TokenDataset
from fednode.learning.device import DeviceError, Placement, resolve_device
from fednode.learning.models import build_model, resolve_preset, state_tensors
from fednode.learning.trainer import LocalTrainer
from fednode.node.learner import MessengerLearner
from tools.harness.sim import sim_configs


def test_devices_resolve_or_fail_in_one_line_that_names_the_fix():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"0 CUDA device\(s\).*use \"auto\" or \"cpu\""):
            resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="cuda:N"):
        resolve_device("cuda:x")
    with pytest.raises(DeviceError, match="unknown"):
        resolve_device("tpu")
    with pytest.raises(ConfigError):  # a DeviceError is a config error: the CLI exits with its code
        Placement.of("cpu", "fp8")
    with pytest.raises(ConfigError, match="grad_accum"):
        Placement.of("cpu", "fp32", 0)


@pytest.mark.parametrize("train, needle", [({"device": "gpu"}, "device"), ({"precision": "half"}, "precision"),
                                           ({"grad_accum": 0}, "grad_accum")])
def test_config_refuses_an_unknown_device_precision_or_accumulation(tmp_path, train, needle):
    raw = {"node": {"name": "a", "data_dir": str(tmp_path / "a"), "listen": "mem:1"}, "train": train}
    with pytest.raises(ConfigError, match=needle):
        parse_config(tomllib.loads(to_toml(raw)), tmp_path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A real site's tokenizer and token blocks (the micro preset's)."""
    from fednode.node.learner import LocalModelLearner

    cfg = sim_configs(tmp_path_factory.mktemp("site"), 1, overrides={"model": {"preset": "micro"},
                                                                    "learning": {"mode": "fedavg"}},
                      code_bytes=20_000)[0]
    learner = LocalModelLearner(cfg)
    data = TokenDataset(learner.dataset.train_blocks[:16], learner.dataset.heldout_blocks[:4])
    return learner.tokenizer, data


def _model(tokenizer):
    return build_model(resolve_preset("micro"), tokenizer, seed=0)


def test_two_accumulated_micro_batches_step_like_one_batch_of_both(site):
    tok, data = site
    one = LocalTrainer(_model(tok), seed=0)
    two = LocalTrainer(_model(tok), seed=0, placement=Placement.of("cpu", "fp32", 2))
    a = one.train(data, steps=2, batch_size=4, seed=3, eval_batch_size=4)
    b = two.train(data, steps=2, batch_size=2, seed=3, eval_batch_size=4)
    assert a.tokens == b.tokens == 2 * 4 * data.train_blocks.shape[1]
    for name, t in state_tensors(one.model).items():
        assert torch.allclose(t, state_tensors(two.model)[name], atol=1e-5), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_fp32_state(site, precision):
    tok, data = site
    trainer = LocalTrainer(_model(tok), seed=0, placement=Placement.of("cpu", precision))
    assert (trainer.scaler is not None) == (precision == "fp16")  # fp16 gradients are scaled
    result = trainer.train(data, steps=6, batch_size=4, seed=1, eval_batch_size=4)
    assert result.loss_after < result.loss_before
    assert all(t.dtype == torch.float32 for t in state_tensors(trainer.model).values())  # what travels


def test_a_messenger_learner_trains_grows_and_merges_under_bf16_and_accumulation(tmp_path):
    cfg = sim_configs(tmp_path, 1, overrides={"model": {"preset": "micro"}, "learning": {"curriculum": False},
                                              "train": {"steps_per_round": 2, "batch_size": 2, "threads": 1,
                                                        "precision": "bf16", "grad_accum": 2, "device": "auto"}},
                      code_bytes=20_000)[0]
    learner = MessengerLearner(cfg)
    first = learner.train_round(1)
    assert first.tokens == 2 * 2 * 2 * cfg.data.seq_len  # steps x batch x micro-batches x tokens
    learner.set_level(1, 1234)  # growth through the CPU and back onto the placement's device
    learner.train_round(2)
    assert learner.level == 1 and all(torch.isfinite(t).all() for t in learner.shared_state().values())
    assert next(learner.messenger.parameters()).device == learner.trainer.placement.device
