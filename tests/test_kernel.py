"""The pure kernel, without services: backoff, error classification, the config
loader, the replication wire messages, feedback timing, failure verdicts."""

from __future__ import annotations

import itertools
import json
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import errors as pgerr
from pydantic import Field

from participants.outcome import Outcome, classify_failure
from relay import protocol
from relay.feedback import Feedback
from walsaga.config import Strict, load, write_toml
from walsaga.errors import (
    BusinessError,
    ConfigError,
    DecodeError,
    ErrorKind,
    PermanentError,
    SetupError,
    TransientError,
    classify,
    classify_sqlstate,
    from_psycopg,
)
from walsaga.logs import Repeats
from walsaga.retry import Backoff, BackoffPolicy

# -- backoff ----------------------------------------------------------------------


class Draws:
    """A random source that returns the given draws in turn."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


policies = st.builds(
    lambda min_s, factor, multiplier, jitter: BackoffPolicy(
        min_s=min_s, max_s=min_s * factor, multiplier=multiplier, jitter=jitter
    ),
    min_s=st.floats(min_value=0.001, max_value=5),
    factor=st.floats(min_value=1, max_value=1000),
    multiplier=st.floats(min_value=1, max_value=4),
    jitter=st.floats(min_value=0, max_value=1),
)


@settings(max_examples=200, deadline=None)
@given(
    policy=policies,
    draws=st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), min_size=12, max_size=12),
    reset_after=st.integers(min_value=1, max_value=6),
)
def test_backoff_grows_to_its_cap_with_jitter_below_each_step_and_resets(
    policy: BackoffPolicy, draws: list[float], reset_after: int
) -> None:
    tolerance = 1e-9 * policy.max_s
    steps = [policy.step(n) for n in range(1, 7)]
    assert steps[0] == pytest.approx(policy.min_s)
    assert all(b >= a for a, b in itertools.pairwise(steps)), "waits never shrink"
    assert all(s <= policy.max_s for s in steps)
    for n, s in enumerate(steps, start=1):
        assert s == pytest.approx(min(policy.max_s, policy.min_s * policy.multiplier ** (n - 1)))

    backoff = policy.backoff(Draws(draws))  # type: ignore[arg-type]
    delays = [backoff.next_delay() for _ in range(reset_after)]
    backoff.reset()
    delays += [backoff.next_delay() for _ in range(6)]
    failures = [*range(1, reset_after + 1), *range(1, 7)]
    for delay, n in zip(delays, failures, strict=True):
        step = policy.step(n)
        assert step * (1 - policy.jitter) - tolerance <= delay <= step + tolerance, (delay, n)
    # After the reset the waits start again from the shortest.
    assert delays[reset_after] <= policy.min_s + tolerance


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    backoff = Backoff(BackoffPolicy(min_s=0.1, max_s=1.0, jitter=0))
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_backoff_after_a_very_long_outage_is_the_cap() -> None:
    policy = BackoffPolicy(min_s=0.2, max_s=10, multiplier=3, jitter=0)
    assert policy.step(10_000) == 10
    assert policy.delay(10_000) == 10


def test_jitter_spreads_waits_across_the_range() -> None:
    policy = BackoffPolicy(min_s=1, max_s=1, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.delay(1, rng) for _ in range(200)]
    assert min(delays) >= 0.5 and max(delays) <= 1
    assert max(delays) - min(delays) > 0.4, "no spread: processes would retry together"


@pytest.mark.parametrize(
    "kwargs",
    [{"min_s": 0}, {"min_s": 2, "max_s": 1}, {"multiplier": 0.5}, {"jitter": 1.5}],
)
def test_backoff_policies_that_make_no_sense_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"min_s|multiplier|jitter"):
        BackoffPolicy(**kwargs)


# -- error classification ---------------------------------------------------------

TRANSIENT = ["08000", "08006", "08001", "40001", "40P01", "53300", "53200", "57P01", "57P03",
             "55P03", "57014"]  # fmt: skip
SETUP = ["42P01", "42501", "42883", "28P01", "28000", "3D000", "3F000", "58P01"]
PERMANENT = ["23505", "23503", "22P02", "P0001", "55000", "57000", "XX000", "0A000"]


@pytest.mark.parametrize("sqlstate", TRANSIENT)
def test_lost_connections_conflicts_and_busy_servers_are_transient(sqlstate: str) -> None:
    assert classify_sqlstate(sqlstate) is ErrorKind.TRANSIENT


@pytest.mark.parametrize("sqlstate", SETUP)
def test_privileges_credentials_and_missing_objects_need_a_person(sqlstate: str) -> None:
    assert classify_sqlstate(sqlstate) is ErrorKind.SETUP


@pytest.mark.parametrize("sqlstate", PERMANENT)
def test_other_server_errors_are_permanent(sqlstate: str) -> None:
    assert classify_sqlstate(sqlstate) is ErrorKind.PERMANENT


@pytest.mark.parametrize("sqlstate", [None, ""])
def test_an_error_without_sqlstate_is_permanent_by_code(sqlstate: str | None) -> None:
    assert classify_sqlstate(sqlstate) is ErrorKind.PERMANENT


def test_business_refusals_are_class_ws_and_the_codes_a_participant_lists() -> None:
    assert classify_sqlstate("WS001") is ErrorKind.BUSINESS
    assert classify_sqlstate("WS999") is ErrorKind.BUSINESS
    assert classify_sqlstate("P0001") is ErrorKind.PERMANENT
    assert classify_sqlstate("P0001", business=frozenset({"P0001"})) is ErrorKind.BUSINESS
    assert classify_sqlstate("23505", business=frozenset({"P0001"})) is ErrorKind.PERMANENT


def test_psycopg_errors_are_classified_by_their_sqlstate() -> None:
    assert classify(pgerr.SerializationFailure()) is ErrorKind.TRANSIENT
    assert classify(pgerr.DeadlockDetected()) is ErrorKind.TRANSIENT
    assert classify(pgerr.lookup("57P01")("terminating connection")) is ErrorKind.TRANSIENT
    assert classify(pgerr.QueryCanceled()) is ErrorKind.TRANSIENT
    assert classify(pgerr.UndefinedTable()) is ErrorKind.SETUP
    assert classify(pgerr.InsufficientPrivilege()) is ErrorKind.SETUP
    assert classify(pgerr.UniqueViolation()) is ErrorKind.PERMANENT
    assert classify(psycopg.InterfaceError("the connection is closed")) is ErrorKind.PERMANENT
    # The SQLSTATE decides, whatever the message says.
    assert classify(pgerr.AdminShutdown("certificate")) is ErrorKind.TRANSIENT


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "db" failed: FATAL:  password authentication failed for user "a"',
        "connection to server failed: fe_sendauth: no password supplied",
        'connection to server at "db" failed: FATAL:  database "shop" does not exist',
        'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "a", no encryption',
        "SSL error: certificate verify failed",
        "server does not support SSL, but SSL was required",
        'invalid sslmode value: "sometimes"',
        "SSL error: tlsv1 alert unknown ca",
    ],
)  # fmt: skip
def test_connection_failures_that_waiting_cannot_fix_need_a_person(message: str) -> None:
    assert classify(psycopg.OperationalError(message)) is ErrorKind.SETUP


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "db" (10.0.0.2), port 5432 failed: Connection refused',
        "server closed the connection unexpectedly",
        "connection timeout expired",
        'could not translate host name "db" to address: Name or service not known',
    ],
)
def test_connection_failures_that_may_pass_are_transient(message: str) -> None:
    assert classify(psycopg.OperationalError(message)) is ErrorKind.TRANSIENT


def test_psycopg_errors_become_walsaga_errors_that_keep_the_diagnosis() -> None:
    transient = from_psycopg(pgerr.SerializationFailure("could not serialize"), "orders")
    assert isinstance(transient, TransientError)
    assert str(transient) == "orders: could not serialize"
    assert isinstance(from_psycopg(pgerr.UndefinedTable("no outbox"), "x"), SetupError)
    assert type(from_psycopg(pgerr.UniqueViolation("dup"), "x")) is PermanentError
    refused = pgerr.RaiseException("out of stock")
    refused.sqlstate = "WS001"
    business = from_psycopg(refused, "x")
    assert isinstance(business, BusinessError)
    assert (business.reason, business.code) == ("out of stock", "WS001")


# -- configuration ----------------------------------------------------------------


class Settings(Strict):
    name: str = "svc"
    password: str | None = None
    port: int = Field(default=9108, ge=0, le=65535)
    ratio: float = 0.5
    enabled: bool = False
    codes: list[str] = Field(default_factory=list)


class Source(Strict):
    name: str
    dsn: str
    tags: list[str] = Field(default_factory=list)


class AppConfig(Strict):
    kafka: dict[str, Any] = Field(default_factory=dict)
    app: Settings = Field(default_factory=Settings)
    source: list[Source] = Field(default_factory=list)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_toml(
        tmp_path / "app.toml",
        {
            "kafka": {"bootstrap.servers": "file:9092"},
            "app": {"name": "from-file"},
            "source": [{"name": "customers", "dsn": "host=a"}, {"name": "Orders", "dsn": "host=b"}],
        },
    )


def test_environment_values_stay_text_unless_the_schema_wants_otherwise(config_file: Path) -> None:
    config = load(
        config_file,
        AppConfig,
        environ={
            "WALSAGA_APP__NAME": "123",
            "WALSAGA_APP__PASSWORD": "2024-01-01",
            "WALSAGA_APP__PORT": "9200",
            "WALSAGA_APP__RATIO": "0.25",
            "WALSAGA_APP__ENABLED": "true",
            "WALSAGA_APP__CODES": '["P0001", "WS001"]',
        },
    )
    assert config.app.name == "123"
    assert config.app.password == "2024-01-01"
    assert config.app.port == 9200
    assert config.app.ratio == 0.25
    assert config.app.enabled is True
    assert config.app.codes == ["P0001", "WS001"]


@pytest.mark.parametrize("text", ['["a", "b"]', "['a', 'b']", '[ "a" ,"b" ]'])
def test_lists_from_the_environment_are_written_as_toml_or_json(text: str) -> None:
    config = load(None, AppConfig, environ={"WALSAGA_APP__CODES": text})
    assert config.app.codes == ["a", "b"]


@pytest.mark.parametrize("text", ["[1, 2]", '{"a": 1}', "true", "P0001", "[not toml"])
def test_text_fields_keep_what_looks_like_a_list_or_a_number(text: str) -> None:
    config = load(None, AppConfig, environ={"WALSAGA_APP__PASSWORD": text})
    assert config.app.password == text


def test_kafka_settings_pass_through_as_text_with_dots(config_file: Path) -> None:
    config = load(
        config_file,
        AppConfig,
        environ={
            "WALSAGA_KAFKA__BOOTSTRAP_SERVERS": "env:9092",
            "WALSAGA_KAFKA__LINGER_MS": "5",
        },
    )
    assert config.kafka == {"bootstrap.servers": "env:9092", "linger.ms": "5"}


def test_an_element_of_an_array_of_tables_is_picked_by_name(config_file: Path) -> None:
    config = load(
        config_file,
        AppConfig,
        environ={
            "WALSAGA_SOURCE__CUSTOMERS__DSN": "host=c",
            "WALSAGA_SOURCE__ORDERS__TAGS": '["eu"]',
        },
    )
    assert [(s.name, s.dsn, s.tags) for s in config.source] == [
        ("customers", "host=c", []),
        ("Orders", "host=b", ["eu"]),
    ]
    with pytest.raises(ConfigError, match=r"WALSAGA_SOURCE__NOBODY__DSN: no \[\[source\]\] named"):
        load(config_file, AppConfig, environ={"WALSAGA_SOURCE__NOBODY__DSN": "x"})


def test_other_programs_variables_are_left_alone(config_file: Path) -> None:
    config = load(
        config_file,
        AppConfig,
        environ={"WALSAGA_RELAY__HTTP_PORT": "x", "WALSAGA_DSN": "y", "OTHER__X": "z"},
    )
    assert config.app.port == 9108


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("WALSAGA_APP__PORT", "lots", "app.port"),
        ("WALSAGA_APP__PORT", "70000", "app.port"),
        ("WALSAGA_APP__ENABLED", "perhaps", "app.enabled"),
        ("WALSAGA_APP__CODES", "P0001", "app.codes"),
        ("WALSAGA_SOURCE__CUSTOMERS__TAGS", "eu", "source['customers'].tags"),
        ("WALSAGA_APP__PROT", "1", "app.prot"),
    ],
)
def test_a_bad_environment_value_names_its_variable_and_key(
    config_file: Path, var: str, value: str, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(config_file, AppConfig, environ={var: value})
    assert str(caught.value).startswith(f"{config_file}: {key} (from {var}): ")


def test_a_bad_file_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", {"app": {"port": "lots", "nmae": "x"}})
    with pytest.raises(ConfigError) as caught:
        load(path, AppConfig, environ={})
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "app.port: " in message
    assert "app.nmae: unknown key" in message
    assert "(from" not in message


def test_a_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml", AppConfig, environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[app\n")
    with pytest.raises(ConfigError, match=f"{broken}: not valid TOML"):
        load(broken, AppConfig, environ={})


# -- the replication wire protocol --------------------------------------------------

lsns = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=200, deadline=None)
@given(lsn=lsns, clock=st.integers(min_value=0, max_value=2**63 - 1))
def test_a_standby_status_update_round_trips(lsn: int, clock: int) -> None:
    message = protocol.standby_status(lsn, clock)
    assert protocol.parse_standby_status(message) == (lsn, lsn, lsn, clock, False)


def test_a_standby_status_update_is_laid_out_as_postgres_reads_it() -> None:
    message = protocol.standby_status(0x16_B374_D848, 0x0102_0304_0506_0708)
    lsn = (0x16_B374_D848).to_bytes(8, "big")
    assert message == b"r" + lsn * 3 + bytes(range(1, 9)) + b"\x00"
    assert len(message) == 34
    with pytest.raises(ValueError, match="not a standby status update"):
        protocol.parse_standby_status(b"k" + message[1:])


def test_the_clock_counts_from_postgres_epoch() -> None:
    assert protocol.pg_clock_us(946_684_800) == 0
    assert protocol.pg_clock_us(946_684_801.5) == 1_500_000
    assert abs(protocol.pg_clock_us() - protocol.pg_clock_us()) < 1_000_000


@settings(max_examples=200, deadline=None)
@given(wal_end=lsns, clock=st.integers(min_value=0, max_value=2**64 - 1), reply=st.booleans())
def test_a_keepalive_gives_the_wal_end_and_whether_to_answer(
    wal_end: int, clock: int, reply: bool
) -> None:
    data = b"k" + struct.pack(">QQB", wal_end, clock, reply)
    assert data[0] == protocol.PRIMARY_KEEPALIVE
    assert protocol.keepalive(data) == (wal_end, reply)
    assert protocol.keepalive(memoryview(data)) == (wal_end, reply)


@settings(max_examples=200, deadline=None)
@given(start=lsns, end=lsns, payload=st.binary(max_size=64))
def test_xlogdata_gives_its_start_and_the_plugin_bytes_follow(
    start: int, end: int, payload: bytes
) -> None:
    data = b"w" + struct.pack(">QQQ", start, end, 12345) + payload
    assert data[0] == protocol.XLOG_DATA
    assert protocol.xlogdata_start(data) == start
    assert protocol.xlogdata_start(memoryview(data)) == start
    assert data[protocol.XLOGDATA_PAYLOAD :] == payload


# -- when the relay reports its position ---------------------------------------------


def test_feedback_goes_out_at_once_when_the_server_asks() -> None:
    feedback = Feedback(sent_lsn=100, last_s=50.0, interval_s=1.0, status_interval_s=10.0)
    assert not feedback.due(50.0, 100)
    feedback.reply_requested = True
    assert feedback.due(50.0, 100)  # nothing new, no time passed: still due
    feedback.sent(100, 50.0)
    assert not feedback.reply_requested
    assert not feedback.due(50.0, 100)


def test_feedback_follows_a_moved_position_once_the_interval_passed() -> None:
    feedback = Feedback(sent_lsn=100, last_s=50.0, interval_s=1.0, status_interval_s=10.0)
    assert not feedback.due(50.5, 200), "moved, but the interval has not passed"
    assert feedback.due(51.0, 200)
    assert not feedback.due(51.0, 100), "the interval passed, but nothing moved"
    assert not feedback.due(51.0, 90)
    feedback.sent(200, 51.0)
    assert not feedback.due(51.5, 300)
    assert feedback.due(52.0, 300)


def test_feedback_goes_out_every_status_interval_whatever_happens() -> None:
    feedback = Feedback(sent_lsn=100, last_s=50.0, interval_s=1.0, status_interval_s=10.0)
    assert not feedback.due(59.9, 100)
    assert feedback.due(60.0, 100)
    feedback.sent(100, 60.0)
    assert not feedback.due(69.9, 100)
    assert feedback.due(70.0, 100)


@settings(max_examples=300, deadline=None)
@given(
    sent=st.integers(min_value=0, max_value=1000),
    confirmable=st.integers(min_value=0, max_value=1000),
    interval_s=st.floats(min_value=0.001, max_value=5),
    status_interval_s=st.floats(min_value=5, max_value=30),
    elapsed_s=st.floats(min_value=0, max_value=60),
    reply=st.booleans(),
)
def test_feedback_is_due_exactly_when_one_of_the_three_reasons_holds(
    sent: int,
    confirmable: int,
    interval_s: float,
    status_interval_s: float,
    elapsed_s: float,
    reply: bool,
) -> None:
    feedback = Feedback(sent, 100.0, interval_s, status_interval_s, reply)
    now = 100.0 + elapsed_s
    elapsed = now - 100.0  # as the float arithmetic has it
    expected = (
        reply or (confirmable > sent and elapsed >= interval_s) or elapsed >= status_interval_s
    )
    assert feedback.due(now, confirmable) is expected


# -- what becomes of a record whose handler failed -----------------------------------


def with_sqlstate(sqlstate: str, message: str = "refused") -> psycopg.Error:
    error = pgerr.RaiseException(message)
    error.sqlstate = sqlstate
    return error


def verdict(error: BaseException, attempts: int = 1, **kw: Any) -> Any:
    return classify_failure(error, attempts=attempts, max_attempts=3, **kw)


def test_a_business_error_becomes_a_failure_event_with_its_reason_and_code() -> None:
    result = verdict(BusinessError("out of stock", code="NO_STOCK"), attempts=99)
    assert (result.outcome, result.reason, result.code) == (
        Outcome.BUSINESS_FAILURE,
        "out of stock",
        "NO_STOCK",
    )


def test_a_ws_sqlstate_or_a_listed_one_becomes_a_failure_event() -> None:
    result = verdict(with_sqlstate("WS010", "negative amount"))
    assert (result.outcome, result.reason, result.code) == (
        Outcome.BUSINESS_FAILURE,
        "negative amount",
        "WS010",
    )
    listed = verdict(pgerr.CheckViolation("too big"), business_sqlstates=frozenset({"23514"}))
    assert (listed.outcome, listed.code) == (Outcome.BUSINESS_FAILURE, "23514")
    unlisted = verdict(pgerr.CheckViolation("too big"), business_sqlstates=frozenset({"P0001"}))
    assert unlisted.outcome is Outcome.RETRY


@pytest.mark.parametrize(
    "error", [PermanentError("bad input"), DecodeError("not JSON"), ConfigError("x")]
)
def test_a_permanent_error_is_dead_lettered_at_once(error: Exception) -> None:
    result = verdict(error, attempts=1)
    assert result.outcome is Outcome.DEAD_LETTER
    assert str(error) in result.reason


@settings(max_examples=200, deadline=None)
@given(
    sqlstate=st.sampled_from(TRANSIENT),
    attempts=st.integers(min_value=1, max_value=1000),
    max_attempts=st.integers(min_value=1, max_value=10),
)
def test_transient_errors_are_retried_and_never_dead_lettered(
    sqlstate: str, attempts: int, max_attempts: int
) -> None:
    result = classify_failure(
        pgerr.lookup(sqlstate)("busy"), attempts=attempts, max_attempts=max_attempts
    )
    assert result.outcome is Outcome.RETRY
    assert "busy" in result.reason


@pytest.mark.parametrize(
    "error",
    [RuntimeError("bug in the handler"), pgerr.UniqueViolation("dup"), pgerr.UndefinedTable("t")],
)
def test_other_errors_are_retried_then_dead_lettered_after_max_attempts(error: Exception) -> None:
    assert [verdict(error, attempts=n).outcome for n in (1, 2, 3, 4)] == [
        Outcome.RETRY,
        Outcome.RETRY,
        Outcome.DEAD_LETTER,
        Outcome.DEAD_LETTER,
    ]
    last = verdict(error, attempts=3)
    assert last.reason == f"failed 3 times: {type(error).__name__}: {error}"


def test_a_walsaga_transient_error_is_never_dead_lettered() -> None:
    assert verdict(TransientError("broker unreachable"), attempts=10).outcome is Outcome.RETRY


def test_a_lost_connection_without_sqlstate_is_never_dead_lettered() -> None:
    error = psycopg.OperationalError("server closed the connection unexpectedly")
    assert classify(error) is ErrorKind.TRANSIENT
    assert verdict(error, attempts=10).outcome is Outcome.RETRY


STOPPING_PROCESS = """
import threading, time
import structlog
from walsaga import logs
from walsaga.lifecycle import Shutdown

