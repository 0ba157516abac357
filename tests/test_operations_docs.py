"""docs/operations.md runs: its tracker.toml blocks load with the tracker's loader (the
generic docs check, tests/test_docs.py, knows no tracker config and skips them), and its
alert rules are valid YAML naming only metrics the tracker exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from participants.tracker import TrackerMetrics
from participants.tracker_config import load_tracker_config
from tests.test_docs import ROOT, blocks_of
from walsaga.http import new_registry

DOC = ROOT / "docs" / "operations.md"
BLOCKS = list(blocks_of(DOC))
TOML = [b for b in BLOCKS if b.language == "toml"]


@pytest.mark.parametrize("block", TOML, ids=[b.where for b in TOML])
def test_tracker_configs_load(
    block: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("WALSAGA_"):
            monkeypatch.delenv(var)
    path = tmp_path / "tracker.toml"
    path.write_text(block.text)  # type: ignore[attr-defined]
    config = load_tracker_config(path)
    assert config.tracker.dsn
    for orchestrator in config.orchestrator:
        assert orchestrator.load_definitions(), "its definitions import"


def test_there_are_tracker_configs_to_check() -> None:
    assert len(TOML) >= 2


def test_alert_rules_are_yaml_over_the_trackers_metrics() -> None:
    (rules,) = [b for b in BLOCKS if b.language == "yaml"]
    groups = yaml.safe_load(rules.text)["groups"]
    registry = new_registry()
    TrackerMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    for rule in groups[0]["rules"]:
        for name in re.findall(r"walsaga_tracker_[a-z_]+", rule["expr"]):
            assert name in exported, (rule["alert"], name)
