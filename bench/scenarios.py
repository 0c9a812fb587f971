"""The scenarios without ssh in the path: the relay at line rate, a VM that boots while the client waits,
a storm of clients during one boot, and a real VM's cold boot against its resume. See bench/README.md.

Each "VM" here is a loopback address with a tiny server on the run's VM port (bench.vm_port, as for the
sshd VM) that sends an SSH identification line at once (peers/rawpeer.py for bulk transfers, peers/stormpeer.py for the storm, a thread of this
process for readiness),
so that what is measured is the relays and the proxies, not sshd's own start-up per connection.
"""
import http.client
import http.server
import json
import os
import random
import selectors
import socket
import statistics
import subprocess
import threading
import time

from benchlib import (
    BENCH, DAEMON_ENV, PYTHON, REPO, WITH_LISTEN_FD, GiB, MiB, BenchError, Peer, children, drain, free_port,
    listening_socket, log, ratio, relay_settled, summary, tail, cpu_seconds, memory_kib,
)

RAW_VM = "127.0.0.78"
REFUSING_VM = "127.0.0.79"
DROPPING_VM = "127.0.0.80"
STORM_VM = "127.0.0.81"
NFT_TABLE = "ssh_on_demand_bench"
BANNER = b"SSH-2.0-OpenSSH_9.2p1 bench-vm\r\n"
CALLERS = ("ssh-on-demand", "daemon", "prototype")


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise BenchError(f"closed after {data!r}")
        data += chunk
    return data


# ---------------------------------------------------------------- raw TCP relay at line rate


def raw_peers(bench, tag):
    """The raw VM (started once per run), and every relay to it, the splice floor included."""
    if not getattr(bench, "raw_vm", None):
        sock = listening_socket(RAW_VM, bench.vm_port)
        bench.raw_vm = bench.procs.spawn("raw VM", [PYTHON, os.path.join(BENCH, "peers", "rawpeer.py"), "vm",
                                                    str(sock.fileno())], pass_fds=[sock.fileno()])
        sock.close()
        log(f"raw VM on {RAW_VM}:{bench.vm_port} (PID {bench.raw_vm.pid})")
    api = bench.start_api_for(RAW_VM, tag)
    peers = [p for p in bench.relays_to(RAW_VM, api, tag) if not p.failed]
    peers[0].api_url = api
    floor = splice_floor(bench, RAW_VM, tag)
    if floor:
        peers.append(floor)
    return peers


