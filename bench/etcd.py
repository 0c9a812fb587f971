"""The etcd cluster of a run (Debian's etcd-server): three members on loopback ports, as testkit/src/etcd.rs
runs them, for the daemons with `state_store = "etcd"`. Their data is on disk (/var/tmp), as a real cluster's
is: etcd syncs its log to disk before it answers a write."""
import os
import shutil
import subprocess

from benchlib import BenchError, drain, free_port, log, tail

# Raft timing as the tests use it; no member fails during a run, so only start-up depends on it.
HEARTBEAT_MS = 50
ELECTION_MS = 500


class Cluster:
    def __init__(self, bench, n):
        etcd = shutil.which("etcd", path="/usr/bin:/usr/sbin:/bin")
        if not etcd:
            raise BenchError("etcd is missing: apt-get install -y etcd-server")
        members = [(f"m{i}", free_port(), free_port()) for i in range(n)]
        initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, _, peer in members)
        self.clients = [f"http://127.0.0.1:{client}" for _, client, _ in members]
        ready = []
        for name, client, peer in members:
            data = os.path.join(bench.disk_root(), f"etcd-{name}")
            proc = bench.procs.spawn(f"etcd {name}", [
                etcd, f"--name={name}", f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster={initial}", "--initial-cluster-state=new",
                "--initial-cluster-token=ssh-on-demand-bench",
                f"--heartbeat-interval={HEARTBEAT_MS}", f"--election-timeout={ELECTION_MS}",
            ], stderr=subprocess.PIPE)
            log_path = bench.path(f"etcd-{name}.log")
            ready.append((proc, log_path, drain(proc.stderr, log_path, b"ready to serve client requests")))
        for proc, log_path, serving in ready:
            serving.wait(30)
            if proc.poll() is not None or not serving.is_set():
                raise BenchError(f"etcd did not start serving:\n{tail(log_path)}")
        log(f"etcd cluster of {n} members: {', '.join(self.clients)}")

    def endpoint_args(self):
        return [f"--etcd-endpoint={url}" for url in self.clients]
