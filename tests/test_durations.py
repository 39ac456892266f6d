"""One duration type for every --timeout (common/durations.py), and the CLI options that use it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loraplane.common.durations import go_duration, parse_duration
from loraplane.common.errors import InvalidInputError
from loraplane.platform.cli import app


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (45, 45.0),
    ],
)
def test_seconds_and_go_durations_parse_to_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "5m10", "-3", "0", "0s"])
def test_anything_else_is_refused_naming_the_option_and_the_forms(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_duration(text)
    assert "--timeout" in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize(("seconds", "go"), [(300.0, "300s"), (5400.0, "5400s"), (0.25, "250ms")])
def test_helm_gets_go_durations_back(seconds: float, go: str) -> None:
    assert go_duration(seconds) == go
    assert parse_duration(go) == seconds


def test_every_timeout_option_of_the_cli_takes_both_forms_and_refuses_others() -> None:
    runner = CliRunner()
    for command in (["uninstall"], ["train", "submit", "x.yaml"], ["data", "push", "x.jsonl", "-m", "m"]):
        bad = runner.invoke(app, [*command, "--timeout", "soon"], env={"COLUMNS": "300", "NO_COLOR": "1"})
        assert bad.exit_code == 2 and "'soon' is not a duration" in bad.output, (command, bad.output)
