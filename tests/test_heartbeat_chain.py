"""The heartbeat hash chain: proofs hash forward to the anchor, and nothing else does."""

from __future__ import annotations

import os

import pytest

from fednode.security.heartbeat import CHAIN_LENGTH, CHECKPOINT_EVERY, HeartbeatChain, hash_forward, proves


def test_every_offset_hashes_forward_to_the_anchor_and_to_each_earlier_proof():
    chain = HeartbeatChain(seed=b"s" * 32, length=3 * CHECKPOINT_EVERY + 5)
    assert chain.proof(0) == chain.anchor
    for offset in (1, 2, CHECKPOINT_EVERY - 1, CHECKPOINT_EVERY, CHECKPOINT_EVERY + 1, chain.length):
        assert hash_forward(chain.proof(offset), offset) == chain.anchor
        assert proves(chain.proof(offset), offset, chain.anchor, 0, chain.length)
        assert proves(chain.proof(offset), offset, chain.proof(offset - 1), offset - 1, chain.length)
    assert chain.proof(chain.length) == b"s" * 32  # the seed itself is the last heartbeat's proof


def test_wrong_values_offsets_and_sizes_prove_nothing():
    chain = HeartbeatChain(length=64)
    p10 = chain.proof(10)
    assert not proves(p10, 11, chain.anchor, 0)  # right value, claimed for a later heartbeat
    assert not proves(p10, 9, chain.anchor, 0)
    assert not proves(os.urandom(32), 10, chain.anchor, 0)
    assert not proves(p10[:31], 10, chain.anchor, 0)
    assert not proves(chain.proof(5), 5, p10, 10)  # not newer than what is known
    assert not proves(os.urandom(32), CHAIN_LENGTH + 1, chain.anchor, 0)  # beyond any chain: no hashing at all
    with pytest.raises(ValueError, match="outside the chain"):
        chain.proof(65)
    assert HeartbeatChain(length=64).anchor != chain.anchor  # a fresh random seed per start