def raw_relay(bench):
    """1 GiB each way at once through every relay."""
    args = bench.args
    peers = raw_peers(bench, "-raw")
    nbytes = args.raw_mib * MiB
    for peer in peers:  # untimed: the first transfers after start-up run slower for every peer alike
        transfer(peer, nbytes // 4)
    runs = {p.name: [] for p in peers}
    for rep in range(args.raw_reps):
        k = rep % len(peers)
        for peer in peers[k:] + peers[:k]:
            runs[peer.name].append(transfer(peer, nbytes))
        log(f"raw relay: repetition {rep + 1}/{args.raw_reps}")
    out = {}
    for peer in peers:
        rs = runs[peer.name]
        rates = [2 * nbytes / r["seconds"] / GiB for r in rs]
        out[peer.name] = {"label": peer.label, "gib_s": statistics.median(rates),
                          "spread": (max(rates) - min(rates)) / statistics.median(rates), "runs": rs}
        if peer.kind != "direct":
            out[peer.name]["cpu_s_per_gib"] = sum(r["cpu_s"] for r in rs) / (len(rs) * 2 * nbytes / GiB)
            per_rep = [r["cpu_s"] / (2 * nbytes / GiB) for r in rs]
            out[peer.name]["cpu_spread"] = (max(per_rep) - min(per_rep)) / statistics.median(per_rep)
    return {"mib_each_way": args.raw_mib, "reps": args.raw_reps, "peers": out}


def splice_floor(bench, vm, tag):
    """The floor of the raw relay scenario (peers/splice_floor.c): the least work a user-space relay can do,
    compiled into the throwaway directory and started per connection like ssh-on-demand. None, with a note,
    where there is no C compiler."""
    binary = bench.path("splice_floor")
    if not os.path.exists(binary):  # built once per run
        try:
            built = subprocess.run(["cc", "-O2", "-pthread", "-o", binary,
                                    os.path.join(BENCH, "peers", "splice_floor.c")], capture_output=True, text=True)
        except OSError as e:
            built = subprocess.CompletedProcess([], 1, "", str(e))
        if built.returncode != 0:
            log(f"note: no splice floor (cc: {built.stderr.strip() or built.returncode})")
            return None
    sock = listening_socket()
    with open(bench.path(f"splice-floor{tag}.log"), "wb") as err:
        proc = bench.procs.spawn("splice floor", ["sh", "-c", WITH_LISTEN_FD, "sh", "systemd-socket-activate",
                                                  "-a", "--inetd", "--", binary, vm, str(bench.vm_port)],
                                 stdin=sock.fileno(), stderr=err)
    peer = Peer("floor", "splice floor (C)", "127.0.0.1", sock.getsockname()[1], "per-connection", proc)
    sock.close()
    log(f"peer {peer.label:<22} {peer.host}:{peer.port} -> {vm}:{bench.vm_port} (PID {proc.pid})")
    return peer


def transfer(peer, nbytes):
    client = subprocess.Popen([PYTHON, os.path.join(BENCH, "peers", "rawpeer.py"), "client", peer.host,
                               str(peer.port), str(nbytes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if client.stdout.readline().strip() != "ready":
            raise BenchError(f"raw relay through {peer.label}: no identification line")
        pid = peer.proxy_pid(client.pid)
        before = cpu_seconds(pid) if pid else 0.0
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        if not line:
            raise BenchError(f"raw relay through {peer.label} failed")
        seconds = json.loads(line)["seconds"]
        cpu = cpu_seconds(pid) - before if pid else 0.0
    finally:
        client.stdin.close()
        client.wait(timeout=60)
        relay_settled(peer)
    return {"seconds": seconds, "cpu_s": cpu}


def memory(bench):
    """Memory per idle session, `idle_sessions` held at once through each relay to the raw VM."""
    out = {}
    peers = raw_peers(bench, "-mem")
    for i, (name, label, path) in enumerate(bench.args.baselines):
        peers.insert(2 + i, bench.proxy(name, f"ssh-on-demand, {label}", peers[0].api_url, "-mem", binary=path))
    for peer in peers:
        if peer.kind == "direct" or peer.name == "prototype":  # 200 Python interpreters measure nothing new
            continue
        out[peer.name] = dict(label=peer.label, **idle_session_memory(peer, bench.args.idle_sessions))
    return {"sessions": bench.args.idle_sessions, "peers": out}


def idle_session_memory(peer, count):
    """A one-process relay: its growth (RSS and PSS) per idle session. Relays with a process per connection
    (ssh-on-demand, socat's forks, the splice floor): the PSS of those processes per session. PSS divides each
    page among the processes that map it, so the binary's code, shared by all, counts once across them; what
    remains is each process's own memory (heap, stacks, pages written at start-up)."""
    def pss(pids):
        return sum(memory_kib(pid).get("Pss", 0) for pid in pids)

    warm = [open_session(peer) for _ in range(10)]  # first sessions grow allocator pools once
    for s in warm:
        s.close()
    time.sleep(0.5)  # let the relay notice those closes before the baseline is read
    relay_settled(peer)
    if peer.kind == "single-process":
        before = memory_kib(peer.proc.pid)
    sessions = [open_session(peer) for _ in range(count)]
    try:
        time.sleep(1.0)  # what each relay does once the VM's line is through (bookkeeping) is done by then
        if peer.kind == "single-process":
            after = memory_kib(peer.proc.pid)
            found = {"rss_kib": (after["VmRSS"] - before["VmRSS"]) / count,
                     "pss_kib": (after["Pss"] - before["Pss"]) / count}
        else:
            pids = children(peer.proc.pid)
            if len(pids) != count:
                raise BenchError(f"{peer.label}: {len(pids)} processes for {count} sessions")
            found = {"pss_kib": pss(pids) / count,
                     "rss_kib": sum(memory_kib(pid)["VmRSS"] for pid in pids) / count}
    finally:
        for s in sessions:
            s.close()
        relay_settled(peer)
    log(f"idle sessions {peer.label:<22} {count} open: PSS {found['pss_kib']:.1f} KiB, RSS {found['rss_kib']:.1f} KiB "
        f"per session")
    return found


def open_session(peer):
    sock = socket.create_connection((peer.host, peer.port), timeout=30)
    sock.sendall(b"SSH-2.0-bench\r\n")
    read_line(sock)
    return sock


# ---------------------------------------------------------------- a VM that boots while clients wait


class StartApi(http.server.ThreadingHTTPServer):
    """A start API in this process, so that the moment of each call is known: answers {"vm_ip": vm_ip}."""
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, vm_ip):
        super().__init__(("127.0.0.1", 0), Handler)
        self.vm_ip = vm_ip
        self.calls = []
        self.called = threading.Condition()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/start"

    def first_call(self, timeout=30):
        with self.called:
            if not self.called.wait_for(lambda: self.calls, timeout):
                raise BenchError("the start API was not called")
            return self.calls[0]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        with self.server.called:
            self.server.calls.append(time.perf_counter())
            self.server.called.notify_all()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"vm_ip": self.server.vm_ip}).encode()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))

    def log_message(self, *args):
        pass


