"""What a participant's batch costs per record: the customer service's declared handler.

On its own durable Postgres cluster with the customer service's schema, capture
and 1,000 customers (``participants/examples/customers``), the service's
declared participant is handed batches of ``ReserveCredit`` commands the way
its consumer hands them over (no broker: the figures are the handling's
alone), each with a trace context as the relay's events carry. Every
--refuse-every-th command names a customer that does not exist, which the
procedure refuses (0: none). Prints, per record, the participant's CPU (its
thread), its backend's CPU and the wall time, and how many batches were
handled again after a record failed without its savepoint.

With builds (``NAME=CHECKOUT``, a checkout with its own ``.venv``), each round
runs every build in turn over the same database, in alternating order:

    .venv/bin/python bench/batch_bench.py [--size 10] [--batches 200] [--rounds 2]
        [--refuse-every 0] [now=. before=../baseline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

#: Customers the commands spread over, each with credit enough for every run.
CUSTOMERS = 1000


def measure(dsn: str, size: int, batches: int, refuse_every: int) -> dict[str, float]:
    """Handle the batches in this process; what they cost per record."""
    import structlog

    from participants import declarative
    from participants.examples import customers
    from participants.message import Message

    sys.path.insert(0, str(Path(__file__).parent))
    from relay_bench import cpu_seconds

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    name = f"bench-{uuid.uuid4().hex[:6]}"
    # The broker is never contacted: handle() is given the records directly.
    participant = declarative.build(customers.config(dsn, "127.0.0.1:9", name=name))

    def batch(b: int) -> list[Message]:
        records = []
        for i in range(size):
            n = b * size + i
            refused = refuse_every and n % refuse_every == 0
            customer = "nobody" if refused else f"c{n % CUSTOMERS}"
            value = {"customer_id": customer, "order_id": f"{name}-{n}", "total": 1}
            message = Message(
                topic="customer-commands",
                partition=0,
                offset=n,
                key=value["order_id"],
                value=json.dumps(value).encode(),
                headers={"id": str(uuid.uuid4()), "type": "ReserveCredit",
                         "traceparent": TRACEPARENT},
            )  # fmt: skip
            records.append(message)
        return records

    for b in range(20):  # warm-up: connection, prepared statements
        participant.handle(batch(-b - 1))
    backend = participant._connection().info.backend_pid
    client0, server0, wall0 = time.thread_time(), cpu_seconds(backend), time.perf_counter()
    for b in range(batches):
        participant.handle(batch(b))
    records = size * batches
    redone = participant.metrics.registry.get_sample_value(
        "walsaga_participant_batches_redone_total", {"participant": name}
    )
    return {
        "client_us": (time.thread_time() - client0) / records * 1e6,
        "backend_us": (cpu_seconds(backend) - server0) / records * 1e6,
        "wall_us": (time.perf_counter() - wall0) / records * 1e6,
        "redone": redone or 0.0,
    }


def build(text: str) -> tuple[str, Path]:
    name, sep, checkout = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKOUT, got {text!r}")
    python = Path(checkout).resolve() / ".venv" / "bin" / "python"
    if not python.exists():
        raise argparse.ArgumentTypeError(f"{python} does not exist")
    return name, Path(checkout).resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="*", type=build, metavar="NAME=CHECKOUT")
    ap.add_argument("--size", type=int, default=10, help="records per batch")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--refuse-every", type=int, default=0, help="refuse every Nth record")
    ap.add_argument("--measure", metavar="DSN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.size, args.batches, args.refuse_every)))
        return

    from participants.examples import customers
    from participants.examples.embedded import LocalPostgres

    builds = args.builds or [("this", Path(__file__).resolve().parent.parent)]
    refusing = f"every {args.refuse_every}th" if args.refuse_every else "none"
    print(f"batches of {args.size}, {args.batches} per run, refusing {refusing}")
    print(f"{'':14}{'client us':>11}{'backend us':>12}{'wall us':>10}{'redone':>8}  (per record)")
    with (
        tempfile.TemporaryDirectory(prefix="walsaga-batch-", dir="/tmp") as base,
        LocalPostgres(Path(base), durable=True) as pg,
    ):
        dsn = pg.create_database("customers")
        with psycopg.connect(dsn) as conn:
            customers.install(conn, {f"c{i}": 1e9 for i in range(CUSTOMERS)})
        for r in range(args.rounds):
            for name, checkout in builds if r % 2 == 0 else builds[::-1]:
                out = subprocess.run(
                    [str(checkout / ".venv" / "bin" / "python"), __file__, "--measure", dsn,
                     "--size", str(args.size), "--batches", str(args.batches),
                     "--refuse-every", str(args.refuse_every)],
                    cwd=checkout, capture_output=True, text=True, check=True,
                )  # fmt: skip
                f = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {r} {name:7}{f['client_us']:11.1f}{f['backend_us']:12.1f}"
                      f"{f['wall_us']:10.1f}{f['redone']:8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
