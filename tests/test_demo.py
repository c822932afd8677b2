"""The README's main job: `fednode demo` starts real daemons, trains, summarises and exits 0."""

import subprocess
import sys


def test_demo_runs_three_nodes_three_rounds_and_cleans_up(tmp_path):
    workdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "fednode", "demo", "--nodes", "3", "--rounds", "3",
                          "--workdir", str(workdir), "--timeout", "280"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 nodes x 3 rounds" in out.stdout
    assert "trained alone vs federated" in out.stdout  # does a site gain from the mesh: the summary says
    for i in range(3):
        assert f"node-{i}" in out.stdout
        assert (workdir / f"node-{i}" / "state" / "journal.db").exists()
    # every daemon it started has exited: nothing still holds a data-dir lock
    import fcntl

    for i in range(3):
        with open(workdir / f"node-{i}" / "state" / "lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_demo_adaptive_picks_enough_rounds_for_a_growth(monkeypatch):
    from click.testing import CliRunner

    import fednode.demo
    from fednode.cli import DEMO_ADAPTIVE_ROUNDS, main

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(fednode.demo, "run_demo", fake)
    assert CliRunner().invoke(main, ["demo", "--nodes", "4", "--adaptive"]).exit_code == 0
    assert seen["rounds"] == DEMO_ADAPTIVE_ROUNDS >= 6 and seen["eager"] and seen["mode"] == "adaptive"
    assert CliRunner().invoke(main, ["demo"]).exit_code == 0
    assert seen["rounds"] == 3 and not seen["eager"]
    assert CliRunner().invoke(main, ["demo", "--adaptive", "--rounds", "9"]).exit_code == 0
    assert seen["rounds"] == 9