class BannerVm:
    """Port `port` of `ip`, answered as sshd answers: the identification line at once, then whatever comes until
    the client closes, then close. One thread accepts and sends the line; another closes what ended."""

    def __init__(self, ip, port):
        self.ip, self.port, self.listener = ip, port, None
        self.watch = selectors.DefaultSelector()
        self.lock = threading.Lock()  # registering, unregistering and closing, never held while waiting
        threading.Thread(target=self.close_ended, daemon=True).start()

    def open(self):
        self.listener = listening_socket(self.ip, self.port)
        opened = time.perf_counter()
        threading.Thread(target=self.serve, args=(self.listener,), daemon=True).start()
        return opened

    def serve(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.sendall(BANNER)
                conn.setblocking(False)
                with self.lock:
                    self.watch.register(conn, selectors.EVENT_READ)
            except (OSError, ValueError, KeyError):
                conn.close()

    def close_ended(self):
        while True:
            if not self.watch.get_map():
                time.sleep(0.01)  # nothing registered: select() on an empty set would return at once
                continue
            try:
                ready = self.watch.select(timeout=0.1)
            except (OSError, ValueError, RuntimeError):
                continue
            for key, _ in ready:
                with self.lock:
                    if key.fileobj.fileno() < 0 or self.watch.get_map().get(key.fd) is not key:
                        continue  # closed meanwhile
                    try:
                        if key.fileobj.recv(65536):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    self.watch.unregister(key.fileobj)
                    key.fileobj.close()

    def close(self):
        if self.listener:
            # Wakes the thread blocked in accept() and stops listening; close() alone would leave the socket
            # listening until that accept() returned, answering the next "closed" port.
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        with self.lock:
            for key in list(self.watch.get_map().values()):
                self.watch.unregister(key.fileobj)
                key.fileobj.close()


class SynDrop:
    """An nftables rule that drops the SYNs to port `port` of `ip`, in a table of the benchmark's own, switched
    through one `nft -i` process: starting nft for each change would take milliseconds of unknown length."""

    def __init__(self, ip, port):
        self.rule = (f"add rule ip {NFT_TABLE} input ip daddr {ip} tcp dport {port} "
                     "tcp flags & (syn | ack) == syn drop")
        self.nft = subprocess.Popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.command(f"add table ip {NFT_TABLE}")
        self.command(f"add chain ip {NFT_TABLE} input {{ type filter hook input priority -10; }}")
        self.command(self.rule)

    def command(self, command):
        """Runs `command`; returns the time it was sent, once nft has carried it out."""
        sent = time.perf_counter()
        self.nft.stdin.write(f"{command}\nlist table ip {NFT_TABLE}\n")
        self.nft.stdin.flush()
        output = []
        while True:  # the listing after it ends with a lone "}"; nft runs commands in order
            line = self.nft.stdout.readline()
            if not line:
                raise BenchError(f"nft exited: {''.join(output)}")
            if line.startswith("Error"):
                raise BenchError(f"nft {command}: {line.strip()}")
            output.append(line)
            if line.rstrip("\n") == "}":
                return sent

    def lift(self):
        return self.command(f"flush chain ip {NFT_TABLE} input")

    def restore(self):
        self.command(self.rule)

    def close(self):
        self.nft.stdin.close()
        self.nft.wait(10)
        remove_nft_table()


def remove_nft_table():
    subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True)


