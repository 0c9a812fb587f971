#!/usr/bin/python3
"""Prototype of the ssh-on-demand design, as such prototypes are usually written (the benchmark's peer 3).

Run once per connection by systemd (Accept=yes, StandardInput=socket) or by
`systemd-socket-activate -a --inetd`: the client's socket is stdin.
  1. blocking POST to the start API, which answers {"vm_ip": "..."} or the IP as plain text;
  2. wait for the VM: try a TCP connect to the VM's sshd port at once, and every 2 s after a failure; a
     successful connect counts as ready (no check for sshd's SSH- line);
  3. relay with select() until either side reaches EOF, then close everything. This is the known
     flaw: a client that half-closes (shutdown(SHUT_WR)) loses what the VM still had to send.
Usage: prototype.py API_URL [VM_PORT]   (VM_PORT: 22 unless given)
"""
import select
import socket
import sys
import time

import requests

BOOT_TIMEOUT = 120
RETRY_EVERY = 2


def start_vm(api_url, client):
    host, port = client.getpeername()[:2]
    answer = requests.post(api_url, json={"client_addr": host, "client_port": port}, timeout=10)
    answer.raise_for_status()
    if answer.headers.get("Content-Type", "").startswith("application/json"):
        return answer.json()["vm_ip"]
    return answer.text.strip()


def wait_for_vm(vm_ip, port):
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            return socket.create_connection((vm_ip, port), timeout=RETRY_EVERY)
        except OSError:
            if time.monotonic() + RETRY_EVERY > deadline:
                raise
            time.sleep(RETRY_EVERY)


def relay(client, vm):
    for sock in (client, vm):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    other = {client: vm, vm: client}
    while True:
        readable, _, _ = select.select([client, vm], [], [])
        for sock in readable:
            data = sock.recv(65536)
            if not data:  # EOF on either side: the session is over
                return
            other[sock].sendall(data)


def main():
    client = socket.socket(fileno=0)
    vm = wait_for_vm(start_vm(sys.argv[1], client), int(sys.argv[2]) if len(sys.argv) > 2 else 22)
    try:
        relay(client, vm)
    finally:
        vm.close()
        client.close()


if __name__ == "__main__":
    main()
