"""The warm scenario: what a login to a running VM costs before sshd can talk, across the ways ssh-on-demand
is set up, each against the same run's peers. See bench/README.md.

Per connection and as the daemon, with
  - a start API that writes its answer in one segment, and one that writes the headers and then the body, as
    Python's http.server usually does (peers/start_api.py): on a reused keep-alive connection the body then
    waits for the client's delayed ACK;
  - the VMs' shared state in memory (tmpfs, as /run is), on disk (/var/tmp), and, for the daemon, in etcd;
  - and, for each --baseline-binary, another build (an older commit, say), per connection and as the daemon.
The VM answers at once (peers/stormpeer.py vm-fd), so that nothing hides the proxies' own cost: a warm
login asks the running VM while the start API answers, and relays the VM's line once the API confirmed it.
Each probe connects, sends an identification, and times the VM's line, as bench.py's VM ident does.
"""
import ctypes
import os
import socket
import struct
import time

from benchlib import (
    BENCH, PYTHON, BenchError, Peer, ident_time, listening_socket, log, relay_settled, summary,
)

FAST_VM = "127.0.0.82"

# inotify(7): the store writes every file as a temporary one renamed into place, so renames count writes.
IN_MOVED_TO, IN_DELETE = 0x80, 0x200


def warm(bench):
    args = bench.args
    if args.warm_vm == "sshd":  # the ssh scenario's VM, whose sshd takes a fork and exec to answer
        if not getattr(bench, "sshd", None):
            bench.start_sshd()
        vm_ip = args.vm_ip
    else:
        vm_ip = FAST_VM
        sock = listening_socket(vm_ip, bench.vm_port)
        vm = bench.procs.spawn("fast VM", [PYTHON, os.path.join(BENCH, "peers", "stormpeer.py"), "vm-fd",
                                           str(sock.fileno())], pass_fds=[sock.fileno()])
        sock.close()
        log(f"fast VM on {vm_ip}:{bench.vm_port} (PID {vm.pid})")
    one = bench.start_api_for(vm_ip, "-warm", "one-segment")
    split = bench.start_api_for(vm_ip, "-warm-split", "split")
    tag = "-warm"
    peers = [Peer("direct", "direct", vm_ip, bench.vm_port, "direct")]
    peers.append(bench.proxy("ssh-on-demand", "ssh-on-demand", one, tag))
    peers.append(bench.proxy("split", "ssh-on-demand, split API", split, tag))
    peers.append(bench.proxy("disk", "ssh-on-demand, state on disk", one, tag, state="disk"))
    for name, label, path in args.baselines:
        peers.append(bench.proxy(name, f"ssh-on-demand, {label}", one, tag, binary=path))
    if "daemon" in bench.options_of(args.binary):
        peers.append(bench.proxy("daemon", "daemon", one, tag, daemon=True))
        for name, label, path in args.baselines:
            if "daemon" in bench.options_of(path):
                peers.append(bench.proxy(f"daemon-{name}", f"daemon, {label}", one, tag, daemon=True, binary=path))
        peers.append(bench.proxy("daemon-split", "daemon, split API", split, tag, daemon=True))
        peers.append(bench.proxy("daemon-disk", "daemon, state on disk", one, tag, daemon=True, state="disk"))
        if "--state-store" in bench.options_of(args.binary):
            peers.append(bench.proxy("daemon-etcd", "daemon, etcd store", one, tag, daemon=True, state="etcd"))
    if args.warm_peers:  # a closer look at a few: more probes in the same time
        keep = set(args.warm_peers.split(",")) | {"direct"}
        peers = [p for p in peers if p.name in keep]
    for peer in peers:
        log(f"peer {peer.label:<30} {peer.host}:{peer.port}" + (f" (PID {peer.proc.pid})" if peer.proc else ""))
    for peer in peers:  # the first login starts the VM; the second finds it up
        for _ in range(2):
            probe(bench, peer)
    # Each probe is followed at once by another through the same peer: a keep-alive connection that saw an
    # answer less than ~40 ms before delays its next ACK, which a busy daemon meets, and which the other
    # peers' probes in between may hide.
    samples = {p.name: [] for p in peers}
    burst = {p.name: [] for p in peers}
    for i in range(args.warm_runs):
        k = i % len(peers)
        for peer in peers[k:] + peers[:k]:
            samples[peer.name].append(bench.once_more(f"warm probe via {peer.label}", probe, bench, peer))
            burst[peer.name].append(bench.once_more(f"back-to-back probe via {peer.label}", probe, bench, peer))
        if (i + 1) % 50 == 0:
            log(f"warm: round {i + 1}/{args.warm_runs}")
    out = {p.name: {"label": p.label, "ident_ms": summary(samples[p.name]),
                    "back_to_back_ms": summary(burst[p.name])} for p in peers}
    for peer in peers:
        state = os.path.join(bench.state_root(), f"state{tag}-{peer.name}")
        if peer.name in ("ssh-on-demand", "daemon") and not args.warm_peers:
            out[peer.name]["writes"] = count_writes(bench, peer, state)
    return {"runs": args.warm_runs, "peers": out, "probes_between": 2 * len(peers) - 1, "vm": args.warm_vm,
            "disk_fs": fs_type(bench.disk_root())}


