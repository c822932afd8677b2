"""`fednode demo`: a real mesh on loopback, end to end, with a progress display and a summary."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fednode.errors import ExitCode
from fednode.launcher import LocalMesh


def _journal_summary(data_dir: Path) -> dict:
    from fednode.store.journal import Journal

    journal = Journal.open(data_dir / "journal.db")
    try:
        rounds = journal.rounds()
    finally:
        journal.close()
    local = [r for r in rounds if r.source == "local"]
    return {
        "rounds": len(rounds),
        "loss_before": local[0].loss_before if local else float("nan"),
        "loss_after": rounds[-1].loss_after if rounds else float("nan"),
        "merged": sum(len(r.merged_from) for r in rounds),
        "levels": "".join(str(r.level) for r in rounds),
    }


def _print_gains(console: Console, mesh: LocalMesh, rounds: int, mode: str) -> None:
    """Federated P vs the same P trained alone: does this site gain from the mesh?"""
    from fednode.demo_compare import compare

    with console.status("training each node's model alone for comparison (same data, seed and steps)"):
        gains = compare([n.config_path for n in mesh.nodes], rounds)
    table = Table(title=f"private model: trained alone vs federated ({mode}), held-out loss in nats/token "
                        "(lower is better)")
    for col in ("node", "own code: alone", "own code: federated", "other sites' code: alone",
                "other sites' code: federated"):
        table.add_column(col, justify="right" if col != "node" else "left")
    for g in gains:
        table.add_row(g.name, f"{g.own_local:.3f}", f"{g.own_federated:.3f}", f"{g.others_local:.3f}",
                      f"{g.others_federated:.3f}")
    Console().print(table)


def _fmt_mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


EAGER_NEGOTIATION = {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0, "min_round_gap": 1,
                     "activation_delay": 3}


def run_demo(*, nodes: int, rounds: int, steps: int, workdir: Path | None, base_port: int, timeout: float,
             mode: str = "adaptive", eager: bool = False) -> int:
    console = Console(stderr=True)
    keep = workdir is not None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fednode-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    mesh = None
    try:
        with console.status("preparing CA, certificates, configs and code partitions"):
            overrides: dict[str, dict[str, Any]] = {
                "train": {"rounds": rounds, "steps_per_round": steps}, "learning": {"mode": mode},
                "negotiation": {"min_live_peers": nodes, **(EAGER_NEGOTIATION if eager else {})}}
            mesh = LocalMesh.create(root, nodes, base_port=base_port, overrides=overrides)
        with console.status("building the shared tokenizer (byte-level BPE on the stdlib, cached)"):
            mesh.prepare_tokenizer()
        mesh.start_all()
        console.print(f"started {nodes} daemons on loopback (mTLS); workdir {root}")
        deadline = started + timeout
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                   TextColumn("{task.fields[phase]}"), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            tasks = {n.name: progress.add_task(n.name, total=rounds, phase="starting") for n in mesh.nodes}
            while True:
                done = 0
                for node in mesh.nodes:
                    proc = mesh.procs[node.name]
                    if proc.poll() is not None:
                        tail = mesh.log_tail(node.name)
                        console.print(f"[red]{node.name} exited with {proc.returncode}[/red]\n{tail}")
                        return ExitCode.FAILURE
                    status = mesh.status(node.name)
                    if status:
                        progress.update(tasks[node.name], completed=int(status["round"]),
                                        phase=f"{status['state']} · {status['peers_alive']} peers")
                        done += int(status["round"]) >= rounds
                if done == nodes:
                    break
                if time.monotonic() > deadline:
                    console.print(f"[red]demo did not finish within {timeout:.0f}s[/red]")
                    for node in mesh.nodes:
                        console.print(f"--- {node.name}\n{mesh.log_tail(node.name, 10)}")
                    return ExitCode.FAILURE
                time.sleep(0.5)
        statuses = {n.name: mesh.status(n.name) or {} for n in mesh.nodes}
        codes = mesh.stop_all()
        title = f"fednode demo ({mode}): {nodes} nodes x {rounds} rounds in {time.monotonic() - started:.0f}s"
        table = Table(title=title)
        headers = ("node", "rounds", "level per round", "loss before", "loss after", "updates merged", "sent MiB",
                   "received MiB", "exit")
        for col in headers:
            table.add_column(col, justify="right" if col != "node" else "left")
        for node in mesh.nodes:
            s = statuses[node.name]
            j = _journal_summary(node.data_dir)
            table.add_row(node.name, str(j["rounds"]), j["levels"], f"{j['loss_before']:.3f}", f"{j['loss_after']:.3f}",
                          str(j["merged"]), _fmt_mib(float(s.get("bytes_sent", 0))),
                          _fmt_mib(float(s.get("bytes_received", 0))), str(codes[node.name]))
        Console().print(table)
        if mode != "local" and not any(codes.values()):  # in local mode the two are the same model
            _print_gains(console, mesh, rounds, mode)
        if any(codes.values()):
            console.print("[red]some daemons did not exit cleanly; see their logs[/red]")
            return ExitCode.FAILURE
        return ExitCode.OK
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    finally:
        if mesh is not None:
            mesh.stop_all(timeout=10)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
