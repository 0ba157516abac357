"""Helpers the integration tests share: relay processes, consumers, event writers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from participants.examples.embedded import free_port
from walsaga.config import write_toml

WALSAGA = str(Path(sys.executable).parent / "walsaga")


def wait_until(
    predicate: Any,
    *,
    timeout_s: float,
    interval_s: float = 0.05,
    what: str | Callable[[], str] = "",
) -> Any:
    """Poll `predicate` until it holds; `what` (or a function giving it, called
    only on timeout: a log read then, not when the wait began) names it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s}s waiting for {said or predicate}")
        time.sleep(interval_s)


def own_group(bootstrap: str, name: str, topics: Iterable[str]) -> str:
    """A consumer group for service `name` that no other test uses, started at
    the end of `topics`.

    On the shared broker a group is only as healthy as its last member's exit:
    a consumer stopped (or killed) while it joins can leave the embedded
    broker's group unable to assign partitions to anyone after it, so every
    test's services join groups of their own.
    """
    group = f"{name}.{uuid.uuid4().hex[:8]}"
    start_at_the_end(bootstrap, group, topics)
    return group


def join_own_group(participant: Any, groups: dict[str, str], bootstrap: str) -> None:
    """Have `participant` consume in the group `groups` holds for its name: one
    of its test's own (:func:`own_group`), the same each time it starts again."""
    if participant.name not in groups:
        groups[participant.name] = own_group(bootstrap, participant.name, participant.topics)
    participant.kafka = {**participant.kafka, "group.id": groups[participant.name]}


def start_at_the_end(bootstrap: str, group: str, topics: Iterable[str]) -> None:
    """Commit `group`'s offsets at the end of each of `topics` that exists.

    Tests share one broker and the examples' fixed topic names: a consumer
    group started afresh would read every record earlier tests left there (and
    a group name an earlier test used, the ones it had not committed). Started
    here, the group sees only what is written from now on.

    The end is found by reading, not asked for: the embedded broker answers a
    request for a partition's end offset with the first offset of its last
    record batch plus one, which can lie inside that batch. Reading from just
    before it runs to the true end (the fetch's end of partition is right).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        existing = consumer.list_topics(timeout=10).topics
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            if topic not in existing:
                continue
            for partition in existing[topic].partitions:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
                ends[topic, partition] = high
        unread = {tp for tp, high in ends.items() if high > 0}
        consumer.assign([TopicPartition(t, p, max(ends[t, p] - 1, 0)) for t, p in unread])
        deadline = time.monotonic() + 30
        while unread and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            at = (msg.topic(), msg.partition())
            error = msg.error()
            if error is None:
                ends[at] = max(ends[at], msg.offset() + 1)
            elif error.code() == KafkaError._PARTITION_EOF:
                ends[at] = max(ends[at], msg.offset())
                unread.discard(at)
        assert not unread, f"could not read to the end of {sorted(unread)}"
        if ends:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                asynchronous=False,
            )
    finally:
        consumer.close()


def wait_all_assigned(participants: dict[str, Any], threads: dict[str, Any]) -> None:
    """Wait until every participant running in `threads` has partitions (or died)."""
    for name, participant in participants.items():
        wait_until(
            lambda p=participant, n=name: p.ready.is_set() or not threads[n].is_alive(),
            timeout_s=60,
            what=f"{name} assigned partitions",
        )
        assert threads[name].is_alive(), f"{name} stopped"


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 4) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for future in futures.values():
        with contextlib.suppress(Exception):  # already exists
            future.result(30)


def relay_toml(
    path: Path,
    *,
    bootstrap: str,
    sources: dict[str, str],
    http_port: int | None = None,
    relay: dict[str, Any] | None = None,
    kafka: dict[str, Any] | None = None,
) -> Path:
    data: dict[str, Any] = {
        "kafka": {"bootstrap.servers": bootstrap, **(kafka or {})},
        "relay": {
            "http_port": http_port if http_port is not None else 0,
            "http_host": "127.0.0.1",
            **(relay or {}),
        },
    }
    if sources:
        data["source"] = [{"name": name, "dsn": dsn} for name, dsn in sources.items()]
    return write_toml(path, data)


@dataclass
class RelayProcess:
    """`walsaga relay --config` in a subprocess, with its log captured to a file."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    http_port: int = 0

    @classmethod
    def start(
        cls, tmp: Path, *, bootstrap: str, sources: dict[str, str], name: str = "relay", **kw: Any
    ) -> RelayProcess:
        port = free_port()
        config = relay_toml(
            tmp / f"{name}.toml", bootstrap=bootstrap, sources=sources, http_port=port, **kw
        )
        rp = cls(config, tmp / f"{name}.log", http_port=port)
        rp.launch()
        return rp

    def launch(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [WALSAGA, "relay", "--config", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        out.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=2
            ) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            return json.loads(e.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as r:
            return r.read().decode()

    def published(self, source: str) -> float:
        """The relay's count of events Kafka acknowledged for `source`."""
        for line in self.metrics().splitlines():
            if line.startswith(f'walsaga_relay_events_published_total{{source="{source}"}} '):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def state(self, source: str) -> str | None:
        report = self.health()
        if not report:
            return None
        return report["sources"].get(source, {}).get("state")  # type: ignore[no-any-return]

    def wait_streaming(self, source: str, timeout_s: float = 30) -> None:
        wait_until(
            lambda: self.state(source) == "streaming",
            timeout_s=timeout_s,
            what=lambda: f"relay streaming {source}; log:\n{self.read_log()[-3000:]}",
        )

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def consumer(bootstrap: str, topics: list[str], **extra: Any) -> Consumer:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 50,
            **extra,
        }
    )
    c.subscribe(topics)
    return c