def probe(bench, peer):
    busy = bench.busy(peer)  # count_writes holds a session open through the peer
    took = ident_time(peer.host, peer.port)
    if bench.args.warm_vm == "sshd":
        bench.quiesce(peer, busy)  # sshd's per-connection processes too
    else:
        relay_settled(peer, busy[1])
    return took


def count_writes(bench, peer, state):
    """Files the store writes per warm login, from inotify: with the VM idle between logins (each login
    takes it from idle to up and leaves it idle again) and with the VM up (another session open)."""
    found = {}
    vm_dirs = [os.path.join(state, d) for d in os.listdir(state) if not d.startswith(".")]
    if len(vm_dirs) != 1:
        raise BenchError(f"{peer.label}: expected one VM in {state}, found {vm_dirs}")
    vm_dir = vm_dirs[0]
    watched = {"record": vm_dir, "sessions": os.path.join(vm_dir, "sessions"),
               "sources": os.path.join(state, ".sources")}
    for case in ("idle", "up"):
        held = None
        if case == "up":
            held = open_session(peer)
        try:
            with Inotify(watched) as events:
                logins = 10
                for _ in range(logins):
                    probe(bench, peer)
                time.sleep(0.3)  # the daemon ends a session after its client closed: let it
                counts = events.read()
        finally:
            if held:
                held.close()
        found[case] = {"state_json": counts.get(("record", IN_MOVED_TO, "state.json"), 0) / logins,
                       "session_files": counts.get(("sessions", IN_MOVED_TO), 0) / logins,
                       "sessions_removed": counts.get(("sessions", IN_DELETE), 0) / logins,
                       "source_records": counts.get(("sources", IN_MOVED_TO), 0) / logins}
        log(f"writes per warm login via {peer.label}, VM {case}: {found[case]}")
    return found


def open_session(peer):
    sock = socket.create_connection((peer.host, peer.port), timeout=30)
    sock.sendall(b"SSH-2.0-bench\r\n")
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise BenchError(f"{peer.label}: closed before the VM's line")
        data += chunk
    return sock


class Inotify:
    """Counts inotify events in a few directories: (name, mask) and, for renames into place,
    (name, mask, file)."""

    def __init__(self, dirs):
        self.dirs = dirs

    def __enter__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self.names = {}
        for name, path in self.dirs.items():
            wd = libc.inotify_add_watch(self.fd, os.fsencode(path), IN_MOVED_TO | IN_DELETE)
            if wd < 0:
                raise BenchError(f"inotify_add_watch {path}: {os.strerror(ctypes.get_errno())}")
            self.names[wd] = name
        return self

    def read(self):
        counts = {}
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return counts
            at = 0
            while at < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, at)
                file = data[at + 16:at + 16 + size].rstrip(b"\0").decode()
                at += 16 + size
                for kind in (IN_MOVED_TO, IN_DELETE):
                    if mask & kind:
                        for key in ((self.names[wd], kind), (self.names[wd], kind, file)):
                            counts[key] = counts.get(key, 0) + 1

    def __exit__(self, *exc):
        os.close(self.fd)


def fs_type(path):
    """The type of the file system `path` is on, from /proc/self/mountinfo (the longest mount point)."""
    best, kind = "", "?"
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount = fields[4]
            fs = fields[fields.index("-") + 1]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fs
    return kind


