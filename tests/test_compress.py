"""int8 update compression: a round trip within one step per block, unbiased rounding, and every malformed encoding a
peer could send is a MALFORMED refusal; values a peer chose (NaN or huge scales) meet the usual
update validation after decompression."""

from __future__ import annotations

import pytest
import torch

from fednode.errors import ProtocolError, Reason
from fednode.learning.aggregate import validate_update
from fednode.learning.compress import BLOCK, SCALE_SUFFIX, block_count, compress, decompress
from fednode.node.tensorstream import decode, encode


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, as in an embedding: a per-tensor scale would zero the small ones
    emb = torch.randn(64, 32, generator=g) * torch.logspace(-4, 0, 64)[:, None]
    return {"emb": emb, "w": torch.randn(16, 8, 3, generator=g), "norm": 1 + 0.01 * torch.randn(32, generator=g),
            "zero": torch.zeros(4, 4), "steps": torch.tensor([3, 4])}


def test_int8_round_trip_is_within_one_step_of_each_block():
    state = _state()
    wire, meta = compress(state, "int8")
    assert meta == {"codec": "int8"}
    assert wire["emb"].dtype == torch.int8 and wire["emb" + SCALE_SUFFIX].shape == (64 * 32 // BLOCK,)
    assert wire["w"].shape == (16, 8, 3)
    assert wire["w" + SCALE_SUFFIX].shape == (block_count(16 * 8 * 3),)  # blocks run across rows
    back = decompress(wire, meta)
    assert set(back) == set(state)
    for name in ("emb", "w"):
        flat, got = state[name].reshape(-1), back[name].reshape(-1)
        for i in range(0, flat.numel(), BLOCK):
            step = float(flat[i:i + BLOCK].abs().max()) / 127
            assert float((got[i:i + BLOCK] - flat[i:i + BLOCK]).abs().max()) <= step * (1 + 1e-5) + 1e-12, (name, i)
        assert back[name].dtype == torch.float32 and back[name].shape == state[name].shape
    assert torch.equal(back["norm"], state["norm"])  # vectors travel as they are
    assert torch.equal(back["zero"], state["zero"]) and torch.equal(back["steps"], state["steps"])


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = {"w": torch.full((4, 64), 0.3) * torch.linspace(-1, 1, 64)}
    x["w"][:, 0] = 1.0  # sets each block's step: 1/127
    mean = sum(decompress(*compress(x, "int8", seed=s))["w"] for s in range(400)) / 400
    assert float((mean - x["w"]).abs().max()) < 0.15 / 127  # round-to-nearest would be off by up to 0.5 step
    a, b = compress(x, "int8", seed=7)[0]["w"], compress(x, "int8", seed=7)[0]["w"]
    assert torch.equal(a, b) and not torch.equal(a, compress(x, "int8", seed=8)[0]["w"])


def test_int8_payload_is_about_four_times_smaller():
    state = {"emb": torch.randn(512, 128), "w": torch.randn(128, 128), "b": torch.randn(128)}
    plain = encode(compress(state, "none")[0]).total_size
    small = encode(*compress(state, "int8")).total_size
    assert 3.5 < plain / small < 4.0


def test_the_codec_travels_in_the_payload_metadata():
    state = _state()
    encoded = encode(*compress(state, "int8"))
    buffer = bytearray(b"".join(bytes(c) for c in encoded.chunks(1 << 20)))
    tensors, meta = decode(buffer)
    back = decompress(tensors, meta)
    assert torch.allclose(back["w"], state["w"], atol=float(state["w"].abs().max()) / 120)
    assert decompress(*decode(bytearray(b"".join(bytes(c) for c in encode(state).chunks(1 << 20)))))["w"].equal(
        state["w"])  # no codec key: uncompressed


@pytest.mark.parametrize("mutate, message", [
    (lambda w, m: m.update(codec="zstd"), "codec 'zstd' is unknown"),
    (lambda w, m: w.pop("emb" + SCALE_SUFFIX), "has no block scales"),
    (lambda w, m: w.pop("emb"), "has no tensor"),
    (lambda w, m: w.__setitem__("emb" + SCALE_SUFFIX, torch.ones(3)), "must be float32 of shape"),
    (lambda w, m: w.__setitem__("emb" + SCALE_SUFFIX, torch.ones(32, dtype=torch.float64)), "must be float32"),
    (lambda w, m: w.__setitem__("norm" + SCALE_SUFFIX, torch.ones(32)), "is torch.float32, not int8"),
    (lambda w, m: w.__setitem__("x", torch.zeros((), dtype=torch.int8)), "has no block scales"),
    (lambda w, m: m.clear(), "uncompressed update carries int8 scales"),
])
def test_malformed_encodings_are_refused(mutate, message):
    wire, meta = compress(_state(), "int8")
    mutate(wire, meta)
    with pytest.raises(ProtocolError, match=message) as info:
        decompress(wire, meta)
    assert info.value.reason == Reason.MALFORMED


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 3e38])
def test_hostile_scales_meet_the_update_validation(scale):
    state = _state()
    wire, meta = compress(state, "int8")
    wire["emb" + SCALE_SUFFIX] = torch.full((64 * 32 // BLOCK,), scale)
    back = decompress(wire, meta)
    with pytest.raises(ProtocolError) as info:
        validate_update(back, state, max_norm=1e6)
    assert info.value.reason in (Reason.NOT_FINITE, Reason.MALFORMED)


def test_unknown_codec_on_the_sending_side_is_a_value_error():
    with pytest.raises(ValueError, match="unknown update codec"):
        compress(_state(), "fp4")


def test_a_mixed_mesh_merges_int8_and_fp32_pushes_over_the_real_node_code(tmp_path):
    """Two full daemons (fedavg, so the whole model travels): n1 pushes int8, n0 float32. Both
    merge the other's updates, and n1's pushes are about a quarter of n0's bytes."""
    import asyncio

    from fednode.store.journal import Journal
    from tools.harness.sim import SimHarness, sim_configs

    learning = {"mode": "fedavg", "aggregation": "mean", "update_codec": "none"}
    configs = sim_configs(tmp_path, 2, overrides={"learning": learning, "train": {"round_timeout_s": 20.0},
                                                  "negotiation": {"min_live_peers": 2}},
                          per_node={"n1": {"learning": {"update_codec": "int8"}}}, seeds=1)

    async def main() -> dict[str, int]:
        async with SimHarness(configs) as mesh:
            mesh.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 240

            def done() -> bool:
                ctxs = [mesh.ctx(n) for n in mesh.names]
                return all(c is not None and c.committed_round >= 3 for c in ctxs)

            while not done():
                assert loop.time() < deadline, "the two nodes did not commit 3 rounds"
                assert len(mesh.live()) == 2, "a node stopped"
                await asyncio.sleep(0.1)

    asyncio.run(main())
    push: dict[str, int] = {}
    for cfg in configs:
        journal = Journal.open(cfg.node.data_dir / "journal.db")
        merged = [r.merged_from for r in journal.rounds()]
        pushed = [r.bytes_sent for r in journal.rounds() if r.bytes_sent > 0]
        journal.close()
        assert pushed, f"{cfg.node.name} never pushed"
        push[cfg.node.name] = max(pushed)  # one peer: one push per round
        other = "n1" if cfg.node.name == "n0" else "n0"
        assert any(other in m for m in merged), f"{cfg.node.name} never merged {other}'s pushes: {merged}"
    assert 3.0 < push["n0"] / push["n1"] < 4.5, push
