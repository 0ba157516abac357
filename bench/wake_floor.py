"""What waking up costs on this machine: the floor under CPU per saga at saga rates.

Every hop of a saga wakes several processes (the walsender, the relay, the
broker, a consumer, a handler's Postgres backend), and a process woken to do a
little work pays for the wake-up besides the work: the scheduler, the system
call that slept, caches that other processes emptied meanwhile. This script
measures that price in two forms, each at a paced rate (a wake-up per event)
beside the same work back to back (no sleep between):

1. a Python thread waiting on a socket (``selectors``, then ``recv``) for a
   small message another process sends at --rate per second, with and without
   a fixed piece of Python work per message: the reading thread's CPU per
   message;
2. one ``SELECT 1`` round trip with psycopg to a local Postgres cluster: the
   client's CPU and the backend's per statement.

    .venv/bin/python bench/wake_floor.py [--rate 200] [--seconds 5]

``bench/saga_bench.py`` prints how many wake-ups each process has per saga
(voluntary context switches); times the paced figures here, they give the
part of CPU per saga that is waking, not working.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from participants.examples.embedded import LocalPostgres

sys.path.insert(0, str(Path(__file__).parent))
from relay_bench import cpu_seconds

#: Bytes of each message.
MESSAGE = 300

#: Sends messages of argv[3] bytes on the socket of fd argv[2], argv[1] per
#: second, until killed.
SENDER = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[2]))
gap = 1 / float(sys.argv[1])
at = time.monotonic()
while True:
    at += gap
    time.sleep(max(0.0, at - time.monotonic()))
    sock.send(b"x" * int(sys.argv[3]))
"""


def work(data: bytes, size: int) -> int:
    """A fixed piece of Python work per message: builds and drops a small dict."""
    found = {}
    for i in range(size):
        found[i] = (data[:10], i * 2, str(i))
    return len(found)


def socket_wakeups(rate: float, seconds: float, size: int) -> tuple[float, float]:
    """(paced, back to back) CPU of the reading thread per message, in µs."""
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(rate), str(theirs.fileno()), str(MESSAGE)],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    selector = selectors.DefaultSelector()
    selector.register(mine, selectors.EVENT_READ)
    try:
        time.sleep(0.2)  # the sender's start-up
        with contextlib.suppress(BlockingIOError):
            mine.recv(1 << 20)  # what queued meanwhile
        n = 0
        cpu0, end = time.thread_time(), time.monotonic() + seconds
        while time.monotonic() < end:
            selector.select(0.05)
            try:
                data = mine.recv(65536)
            except BlockingIOError:
                continue
            for _ in range(len(data) // MESSAGE):
                work(data, size)
                n += 1
        paced = (time.thread_time() - cpu0) / max(n, 1) * 1e6
    finally:
        sender.kill()
        sender.wait()
        mine.close()
    # Back to back: messages already wait, the thread never sleeps (the sends
    # that queue them are left out of the time).
    a, b = socket.socketpair()
    a.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(a, selectors.EVENT_READ)
    cpu = 0.0
    batches = max(n // 100, 10)
    for _ in range(batches):
        for _ in range(100):
            b.send(b"x" * MESSAGE)
        cpu0 = time.thread_time()
        for _ in range(100):
            selector.select(0.05)
            work(a.recv(MESSAGE), size)
        cpu += time.thread_time() - cpu0
    a.close()
    b.close()
    return paced, cpu / (batches * 100) * 1e6


def round_trips(dsn: str, rate: float, seconds: float) -> dict[str, tuple[float, float]]:
    """Client and backend CPU per ``SELECT 1``, in µs: paced at `rate`, and back to back."""
    found = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.info.backend_pid
        for _ in range(200):
            conn.execute("SELECT 1")
        for label, gap in (("paced", 1 / rate), ("back to back", 0.0)):
            count = int(seconds * rate)
            client0, server0 = time.thread_time(), cpu_seconds(backend)
            at = time.monotonic()
            for _ in range(count):
                if gap:
                    at += gap
                    time.sleep(max(0.0, at - time.monotonic()))
                conn.execute("SELECT 1")
            found[label] = (
                (time.thread_time() - client0) / count * 1e6,
                (cpu_seconds(backend) - server0) / count * 1e6,
            )
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200, help="paced wake-ups per second")
    ap.add_argument("--seconds", type=float, default=5, help="length of each paced run")
    ap.add_argument("--work", type=int, default=50, help="size of the Python work per message")
    args = ap.parse_args()

    print(f"a Python thread woken by a socket, {args.rate:g} messages/s, {args.seconds:g} s each")
    rows = []
    for size in (0, args.work):
        paced, hot = socket_wakeups(args.rate, args.seconds, size)
        rows.append((f"select + recv{' + work' if size else ''}", paced, hot))
    with (
        tempfile.TemporaryDirectory(prefix="walsaga-wake-", dir="/tmp") as base,
        LocalPostgres(Path(base), durable=False) as pg,
    ):
        print(f"SELECT 1 round trips, {args.rate:g}/s, {args.seconds:g} s")
        trips = round_trips(pg.dsn(), args.rate, args.seconds)
    print()
    print(f"{'CPU per message (us)':44}{'paced':>10}{'back to back':>14}{'woken':>10}")
    for label, paced, hot in rows:
        print(f"{'  thread: ' + label:44}{paced:10.1f}{hot:14.1f}{paced - hot:10.1f}")
    for side, index in (("client (sleeps twice: pace, reply)", 0), ("backend", 1)):
        paced, hot = trips["paced"][index], trips["back to back"][index]
        print(f"{'  SELECT 1, ' + side:44}{paced:10.1f}{hot:14.1f}{paced - hot:10.1f}")
    print()
    print("'woken' is what a wake-up adds to the same work: the floor each process")
    print("pays per wake-up that bench/saga_bench.py counts.")


if __name__ == "__main__":
    main()