def render(results, add, table):
    warm_results = results.get("warm")
    if not warm_results:
        return
    peers = warm_results["peers"]
    direct = peers["direct"]["ident_ms"]

    def reference(name):
        return "daemon" if name.startswith("daemon") else "ssh-on-demand"

    rows = []
    for name, p in peers.items():
        s = p["ident_ms"]
        ref = peers.get(reference(name), {}).get("ident_ms")
        b2b = p["back_to_back_ms"]
        ref_b2b = peers.get(reference(name), {}).get("back_to_back_ms")
        rows.append([p["label"], f"{s['median']:.2f}", f"{s['p10']:.2f}", f"{s['p90']:.2f}",
                     "-" if name == "direct" else f"{s['median'] - direct['median']:+.2f}",
                     "-" if name == "direct" or not ref else f"{s['median'] - ref['median']:+.2f}",
                     "-" if name == "direct" or not ref else f"{s['median'] / ref['median']:.2f}x",
                     f"{b2b['median']:.2f}",
                     "-" if name == "direct" or not ref_b2b else f"{b2b['median'] - ref_b2b['median']:+.2f}"])
    table(f"Warm login, connect -> VM identification (ms), {warm_results['runs']} probes per peer, interleaved "
          f"(each peer's next probe comes {warm_results['probes_between']} probes later); "
          + ("the VM answers at once; " if warm_results.get("vm", "fast") == "fast" else "the VM is sshd; ") +
          f"'vs ref': against ssh-on-demand per connection, or the daemon, with the one-segment API and the "
          f"state in memory; back-to-back: each probe followed at once by another through the same peer (a busy "
          f"host); disk: {warm_results['disk_fs']}",
          ["peer", "median", "p10", "p90", "vs direct", "vs ref", "ratio", "back-to-back", "vs ref"], rows)

    def diff(a, b, key="ident_ms"):
        if a in peers and b in peers:
            return peers[a][key]["median"] - peers[b][key]["median"]
        return None

    lines = []
    d = diff("daemon-split", "daemon", "back_to_back_ms")
    if d is not None:
        lines.append(f"the daemon with a start API that writes head and body apart, logins back to back: {d:+.2f} ms "
                     f"against one that writes its answer at once (goal: no delayed-ACK stall, within 0.5 ms): "
                     f"{'MET' if d <= 0.5 else 'NOT MET'}; interleaved: {diff('daemon-split', 'daemon'):+.2f} ms")
    d = diff("split", "ssh-on-demand", "back_to_back_ms")
    if d is not None:
        lines.append(f"per connection, the same: {d:+.2f} ms back to back, "
                     f"{diff('split', 'ssh-on-demand'):+.2f} ms interleaved")
    for name, label in (("disk", "per connection"), ("daemon-disk", "the daemon")):
        d = diff(name, reference(name))
        if d is not None:
            lines.append(f"{label} with the state on disk against in memory: {d:+.2f} ms")
    d = diff("daemon-etcd", "daemon")
    if d is not None:
        lines.append(f"the daemon with the etcd store against the local store: {d:+.2f} ms "
                     f"({peers['daemon-etcd']['ident_ms']['median'] / peers['daemon']['ident_ms']['median']:.2f}x)")
    for name in [n for n in peers if n.startswith("baseline")]:
        label = peers[name]["label"].split(", ", 1)[1]
        d = diff("ssh-on-demand", name)
        lines.append(f"per connection, this build against {label}: {d:+.2f} ms interleaved, "
                     f"{diff('ssh-on-demand', name, 'back_to_back_ms'):+.2f} ms back to back (goal, issue 15: at "
                     f"most +0.1 ms against ab0303d): {'MET' if d <= 0.1 else 'NOT MET'}")
        d = diff("daemon", f"daemon-{name}")
        if d is not None:
            lines.append(f"the daemon, this build against {label}: {d:+.2f} ms interleaved, "
                         f"{diff('daemon', f'daemon-{name}', 'back_to_back_ms'):+.2f} ms back to back")
    for line in lines:
        add(f"  {line}.")
    for name in ("ssh-on-demand", "daemon"):
        writes = peers.get(name, {}).get("writes")
        if writes:
            add(f"  Files written per warm login, {peers[name]['label']}: " + "; ".join(
                f"VM {case}: {w['session_files']:g} session file (removed {w['sessions_removed']:g}), "
                f"{w['state_json']:g} VM record, {w['source_records']:g} source record"
                for case, w in writes.items()))
    add("")
