"""A TCP proxy on loopback that can go silent: while frozen it forwards nothing in either direction but keeps
every connection open, so each end sees a healthy TCP connection that carries nothing (a half-open link,
as a stuck middlebox or a frozen VM makes)."""

from __future__ import annotations

import socket
import threading


class FreezableProxy:
    """`upstream_budget`: forward at most this many bytes from each client to the target, then hold the rest
    (the client's message stays half-sent, its connection open), as a client that stops mid-message does."""

    def __init__(self, target: tuple[str, int], upstream_budget: int | None = None) -> None:
        self.target = target
        self.upstream_budget = upstream_budget
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self._closed.set()
        self.flowing.set()
        for s in [self.listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for a, b, budget in ((client, upstream, self.upstream_budget), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, budget), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int | None = None) -> None:
        while not self._closed.is_set():
            if budget is not None and budget <= 0:  # spent: read nothing more, keep both ends open
                self._closed.wait()
                return
            try:
                data = src.recv(65536 if budget is None else min(65536, budget))
            except OSError:
                return
            if not data:
                return
            if budget is not None:
                budget -= len(data)
            while not self.flowing.wait(0.5):  # frozen: hold the bytes, keep both connections open
                if self._closed.is_set():
                    return
            try:
                dst.sendall(data)
            except OSError:
                return