def consume(
    bootstrap: str, topics: list[str], *, until: Any, timeout_s: float = 60
) -> list[Message]:
    """Read `topics` from the start until ``until(records)`` is true or the time runs out."""
    c = consumer(bootstrap, topics)
    records: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(records):
            for msg in c.consume(5000, 0.2):
                err = msg.error()
                if err is None:
                    records.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(f"consumer error: {err}")
    finally:
        c.close()
    return records


def headers_of(msg: Message) -> dict[str, str]:
    return {k: (v.decode() if v is not None else "") for k, v in (msg.headers() or [])}


def write_events(
    dsn: str,
    count: int,
    *,
    aggregatetype: str = "order",
    aggregates: int = 50,
    per_txn: int = 10,
    start: int = 0,
) -> list[str]:
    """Publish `count` events through walsaga.publish; return their ids in commit order.

    Payload ``{"n": i, "agg": aggregate}`` numbers the events so per-aggregate
    order can be checked.
    """
    ids: list[str] = []
    with psycopg.connect(dsn) as conn:
        for first in range(start, start + count, per_txn):
            with conn.transaction():
                for i in range(first, min(first + per_txn, start + count)):
                    agg = f"a{i % aggregates}"
                    row = conn.execute(
                        "SELECT walsaga.publish(%s, %s, 'Counted', %s::jsonb, %s::jsonb)",
                        (aggregatetype, agg, json.dumps({"n": i, "agg": agg}), '{"saga_id": "s"}'),
                    ).fetchone()
                    assert row is not None
                    ids.append(str(row[0]))
    return ids


@contextlib.contextmanager
def background_writer(dsn: str, **kw: Any) -> Iterator[list[str]]:
    """Write events in a thread until the block ends; the list fills with their ids."""
    import threading

    ids: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        n = kw.pop("start", 0)
        try:
            while not stop.is_set():
                ids.extend(write_events(dsn, 50, start=n, **kw))
                n += 50
                time.sleep(0.01)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield ids
    finally:
        stop.set()
        thread.join(30)
    if errors:
        raise errors[0]