logs.configure("info", "json")
log = structlog.get_logger("walsaga.test")
shutdown = Shutdown(grace_s=10, name="test")

def chatter():  # a client abandoned in its thread, still talking
    while True:
        log.warning("still trying the broker")
        time.sleep(0.01)

threading.Thread(target=chatter, daemon=True).start()
time.sleep(0.1)
shutdown.request()
log.info("exited", shutdown_s=shutdown.done())
time.sleep(0.3)
"""


def test_a_stopped_process_says_exited_last_whatever_other_threads_still_log() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STOPPING_PROCESS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    assert "still trying the broker" in events, "the other thread logged before the stop"
    assert events[-1] == "exited"


def test_repeated_kafka_complaints_are_written_once_per_window_with_a_count() -> None:
    now = [0.0]
    repeats = Repeats(30, clock=lambda: now[0])
    refused = "127.0.0.1:{}/bootstrap: Connect failed: Connection refused (after {}ms)"
    assert repeats.admit(refused.format(9092, 0)) == 0
    for i in range(40):  # every 100 ms for 4 s, ports and timings varying
        now[0] += 0.1
        assert repeats.admit(refused.format(9092 + i % 3, i)) is None
    assert repeats.admit("Broker: Unknown topic or partition") == 0, "another message"
    now[0] = 31.0
    assert repeats.admit(refused.format(9092, 1)) == 40
    now[0] = 32.0
    assert repeats.admit(refused.format(9092, 1)) is None
