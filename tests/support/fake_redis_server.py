"""fakeredis's TCP server as its own process, for multi-process tests: ``--port N``.

The server's accepted sockets get TCP_NODELAY: without it, the several small replies of a
pipeline meet Nagle's algorithm and the client's delayed ACK, and every pipeline takes ~40 ms.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import Any

from fakeredis import TcpFakeServer


class NoDelayServer(TcpFakeServer):
    """TcpFakeServer whose connections send each reply at once."""

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = NoDelayServer(("127.0.0.1", args.port), server_type="redis", server_version=(7, 4))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
