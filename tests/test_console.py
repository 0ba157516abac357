"""The web console in a real browser (Debian's chromium, driven by Playwright), over a real
tracker, orchestrator, relay and broker: the saga list, a saga's page and its diagram, a
retry of a FAILED saga from its button, the relay page; and the refusals (bad token,
missing CSRF token, unknown saga, read-only console) over plain HTTP.

Screenshots are saved under ``$WALSAGA_TEST_ARTIFACTS/console`` (default
``.walsaga/test-artifacts/console`` in the checkout); the path is printed at the end
of the run.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.support import wait_until
from tests.tracker_support import (
    ConsoleProcess,
    Vault,
    running_tracker,
    running_vault,
    tracked,
    vault_config,
)
from walsaga.tracing import TraceContext

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = (
    Path(os.environ.get("WALSAGA_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent
                        / ".walsaga" / "test-artifacts")) / "console"
)  # fmt: skip


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    assert CHROMIUM.exists(), "no /usr/bin/chromium: run scripts/setup.sh (apt: chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"console screenshots: {ARTIFACTS}")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    found = context.new_page()
    found.set_default_timeout(20_000)
    try:
        yield found
    finally:
        context.close()


def shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def vault(
    tmp_path: Path, make_database: Any, broker: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Vault]:
    with running_vault(tmp_path, make_database, broker, monkeypatch) as found:
        yield found


TOKEN = secrets.token_urlsafe(24)


def test_list_saga_and_retry_a_failed_saga_from_its_button(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault, page: Any
) -> None:
    assert vault.relay is not None
    relay_url = f"http://127.0.0.1:{vault.relay.http_port}/healthz"
    config = vault_config(
        tmp_path, make_database, broker, vault,
        relay_sources=[{"name": "sagas", "dsn": vault.saga_dsn, "relay_urls": [relay_url]},
                       {"name": "vault", "dsn": vault.vault_dsn, "relay_urls": [relay_url]}],
    )  # fmt: skip
    jammed, fine = f"jammed-{uuid.uuid4().hex[:6]}", f"fine-{uuid.uuid4().hex[:6]}"
    vault.refusals[jammed] = 1000  # its compensation keeps failing
    vault.checks[fine] = "ok"
    trace = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    with running_tracker(config) as tracker:
        vault.begin(fine)
        vault.begin(jammed, trace=trace)
        vault.wait_status(jammed, "FAILED")
        vault.wait_status(fine, "COMPLETED")
        dsn = tracker.config.tracker.dsn
        wait_until(lambda: (tracked(dsn, jammed) or {}).get("status") == "FAILED"
                   and (tracked(dsn, fine) or {}).get("status") == "COMPLETED",
                   timeout_s=30, what="the tracker to mirror both sagas")  # fmt: skip
        console = ConsoleProcess(config, tmp_path / "console.log", token=TOKEN).start()
        try:
            # The list: counts per status, the FAILED saga first.
            page.goto(f"{console.url}/sagas")
            failed = page.locator("li.count.failed")
            assert failed.locator(".n").inner_text() == "1"
            assert "alert" in (failed.get_attribute("class") or "")
            rows = page.locator("table.sagas tbody tr")
            assert rows.first.get_attribute("data-saga") == jammed
            assert rows.first.locator(".badge").inner_text() == "FAILED"
            assert page.locator(f'tr[data-saga="{fine}"] .badge').inner_text() == "COMPLETED"
            shot(page, "01-saga-list")

            # The saga: its diagram across services, its compensation drawn, its trace.
            page.click(f'tr[data-saga="{jammed}"] a')
            page.wait_for_url(re.compile(rf"/sagas/{jammed}$"))
            assert page.locator("#saga-status").inner_text() == "FAILED"
            assert page.locator("#trace-id").inner_text() == trace.trace_id
            svg = page.locator("svg.sequence")
            lanes = svg.locator("g.lane").evaluate_all("els => els.map(e => e.dataset.lane)")
            assert lanes[0] == "sagas" and "vault" in lanes
            messages = svg.locator("g.message")
            assert messages.count() >= 6  # Take, Taken, Check, CheckRefused, GiveBack x2, ...
            compensations = svg.locator("g.message.compensation")
            assert compensations.count() >= 2
            assert "GiveBack" in compensations.first.get_attribute("data-type")
            assert svg.locator("g.note").count() >= 1  # the orchestrator's log (FAILED)
            assert "Log in" in page.locator("section.actions").inner_text()
            shot(page, "02-failed-saga")

            # Log in, then retry once the fault is gone.
            page.click("section.actions a")
            page.fill("input[name=token]", TOKEN)
            page.click("form[action='/login'] button")
            page.wait_for_url(re.compile(rf"/sagas/{jammed}$"))
            assert page.locator(".mode.operator").is_visible()
            vault.refusals[jammed] = 0
            retry = page.locator("form.action.retry")
            retry.locator("input[name=note]").fill("vault repaired")
            retry.locator("input[name=by]").fill("dana")
            retry.locator("button").click()
            page.wait_for_url(re.compile(rf"/sagas/{jammed}\?done=retried$"))
            assert "Saga retried" in page.locator(".done").inner_text()
            vault.wait_status(jammed, "COMPENSATED")
            wait_until(lambda: (tracked(dsn, jammed) or {}).get("status") == "COMPENSATED",
                       timeout_s=30, what="the tracker to see it compensated")  # fmt: skip
            page.goto(f"{console.url}/sagas/{jammed}")
            assert page.locator("#saga-status").inner_text() == "COMPENSATED"
            log = page.locator("table.log").inner_text()
            assert "RETRIED" in log and "dana (console, 127.0.0.1)" in log
            assert "The saga has ended" in page.locator("section.actions").inner_text()
            assert page.locator("svg.sequence g.message[data-type=SagaRetried]").count() == 1
            shot(page, "03-retried-saga")
            assert jammed not in vault.taken()

            # The relay page: both sources streamed by the relay, their slots and rates.
            page.goto(f"{console.url}/relay")
            for source in ("sagas", "vault"):
                row = page.locator(f'tr[data-source="{source}"]')
                assert row.locator("td.role").inner_text().startswith("active")
                assert re.match(r"^[0-9A-F]+/[0-9A-F]+$", row.locator("td.lsn").inner_text())
            shot(page, "04-relay")
        finally:
            console.stop()


def test_bad_token_missing_csrf_and_unknown_saga_get_a_clear_4xx(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault, page: Any
) -> None:
    config = vault_config(tmp_path, make_database, broker, vault)
    running = f"waiting-{uuid.uuid4().hex[:6]}"
    vault.checks[running] = "ignore"
    vault.begin(running)
    with running_tracker(config):
        console = ConsoleProcess(config, tmp_path / "console.log", token=TOKEN).start()
        try:
            # In the browser: a wrong token is refused and said so.
            page.goto(f"{console.url}/login")
            page.fill("input[name=token]", "not-the-token-at-all")
            with page.expect_response(lambda r: r.url.endswith("/login")) as answer:
                page.click("form[action='/login'] button")
            assert answer.value.status == 403
            assert page.locator("p.problem").inner_text() == "wrong operator token"
            shot(page, "05-bad-token")

            with httpx.Client(base_url=console.url, timeout=10) as client:
                bad = client.post("/login", data={"token": "wrong"})
                assert bad.status_code == 403 and "wrong operator token" in bad.text
                # Not logged in: refused.
                anonymous = client.post(f"/sagas/{running}/abort", data={"csrf": "x"})
                assert anonymous.status_code == 403
                assert "log in with the operator token first" in anonymous.text
                # Logged in, but no CSRF token: refused, and nothing happened.
                good = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
                assert good.status_code == 303 and "walsaga_operator" in good.cookies
                missing = client.post(f"/sagas/{running}/abort", data={"note": "x"})
                assert missing.status_code == 403 and "missing CSRF token" in missing.text
                forged = client.post(f"/sagas/{running}/abort", data={"csrf": "0" * 64})
                assert forged.status_code == 403 and "CSRF token does not match" in forged.text
                assert vault.status(running) == "RUNNING"
                # An unknown saga: 404, on its page and for an action.
                unknown = client.get("/sagas/no-such-saga")
                assert (
                    unknown.status_code == 404 and "no saga &#39;no-such-saga&#39;" in unknown.text
                )
                page_html = client.get(f"/sagas/{running}").text
                csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page_html)
                assert csrf is not None
                act = client.post("/sagas/no-such-saga/retry", data={"csrf": csrf.group(1)})
                assert act.status_code == 404 and "no saga" in act.text
                # A repair that does not apply: 409, saying why.
                resolve = client.post(f"/sagas/{running}/resolve", data={"csrf": csrf.group(1)})
                assert resolve.status_code == 409 and "resolve needs a note" in resolve.text
                # With both: the action goes through.
                done = client.post(f"/sagas/{running}/abort",
                                   data={"csrf": csrf.group(1), "note": "test"})  # fmt: skip
                assert done.status_code == 303
            vault.wait_status(running, "COMPENSATED")
            with httpx.Client(base_url=console.url, timeout=10) as client:
                bad_filter = client.get("/sagas", params={"since": "soon"})
                assert bad_filter.status_code == 400 and "number and a unit" in bad_filter.text
        finally:
            console.stop()


def test_a_console_without_a_token_is_read_only(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault, page: Any
) -> None:
    config = vault_config(tmp_path, make_database, broker, vault)
    saga = f"waiting-{uuid.uuid4().hex[:6]}"
    vault.checks[saga] = "ignore"
    with running_tracker(config) as tracker:
        vault.begin(saga)
        wait_until(lambda: tracked(tracker.config.tracker.dsn, saga), timeout_s=30,
                   what="the saga tracked")  # fmt: skip
        console = ConsoleProcess(config, tmp_path / "console.log").start()
        try:
            page.goto(f"{console.url}/sagas/{saga}")
            assert page.locator(".mode").inner_text() == "read-only"
            assert page.locator("form.action").count() == 0
            assert "read-only" in page.locator("section.actions").inner_text()
            shot(page, "06-read-only")
            with httpx.Client(base_url=console.url, timeout=10) as client:
                refused = client.post(f"/sagas/{saga}/abort", data={"csrf": "x"})
                assert refused.status_code == 403 and "read-only" in refused.text
                assert client.post("/login", data={"token": "x" * 20}).status_code == 403
            assert vault.status(saga) == "RUNNING"
        finally:
            console.stop()


def test_dead_lettered_events_are_listed_on_the_relay_page(
    tmp_path: Path, make_database: Any, broker: str, vault: Vault, page: Any
) -> None:
    config = vault_config(tmp_path, make_database, broker, vault,
                          relay_sources=[{"name": "vault", "dsn": vault.vault_dsn}])  # fmt: skip
    with psycopg.connect(vault.vault_dsn) as conn:
        conn.execute(
            """
            INSERT INTO walsaga.relay_dead_letter
                (event_id, source, lsn, topic, key, type, reason, code, size_bytes)
            VALUES ('0190d0c8-0000-7000-8000-000000000001', 'vault', '0/16B3748', 'vault',
                    'k1', 'HugeThing', 'larger than message.max.bytes', 'MSG_SIZE_TOO_LARGE',
                    2000000)
            """
        )
    console = ConsoleProcess(config, tmp_path / "console.log").start()
    try:
        page.goto(f"{console.url}/relay")
        row = page.locator('tr[data-source="vault"]')
        assert row.locator("td.alert").last.inner_text() == "1"
        letters = page.locator("table.dead-letters").inner_text()
        assert "HugeThing" in letters and "MSG_SIZE_TOO_LARGE" in letters
        assert "waiting" in letters
        shot(page, "07-dead-letters")
    finally:
        console.stop()


def test_the_examples_compensated_trips_are_drawn_with_their_compensations(
    tmp_path: Path, make_database: Any, broker: str, page: Any
) -> None:
    """What `walsaga demo --serve` shows: the examples' tracker config, every saga listed,
    a compensated trip's compensations drawn across the four services."""
    from datetime import timedelta

    from participants.examples.operations import tracker_config
    from participants.examples.travel import trip
    from tests.travel_support import FIRST_NIGHT, running_travel

    def request(**kw: Any) -> trip.TripRequest:
        asked = {"traveller": "Ada", "flight_id": "TP100", "hotel_id": "H1",
                 "check_in": FIRST_NIGHT, "check_out": FIRST_NIGHT + timedelta(days=2),
                 "car_class": "LIS-compact", **kw}  # fmt: skip
        return trip.TripRequest(**asked)

    inventory = {"flights": {"TP100": 10}, "hotels": {"H1": 5},
                 "car_classes": {"LIS-compact": 4, "LIS-van": 0}}  # fmt: skip
    with running_travel(tmp_path, make_database, broker, **inventory) as site:
        relay_url = f"http://127.0.0.1:{site.relay.http_port}/healthz"
        config = tracker_config(tmp_path / "tracker.toml", tracker_dsn=make_database("tracker"),
                                dsns=site.dsns, bootstrap_servers=broker,
                                relay_urls=[relay_url], console_port=0)  # fmt: skip
        with running_tracker(config) as tracker:
            booked = site.book(request())
            no_car = site.book(request(car_class="LIS-van"))
            trips = site.wait_settled([booked, no_car])
            assert trips[no_car].saga_status == "COMPENSATED"
            dsn = tracker.config.tracker.dsn
            wait_until(lambda: (tracked(dsn, booked) or {}).get("status") == "COMPLETED"
                       and (tracked(dsn, no_car) or {}).get("status") == "COMPENSATED",
                       timeout_s=60, what="the tracker to see both trips end")  # fmt: skip
            console = ConsoleProcess(config, tmp_path / "console.log").start()
            try:
                page.goto(f"{console.url}/sagas?type=trip")
                assert page.locator(f'tr[data-saga="{booked}"] .badge').inner_text() == "COMPLETED"
                assert page.locator(f'tr[data-saga="{no_car}"] .badge').inner_text() == (
                    "COMPENSATED")  # fmt: skip
                shot(page, "08-trips")
                page.goto(f"{console.url}/sagas/{no_car}")
                svg = page.locator("svg.sequence")
                lanes = svg.locator("g.lane").evaluate_all("els => els.map(e => e.dataset.lane)")
                assert lanes[0] == "trip" and {"flight", "hotel", "car"} <= set(lanes)
                drawn = svg.locator("g.message.compensation").evaluate_all(
                    "els => els.map(e => e.dataset.type)"
                )
                assert {"ReleaseRooms", "ReleaseSeats", "RoomsReleased", "SeatsReleased"} <= set(
                    drawn
                ), drawn
                assert svg.locator("g.note.compensation").count() >= 1  # compensating, compensated
                shot(page, "09-compensated-trip")
                page.goto(f"{console.url}/relay")
                for source in site.dsns:
                    row = page.locator(f'tr[data-source="{source}"] td.role')
                    assert row.inner_text().startswith("active")
                shot(page, "10-examples-relay")
            finally:
                console.stop()
