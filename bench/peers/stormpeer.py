#!/usr/bin/python3
"""Both ends of the storm scenario, each its own process with one epoll loop, so that neither the VM nor
the clients wait for the benchmark's interpreter lock (100 client threads and the VM's thread in one
Python process measured mostly how Python shares its lock).

  stormpeer.py vm CTRL_FD            wait for the listening socket, sent over the unix socket CTRL_FD
                                     (SCM_RIGHTS) the moment the benchmark opens it; then answer every
                                     connection with an SSH identification line at once and close it when
                                     its client does; exit when CTRL_FD closes
  stormpeer.py vm-fd FD              the same, on the already listening socket FD (inherited), until killed
  stormpeer.py clients HOST:PORT[,HOST:PORT...] N TIMEOUT
                                     open N connections at once (taking the addresses in turn), send an
                                     SSH identification on each, note
                                     (time.monotonic()) when the VM's line arrives on each; print
                                     {"banner_at": [...], "errors": [...]} as JSON once all arrived or
                                     TIMEOUT seconds passed
"""
import json
import selectors
import socket
import sys
import time

BANNER = b"SSH-2.0-OpenSSH_9.2p1 bench-vm\r\n"


def vm(ctrl_fd):
    ctrl = socket.socket(fileno=ctrl_fd)
    _, fds, _, _ = socket.recv_fds(ctrl, 16, 1)
    if fds:
        serve(socket.socket(fileno=fds[0]), ctrl)


def serve(listener, ctrl=None):
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    if ctrl:
        sel.register(ctrl, selectors.EVENT_READ, "ctrl")
    while True:
        for key, _ in sel.select():
            if key.data == "ctrl":
                return  # the benchmark closed its end: done
            if key.data == "accept":
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        conn.sendall(BANNER)
                    except OSError:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            try:
                if key.fileobj.recv(65536):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(key.fileobj)
            key.fileobj.close()


def clients(targets, n, timeout):
    sel = selectors.DefaultSelector()
    state = {}
    errors = []
    for i in range(n):
        host, port = targets[i % len(targets)]
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        state[sock] = b""
        sel.register(sock, selectors.EVENT_WRITE)
    banner_at, open_socks = [], list(state)
    deadline = time.monotonic() + timeout
    while state and time.monotonic() < deadline:
        for key, events in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    errors.append(f"connect: errno {error}")
                    sel.unregister(sock)
                    del state[sock]
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.send(b"SSH-2.0-bench\r\n")
                sel.modify(sock, selectors.EVENT_READ)
                continue
            try:
                chunk = sock.recv(4096)
            except OSError as e:
                chunk, error = b"", str(e)
            else:
                error = f"closed after {state[sock]!r}"
            if not chunk:
                errors.append(error)
                sel.unregister(sock)
                del state[sock]
                continue
            state[sock] += chunk
            if b"\n" in state[sock]:
                banner_at.append(time.monotonic())
                if not state[sock].startswith(BANNER):
                    errors.append(f"got {state[sock]!r}")
                sel.unregister(sock)
                del state[sock]
    if state:
        errors.append(f"{len(state)} without a line after {timeout} s")
    print(json.dumps({"banner_at": banner_at, "errors": errors}), flush=True)
    for sock in open_socks:
        sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "vm":
        vm(int(sys.argv[2]))
    elif sys.argv[1] == "vm-fd":
        serve(socket.socket(fileno=int(sys.argv[2])))
    else:
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[2].split(",")]
        clients(targets, int(sys.argv[3]), float(sys.argv[4]))
