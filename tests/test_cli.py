"""The CLI: clear errors, documented exit codes, JSON output, and no change after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loraplane.common.settings import Settings


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAPLANE_HOME": str(settings.home),
        "LORAPLANE_ADAPTERS_ROOT": str(settings.adapters_dir),
        "LORAPLANE_SERVER_URL": settings.server_url,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", *args], capture_output=True, text=True, env=env
    )


def test_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loraplane.platform.cli", "adapters", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("list", "show", "register", "load", "unload", "eval", "promote", "rollback", "retire"):
        assert command in out


def test_register_missing_path_exits_2_and_changes_nothing(settings: Settings) -> None:
    result = _cli(settings, "adapters", "register", str(settings.adapters_dir / "bot" / "v1"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (settings.home / "registry.json").exists()


def test_register_then_list_json(settings: Settings, fake_adapter: Path) -> None:
    result = _cli(settings, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1")
    assert result.returncode == 0, result.stderr
    listed = json.loads(_cli(settings, "adapters", "list", "--output", "json").stdout)
    assert listed["adapters"]["demo"]["versions"]["v1"]["served_name"] == "demo@v1"


def test_load_with_server_down_exits_1_with_hint(settings: Settings, fake_adapter: Path) -> None:
    assert (
        _cli(
            settings, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1"
        ).returncode
        == 0
    )
    before = (settings.home / "registry.json").read_bytes()
    result = _cli(settings, "adapters", "load", "demo@v1")
    assert result.returncode == 1
    assert "cannot reach the vLLM server at http://127.0.0.1:9" in result.stderr
    assert "is the server running?" in result.stderr
    assert (settings.home / "registry.json").read_bytes() == before


def test_promote_unevaluated_exits_3(settings: Settings, fake_adapter: Path) -> None:
    assert (
        _cli(
            settings, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1"
        ).returncode
        == 0
    )
    result = _cli(settings, "adapters", "promote", "demo@v1")
    assert result.returncode == 3
    assert "never been evaluated" in result.stderr


def test_evals_validate_reports_a_good_suite_and_exits_2_on_a_bad_one(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "e.jsonl").write_text('{"prompt": "2+2?", "reference": "4"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ndatasets:\n  - {name: math, path: e.jsonl, metrics: [exact_match, latency]}\n")
    ok = _cli(settings, "evals", "validate", str(suite))
    assert ok.returncode == 0, ok.stderr
    assert "math: 1 examples" in ok.stdout and "gate: none" in ok.stdout
    suite.write_text(suite.read_text() + "gate: {min_score: {perplexity: 3}}\n")
    bad = _cli(settings, "evals", "validate", str(suite))
    assert bad.returncode == 2
    assert (
        "gate: got {'min_score': {'perplexity': 3}}; min_score.perplexity: lower is better for perplexity"
        in " ".join(bad.stderr.split())
    )


def test_adapters_eval_needs_exactly_one_of_suite_or_dataset(settings: Settings) -> None:
    result = _cli(settings, "adapters", "eval", "demo@v1")
    assert result.returncode == 2 and "exactly one of --suite FILE or --dataset FILE" in result.stderr


def test_retiring_a_served_version_with_the_server_down_exits_1_and_changes_nothing(
    settings: Settings, fake_adapter: Path
) -> None:
    from loraplane.registry.local import LocalRegistry

    assert (
        _cli(
            settings, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1"
        ).returncode
        == 0
    )
    with LocalRegistry(settings.home).transaction() as state:  # as if it had been loaded
        state.resolve("demo@v1").state = "serving"
    before = (settings.home / "registry.json").read_bytes()
    result = _cli(settings, "adapters", "retire", "demo@v1")
    assert result.returncode == 1, result.stderr
    assert "cannot reach the vLLM server at http://127.0.0.1:9" in result.stderr
    assert (settings.home / "registry.json").read_bytes() == before


def test_an_unexpected_error_is_one_line_without_traceback_unless_debug(
    settings: Settings, fake_adapter: Path
) -> None:
    # A state directory that is a file: the registry cannot be created there (an OSError, not ours).
    blocked = settings.model_copy(update={"home": settings.home.parent / "not-a-dir"})
    blocked.home.write_text("x")
    plain = _cli(blocked, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1")
    assert plain.returncode == 1
    assert "error: unexpected FileExistsError" in plain.stderr and "--debug" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = _cli(
        blocked, "--debug", "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1"
    )
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def _commands() -> list[tuple[list[str], object]]:
    from typer.main import get_command

    from loraplane.platform.cli import app

    found: list[tuple[list[str], object]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "list_commands"):  # a group (typer's click may be vendored)
            ctx = cmd.context_class(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
        else:
            found.append((path, cmd))

    walk(get_command(app), [])
    return found


def test_every_command_has_help_with_an_example_and_is_in_the_cli_docs() -> None:
    from typer.testing import CliRunner

    from loraplane.platform.cli import app

    commands = _commands()
    assert len(commands) >= 25
    runner = CliRunner()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = []
    for path, _ in commands:
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.output)
        if "Example" not in shown.output or "loraplane " not in shown.output.split("Example", 1)[1]:
            missing.append(" ".join(path))
        assert f"loraplane {' '.join(path)}" in docs or f"`{' '.join(path)}`" in docs, path
    assert missing == [], f"no example in the --help of: {missing}"
    for code in ("| 0 ", "| 1 ", "| 2 ", "| 3 ", "| 4 ", "| 130 "):
        assert code in docs, f"exit code {code} undocumented"


def test_read_commands_answer_json(settings: Settings, fake_adapter: Path, tmp_path: Path) -> None:
    assert (
        _cli(
            settings, "adapters", "register", str(fake_adapter), "--name", "demo", "--version", "v1"
        ).returncode
        == 0
    )
    shown = json.loads(_cli(settings, "adapters", "show", "demo", "-o", "json").stdout)
    assert shown["adapter"]["versions"]["v1"]["weights_sha256"]
    assert [e["action"] for e in shown["history"]] == ["register"]
    listed = json.loads(_cli(settings, "adapters", "list", "-o", "json").stdout)
    assert listed["adapters"]["demo"]["versions"]["v1"]["state"] == "registered"
    typo = _cli(settings, "adapters", "list", "-o", "yaml")
    assert typo.returncode == 2 and "'yaml': use text (or table) or json" in typo.stderr

    (tmp_path / "e.jsonl").write_text('{"prompt": "2+2?", "reference": "4"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: s\ndatasets:\n  - {name: math, path: e.jsonl, metrics: [exact_match]}\n"
        "gate: {min_score: {exact_match: 0.5}}\n"
    )
    validated = _cli(settings, "evals", "validate", str(suite), "-o", "json")
    assert validated.returncode == 0, validated.stderr
    parsed = json.loads(validated.stdout)
    assert parsed["datasets"]["math"]["examples"] == 1 and parsed["datasets"]["math"]["metrics"] == [
        "exact_match"
    ]
    assert parsed["gate"] == [{"rule": "min_score", "key": "exact_match", "threshold": 0.5}]


def test_cluster_commands_with_the_local_registry_say_what_to_pass(settings: Settings) -> None:
    for args in (("train", "logs", "j"), ("train", "register", "j"), ("train", "cancel", "j")):
        result = _cli(settings, *args)
        assert result.returncode == 2 and "--registry kubernetes" in result.stderr, args
        assert "Traceback" not in result.stderr


def test_set_values_are_typed_as_helm_types_them_and_files_merge_in_order(tmp_path: Path) -> None:
    from loraplane.platform.helm_release import load_values

    first = tmp_path / "a.yaml"
    first.write_text("serving:\n  replicas: 1\n  args: [a, b]\n  tolerations: [x]\ngateway: {port: 1}\n")
    second = tmp_path / "b.yaml"
    second.write_text("serving:\n  args: [c]\n")
    values = load_values([first, second], ["serving.replicas=3,gateway.enabled=false", "serving.name=v1.2"])
    assert values == {
        "serving": {"replicas": 3, "args": ["c"], "tolerations": ["x"], "name": "v1.2"},
        "gateway": {"port": 1, "enabled": False},
    }, "lists are replaced, not concatenated; --set wins; scalars typed"


def test_evals_run_without_an_endpoint_on_the_local_registry_says_what_to_pass(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "e.jsonl").write_text('{"prompt": "2+2?", "reference": "4"}\n')
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ndatasets:\n  - {name: math, path: e.jsonl, metrics: [exact_match]}\n")
    result = _cli(settings, "evals", "run", str(suite), "-m", "x")
    assert result.returncode == 2 and "--endpoint URL is required" in result.stderr


def _register(settings: Settings, version: str) -> None:
    from support import write_fake_adapter

    path = write_fake_adapter(settings.adapters_dir / "demo" / version)
    result = _cli(settings, "adapters", "register", str(path), "--name", "demo", "--version", version)
    assert result.returncode == 0, result.stderr


def test_retired_is_terminal_from_the_cli_and_refusals_change_nothing(settings: Settings) -> None:
    """The issue's defect: retire, then unload (was rc 0, back to registered), then load (served it)."""
    _register(settings, "v1")
    retired = _cli(settings, "adapters", "retire", "demo@v1")  # never loaded: no server is asked
    assert retired.returncode == 0, retired.stderr
    assert retired.stdout.strip() == "demo@v1 is retired"
    registry = settings.home / "registry.json"
    before = registry.read_bytes()
    for command in ("unload", "load", "promote"):
        refused = _cli(settings, "adapters", command, "demo@v1")
        assert refused.returncode == 2, (command, refused.stderr)
        message = " ".join(refused.stderr.split())
        assert "demo@v1 is retired, and retired is terminal" in message, message
        assert "register them as a new version: loraplane adapters register" in message
        assert registry.read_bytes() == before, f"a refused {command} changed the registry"
    again = _cli(settings, "adapters", "retire", "demo@v1")
    assert again.returncode == 0 and "demo@v1 was already retired: nothing changed" in again.stdout
    assert registry.read_bytes() == before
    shown = json.loads(_cli(settings, "adapters", "show", "demo", "-o", "json").stdout)
    assert shown["adapter"]["versions"]["v1"]["state"] == "retired"


