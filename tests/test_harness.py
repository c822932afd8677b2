"""The gossip-mode harness drives real daemon processes: start, pause, tampering peer, and cleanup
(also when the harness process itself is killed). kill -9 + restart, crashes at write points,
partitions, latency and stalls are exercised by tests/test_fault_injection.py through the same
harness."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fednode.transport.faults import FaultPlan
from tools.harness import ProcessHarness
from tools.harness.process import HarnessError, port_bindable

FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 32, "max_tokens": 4_000},
    "train": {"steps_per_round": 2, "batch_size": 2, "round_timeout_s": 4.0},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}


@pytest.fixture
def harness(tmp_path):
    with ProcessHarness(tmp_path, 3, overrides=FAST, code_bytes=30_000) as h:
        h.start()
        h.wait_members(timeout=120)
        yield h
    assert not any(h.alive(n) for n in h.names)


def test_pause_longer_than_suspect_timeout_then_resume(harness):
    h = harness
    h.wait_round(1, timeout=120)
    h.pause("node-1")
    h.wait_until("node-1 judged not alive", lambda st: all(s["peers_alive"] == 1 for s in st.values()), 60,
                 names=["node-0", "node-2"])
    mark = int(h.status("node-0")["round"])
    h.wait_until("rounds go on without the paused node", lambda st: st["node-0"]["round"] >= mark + 2, 60,
                 names=["node-0"])
    h.resume("node-1")
    h.wait_members(timeout=60)
    mark1 = int(h.status("node-1")["round"])
    h.wait_round(mark1 + 1, timeout=60, names=["node-1"])


def test_tampering_peer_is_refused_and_counted(harness):
    h = harness
    h.wait_round(1, timeout=120)
    base = {n: int(h.status(n)["rejected"]) for n in ("node-0", "node-1")}
    h.tamper("node-2")
    h.wait_until("honest nodes refuse the tampered updates",
                 lambda st: sum(int(st[n]["rejected"]) - base[n] for n in st) >= 1, 90, names=["node-0", "node-1"])
    mark = int(h.status("node-0")["round"])
    h.wait_until("rounds go on", lambda st: st["node-0"]["round"] >= mark + 1, 60, names=["node-0"])


def test_wait_raises_with_log_tail_when_a_daemon_dies(tmp_path):
    with ProcessHarness(tmp_path, 1, overrides={**FAST, "tls": {"key": str(tmp_path / "missing.key")}},
                        code_bytes=10_000) as h:
        h.start()
        with pytest.raises(HarnessError, match="exited with"):
            h.wait_round(1, timeout=120)


def test_fault_plan_rejects_bad_files_with_one_line_errors():
    from fednode.errors import ConfigError

    assert FaultPlan.from_json("") == FaultPlan()
    plan = FaultPlan.from_json(json.dumps({"block": ["127.0.0.1:1"], "latency_ms": 5, "stall_after": 2,
                                           "tamper": True}))
    assert plan.blocks("127.0.0.1:1") and not plan.blocks("127.0.0.1:2")
    assert FaultPlan.from_json(plan.to_json()) == plan
    for bad, word in (("[1]", "object"), ('{"bogus": 1}', "unknown"), ('{"latency_ms": -1}', "latency_ms"),
                      ('{"stall_after": "x"}', "stall_after"), ('{"tamper": 1}', "tamper"),
                      ('{"block": "a"}', "block"), ("{", "not JSON"),
                      ('{"crash_at": ["atomic.nowhere"]}', "unknown points .*atomic.fsynced")):
        with pytest.raises(ConfigError, match=word) as info:
            FaultPlan.from_json(bad)
        assert "\n" not in str(info.value)


def test_a_fault_plan_reaches_the_store_only_through_its_crash_hook(tmp_path):
    """FEDNODE_FAULTS wraps the transport and installs the plan's crash points with
    fednode.store.atomic.set_crash_hook; without it nothing is wrapped or installed."""
    from fednode.store import atomic
    from fednode.transport.faults import ENV_VAR, FaultyTransport, wrap_from_env
    from fednode.transport.memory import MemoryNetwork, MemoryTransport

    def factory(identity):
        return MemoryTransport(MemoryNetwork(), "a")

    before = atomic.set_crash_hook(None)
    try:
        assert wrap_from_env(factory, {}) is factory and atomic.set_crash_hook(None) is None
        wrapped = wrap_from_env(factory, {ENV_VAR: str(tmp_path / "faults.json")})
        assert isinstance(wrapped(None), FaultyTransport)
        hook = atomic.set_crash_hook(None)
        assert hook is not None
        hook("atomic.fsynced")  # no plan file yet: an empty plan, no crash
    finally:
        atomic.set_crash_hook(before)


def test_daemons_die_with_a_killed_harness_and_ports_are_freed(tmp_path):
    """SIGKILL of the harness process itself (no atexit, no finally) still leaves nothing running."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from tools.harness import ProcessHarness
        h = ProcessHarness({str(tmp_path)!r}, 2, overrides={FAST!r}, code_bytes=10_000)
        h.start()
        h.wait_members(timeout=120)
        print(json.dumps({{"pids": [h.pid(n) for n in h.names], "addresses": [h.address(n) for n in h.names]}}),
              flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, "the harness script failed before reporting its daemons"
        info = json.loads(line)
        assert all(psutil.pid_exists(pid) for pid in info["pids"])
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in info["pids"]):
        assert time.monotonic() < deadline, "daemons outlived their killed harness"
        time.sleep(0.1)
    # the kernel may hold a dead daemon's connections briefly (orphaned FIN-WAIT on loopback): the
    # listen ports must become bindable within a bound, as a restarted daemon needs them
    deadline = time.monotonic() + 60
    while not all(port_bindable(address) for address in info["addresses"]):
        assert time.monotonic() < deadline, "listen ports still held a minute after the daemons died"
        time.sleep(0.2)



def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_close_stops_everything_even_paused_nodes_and_frees_ports(tmp_path):
    h = ProcessHarness(tmp_path, 2, overrides=FAST, code_bytes=10_000)
    h.start()
    h.wait_members(timeout=120)
    pids = [h.pid(n) for n in h.names]
    h.pause("node-0")
    codes = h.close(timeout=20)
    assert codes == {"node-0": 0, "node-1": 0}, "both drained cleanly (the paused one was resumed first)"
    assert not any(_running(pid) for pid in pids)
    assert h.ports_free()


def test_soak_command_samples_every_node_and_reports_flat_resources(tmp_path):
    from click.testing import CliRunner

    from tools.bench_cli import main as bench

    out = tmp_path / "soak"
    result = CliRunner().invoke(bench, ["soak", "--nodes", "2", "--rounds", "3", "--warmup", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["benchmark"] == "soak" and last["rounds_lost"] == 0 and last["leaked_processes"] == 0
    data = json.loads((out / "soak.json").read_text())
    assert set(data["per_node"]) == {"node-0", "node-1"}
    assert all(v["rss_end_mib"] > 10 and v["fds_end"] > 0 for v in data["per_node"].values())
    assert (out / "soak_rss.png").exists()


def test_soak_tells_lost_rounds_from_rounds_skipped_by_catching_up():
    from tools.soak import round_gaps

    journal = [(1, "local"), (2, "local"), (5, "fetched:node-1"), (6, "local"), (8, "local")]
    lost, caught_up = round_gaps(journal, 9)
    assert caught_up == [3, 4] and lost == [7, 9]
    assert round_gaps([(r, "local") for r in range(1, 4)], 3) == ([], [])
