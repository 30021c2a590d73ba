"""The first process of a sandbox run: sets up isolation, then starts the untrusted program and waits for it.

Run as a script by the configured sandbox interpreter (`python -S -s sandbox_init.py`), never imported by the
pipeline: it uses the standard library only and works on Python 3.8+, since the interpreter may be the system one.
It reads one JSON spec on stdin (see `stages/shared/sandbox.py`), writes the program's files into a fresh working
directory, and runs `python program` there with stdin from the test case; the program's stdout/stderr are this
process's own (pipes that the parent reads under a size limit). Exit status: the program's, 128+N when a signal N
killed it, 125 when the sandbox itself could not be set up (the reason on stderr, prefixed `r1flow-sandbox:`).

Isolation modes (`spec["mode"]`):
- "root": run as root. New mount, network and PID namespaces; the program runs as a fresh unprivileged uid (so
  RLIMIT_NPROC counts only its own processes and root's files follow normal permissions).
- "userns": run as an ordinary user. The same namespaces inside a new user namespace; the program keeps the user's
  uid but loses every capability at exec, and the user's home and the project are hidden under empty tmpfs mounts.
- "none": no namespaces (only when the config accepts it): rlimits, a temporary directory and an empty environment.

In both namespace modes every existing mount is remounted read-only, /tmp, /var/tmp, /dev/shm and the working
directory are small fresh tmpfs mounts, the network namespace holds only a downed loopback, and the program is PID 1
of its own PID namespace: when it exits or is killed, the kernel kills everything it started.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
# statvfs f_flag bit -> the mount flag that keeps it on a remount (a bind remount must restate locked flags)
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125
WORKDIR = "/tmp/sandbox"
program_pid = None  # the program's pid as seen from here, once forked
stop_requested = False

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class SetupError(Exception):
    pass


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def mount_points() -> list:
    """Mount points of this mount namespace, parents first (mountinfo field 5, octal escapes decoded)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(raw.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace"))
    return points


def remount_read_only() -> None:
    """Every mount read-only; "/" must succeed, others may not exist any more (hidden by an earlier mount)."""
    for point in mount_points():
        try:
            st = os.statvfs(point)
        except OSError:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_bit, ms_bit in ST_TO_MS.items():
            if st.f_flag & st_bit:
                flags |= ms_bit
        try:
            mount(None, point, None, flags)
        except SetupError:
            if point == "/":
                raise


def tmpfs(target: str, size_mb: int, mode: str = "1777", read_only: bool = False) -> None:
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    mount("tmpfs", target, "tmpfs", flags, f"size={size_mb}m,mode={mode}")


def enter_namespaces(spec: dict) -> None:
    """Runs in this (the first) process: new namespaces and the filesystem view the program will see."""
    mode = spec["mode"]
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (CLONE_NEWUSER if mode == "userns" else 0)
    check(libc.unshare(flags), "unshare")
    if mode == "userns":
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host's mounts
    remount_read_only()
    for path in spec["hide"]:
        if os.path.isdir(path):
            tmpfs(path, 1, mode="755", read_only=True)
    size = spec["limits"]["file_mb"]
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            tmpfs(path, size)


def prepare_workdir(spec: dict, workdir: str, owner: int | None) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name, text in spec["files"].items():
        write_file(os.path.join(workdir, name), text)
    write_file(os.path.join(workdir, ".stdin"), spec["stdin"])
    if owner is not None:
        for name in os.listdir(workdir):
            os.chown(os.path.join(workdir, name), owner, owner)
        os.chown(workdir, owner, owner)
        os.chmod(workdir, 0o700)


def set_limits(limits: dict) -> None:
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))  # whole seconds, rounded up
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                       (resource.RLIMIT_NPROC, limits["processes"]), (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
                       (resource.RLIMIT_NOFILE, limits["open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))


def exec_program(spec: dict, workdir: str, sandbox_uid: int | None) -> None:
    """In the process that becomes the program: drop privileges, limits, empty environment, exec. Never returns."""
    os.chdir(workdir)
    fd = os.open(".stdin", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    os.unlink(".stdin")
    if sandbox_uid is not None:
        os.setgroups([])
        os.setgid(sandbox_uid)
        os.setuid(sandbox_uid)
    # a uid change clears the parent-death signal: set it again, so that killing the first process kills this one
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    set_limits(spec["limits"])
    os.umask(0o077)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
           "TMPDIR": workdir, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
    os.closerange(3, 65536)
    os.execve(spec["python"], [spec["python"], "-S", "-s"] + spec["argv"], env)


def run_in_pid_namespace(spec: dict) -> int:
    """Fork the program as PID 1 of the new PID namespace; wait for it; return this process's exit status."""
    root = spec["mode"] == "root"
    sandbox_uid = spec["uid"] if root else None
    child = os.fork()
    if child == 0:
        try:
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
            os.setsid()
            try:  # a /proc of this PID namespace only (no view of the host's processes)
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            except SetupError:
                tmpfs("/proc", 1, mode="555", read_only=True)
            tmpfs(os.path.dirname(WORKDIR), spec["limits"]["file_mb"])
            prepare_workdir(spec, WORKDIR, sandbox_uid)
            exec_program(spec, WORKDIR, sandbox_uid)
        except BaseException as e:  # noqa: BLE001 - anything before exec is a setup failure
            os.write(2, f"r1flow-sandbox: {e}\n".encode())
            os._exit(SETUP_FAILED)
    return wait_status(started(child))


def run_without_namespaces(spec: dict) -> int:
    sandbox_uid = spec["uid"] if os.getuid() == 0 else None
    prepare_workdir(spec, spec["workdir"], sandbox_uid)
    child = os.fork()
    if child == 0:
        try:
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
            exec_program(spec, spec["workdir"], sandbox_uid)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"r1flow-sandbox: {e}\n".encode())
            os._exit(SETUP_FAILED)
    return wait_status(started(child))


def stop(signum, frame) -> None:
    """SIGTERM from the parent (wall clock, output limit): kill the program. When it is PID 1 of its namespace the
    kernel kills every process in it before our waitpid returns, so this process exits after all of them."""
    global stop_requested
    stop_requested = True
    if program_pid is not None:
        os.kill(program_pid, signal.SIGKILL)


def started(pid: int) -> int:
    global program_pid
    program_pid = pid
    if stop_requested:
        os.kill(pid, signal.SIGKILL)
    return pid


def wait_status(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    spec = json.loads(sys.stdin.read())
    try:
        if spec["mode"] == "none":
            code = run_without_namespaces(spec)
        else:
            enter_namespaces(spec)
            code = run_in_pid_namespace(spec)
    except SetupError as e:
        os.write(2, f"r1flow-sandbox: {e}\n".encode())
        code = SETUP_FAILED
    os._exit(code)


if __name__ == "__main__":
    main()
