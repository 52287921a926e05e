"""Run untrusted Python (e.g. a HumanEval program) in a contained child process tree, never in this process.

Guarantees of `run_program(source, limits)`:
- The source is only ever executed by a fresh `python -I -B` started as a child of a small launcher, inside its own
  session (`start_new_session`: own process group), with stdin closed, a stripped environment and a fresh
  temporary working directory that is deleted afterwards. Nothing from the source is imported or evaluated here.
- Wall clock: after `limits.timeout_s` the whole process group is SIGKILLed, and so is every member of the pids
  cgroup when one is in use; the result is then "timed out". Output read from the child is capped at
  `limits.max_output_bytes` per stream while it runs (a program printing forever cannot fill our memory).
- Resource limits are set in the child before it execs the program: RLIMIT_AS (`memory_bytes`), RLIMIT_CPU
  (timeout rounded up + 1 s), RLIMIT_NPROC (`max_processes`), RLIMIT_FSIZE (`max_file_bytes`), RLIMIT_CORE 0;
  no_new_privs is set and every capability is dropped (bounding, inheritable and ambient sets).
- Namespaces, when `unshare` (util-linux) works unprivileged here (checked once, at import): the child runs in new
  user + network + pid + mount namespaces. Network: only a loopback that is down, so nothing can be reached
  (`NETWORK_ISOLATED` says whether this was verified at import). Pid: the program cannot name, hence cannot signal,
  any process outside (its parent pid is the launcher, pid 1); when the launcher ends, the kernel kills every
  process left in the namespace. Mount: the whole file system is remounted read-only, the working directory is a
  private size-limited tmpfs and /proc shows only the sandbox's processes, so the program can neither write nor
  delete anything outside its own scratch space.
- Process count: RLIMIT_NPROC is not enforced by Linux for uid 0, so when we run as root a pids cgroup with
  `pids.max = max_processes` is used instead if one can be created; with neither, process creation is refused at
  Python level (a weak guard), and `isolation["process_limit"]` says which applies.
- As an extra layer the program starts after a prelude that makes every socket constructor raise PermissionError.
- A result is "passed" only when the program ran to its end and the interpreter exited with status 0 (an early
  `sys.exit(0)` or `os._exit(0)` is "failed"); otherwise "failed" or "timed out", with the reason. Every result
  carries the isolation layers that were actually in force for that run.
Not guaranteed: that a hostile program cannot forge a pass (it shares the interpreter with its own tests); without
namespaces (no working `unshare`) the file system and same-user processes are protected only by Python-level guards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# The launcher runs in the child (after `unshare`, as pid 1 of the new pid namespace when there is one). It joins
# the pids cgroup, builds the private file system view, then forks the program process, which sets its limits,
# drops capabilities and execs a fresh interpreter running BOOT. Errors are reported on the status pipe.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
fd = cfg["status_fd"]
report = {"pid_namespace": os.getpid() == 1}
guards = cfg["guards"]
if cfg["cgroup"]:
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as fh:
            fh.write("0")
        report["pids_cgroup"] = True
    except OSError:
        report["pids_cgroup"] = False
if cfg["root"] and not report.get("pids_cgroup"):
    guards.append("process")  # uid 0 ignores RLIMIT_NPROC: nothing else would stop a fork bomb
report["guards"] = ["socket"] + guards
work = cfg["workdir"]
with open(os.path.join(work, "program.py"), "rb") as fh:
    source = fh.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
def prctl(*args):  # full-width arguments: the kernel checks the unused ones are 0
    return libc.prctl(*[ctypes.c_ulong(a) for a in args])
if cfg["mount"]:
    NOSUID, NODEV, NOEXEC = 2, 4, 8
    if report["pid_namespace"]:
        report["private_proc"] = libc.mount(b"proc", b"/proc", b"proc", NOSUID | NODEV | NOEXEC, None) == 0
    attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # struct mount_attr: attr_set = MOUNT_ATTR_RDONLY
    # mount_setattr (442 on every Linux architecture), AT_FDCWD, "/", AT_RECURSIVE: the whole tree read-only
    report["readonly_fs"] = libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.c_size_t(32)) == 0
    opts = ("size=%d,nr_inodes=4096,mode=0700" % cfg["workdir_bytes"]).encode()
    report["private_workdir"] = libc.mount(b"tmpfs", work.encode(), b"tmpfs", NOSUID | NODEV, opts) == 0
    if report["private_workdir"]:
        with open(os.path.join(work, "program.py"), "wb") as fh:
            fh.write(source)
os.chdir(work)
os.write(fd, (json.dumps(report) + "\n").encode())
signal.signal(signal.SIGINT, signal.SIG_DFL)  # as pid 1, signals without a handler from inside are then ignored
child = os.fork()
if child == 0:
    try:
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.close(0)
        prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
        hdr, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        if libc.capget(hdr, data) == 0:
            data[2] = data[5] = 0  # inheritable set (both 32-bit halves)
            libc.capset(hdr, data)
        for cap in range(64):  # an empty bounding set: exec (even as uid 0) grants no capability
            prctl(24, cap, 0, 0, 0)
        os.execv(cfg["python"], [cfg["python"], "-I", "-B", "-c", cfg["boot"], str(fd), json.dumps(guards)])
    except BaseException as exc:
        os.write(2, ("sandbox launcher: %r\n" % (exc,)).encode())
    os._exit(127)
while True:  # pid 1 also reaps orphans; it leaves once the program process is gone
    pid, status = os.wait()
    if pid == child:
        os.write(fd, ("exit %d\n" % status).encode())
        os._exit(0)
'''

# The program's interpreter: the socket prelude (and, where no OS layer covers them, process/signal guards), then
# the program as __main__ in its own namespace; "ok" goes to the status pipe only if it ran to its end.
_BOOT = r'''
import json, os, sys
def _guards(fd, wanted):
    import socket, _socket
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in this sandbox")
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()
    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()
    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    socket.create_connection = socket.create_server = socket.socketpair = socket.fromfd = refuse
    _socket.socketpair = refuse
    def deny(*args, **kwargs):
        raise PermissionError("not allowed in this sandbox")
    if "process" in wanted:
        import _posixsubprocess
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
            if hasattr(os, name):
                setattr(os, name, deny)
        _posixsubprocess.fork_exec = deny
    if "signal" in wanted:
        import signal
        os.kill = os.killpg = signal.pthread_kill = deny
_fd = int(sys.argv[1])
_guards(_fd, set(json.loads(sys.argv[2])))
del _guards
sys.argv = ["program.py"]
with open("program.py", "rb") as _fh:
    _code = compile(_fh.read(), "program.py", "exec")
exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
sys.stdout.flush()
sys.stderr.flush()
os.write(_fd, b"ok\n")
'''

_PREFIXES = (("namespaces", ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount"]),
             ("user+net", ["--user", "--map-root-user", "--net"]))
# Run inside a candidate prefix: succeeds only if the network namespace has no interface but loopback.
_NET_PROBE = "import socket, sys; sys.exit(0 if [n for _, n in socket.if_nameindex()] == ['lo'] else 3)"
_PYTHON = sys.executable or shutil.which("python3") or "python3"


def _probe_namespaces() -> tuple[str, list[str]]:
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return "none", []
    for name, flags in _PREFIXES:
        try:
            done = subprocess.run([unshare, *flags, _PYTHON, "-I", "-S", "-c", _NET_PROBE], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return name, [unshare, *flags]
    return "none", []


def _pids_cgroup_parent() -> Path | None:
    """A writable cgroup directory (v1 "pids" hierarchy, or v2 with pids delegated) to create sandboxes under."""
    if os.geteuid() != 0 or not os.path.exists("/proc/self/mountinfo"):
        return None
    try:
        own = {parts[1]: parts[2] for parts in (line.strip().split(":", 2)
                                                  for line in open("/proc/self/cgroup", encoding="utf-8"))}
        for line in open("/proc/self/mountinfo", encoding="utf-8"):
            fields = line.split()
            sep = fields.index("-")
            mount_point, fstype, options = Path(fields[4]), fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup" and "pids" in options:
                candidate = mount_point / own.get("pids", "/").lstrip("/")
            elif fstype == "cgroup2" and "pids" in (mount_point / "cgroup.subtree_control").read_text().split():
                candidate = mount_point
            else:
                continue
            if candidate.is_dir() and os.access(candidate, os.W_OK):
                return candidate
    except (OSError, ValueError):
        return None
    return None


NAMESPACES, _PREFIX = _probe_namespaces()
NETWORK_ISOLATED = NAMESPACES != "none"
_CGROUP_PARENT = _pids_cgroup_parent()


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 4 << 20
    max_output_bytes: int = 64 << 10
    workdir_bytes: int = 64 << 20


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timed out"
    reason: str
    stdout: str
    stderr: str
    seconds: float
    pid: int | None  # the session (and process group) leader's pid
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def isolation_summary() -> dict[str, Any]:
    """The layers this machine offers (fixed at import); each result says which were in force for its run."""
    return {"namespaces": NAMESPACES, "network_isolated": NETWORK_ISOLATED,
            "pids_cgroup_available": _CGROUP_PARENT is not None, "running_as_root": os.geteuid() == 0}


# What each value of `isolation["namespaces"]` means, for messages read by people.
NAMESPACES_IN_WORDS = {"namespaces": "user, network, pid and mount namespaces",
                       "user+net": "user and network namespaces only",
                       "none": "no namespaces, as unshare does not work here, so Python-level guards only"}


def _make_cgroup(limit: int) -> Path | None:
    if _CGROUP_PARENT is None:
        return None
    path = _CGROUP_PARENT / f"posttrain-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        (path / "pids.max").write_text(str(limit))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _remove_cgroup(path: Path) -> None:
    # Members that escaped the process group (setsid) are still in the cgroup: kill them all, then remove it.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


class _Capture:
    def __init__(self, cap: int) -> None:
        self.cap, self.data, self.dropped = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        return out + (f"\n[... {self.dropped} more bytes not kept]" if self.dropped else "")


def _exited(pid: int) -> bool:
    # WNOWAIT: the leader stays a zombie (its pid, hence its process group id, cannot be reused) until we reap it.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int, int]]:
    cpu = int(math.ceil(limits.timeout_s)) + 1
    return [("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes), ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
            ("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes), ("RLIMIT_CORE", 0, 0)]


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), *, namespaces: bool = True) -> SandboxResult:
    """Execute `source` as a Python program in the sandbox (see the module docstring); `namespaces=False` skips the
    namespace layers (for comparison only)."""
    prefix = _PREFIX if namespaces else []
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
    cgroup = _make_cgroup(limits.max_processes + 2)  # + the launcher and the program process itself
    # Without a pid namespace, same-user processes (this one included) could be signalled: guard at Python level.
    guards = [] if "--pid" in prefix else ["signal"]
    status_r, status_w = os.pipe()
    stdout, stderr, status = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes), _Capture(4096)
    proc = None
    timed_out = False
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        cfg = {"status_fd": status_w, "cgroup": str(cgroup) if cgroup else None, "workdir": str(workdir),
               "mount": "--mount" in prefix, "workdir_bytes": limits.workdir_bytes, "rlimits": _rlimits(limits),
               "python": _PYTHON, "boot": _BOOT, "guards": guards, "root": os.geteuid() == 0}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": str(workdir), "TMPDIR": str(workdir)}
        proc = subprocess.Popen([*prefix, _PYTHON, "-I", "-S", "-B", "-c", _LAUNCHER, json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        timed_out = _collect(proc, {proc.stdout: stdout, proc.stderr: stderr, status_r: status},
                             started + limits.timeout_s)
    finally:
        if proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything still in the group, whatever happened above
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(stdout.text(), stderr.text(), status.text(), timed_out, limits, time.monotonic() - started,
                    proc.pid if proc else None, prefix)


def _collect(proc: subprocess.Popen, sinks: dict[Any, _Capture], deadline: float) -> bool:
    """Read the child's pipes until it has exited and they are drained; True when the deadline came first."""
    selector = selectors.DefaultSelector()
    for stream in sinks:
        selector.register(stream, selectors.EVENT_READ)
    grace_until = None
    timed_out = False
    try:
        while True:
            now = time.monotonic()
            if grace_until is None and _exited(proc.pid):
                grace_until = now + 0.5  # leftovers may hold the pipes open; read what they already wrote
            if grace_until is not None and (not selector.get_map() or now >= grace_until):
                return timed_out
            if grace_until is None and now >= deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                grace_until = now + 0.5
                continue
            wait = min(0.05, max(deadline - now, 0.0))
            if not selector.get_map():
                time.sleep(wait)
                continue
            for key, _ in selector.select(timeout=wait):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if chunk:
                    sinks[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
    finally:
        selector.close()


def _verdict(stdout: str, stderr: str, status: str, timed_out: bool, limits: SandboxLimits, seconds: float,
             pid: int | None, prefix: list[str]) -> SandboxResult:
    report: dict[str, Any] = {}
    exit_status, completed = None, False
    for line in status.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
        elif line.startswith("exit "):
            exit_status = int(line.split()[1])
        elif line == "ok":
            completed = True
    isolation = {"namespaces": NAMESPACES if prefix else "none", "network_isolated": "--net" in prefix,
                 "pid_namespace": bool(report.get("pid_namespace")),
                 "readonly_fs": bool(report.get("readonly_fs")), "private_workdir": bool(report.get("private_workdir")),
                 "private_proc": bool(report.get("private_proc")),
                 "process_limit": "pids_cgroup" if report.get("pids_cgroup") else
                 ("python_guard" if "process" in report.get("guards", []) else "rlimit_nproc"),
                 "python_guards": report.get("guards", [])}
    last_line = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if timed_out:
        status_, reason = "timed out", f"no result within the {limits.timeout_s:g} s wall-clock limit"
    elif not report:
        status_, reason = "failed", f"the sandbox did not start: {last_line or 'no report from the launcher'}"
    elif exit_status is None:
        status_, reason = "failed", f"the sandbox ended without the program's status: {last_line or 'no output'}"
    elif os.WIFSIGNALED(exit_status):
        sig = os.WTERMSIG(exit_status)
        names = {signal.SIGXCPU: "CPU time limit exceeded", signal.SIGXFSZ: "file size limit exceeded"}
        status_, reason = "failed", f"{names.get(sig, 'killed')} ({signal.Signals(sig).name})"
    elif os.WEXITSTATUS(exit_status) == 0 and completed:
        status_, reason = "passed", "passed"
    elif os.WEXITSTATUS(exit_status) == 0:
        status_, reason = "failed", "the program exited (status 0) before running to its end"
    else:
        status_, reason = "failed", last_line or f"exit status {os.WEXITSTATUS(exit_status)}"
    return SandboxResult(status_, reason, stdout, stderr, round(seconds, 3), pid, isolation)


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                 namespaces: bool = True) -> list[SandboxResult]:
    """`run_program` over many sources with a small pool of `workers` concurrent sandboxes; results in input order."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits, namespaces=namespaces), sources))
