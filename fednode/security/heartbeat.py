"""Heartbeats that only their owner can advance: a hash chain anchored in the signed Hello.

The owner draws a random seed at start, hashes it CHAIN_LENGTH times and signs the last value
(the anchor) into its Hello together with the heartbeat it stands for (the base). Heartbeat
base + k is proven by the chain value k steps before the anchor: anyone checks it by hashing
forward to a value already verified (one hash per heartbeat step), no one but the owner can
compute it (a preimage of SHA-256). So a member relaying gossip can pass fresh heartbeats on but
never invent one: it cannot keep a stopped node looking alive nor push a node's heartbeat past
what its owner reached. A signature per tick would cost a verification per record per digest;
a hash costs a microsecond. When the chain runs out the owner signs a new Hello with a new anchor.
"""

from __future__ import annotations

import hashlib
import os

CHAIN_LENGTH = 1 << 16  # heartbeats per anchor: ~18 h at one tick a second, then a new signed Hello
CHECKPOINT_EVERY = 256  # the owner keeps every 256th value: 256 x 32 bytes, <= 255 hashes per proof
PROOF_BYTES = 32


def _h(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def hash_forward(value: bytes, steps: int) -> bytes:
    for _ in range(steps):
        value = _h(value)
    return value


class HeartbeatChain:
    """The owner's side: the anchor to sign, and the proof of each offset (0 = the anchor)."""

    def __init__(self, seed: bytes | None = None, length: int = CHAIN_LENGTH):
        self.length = length
        value = seed if seed is not None else os.urandom(PROOF_BYTES)
        # checkpoints[i] = chain value at distance i * CHECKPOINT_EVERY from the seed
        self._checkpoints = []
        for i in range(length + 1):
            if i % CHECKPOINT_EVERY == 0:
                self._checkpoints.append(value)
            if i < length:
                value = _h(value)
        self.anchor = value

    def proof(self, offset: int) -> bytes:
        """The value `offset` steps before the anchor (hashing it `offset` times gives the anchor)."""
        if not 0 <= offset <= self.length:
            raise ValueError(f"heartbeat offset {offset} is outside the chain (0..{self.length})")
        distance = self.length - offset  # from the seed
        base = distance // CHECKPOINT_EVERY
        return hash_forward(self._checkpoints[base], distance - base * CHECKPOINT_EVERY)


def proves(proof: bytes, offset: int, known: bytes, known_offset: int, length: int = CHAIN_LENGTH) -> bool:
    """Whether `proof` is the chain value at `offset`, given a verified value at `known_offset`
    (the anchor at 0). Costs offset - known_offset hashes, at most `length`."""
    if len(proof) != PROOF_BYTES or not known_offset < offset <= length:
        return False
    return hash_forward(proof, offset - known_offset) == known
