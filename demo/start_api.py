#!/usr/bin/env python3
"""An example start API for ssh-on-demand, used by demo/run.

It "boots" a VM on request: the VM is an sshd on a loopback address, started after a pretend boot time.
It shows the whole contract (README.md, "The start API"):
  - POST with a JSON body describing the connection (client_addr, client_port, local_addr, local_port,
    and profile when one is configured);
  - answer 200 with {"vm_ip": "...", "port": 22} as soon as the VM has an address, even while it boots:
    ssh-on-demand waits for the VM's sshd itself;
  - answer 4xx with {"error": "..."} to refuse: the ssh user reads that reason;
  - optionally check "Authorization: Bearer <token>".
Python standard library only.

Usage: start_api.py PORT VM_IP SSHD_CONFIG BOOT_SECONDS [TOKEN]
"""
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, VM_IP, SSHD_CONFIG, BOOT_SECONDS = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
TOKEN = sys.argv[5] if len(sys.argv) > 5 else None
PROFILES = {"demo"}

vm_lock = threading.Lock()
vm_process = None


def boot_vm():
    """Starts the VM once; later calls find it booting or running."""
    global vm_process
    with vm_lock:
        if vm_process is not None:
            return
        vm_process = "booting"

    def boot():
        global vm_process
        time.sleep(BOOT_SECONDS)  # a real VM takes a while to boot; its sshd starts last
        process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG],
                                   stderr=subprocess.DEVNULL)
        with vm_lock:
            vm_process = process
        print(f"start API: VM {VM_IP} booted (sshd pid {process.pid})", file=sys.stderr, flush=True)

    threading.Thread(target=boot, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        print(f"start API: POST {self.path} {request}", file=sys.stderr, flush=True)
        if TOKEN and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.answer(401, {"error": "the start API did not accept the proxy's token"})
        profile = request.get("profile")
        if profile not in PROFILES:
            return self.answer(404, {"error": f"there is no VM profile named {profile!r}"})
        boot_vm()
        self.answer(200, {"vm_ip": VM_IP, "port": 22})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    # demo/run ends us with SIGTERM: turn it into an exit, so that the VM is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    print(f"start API: listening on 127.0.0.1:{PORT}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        if isinstance(vm_process, subprocess.Popen):
            vm_process.terminate()
