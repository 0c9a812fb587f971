#!/usr/bin/python3
"""Both ends of the raw-TCP relay scenario: a "VM" that speaks like sshd only for its first line, then
sinks and sources bytes, and a client for it. No ssh cryptography in the path: what limits the transfer
is the relay between them.

  rawpeer.py vm FD                  serve the already listening socket FD (inherited) forever
  rawpeer.py client HOST PORT N     connect, exchange identification lines, print "ready", wait for a
                                    line on stdin, then send N bytes and receive N bytes at once; print
                                    {"seconds": ...} as JSON and keep the connection open until stdin closes

Both ends move bytes without copying them, in a process per direction: sendfile(2) from a file in memory
to the socket, and splice(2) from the socket through a pipe to /dev/null, so that the endpoints cost little
CPU next to the relay measured between them. A connection sends and receives exactly N bytes (N in its
first line from the client: "SSH-2.0-bench N\\r\\n").
"""
import fcntl
import json
import os
import socket
import sys
import threading
import time

CHUNK = 1 << 20
SOURCE_FILE = 8 << 20
F_SETPIPE_SZ = 1031


def pipe():
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    except OSError:
        pass
    return r, w


def source(sock, nbytes):
    """Sends nbytes: sendfile(2) from a file in memory, filled once, so each send hands the socket page
    references. Splicing from /dev/zero would not: Linux (6.18 here) splices it by zero-filling fresh pages
    (copy_splice_read), which cost the endpoints a quarter of two cores at these rates and hid the relay's
    share of the machine."""
    data = os.memfd_create("rawpeer-source")
    try:
        os.write(data, os.urandom(1 << 16) * (SOURCE_FILE // (1 << 16)))
        left = nbytes
        while left:
            offset = (nbytes - left) % SOURCE_FILE
            left -= os.sendfile(sock.fileno(), data, offset, min(left, SOURCE_FILE - offset))
    finally:
        os.close(data)


def sink(sock, nbytes):
    """Receives exactly nbytes: socket -> pipe -> /dev/null. Raises if the connection ends early."""
    r, w = pipe()
    null = os.open("/dev/null", os.O_WRONLY)
    try:
        left = nbytes
        while left:
            n = os.splice(sock.fileno(), w, min(left, CHUNK))
            if not n:
                raise EOFError(f"connection ended {left} bytes short")
            left -= n
            while n:
                n -= os.splice(r, null, n)
    finally:
        for fd in (r, w, null):
            os.close(fd)


def both_ways(sock, nbytes):
    """Sends in a child process while this one receives: as two threads of one interpreter, each system call's
    return would wait for the GIL the other thread holds."""
    pid = os.fork()
    if pid == 0:
        try:
            source(sock, nbytes)
            os._exit(0)
        except OSError as e:
            print(f"source: {e}", file=sys.stderr, flush=True)
            os._exit(1)
    try:
        sink(sock, nbytes)
    finally:
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("source failed")


def read_line(sock):
    """One line, byte by byte, so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise EOFError(f"closed after {line!r}")
        line += b
    return line


def serve_one(sock):
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"SSH-2.0-rawvm\r\n")
        try:
            words = read_line(sock).split()
            nbytes = int(words[1]) if len(words) > 1 else 0
            if nbytes:
                both_ways(sock, nbytes)
            while sock.recv(65536):
                pass
        except (OSError, EOFError, ValueError):
            pass


def vm(fd):
    listener = socket.socket(fileno=fd)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def client(host, port, nbytes):
    sock = socket.create_connection((host, port), timeout=60)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(f"SSH-2.0-bench {nbytes}\r\n".encode())
    line = read_line(sock)
    if not line.startswith(b"SSH-"):
        raise SystemExit(f"got {line!r} instead of an identification line")
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    both_ways(sock, nbytes)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    sys.stdin.read()
    sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "vm":
        vm(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