class Client(threading.Thread):
    """One SSH client's view: connects, sends its identification, and notes when the VM's line arrives."""

    def __init__(self, peer, timeout=30):
        super().__init__(daemon=True)
        self.peer, self.timeout, self.banner_at, self.error, self.sock = peer, timeout, None, None, None

    def run(self):
        try:
            self.sock = socket.create_connection((self.peer.host, self.peer.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(b"SSH-2.0-bench\r\n")
            line = read_line(self.sock)
            self.banner_at = time.perf_counter()
            if line != BANNER:
                self.error = f"got {line!r}"
        except (OSError, BenchError) as e:
            self.error = str(e)

    def close(self):
        if self.sock:
            self.sock.close()


def readiness(bench):
    """Lag from the VM's port opening to its identification line reaching the client, while the port
    refuses before, and while the VM drops SYNs before."""
    args = bench.args
    api = StartApi(REFUSING_VM)
    peers = [p for p in bench.relays_to(REFUSING_VM, api.url, "-ready", callers_only=True, guard=False)
             if not p.failed]
    out = {p.name: {"label": p.label} for p in peers}
    drop = SynDrop(DROPPING_VM, bench.vm_port)
    dropping = BannerVm(DROPPING_VM, bench.vm_port)
    dropping.open()
    try:
        for mode, ip in (("refused", REFUSING_VM), ("dropped", DROPPING_VM)):
            api.vm_ip = ip
            lags = {p.name: [] for p in peers}
            for i in range(args.readiness_runs):
                for peer in peers:
                    lags[peer.name].append(ready_lag(peer, api, mode, args.open_after_ms, drop, bench.vm_port))
            for peer in peers:
                out[peer.name][mode] = summary(lags[peer.name])
            log(f"readiness, {mode}: " + ", ".join(
                f"{p.label} p50 {out[p.name][mode]['median']:.1f} ms" for p in peers))
    finally:
        dropping.close()
        drop.close()
    return {"runs": args.readiness_runs, "open_after_ms": args.open_after_ms, "peers": out}


def ready_lag(peer, api, mode, open_after_ms, drop, port):
    with api.called:
        api.calls.clear()
    refusing = BannerVm(REFUSING_VM, port)
    client = Client(peer)
    client.start()
    try:
        called = api.first_call()
        # Jitter, so that the opening does not keep one phase with a proxy's retry period.
        time.sleep(max(0.0, called + (open_after_ms + random.uniform(0, 40)) / 1000 - time.perf_counter()))
        if mode == "refused":
            opened = refusing.open()
        else:
            opened = drop.lift()
        client.join(30)
        if client.banner_at is None:
            raise BenchError(f"readiness via {peer.label} ({mode}): {client.error or 'no banner'}")
        return (client.banner_at - opened) * 1000
    finally:
        client.close()
        refusing.close()
        if mode == "dropped":
            drop.restore()
        relay_settled(peer)


def proxy_hosts(bench, api_url, n):
    """`n` proxy hosts in front of one VM: daemons sharing its life through the run's etcd cluster, each with its
    own listening socket and host_id, as hosts behind DNS round-robin would be; the storm's clients take them
    in turn."""
    hosts = [bench.proxy(f"host{i}", f"daemon host {i}", api_url, "-storm-hosts", daemon=True, state="etcd",
                         guard=False) for i in range(n)]
    peer = Peer("hosts", f"{n} daemons, etcd store", hosts[0].host, hosts[0].port, "single-process", hosts[0].proc)
    peer.hosts = hosts
    for host in hosts:
        log(f"peer {host.label:<22} {host.host}:{host.port} (PID {host.proc.pid})")
    return peer


def storm(bench):
    """`storm_clients` clients at once while the VM boots for `storm_boot_s` from the first start call. The
    clients and the VM are processes of their own (peers/stormpeer.py), each one epoll loop."""
    args = bench.args
    api = StartApi(STORM_VM)
    peers = [p for p in bench.relays_to(STORM_VM, api.url, "-storm", callers_only=True, guard=False)
             if not p.failed]
    if "--state-store" in bench.options_of(args.binary):
        peers.append(proxy_hosts(bench, api.url, args.storm_hosts))
    peer_script = os.path.join(BENCH, "peers", "stormpeer.py")
    out = {}
    for peer in peers:
        with api.called:
            api.calls.clear()
        ours, theirs = socket.socketpair()
        vm = bench.procs.spawn("storm VM", [PYTHON, peer_script, "vm", str(theirs.fileno())],
                               pass_fds=[theirs.fileno()])
        theirs.close()
        clients = bench.procs.spawn(
            "storm clients",
            [PYTHON, peer_script, "clients", ",".join(f"{p.host}:{p.port}" for p in peer.hosts),
             str(args.storm_clients), str(args.storm_boot_s + 60)],
            stdout=subprocess.PIPE)
        try:
            first = api.first_call()
            time.sleep(max(0.0, first + args.storm_boot_s - time.perf_counter()))
            listener = listening_socket(STORM_VM, bench.vm_port)
            up = time.monotonic()
            socket.send_fds(ours, [b"L"], [listener.fileno()])
            listener.close()
            result = json.loads(clients.communicate(timeout=args.storm_boot_s + 90)[0] or b"{}")
            served = [at - up for at in result.get("banner_at", [])]
            out[peer.name] = {
                "label": peer.label, "start_calls": len(api.calls), "served": len(served),
                "last_banner_s": max(served) if served else None,
                "median_banner_s": statistics.median(served) if served else None,
                "errors": sorted(set(result.get("errors", [])))[:3],
            }
            log(f"storm {peer.label:<22} {len(api.calls)} start calls, {len(served)}/{args.storm_clients} served, "
                f"last banner {max(served) if served else float('nan'):.3f} s after the VM was up")
        finally:
            if clients.poll() is None:
                clients.kill()
                clients.wait()
            ours.close()
            vm.wait(10)
            relay_settled(peer)
    return {"clients": args.storm_clients, "boot_s": args.storm_boot_s, "peers": out}


# ---------------------------------------------------------------- a real VM: cold boot against resume

GUEST = os.path.join(REPO, "tests", "guest")
RESUME_GOAL = 0.25  # issue 18: a resume at most a quarter of a cold boot


def resume(bench):
    """A real VM (tests/guest: a Debian kernel, busybox and dropbear, under QEMU with TCG) through the
    companion's command backend (tests/guest/qemu-vm): from the start call to the VM's SSH identification line
    on a cold boot, and on a resume from the state a stop saved (QEMU's migration to a file)."""
    args = bench.args
    vm_dir = bench.path("resume-vm")
    os.makedirs(vm_dir)
    port = free_port()
    kernel = prepare_guest(bench, vm_dir)
    with open(os.path.join(vm_dir, "vm.json"), "w") as f:
        json.dump({"kernel": kernel, "initrd": os.path.join(vm_dir, "initrd"), "port": port, "memory_mib": 128}, f)
    api = Companion(bench, vm_dir, port)
    cold, warm, suspends, state_mib = [], [], [], []
    try:
        for run in range(args.resume_runs):
            cold.append(start_to_banner(api, port, "booted"))
            stop_began = time.perf_counter()
            api.suspend()
            suspends.append((time.perf_counter() - stop_began) * 1000)
            state_mib.append(os.path.getsize(os.path.join(vm_dir, "state")) / MiB)
            warm.append(start_to_banner(api, port, "resumed"))
            # Off without a saved state, so that the next run boots cold again.
            qemu_vm("stop", vm_dir)
            log(f"resume: run {run + 1}/{args.resume_runs}: cold boot {cold[-1]:.0f} ms, resume {warm[-1]:.0f} ms "
                f"(suspend {suspends[-1]:.0f} ms, {state_mib[-1]:.0f} MiB saved)")
    finally:
        qemu_vm("kill", vm_dir)
    return {"runs": args.resume_runs, "kernel": os.path.basename(os.path.dirname(kernel)),
            "cold_ms": summary(cold), "resume_ms": summary(warm), "suspend_ms": summary(suspends),
            "state_mib": statistics.median(state_mib),
            "ratio": statistics.median(warm) / statistics.median(cold)}


def prepare_guest(bench, vm_dir):
    """tests/guest/build (cached under target/guest), and an initrd that lets the benchmark's client key in;
    returns the kernel's path."""
    built = subprocess.run([os.path.join(GUEST, "build"), os.path.join(REPO, "target", "guest")],
                           capture_output=True, text=True, timeout=900)
    if built.returncode != 0:
        raise BenchError(f"tests/guest/build failed: {built.stderr.strip()}")
    kernel, image = built.stdout.split()
    keys = bench.path("guest-keys")
    os.makedirs(os.path.join(keys, "root", ".ssh"))
    with open(bench.path("client_key.pub")) as key, open(os.path.join(keys, "root/.ssh/authorized_keys"), "w") as out:
        out.write(key.read())
    archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=keys, capture_output=True,
                             input=b"root/.ssh\nroot/.ssh/authorized_keys\n", check=True).stdout
    # The kernel unpacks concatenated archives in turn: the cached image, then the key.
    with open(image, "rb") as f, open(os.path.join(vm_dir, "initrd"), "wb") as out:
        out.write(f.read() + archive)
    return kernel


def qemu_vm(action, vm_dir):
    done = subprocess.run([os.path.join(GUEST, "qemu-vm"), action, vm_dir], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 and action != "kill":
        raise BenchError(f"qemu-vm {action}: {done.stderr.strip()}")


class Companion:
    """ssh-on-demand-api with the command backend running tests/guest/qemu-vm, stop_mode = "suspend"."""

    def __init__(self, bench, vm_dir, port):
        self.port, self.token = free_port(), "bench-token"
        credentials = bench.path("companion-credentials")
        os.makedirs(credentials)
        with open(os.path.join(credentials, "api-token"), "w") as f:
            f.write(self.token + "\n")
        script = os.path.join(GUEST, "qemu-vm")
        argv = lambda action: json.dumps([script, action, "{vm}"])  # noqa: E731
        config = bench.path("companion.toml")
        with open(config, "w") as f:
            f.write(f"""stop_timeout = "120s"
[backends.qemu]
type = "command"
timeout = "120s"
start = {argv("start")}
resume = {argv("resume")}
suspend = {argv("suspend")}
stop = {argv("stop")}
kill = {argv("kill")}
[profiles.bench]
backend = "qemu"
vm = {json.dumps(vm_dir)}
port = {port}
stop_mode = "suspend"
""")
        proc = bench.procs.spawn("companion", [bench.args.companion, "--config", config, "--listen",
                                               f"127.0.0.1:{self.port}", "--log-target", "stderr"],
                                 env=dict(DAEMON_ENV, CREDENTIALS_DIRECTORY=credentials), stderr=subprocess.PIPE)
        serving = drain(proc.stderr, bench.path("companion.log"), b"serving")
        serving.wait(30)
        if proc.poll() is not None or not serving.is_set():
            raise BenchError(f"the companion did not start: {tail(bench.path('companion.log'), 5)}")
        log(f"companion at 127.0.0.1:{self.port} (PID {proc.pid}), its VM's sshd forwarded to 127.0.0.1:{port}")

    def post(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=180)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            answer = json.loads(response.read() or b"{}")
        finally:
            conn.close()
        if response.status >= 300:
            raise BenchError(f"the companion answered {path} with {response.status}: {answer}")
        return answer

    def start(self):
        return self.post("/start", {"profile": "bench", "client_addr": "127.0.0.1"})

    def suspend(self):
        """Asks for the stop, then asks again: the second stop waits until the first is done, and finds
        the VM suspended."""
        self.post("/stop", {"profile": "bench", "vm_ip": "127.0.0.1"})
        again = self.post("/stop", {"profile": "bench", "vm_ip": "127.0.0.1"})
        if again.get("status") != "suspended":
            raise BenchError(f"the VM is not suspended after the stop: {again}")


def start_to_banner(api, port, how):
    """ms from the start call to the VM's SSH- line on its forwarded port."""
    began = time.perf_counter()
    answer = api.start()
    if answer.get("how") != how:
        raise BenchError(f"the start was to be {how}, the companion answered {answer}")
    if first_banner(port, began + 180) is None:
        raise BenchError(f"no SSH identification on 127.0.0.1:{port} within 180 s of the start call")
    return (time.perf_counter() - began) * 1000


def first_banner(port, deadline, patience=1.0):
    """Waits for an SSH- line from 127.0.0.1:port: one connection at a time, each given `patience` for the line,
    the next 10 ms after one was refused, reset or given up. QEMU accepts on the port as soon as it runs;
    while the guest boots, it resets a connection, or the connection's SYN to the guest is lost (before the
    guest's network is up) and retried on slirp's timer (seconds), which a single connection would wait out.
    Many connections at once would load the emulated guest being timed. Returns the time, or None."""
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=patience) as sock:
                sock.settimeout(patience)
                if sock.recv(4).startswith(b"SSH-"):
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.01)
    return None


