#!/usr/bin/env python3
"""Container health check of walsaga's processes: exit 0 when ``/healthz`` answers 200.

Installed in the walsaga image as ``walsaga-healthcheck``; docker-compose.yml
runs it in every walsaga service. With ``--sources-streaming`` (the relay's
check) every source must also have its slot and be streaming, or standing by
behind a relay that streams: /healthz already answers 200 while a source is
still starting, but a service started before the slot exists would write
events the slot never sees, so the services wait for this instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

READY_STATES = frozenset({"streaming", "standby"})


def check(url: str, *, sources_streaming: bool = False, timeout_s: float = 3.0) -> str | None:
    """Why the service at `url` is not healthy, or None when it is."""
    if not url.startswith(("http://", "https://")):
        return f"{url}: not an http(s) URL"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (checked above)
            body = response.read()
    except urllib.error.HTTPError as e:
        return f"{url}: {e.code} {e.reason}"
    except OSError as e:
        return f"{url}: {e}"
    if not sources_streaming:
        return None
    try:
        sources = json.loads(body)["sources"]
    except (ValueError, KeyError, TypeError):
        return f"{url}: no sources in the answer"
    waiting = sorted(
        f"{name} ({status.get('state')})"
        for name, status in sources.items()
        if status.get("state") not in READY_STATES
    )
    if not sources:
        return f"{url}: no sources"
    if waiting:
        return f"{url}: not streaming yet: {', '.join(waiting)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walsaga-healthcheck", description=__doc__)
    parser.add_argument("url", help="the service's /healthz, e.g. http://127.0.0.1:8080/healthz")
    parser.add_argument(
        "--sources-streaming",
        action="store_true",
        help="the relay: every source must be streaming (or standing by)",
    )
    parser.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    problem = check(args.url, sources_streaming=args.sources_streaming, timeout_s=args.timeout)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
