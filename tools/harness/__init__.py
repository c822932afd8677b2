"""The gossip-mode harness: real daemons (processes) or full in-process nodes, with fault hooks.

- `ProcessHarness`: N `fednode run` processes on loopback, fresh CA/certificates/configs and
  non-IID partitions (fednode.launcher.LocalMesh), with kill -9/restart, SIGSTOP/SIGCONT,
  partitions, latency, stalls and a tampering peer (fednode.transport.faults plans).
- `SimHarness`: the same daemon code over the in-memory transport twin, for 50+ node meshes.
"""

from tools.harness.collect import NodeReport, ResourceSample, read_rounds
from tools.harness.process import ProcessHarness
from tools.harness.sim import SimHarness

__all__ = ["NodeReport", "ProcessHarness", "ResourceSample", "SimHarness", "read_rounds"]
