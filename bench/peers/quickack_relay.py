#!/usr/bin/python3
"""Experiment, not a product: the simplest correct relay (a thread per direction, half-close passed on)
that also ACKs at once. OpenSSH does not set TCP_NODELAY on non-interactive sessions, so during the
handshake ssh and sshd often hold a small packet (Nagle) until their previous one is ACKed, and the
receiver delays that ACK by up to 40 ms. A relay sits on both legs and can ACK immediately by
re-arming TCP_QUICKACK after every read. bench.py runs this only with --quickack-peer.

Usage: quickack_relay.py FD VM_IP   (FD: an already listening TCP socket, inherited from the benchmark)
"""
import socket
import sys
import threading


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client, vm_ip):
    with client, socket.create_connection((vm_ip, 22)) as vm:
        for sock in (client, vm):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        back = threading.Thread(target=pipe, args=(vm, client))
        back.start()
        pipe(client, vm)
        back.join()


def main():
    listener = socket.socket(fileno=int(sys.argv[1]))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, sys.argv[2]), daemon=True).start()


if __name__ == "__main__":
    main()
