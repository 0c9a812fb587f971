#!/usr/bin/python3
"""The benchmark's stand-in for an operator's VM start API: every POST is answered at once with
{"vm_ip": VM_IP}. The VM is already running (a warm VM), so this measures the proxies, not a boot.

Usage: start_api.py FD VM_IP [one-segment|split]   (FD: an already listening TCP socket, inherited)

HTTP/1.1 with Content-Length, so keep-alive clients may reuse the connection and one-shot clients may
simply close it. Two ways of writing the answer:

  one-segment  headers and body in one write, Nagle off: no answer ever waits for a delayed ACK.
  split        the way http.server is usually used (send_response, send_header, end_headers, then the
               body written apart), Nagle on as http.server leaves it: the headers go out as one segment,
               and the body waits until the client ACKs them. A client that reuses a keep-alive connection
               within ~40 ms of its previous answer delays that ACK (Linux's delayed ACK), so the answer
               waits for it. Operators write start APIs exactly like this; the README invites them to.
"""
import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OneSegment(BaseHTTPRequestHandler):
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


class Split(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    do_GET = do_POST

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


if __name__ == "__main__":
    fd, vm_ip = int(sys.argv[1]), sys.argv[2]
    handler = {"one-segment": OneSegment, "split": Split}[sys.argv[3] if len(sys.argv) > 3 else "one-segment"]
    ANSWER = json.dumps({"vm_ip": vm_ip}).encode()
    server = Server(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    server.server_address = server.socket.getsockname()
    server.serve_forever(poll_interval=3600)