def test_promoting_a_bare_name_that_resolves_to_its_own_prod_is_refused(settings: Settings) -> None:
    from loraplane.registry.local import LocalRegistry
    from loraplane.registry.model import move_alias

    _register(settings, "v1")
    with LocalRegistry(settings.home).transaction() as state:
        move_alias(state, "demo", "prod", "v1", expected=None, action="promote")
    before = (settings.home / "registry.json").read_bytes()
    result = _cli(settings, "adapters", "promote", "demo", "--force", "--reason", "again")
    assert result.returncode == 2, result.stderr
    assert "demo:prod already points at v1" in result.stderr and "promote demo@vN" in result.stderr
    assert (settings.home / "registry.json").read_bytes() == before
    shown = _cli(settings, "adapters", "promote", "--help").stdout
    assert "NAME@VERSION: the version to point the alias at" in shown


def _option_line(help_text: str, option: str) -> str:
    return next(line for line in help_text.splitlines() if line.lstrip("│ ").startswith(option))


def test_flags_show_as_flags_in_help() -> None:
    from typer.testing import CliRunner

    from loraplane.platform.cli import app

    runner = CliRunner()
    promote = runner.invoke(app, ["adapters", "promote", "--help"], env={"COLUMNS": "200"}).output
    force = _option_line(promote, "--force")
    assert "<bool>" not in force and "--no-force" not in force, force
    assert "<str>" in _option_line(promote, "--reason"), "an option that takes a value keeps its type"
    for path, _ in _commands():
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in shown, f"loraplane {' '.join(path)} --help: {shown}"
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "<bool>" not in top and "<int>" not in _option_line(top, "--verbose")


def test_tables_are_not_cut_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    """Piped output (not a TTY) with no COLUMNS: a long row comes out whole, on one line."""
    from support import write_fake_adapter

    deep = tmp_path / ("a-rather-long-directory-name-" * 4).rstrip("-")
    settings = Settings(
        home=tmp_path / "state", adapters_root=deep / "adapters", server_url="http://127.0.0.1:9"
    )
    name = "a-long-adapter-name-for-a-wide-table"
    path = write_fake_adapter(settings.adapters_dir / name / "v1")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(LORAPLANE_HOME=str(settings.home), LORAPLANE_ADAPTERS_ROOT=str(settings.adapters_dir))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "loraplane.platform.cli", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)

    registered = cli("adapters", "register", str(path), "--name", name, "--version", "v1")
    assert registered.returncode == 0, registered.stderr
    shown = cli("adapters", "show", name)
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if f"{name}@v1" in line]
    assert len(rows) == 1 and str(path) in rows[0], shown.stdout
    assert len(rows[0]) > 200, "the row is longer than any terminal default, and whole"
