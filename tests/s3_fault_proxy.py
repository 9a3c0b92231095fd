"""A loopback TCP proxy between an S3 client and the moto server that injects network faults.

Why a proxy and not stopping moto: stopping and restarting a ``ThreadedMotoServer`` on the same
port works (connections are refused meanwhile, and moto's state, held by the process, survives),
but it can only refuse whole requests at whatever moment the client happens to be in, which
races the client. The proxy breaks exactly the request a test names (by a byte pattern of its
request line), at an exact byte of its body, a counted number of times, so every run injects the
same fault; ``down()`` / ``up()`` give the refused-connection case on the proxy's port.

Faults:
- ``cut(pattern, after_body_bytes, times)``: the next ``times`` requests whose bytes contain
  ``pattern`` are forwarded up to ``after_body_bytes`` bytes past the end of their head, then
  both sides of the connection are reset (the server sees a truncated body, the client a dropped
  connection). ``after_body_bytes=None`` forwards the whole request and drops the response
  instead (the server did the work; the client cannot know).
- ``down()`` / ``up()``: no listener at all (connection refused), then the same port again.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class _Cut:
    pattern: bytes
    after_body_bytes: int | None
    times: int
    hits: int = 0


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees a reset, as when a server process dies."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.host, self.upstream_port = host, upstream_port
        self._lock = threading.Lock()
        self._cuts: list[_Cut] = []
        self.generation = 0  # bumped by down(): connections of an older one reset themselves
        self._listener: socket.socket | None = None
        self.port = 0
        self.connections = 0  # accepted so far (resets included)
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- fault control ----------------------------------------------------------------
    def cut(self, pattern: bytes, after_body_bytes: int | None = 0, times: int = 1) -> _Cut:
        rule = _Cut(pattern, after_body_bytes, times)
        with self._lock:
            self._cuts.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._cuts.clear()

    def down(self) -> None:
        """Stop listening and reset every open connection: the endpoint is gone."""
        if self._listener is not None:
            # shutdown() first: close() alone neither wakes the thread blocked in accept() nor
            # stops the kernel from queueing new connections on the socket.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        # Open connections see the new generation within one select() timeout and reset
        # themselves; wait that long so none outlives down().
        self.generation += 1
        time.sleep(0.2)

    def up(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.host, self.port))  # port 0 the first time, the same port after down()
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept_loop, args=(lst,), daemon=True).start()

    def close(self) -> None:
        self.down()

    # --- plumbing ---------------------------------------------------------------------
    def _accept_loop(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # listener closed by down()
            with self._lock:
                self.connections += 1
            try:
                server = socket.create_connection((self.host, self.upstream_port))
            except OSError:
                _abort(client)
                continue
            threading.Thread(target=_Connection(self, client, server).run, daemon=True).start()

    def _take_rule(self, data: bytes, new_from: int = 0) -> tuple[_Cut, int] | None:
        """The first armed rule whose pattern is in ``data`` and ends in its new bytes (from
        ``new_from``: a match wholly inside the already-forwarded tail belongs to an earlier
        request), and where; its count is used up."""
        with self._lock:
            for rule in self._cuts:
                if rule.hits < rule.times:
                    at = data.find(rule.pattern, max(0, new_from - len(rule.pattern) + 1))
                    if at >= 0:
                        rule.hits += 1
                        return rule, at
        return None


class _Connection:
    """One proxied connection, served by one thread: select() over both sockets, so a reset is
    always done by the thread that owns them (closing a socket another thread is blocked on does
    not reach the peer on Linux)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket):
        self.proxy, self.client, self.server = proxy, client, server
        self.generation = proxy.generation
        self.drop_response = False  # lose the server's next answer (the request was delivered)
        self.dead = False
        self.tail = b""  # last bytes already forwarded, so a pattern split across reads is found
        self.pending = b""  # bytes held back until a matched request's head is complete
        self.held: tuple[_Cut, int] | None = None
        self.cut_in: int | None = None  # request bytes still to forward before the reset

    def kill(self) -> None:
        self.dead = True
        _abort(self.client)
        _abort(self.server)

    def run(self) -> None:
        try:
            while not self.dead and self.generation == self.proxy.generation:
                ready, _, _ = select.select([self.client, self.server], [], [], 0.05)
                for sock in ready:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return self.kill()  # either side closed: HTTP keep-alive ends here
                    if sock is self.client:
                        self._from_client(chunk)
                    elif self.drop_response:
                        return self.kill()
                    else:
                        self.client.sendall(chunk)
                    if self.dead:
                        return
            self.kill()
        except OSError:
            self.kill()

    def _from_client(self, chunk: bytes) -> None:
        if self.cut_in is not None:  # inside a request that is to be cut
            if len(chunk) >= self.cut_in:
                self.server.sendall(chunk[:self.cut_in])
                return self.kill()
            self.server.sendall(chunk)
            self.cut_in -= len(chunk)
            return
        data = self.pending + chunk
        scan = self.tail + data
        hit = self.held if self.pending else self.proxy._take_rule(scan, new_from=len(self.tail))
        if hit is None:
            self.server.sendall(data)
            self.tail, self.pending = scan[-256:], b""
            return
        rule, at = hit
        head_end = scan.find(b"\r\n\r\n", at)
        if head_end < 0:
            self.held, self.pending = hit, data  # wait for the rest of the head
            return
        self.held, self.pending = None, b""
        body_start = head_end + 4 - len(self.tail)  # index into data
        if rule.after_body_bytes is None:
            self.drop_response = True
            self.server.sendall(data)
            self.tail = scan[-256:]
            return
        stop = body_start + rule.after_body_bytes
        if stop <= len(data):
            self.server.sendall(data[:stop])
            return self.kill()
        self.server.sendall(data)
        self.cut_in = stop - len(data)
