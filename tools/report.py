"""The one report writer every `fednode-bench` benchmark uses.

A benchmark computes its figures, then calls:

    meta = run_metadata(command_line(), seeds=[0], preset="tiny-cpu")
    paths = write_report(out_dir, "throughput", {"metadata": meta, **figures}, markdown_text)
    bar_plot(out_dir / "throughput.png", labels, values, "tokens/s", "Generation speed")
    emit_last_line(summary)          # the benchmark contract: last stdout line = one JSON object

Why one module: every report must carry the same provenance (machine, versions, date, exact
command) so figures from different runs and tools can be compared, and every file must be
written atomically (a crashed run never leaves a half-written JSON that a later script trusts).
matplotlib is imported lazily (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import io
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from fednode.errors import StoreError

__all__ = [
    "ReportError",
    "bar_plot",
    "command_line",
    "emit_last_line",
    "line_plot",
    "machine_info",
    "markdown_table",
    "run_metadata",
    "write_report",
]

VERSIONED_PACKAGES = ("torch", "transformers", "fednode", "grpcio")


class ReportError(click.ClickException):
    """A report cannot be written (bad --out, disk full): click prints one line, exit code 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"fednode-bench: error: {self.format_message()}", err=True)


# --- provenance -----------------------------------------------------------------------------------


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command line of this process, shell-quoted (argv[0] reduced to its base name)."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    head = os.path.basename(args[0]) or args[0]
    if head == "__main__.py":  # python -m pkg: name the package, as it was typed
        package = os.path.relpath(os.path.dirname(os.path.abspath(args[0]))).replace(os.sep, ".")
        return shlex.join(["python", "-m", package, *args[1:]])
    if head == "-c":  # python -c CODE: the code itself is not kept in argv
        return shlex.join(["python", "-c", "...", *args[1:]])
    return shlex.join([head, *args[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """GPU names torch can see (empty on CPU machines or without torch)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores (total and usable by this process), RAM, GPUs, OS and torch threads."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    ram = _ram_bytes()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": None if ram is None else round(ram / 2**30, 1),
        "gpus": _gpus(),
        "platform": platform.platform(),
        "load_avg_1m": _load_avg(),  # other work on a shared machine skews timings: say how busy it was
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(command: str, seeds: Sequence[int] | None = None, preset: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Provenance for a report: machine, package versions, UTC date, the exact command, seeds, preset.

    `extra` keys (JSON-serialisable) are added as they are, e.g. `threads=2`.
    """
    versions = {"python": platform.python_version(), **{p: _version(p) for p in VERSIONED_PACKAGES}}
    return {
        "command": command,
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "versions": versions,
        "seeds": list(seeds) if seeds is not None else None,
        "preset": preset,
        **extra,
    }


# --- files ----------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _clean_floats(obj: Any) -> Any:
    """NaN/inf become None: strict JSON has no such numbers and many readers refuse them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_floats(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Strict JSON (NaN/inf as null, Paths as strings), indented, with a final newline."""
    return json.dumps(_clean_floats(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"


def prepare_out_dir(out_dir: Path) -> Path:
    """Create out_dir (and parents); ReportError naming the fix if it is a file or not writable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir} is a file, not a directory: pass a directory path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create --out {out_dir} ({exc.strerror or exc}): pass a writable directory") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ReportError(f"--out {out_dir} is not writable: pass a writable directory")
    return out_dir


def write_atomic(path: Path, data: bytes) -> Path:
    """Write bytes to path via a temp file, fsync and rename (never half-written): the daemon's
    own atomic writer, so a report survives a crash exactly like a checkpoint does."""
    from fednode.store.atomic import write_atomic as store_write_atomic

    store_write_atomic(Path(path), data)
    return Path(path)


def write_report(out_dir: Path, name: str, data: Mapping[str, Any], markdown: str) -> dict[str, Path]:
    """Write `<name>.json` (data, strict JSON) and `<name>.md` into out_dir, each atomically.

    Returns {"json": path, "md": path}. Raises ReportError (one line, exit 1) when out_dir is a
    file, cannot be created or is not writable, or a write fails.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"report name {name!r} must be a plain file stem")
    out_dir = prepare_out_dir(out_dir)
    payload = to_json(data).encode()
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    try:
        write_atomic(paths["json"], payload)
        write_atomic(paths["md"], text.encode())
    except (OSError, StoreError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ReportError(f"cannot write the report into {out_dir} ({reason}): free space or pick "
                          "another --out") from None
    return paths


# --- markdown -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; None/NaN show as '–', floats get sensible precision, '|' is escaped."""
    if not headers:
        raise ValueError("a table needs at least one header")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns")
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    prepare_out_dir(path.parent)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return write_atomic(path, buffer.getvalue())


def line_plot(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
              ylabel: str, title: str) -> Path:
    """PNG line plot, one line per named (xs, ys) series, with markers and a legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            plt.close(fig)
            raise ValueError(f"series {label!r}: {len(xs)} x values but {len(ys)} y values")
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return _save(fig, path)


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
             errors: Sequence[float] | None = None) -> Path:
    """PNG bar plot with the value written above each bar; `errors` draws symmetric error bars."""
    if len(labels) != len(values) or (errors is not None and len(errors) != len(values)):
        raise ValueError("labels, values (and errors) must have the same length")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.2))
    bars = ax.bar(range(len(values)), list(values), yerr=None if errors is None else list(errors), capsize=3,
                  color="#4878a8")
    ax.set_xticks(range(len(labels)), list(labels), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(_cell(float(value)), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    return _save(fig, path)


def scatter_plot(path: Path, groups: Mapping[str, Sequence[tuple[float, float, float]]], xlabel: str, ylabel: str,
                 title: str, colour_label: str, front: Sequence[tuple[float, float]] = (), log_x: bool = False) -> Path:
    """PNG scatter: one marker shape per named group of (x, y, colour value) points, colour by value
    (e.g. the round), and `front` (x, y) joined as a step line (a Pareto front)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^v*Xp"
    values = [c for pts in groups.values() for _, _, c in pts]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    mappable = None
    for i, (name, pts) in enumerate(groups.items()):
        if not pts:
            continue
        mappable = ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], c=[c for _, _, c in pts],
                              cmap="viridis", vmin=lo, vmax=hi, marker=markers[i % len(markers)], s=36,
                              edgecolors="black", linewidths=0.4, label=name)
    if front:
        ordered = sorted(front)
        ax.step([x for x, _ in ordered], [y for _, y in ordered], where="pre", color="crimson", linewidth=1,
                alpha=0.7, label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label=colour_label)
        ax.legend(fontsize=8)
    return _save(fig, path)


# --- the benchmark contract -----------------------------------------------------------------------


def emit_last_line(obj: Mapping[str, Any]) -> str:
    """Print obj as one compact JSON line on stdout (call it last: scripts read `tail -n 1`)."""
    line = json.dumps(_clean_floats(obj), sort_keys=True, default=_json_default, allow_nan=False)
    sys.stdout.flush()
    click.echo(line)
    sys.stdout.flush()
    return line