# ---------------------------------------------------------------- tables


def render(results, add, table):
    raw = results.get("raw")
    if raw:
        peers, ref = raw["peers"], raw["peers"].get("proxyd", {})
        rows = []
        for p in peers.values():
            cpu = p.get("cpu_s_per_gib")
            rows.append([p["label"], f"{p['gib_s']:.2f}", f"{100 * p['spread']:.0f}%",
                         ratio(p["gib_s"], ref.get("gib_s")),
                         "-" if cpu is None else f"{cpu:.3f}", ratio(cpu, ref.get("cpu_s_per_gib"))])
        table(f"Raw TCP relay: {raw['mib_each_way']} MiB each way at once (no ssh in the path), median of "
              f"{raw['reps']}; GiB/s = both directions together; CPU = utime+stime of the relaying process per "
              f"GiB relayed; ratios against systemd-socket-proxyd",
              ["peer", "GiB/s", "spread", "vs proxyd", "CPU s/GiB", "vs proxyd"], rows)
        sod = peers.get("ssh-on-demand")
        if sod and ref:
            fast = sod["gib_s"] / ref["gib_s"]
            cheap = sod["cpu_s_per_gib"] / ref["cpu_s_per_gib"]
            add(f"Targets (issue 10): throughput >= 1.2x proxyd: {fast:.2f}x, {'MET' if fast >= 1.2 else 'NOT MET'}; "
                f"CPU per GiB <= 0.8x proxyd: {cheap:.2f}x, {'MET' if cheap <= 0.8 else 'NOT MET'}.")
            floor = peers.get("floor")
            if floor:
                add(f"The splice floor, the least work a relay can do, moves {floor['gib_s'] / ref['gib_s']:.2f}x "
                    f"proxyd's throughput; ssh-on-demand {sod['gib_s'] / floor['gib_s']:.2f}x the floor's.")
            add("")
    mem = results.get("memory")
    if mem:
        peers = mem["peers"]
        sod, socat = peers.get("ssh-on-demand"), peers.get("socat")
        rows = [[p["label"], f"{p['pss_kib']:.1f}", ratio(p["pss_kib"], sod and sod["pss_kib"]),
                 f"{p['rss_kib']:.1f}"] for p in peers.values()]
        table(f"Idle sessions: {mem['sessions']} held at once through each relay (KiB per session): PSS of the "
              f"per-connection processes, or a one-process relay's growth; RSS the same without sharing",
              ["peer", "PSS KiB", "ratio", "RSS KiB"], rows)
        if sod:
            add(f"Goal (issue 19): per connection at most 400 KiB PSS per idle session: {sod['pss_kib']:.0f} KiB, "
                f"{'MET' if sod['pss_kib'] <= 400 else 'NOT MET'}"
                + (f" (socat {socat['pss_kib']:.0f} KiB)." if socat else "."))
            add("")
    ready = results.get("readiness")
    if ready:
        rows = [[p["label"], f"{p['refused']['median']:.1f}", f"{p['refused']['p90']:.1f}",
                 f"{p['refused']['max']:.1f}", f"{p['dropped']['median']:.1f}", f"{p['dropped']['p90']:.1f}",
                 f"{p['dropped']['max']:.1f}"] for p in ready["peers"].values()]
        table(f"Readiness lag: the VM's port opens ~{ready['open_after_ms']} ms (+0-40 ms jitter) after the start "
              f"API call -> its identification line reaches the client (ms), {ready['runs']} runs each; before "
              f"that the port refuses (RST), or the VM drops SYNs (nftables)",
              ["peer", "refused p50", "p90", "max", "dropped p50", "p90", "max"], rows)
        sod = ready["peers"].get("ssh-on-demand")
        if sod:
            met = all(sod[m]["median"] <= 25 and sod[m]["p90"] <= 50 for m in ("refused", "dropped"))
            add(f"Target (issue 10): p50/p90 <= 25/50 ms in both cases: {'MET' if met else 'NOT MET'} for "
                f"ssh-on-demand.")
            add("")
    daemon_targets(results, add)
    resumed = results.get("resume")
    if resumed:
        rows = [[label, f"{r['median']:.0f}", f"{r['min']:.0f}", f"{r['max']:.0f}"]
                for label, r in (("cold boot", resumed["cold_ms"]), ("resume", resumed["resume_ms"]),
                                 ("(the suspend)", resumed["suspend_ms"]))]
        table(f"Resume: a real VM ({resumed['kernel']}, busybox and dropbear, 128 MiB, QEMU with TCG) through "
              f"the companion's command backend; from the start call to the VM's SSH identification line (ms), "
              f"{resumed['runs']} runs; the suspend: from the stop call to the state saved and QEMU gone",
              ["", "median", "min", "max"], rows)
        met = resumed["ratio"] <= RESUME_GOAL
        add(f"Goal (issue 18): a resume at most a quarter of a cold boot: {resumed['ratio']:.2f}x, "
            f"{'MET' if met else 'NOT MET'}. Saved state: {resumed['state_mib']:.0f} MiB.")
        add("")
    storm_results = results.get("storm")
    if storm_results:
        rows = [[p["label"], p["start_calls"], f"{p['served']}/{storm_results['clients']}",
                 "-" if p["median_banner_s"] is None else f"{p['median_banner_s']:.3f}",
                 "-" if p["last_banner_s"] is None else f"{p['last_banner_s']:.3f}"]
                for p in storm_results["peers"].values()]
        table(f"Storm: {storm_results['clients']} clients at once while the VM boots for "
              f"{storm_results['boot_s']:g} s from the first start call; times from the VM's port opening to "
              f"each client's VM identification line (s)",
              ["peer", "start calls", "served", "median", "last"], rows)
        sod = storm_results["peers"].get("ssh-on-demand")
        if sod and sod["last_banner_s"] is not None:
            met = sod["last_banner_s"] <= 0.05 and sod["served"] == storm_results["clients"]
            add(f"Target (issue 10): last client's banner <= 0.05 s after the VM is up: {sod['last_banner_s']:.3f} s, "
                f"{'MET' if met else 'NOT MET'} for ssh-on-demand.")
        hosts = storm_results["peers"].get("hosts")
        if hosts and hosts["last_banner_s"] is not None:
            add(f"Across hosts (issue 15): {hosts['label']}, clients taken in turn: {hosts['start_calls']} start "
                f"call(s) for {hosts['served']} clients, last banner {hosts['last_banner_s']:.3f} s after the VM "
                f"was up.")
        add("")


