"""fednode: a peer-to-peer federated-learning daemon for code models."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2  # 2: heartbeats proven by the owner's hash chain, signed farewells
