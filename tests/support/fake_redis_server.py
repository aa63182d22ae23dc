"""fakeredis's TCP server as its own process, for multi-process tests: ``--port N``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from fakeredis import TcpFakeServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = TcpFakeServer(("127.0.0.1", args.port), server_type="redis", server_version=(7, 4))
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