def daemon_targets(results, add):
    """Issue 7's targets for the daemon mode, from whichever scenarios ran."""
    lines = []
    ssh = results.get("peers", {})
    if "daemon" in ssh and "direct" in ssh:
        over = ssh["daemon"]["vm_ident_ms"]["median"] - ssh["direct"]["vm_ident_ms"]["median"]
        lines.append(f"connect -> VM identification within 0.3 ms of direct at the median: {over:+.2f} ms, "
                     f"{'MET' if over <= 0.3 else 'NOT MET'}")
    kib = results.get("memory", {}).get("peers", {}).get("daemon", {}).get("rss_kib")
    if kib is not None:
        lines.append(f"memory per idle session <= 64 KiB: {kib:.1f} KiB (RSS), {'MET' if kib <= 64 else 'NOT MET'}")
    raw = results.get("raw", {}).get("peers", {})
    if "daemon" in raw:
        if "ssh-on-demand" in raw:
            d, p = raw["daemon"]["cpu_s_per_gib"], raw["ssh-on-demand"]["cpu_s_per_gib"]
            spreads = [raw[name].get("cpu_spread") for name in ("daemon", "ssh-on-demand")]
            noise = (f" (by {(d - p) / p:.1%}; the repetitions of each vary by {spreads[0]:.0%} and "
                     f"{spreads[1]:.0%})" if d > p and None not in spreads else "")
            lines.append(f"relay CPU per GiB no worse than per-connection: {d:.3f} against {p:.3f} s, "
                         f"{'MET' if d <= p else 'NOT MET'}{noise}")
    if lines:
        add("Daemon targets (issue 7): " + "; ".join(lines) + ".")
        add("")
