"""The console's pure parts: the operator's session and CSRF tokens, the sequence diagram."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

import pytest

from participants.console.diagram import sequence_diagram
from participants.console.security import SESSION_S, OperatorAuth, RefusedError
from participants.timeline import Entry, Line

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_session_needs_the_right_token_and_actions_need_its_csrf_token() -> None:
    auth = OperatorAuth("s3cret-operator-token")
    with pytest.raises(RefusedError, match="wrong operator token"):
        auth.login("guess")
    cookie = auth.login("s3cret-operator-token", now=1000)
    assert auth.session_ok(cookie, now=1000 + SESSION_S)
    assert not auth.session_ok(cookie, now=1001 + SESSION_S), "sessions expire"
    assert not auth.session_ok(cookie.replace(".", ".0"), now=1000), "forged signature"
    assert not OperatorAuth("s3cret-operator-token").session_ok(cookie, now=1000), (
        "a restart ends every session")  # fmt: skip
    fresh = auth.login("s3cret-operator-token")
    auth.check_action(fresh, auth.csrf_token(fresh))
    with pytest.raises(RefusedError, match="missing CSRF token"):
        auth.check_action(fresh, None)
    with pytest.raises(RefusedError, match="does not match"):
        auth.check_action(fresh, auth.csrf_token(auth.login("s3cret-operator-token", now=5)))
    with pytest.raises(RefusedError, match="log in"):
        auth.check_action(None, auth.csrf_token(fresh))


def test_a_console_without_a_token_refuses_every_action() -> None:
    auth = OperatorAuth(None)
    assert auth.read_only
    with pytest.raises(RefusedError, match="read-only"):
        auth.login("anything")
    with pytest.raises(RefusedError, match="read-only"):
        auth.check_action("1.x", "y")


def entry(type_: str, source: str, n: int) -> Entry:
    return Entry("s", f"e{n}", T0 + timedelta(seconds=n), type_, "event", source, "t", 0, n,
                 None, {}, {})  # fmt: skip


def test_the_diagram_draws_one_lane_per_service_and_one_arrow_per_message() -> None:
    lines = [
        Line(T0, "Take", "sagas", target="vault", step="take", entry=entry("Take", "sagas", 0)),
        Line(T0 + timedelta(seconds=1), "<Taken & co>", "vault", target="sagas",
             entry=entry("Taken", "vault", 1)),
        Line(T0 + timedelta(seconds=2), "GiveBack", "sagas", target="vault", compensation=True,
             entry=entry("GiveBack", "sagas", 2)),
        Line(T0 + timedelta(seconds=3), "Lost", "sagas", entry=entry("Lost", "sagas", 3)),
        Line(T0 + timedelta(seconds=4), "compensating", "sagas", compensation=True),
    ]  # fmt: skip
    svg = sequence_diagram(["sagas", "vault"], lines)
    tree = ElementTree.fromstring(svg)  # well-formed, the odd title escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert [g.get("data-lane") for g in tree.iterfind("s:g[@class='lane']", ns)] == [
        "sagas", "vault"]  # fmt: skip
    messages = tree.findall("s:g[@data-type]", ns)
    assert [g.get("class") for g in messages] == [
        "message", "message", "message compensation", "message", "note compensation"]  # fmt: skip
    assert 'marker-end="url(#arrow-compensation)"' in svg
    assert len(re.findall(r"<circle", svg)) == 1, "the unanswered message ends in a circle"
    assert "&lt;Taken &amp; co&gt;" in svg
