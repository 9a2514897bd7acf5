"""The hosts of a multi-instance training job wait for each other before they exit.

SageMaker's local mode runs a job's hosts with docker-compose's `--abort-on-container-exit`: the
first container to exit stops the others, whose programs then never finish. So every host runs
its own program to its end, then stays until each other host's program has ended too, and
exits with its own status (a failure stays the failing host's).

Each host answers on a TCP port while its job runs: a peer's line ``HOST STATE`` (``running`` or
``done CODE``) gets this host's line back. A host leaves once it knows every peer is done and
every peer knows it is done; a peer that cannot be reached for ``GIVE_UP`` seconds (gone without
a word) is left behind. Standard library only.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from . import contract

GIVE_UP = 600.0
POLL = 0.5


@dataclass
class Barrier:
    me: str
    peers: list
    port: int = contract.TRAINING_PEER_PORT
    code: int | None = None  # this host's program's status, once it ended
    done: dict = field(default_factory=dict)  # peer → its status
    told: set = field(default_factory=set)  # peers that know this host is done
    lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self) -> str:
        return "running" if self.code is None else f"done {self.code}"

    def heard(self, line: str) -> None:
        """A peer's line: record what it says of itself."""
        words = line.split()
        if len(words) == 3 and words[0] in self.peers and words[1] == "done":
            with self.lock:
                self.done[words[0]] = int(words[2]) if words[2].lstrip("-").isdigit() else 1

    # -- the server every host runs for the whole job

    def serve(self) -> socket.socket:
        server = socket.create_server(("", self.port), reuse_port=False)
        server.settimeout(1.0)
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return server

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            with connection:
                try:
                    connection.settimeout(5)
                    line = connection.makefile().readline()
                    self.heard(line)
                    with self.lock:
                        reply = f"{self.me} {self.state()}\n"
                        if self.code is not None and line.split()[:1] and \
                                line.split()[0] in self.peers:
                            self.told.add(line.split()[0])
                    connection.sendall(reply.encode())
                except OSError:
                    continue

    # -- after this host's program ended

    def ask(self, peer: str) -> bool:
        """Tell ``peer`` this host's state and hear its own; False when it cannot be reached."""
        try:
            with socket.create_connection((peer, self.port), timeout=5) as connection:
                connection.sendall(f"{self.me} {self.state()}\n".encode())
                reply = connection.makefile().readline()
        except OSError:
            return False
        self.heard(reply)
        with self.lock:
            self.told.add(peer)
        return True

    def finished(self) -> bool:
        with self.lock:
            return all(p in self.done and p in self.told for p in self.peers)

    def wait(self, code: int, say, clock=time.monotonic, sleep=time.sleep) -> dict:
        """Record this host's status and wait for the peers; their statuses."""
        with self.lock:
            self.code = code
        if self.peers:
            say(f"{self.me} done ({code}); waiting for {', '.join(self.peers)} to finish")
        last_heard = {peer: clock() for peer in self.peers}
        while not self.finished():
            for peer in self.peers:
                with self.lock:
                    settled = peer in self.done and peer in self.told
                if settled:
                    continue
                if self.ask(peer):
                    last_heard[peer] = clock()
                elif peer in self.done:
                    with self.lock:
                        self.told.add(peer)  # it heard us before it left, or it never will
                elif clock() - last_heard[peer] > GIVE_UP:
                    say(f"{peer} has not answered for {GIVE_UP:.0f} s: not waiting for it")
                    with self.lock:
                        self.done[peer] = -1
                        self.told.add(peer)
            if not self.finished():
                sleep(POLL)
        return dict(self.done)
