"""A saga's timeline as an SVG sequence diagram, drawn on the server. Pure.

One lane per service, one arrow per message from the service that sent it
to the one seen reacting (a message nobody was seen reacting to ends in an
open circle), one note per orchestrator log entry that no message shows.
Compensations are drawn red and dashed, and marked ↺. Every arrow and note
carries a ``<title>`` (shown on hover) with the details.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from participants.timeline import Line

LANE_W = 190
LEFT = 84  # the time column
TOP = 56
ROW_H = 34
NOTE_W = 170


def _x(lanes: Sequence[str], lane: str | None) -> float:
    index = lanes.index(lane) if lane in lanes else len(lanes) - 1
    return LEFT + LANE_W * index + LANE_W / 2


def _text(x: float, y: float, text: str, cls: str, anchor: str = "middle") -> str:
    return (
        f'<text x="{x:.0f}" y="{y:.0f}" class="{cls}" text-anchor="{anchor}">{escape(text)}</text>'
    )


def _clip(text: str, size: int = 30) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def _title(line: Line) -> str:
    parts = [line.title]
    if line.step:
        parts.append(f"step {line.step}")
    if line.outcome:
        parts.append(f"outcome {line.outcome}")
    if line.note:
        parts.append(line.note)
    if line.entry is not None:
        e = line.entry
        parts.append(f"{e.topic}[{e.partition}]@{e.offset}")
        if e.lsn:
            parts.append(f"lsn {e.lsn}")
    return " · ".join(parts)


def sequence_diagram(
    lanes: Sequence[str], lines: Sequence[Line], *, start: datetime | None = None
) -> str:
    """The SVG of `lines` across `lanes` (lanes named by a line but not listed are added)."""
    lanes = list(lanes)
    for line in lines:
        for lane in (line.lane, line.target):
            if lane and lane not in lanes:
                lanes.append(lane)
    if not lanes:
        lanes = ["(no service)"]
    width = LEFT + LANE_W * len(lanes) + 10
    height = TOP + ROW_H * max(1, len(lines)) + 24
    begin = start or (lines[0].at if lines else None)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="sequence" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="sequence diagram of the saga across {len(lanes)} services">',
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'class="head"/></marker>'
        '<marker id="arrow-compensation" viewBox="0 0 10 10" refX="10" refY="5" '
        'markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" class="head compensation"/></marker>'
        "</defs>",
    ]
    bottom = height - 8
    for lane in lanes:
        x = _x(lanes, lane)
        out.append(
            f'<g class="lane" data-lane="{escape(lane)}">'
            f'<rect x="{x - LANE_W / 2 + 12:.0f}" y="8" width="{LANE_W - 24}" height="28" rx="4"/>'
            + _text(x, 27, _clip(lane, 24), "lane-name")
            + f'<line x1="{x:.0f}" y1="36" x2="{x:.0f}" y2="{bottom}" class="lifeline"/></g>'
        )
    for row, line in enumerate(lines):
        y = TOP + ROW_H * row + ROW_H / 2
        offset = f"+{(line.at - begin).total_seconds():.3f}s" if begin else ""
        classes = ["message" if line.is_message else "note"]
        if line.compensation:
            classes.append("compensation")
        label = ("↺ " if line.compensation else "") + line.title
        if line.step:
            label += f" · {line.step}"
        group = [
            f'<g class="{" ".join(classes)}" data-type="{escape(line.title)}">',
            f"<title>{escape(_title(line))}</title>",
            _text(LEFT - 8, y + 4, offset, "offset", anchor="end"),
        ]
        x1 = _x(lanes, line.lane)
        if line.is_message:
            marker = "arrow-compensation" if line.compensation else "arrow"
            if line.target is not None:
                x2 = _x(lanes, line.target)
                group.append(
                    f'<line x1="{x1:.0f}" y1="{y:.0f}" x2="{x2:.0f}" y2="{y:.0f}" '
                    f'class="arrow" marker-end="url(#{marker})"/>'
                )
            else:  # nobody seen reacting: a stub ending in an open circle
                x2 = x1 + LANE_W * 0.45
                group.append(
                    f'<line x1="{x1:.0f}" y1="{y:.0f}" x2="{x2 - 5:.0f}" y2="{y:.0f}" '
                    f'class="arrow unanswered"/>'
                    f'<circle cx="{x2:.0f}" cy="{y:.0f}" r="5" class="unanswered"/>'
                )
            middle = (x1 + x2) / 2
            group.append(_text(middle, y - 5, _clip(label, 34), "label"))
            if line.outcome:
                group.append(_text(middle, y + 12, line.outcome, "outcome"))
        else:
            group.append(
                f'<rect x="{x1 - NOTE_W / 2:.0f}" y="{y - 11:.0f}" width="{NOTE_W}" height="22" '
                f'rx="3" class="note-box"/>'
            )
            group.append(_text(x1, y + 4, _clip(label, 28), "note-text"))
        group.append("</g>")
        out.append("".join(group))
    out.append("</svg>")
    return "\n".join(out)
