"""Serves ClickHouse 26.9 from PyPI's `chdb-core` on 127.0.0.1 (the local stack's server).

`chdb-core` is the ClickHouse engine built as one shared library. Its clickhouse-local entry
point can serve the real HTTP and native protocols: `SYSTEM START LISTEN QUERIES ALL`
starts the listeners configured in `config.xml` of the working directory, and they live as
long as the query that started them runs. So this launcher keeps one sleeping query
running and ends it (`KILL QUERY`, over its own HTTP port) on SIGTERM/SIGINT, after which
the engine shuts down and the process exits 0. Facts behind this recipe:
`shared/notes/services.md`, "ClickHouse 26.9 as a server".

Usage (deploy/local/lib.sh runs it): python serve.py WORKDIR
WORKDIR holds config.xml (ports, logger, users_config, query_log) and users.xml; data lives
in WORKDIR/data, so it survives restarts.

Do not `import chdb` here: that starts an embedded engine first, after which the
clickhouse-local entry point fails ("EventNotifier is initialized twice").
"""

import ctypes
import importlib.util
import os
import re
import signal
import sys
import threading
import urllib.request

# The query that keeps the listeners alive: one row a second, for as long as it is not killed.
HOLD = (
    "SYSTEM START LISTEN QUERIES ALL; "
    "SELECT count() FROM system.numbers WHERE sleepEachRow(1) = 0 SETTINGS max_block_size = 1"
)
KILL = "KILL QUERY WHERE query LIKE '%sleepEachRow%' AND query NOT LIKE 'KILL%' SYNC"


def load_engine():
    spec = importlib.util.find_spec("chdb")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("serve.py: chdb-core is not installed in this Python (run deploy/local/up)")
    so = os.path.join(spec.submodule_search_locations[0], "_chdb.abi3.so")
    # As chdb's own __init__ does: load the library with RTLD_DEEPBIND first so that its
    # pybind11 stubs resolve operator new/delete from the engine's jemalloc.
    ctypes.CDLL(so, mode=sys.getdlopenflags() | os.RTLD_DEEPBIND)
    module_spec = importlib.util.spec_from_file_location("_chdb", so)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def http_port(config_path):
    with open(config_path, encoding="utf-8") as f:
        found = re.search(r"<http_port>(\d+)</http_port>", f.read())
    if not found:
        sys.exit(f"serve.py: no <http_port> in {config_path}")
    return int(found.group(1))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: serve.py WORKDIR")
    workdir = os.path.abspath(sys.argv[1])
    os.chdir(workdir)  # clickhouse-local reads ./config.xml as its configuration
    port = http_port("config.xml")
    engine = load_engine()

    outcome = {}

    def hold():
        try:
            outcome["result"] = engine.query(HOLD, "TabSeparated", path=os.path.join(workdir, "data"))
        except Exception as e:  # the engine raises on a bad config, a taken port, ...
            outcome["error"] = e

    server = threading.Thread(target=hold, name="clickhouse", daemon=True)
    server.start()

    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # The main thread waits in short steps so that Python runs the signal handler promptly.
    while server.is_alive() and not stopping.is_set():
        server.join(0.2)

    if stopping.is_set() and server.is_alive():
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=KILL.encode())
            urllib.request.urlopen(req, timeout=30).read()
        except OSError as e:
            print(f"serve.py: could not end the serving query: {e}", file=sys.stderr)
            os._exit(1)
        server.join(30)
        print("serve.py: stopped", file=sys.stderr)
        return 0

    # The serving query ended without being asked to: the server failed.
    error = outcome.get("error") or "the serving query ended on its own"
    print(f"serve.py: ClickHouse stopped: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
