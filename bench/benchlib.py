#!/usr/bin/python3
"""What every scenario of the benchmark shares: the processes it starts (and stops, by PID), /proc readings,
the peers, statistics. See bench/README.md."""
import http.client
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
PYTHON = "/usr/bin/python3"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
CIPHER = "aes128-gcm@openssh.com"
CLK_TCK = os.sysconf("SC_CLK_TCK")
F_SETPIPE_SZ = 1031
MiB = 1 << 20
GiB = 1 << 30
# What the daemons get as environment: nothing of the caller's (no proxies, no agent, no pyenv).
DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "SYSTEMD_LOG_LEVEL": "warning"}
# Hands a listening socket, given as stdin, to a program as fd 3 with LISTEN_FDS=1 and the right
# LISTEN_PID (the shell's own pid, which exec keeps): systemd's socket passing, without systemd.
WITH_LISTEN_FD = 'exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'


class BenchError(Exception):
    pass


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes we start, and only those


class Processes:
    """Every long-lived process the benchmark starts, so that all of them (and their children, found
    through /proc/PID/task/*/children) are stopped by PID at exit."""

    def __init__(self):
        self.started = []

    def spawn(self, name, argv, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("env", DAEMON_ENV)
        # Own session: a CTRL-C reaches only the benchmark, which then stops everything in order.
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.started.append((name, proc))
        return proc

    def stop_all(self):
        victims = []
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                victims.extend(descendants(proc.pid))
        for pid in victims:
            signal_pid(pid, signal.SIGTERM)
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
        for pid in victims:
            if not wait_pid_gone(pid, 2.0):
                signal_pid(pid, signal.SIGKILL)
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.clear()


def children(pid):
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def descendants(pid):
    found = []
    for child in children(pid):
        found.extend(descendants(child))
        found.append(child)
    return found


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_pid_gone(pid, timeout):
    """Waits for a process that is not our child to exit, by its pidfd (an event, not a poll loop)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def daemon_sessions(peer):
    """The connections an ssh-on-demand daemon has in progress, from its metrics endpoint's sessions gauge."""
    conn = http.client.HTTPConnection(*peer.metrics, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in body.splitlines():
        if line.startswith("ssh_on_demand_sessions "):
            return int(float(line.split()[1]))
    raise BenchError(f"{peer.label}: no ssh_on_demand_sessions in its metrics")


def relay_busy(peer):
    """What `peer` has in progress now (its per-connection processes, or a daemon's session count), for
    relay_settled to wait back down to: a session held open on purpose is not a connection to wait for."""
    if peer.kind in ("per-connection", "socat"):
        return set(children(peer.proc.pid))
    if peer.metrics:
        try:
            return daemon_sessions(peer)
        except ConnectionRefusedError:
            return 0  # still starting: its first connection is yet to come
    return None


def relay_settled(peer, busy=None):
    """Waits until the connections through `peer` since `busy` (relay_busy's reading; by default, none held)
    are over for its relay: their per-connection processes gone (on pidfds), or an ssh-on-demand daemon's
    sessions gauge back down. A daemon's session goes on for a moment after its client has gone (its end is
    written to the store, in etcd's case to three members' disks), and the next sample, through whichever
    peer, should not pay for that; the daemon has no process per connection to wait for, and no event to
    wait on, so this asks."""
    if peer.kind in ("per-connection", "socat"):
        for pid in set(children(peer.proc.pid)) - (busy or set()):
            if not wait_pid_gone(pid, 10):
                log(f"note: PID {pid} still running 10 s after its connection ended")
    elif peer.metrics:
        deadline = time.monotonic() + 10
        while daemon_sessions(peer) > (busy or 0):
            if time.monotonic() > deadline:
                log(f"note: {peer.label} still had a session 10 s after its connection ended")
                return
            time.sleep(0.001)


def drain(pipe, path, marker=None):
    """Copies a child's output pipe to a log file in a thread. Returns an event that is set when a line
    containing `marker` goes by (or at EOF, so that waiting never outlives the child)."""
    seen = threading.Event()

    def run():
        with open(path, "ab") as out:
            for line in iter(pipe.readline, b""):
                out.write(line)
                out.flush()
                if marker and marker in line:
                    seen.set()
        seen.set()

    threading.Thread(target=run, daemon=True).start()
    return seen


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except FileNotFoundError:
        return "(no output)"


def listening_socket(host="127.0.0.1", port=0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if port:  # a "VM" port, opened and closed again and again: its old connections must not block it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def reserve_port():
    """A port for every "VM" of the run, on whatever 127.x address each has: bound on 127.0.0.1 (not
    listening) and held for the whole run, so the kernel never hands it out as an ephemeral port. A stock
    Debian server runs its own sshd on 0.0.0.0:22, so the VMs cannot use port 22; the tests do the same."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port(host="127.0.0.1"):
    """For tools that want a port number, not a socket (socat): bind port 0, close, hand the number on."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ident_time(host, port, silent=False):
    """ms from connect until the VM's SSH- line arrives; `silent`: without sending ours first, as ssh-keyscan
    and scanners do."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not silent:
            sock.sendall(b"SSH-2.0-bench\r\n")
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError(f"{host}:{port} closed before its SSH identification")
            data += chunk
    return (time.perf_counter() - start) * 1000


# ---------------------------------------------------------------- /proc readings


def read_tcp_table():
    """inode -> ((local ip, port), (remote ip, port)) for IPv4 TCP sockets of this network namespace."""
    def addr(text):
        ip, port = text.split(":")
        return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)

    table = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            table[int(fields[9])] = (addr(fields[1]), addr(fields[2]))
    return table


def socket_inodes(pid):
    inodes = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.append(int(target[8:-1]))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return inodes


def serving_pid(candidates, ssh_pid):
    """Which of `candidates` holds the accepted end of the ssh client `ssh_pid`'s TCP connection."""
    table = read_tcp_table()
    client_ends = {table[i][0] for i in socket_inodes(ssh_pid) if i in table}
    for pid in candidates:
        for inode in socket_inodes(pid):
            if inode in table and table[inode][1] in client_ends:
                return pid
    return None


def cpu_seconds(pid):
    """utime + stime of the whole process (exited threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    values["Pss"] = int(line.split()[1])
    except FileNotFoundError:
        pass
    return values


# ---------------------------------------------------------------- the peers


class Peer:
    def __init__(self, name, label, host, port, kind, proc=None):
        self.name = name          # short key, used in JSON
        self.label = label        # what the tables show
        self.host, self.port = host, port
        self.kind = kind          # direct | per-connection | socat | single-process
        self.proc = proc          # the process we started for it
        self.failed = None        # why it was dropped from the run, if it was
        self.hosts = [self]       # where its clients connect: several for proxy hosts sharing one store
        self.metrics = None       # (host, port) of an ssh-on-demand daemon's metrics, to tell its sessions' end

    def proxy_pid(self, ssh_pid):
        """The process that relays the ssh client `ssh_pid`'s connection, while that connection is open."""
        if self.kind == "direct":
            return None
        if self.kind == "single-process":
            # systemd-socket-proxyd: systemd-socket-activate (Accept=no) execs it in place, so the PID we
            # started is the relay, serving every connection.
            return self.proc.pid
        # per-connection: a child of systemd-socket-activate; socat: a forked child of the socat we started
        pid = serving_pid(children(self.proc.pid), ssh_pid)
        if pid is None:
            raise BenchError(f"{self.label}: found no child of PID {self.proc.pid} serving ssh PID {ssh_pid}")
        return pid


# ---------------------------------------------------------------- reporting


def percentile(ordered, q):
    return ordered[max(0, -(-q * len(ordered) // 100) - 1)]  # nearest rank


def summary(samples):
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "mean": statistics.fmean(ordered),
            "p10": percentile(ordered, 10), "p90": percentile(ordered, 90), "min": ordered[0],
            "max": ordered[-1], "samples": samples}


def ratio(value, reference):
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"
