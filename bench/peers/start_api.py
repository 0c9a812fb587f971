#!/usr/bin/python3
"""The benchmark's stand-in for an operator's VM start API: every POST is answered at once with
{"vm_ip": VM_IP}. The VM is already running (a warm VM), so this measures the proxies, not a boot.

Usage: start_api.py FD VM_IP   (FD: an already listening TCP socket, inherited from the benchmark)

HTTP/1.1 with Content-Length, so keep-alive clients may reuse the connection and one-shot clients
(ssh-on-demand, requests) may simply close it. Headers and body go out in one write, and Nagle is
off, so no answer ever waits for a delayed ACK.
"""
import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = ANSWER
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if self.close_connection else "")
            + "\r\n"
        ).encode()
        self.wfile.write(head + body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


if __name__ == "__main__":
    fd, vm_ip = int(sys.argv[1]), sys.argv[2]
    ANSWER = json.dumps({"vm_ip": vm_ip}).encode()
    server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    server.server_address = server.socket.getsockname()
    server.serve_forever(poll_interval=3600)
