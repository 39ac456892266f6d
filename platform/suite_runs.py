"""``loraplane evals run`` as a library call: a suite against an endpoint, the report written, nothing
registered (``platform/adapters.py:evaluate_adapter`` is the one that records a verdict).

Where the requests go: ``endpoint`` when given (any OpenAI-compatible base URL: vLLM, the gateway,
another provider); else, with the Kubernetes registry, the namespace's gateway through a
port-forward (``platform/portforward.py``); else it is required.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from loraplane.common.errors import InvalidInputError, LoraplaneError
from loraplane.common.settings import Settings
from loraplane.evals.render import ReportFiles, write_report
from loraplane.evals.report import SuiteReport
from loraplane.evals.runner import SuiteIncompleteError, run_suite
from loraplane.evals.suite import LoadedSuite


@contextlib.contextmanager
def suite_endpoint(settings: Settings, endpoint: str | None) -> Iterator[str]:
    """The base URL (ending in ``/v1`` for the gateway) the suite's requests go to, while it is needed."""
    if endpoint is not None:
        yield endpoint
        return
    if settings.registry != "kubernetes":
        raise InvalidInputError(
            "--endpoint URL is required", hint="e.g. -e http://127.0.0.1:8000/v1 (vLLM or the gateway)"
        )
    from loraplane.platform.portforward import service_url

    with service_url(settings, "gateway") as url:
        yield f"{url}/v1"


def run_suite_on_endpoint(
    settings: Settings,
    loaded: LoadedSuite,
    models: dict[str, str],
    *,
    endpoint: str | None = None,
    api_key: str | None = None,
    report_dir: Path = Path("eval-reports"),
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[SuiteReport, ReportFiles]:
    """Run ``loaded`` for ``models`` (role -> model name: candidate, and optionally prod and base) and
    write the JSON, Markdown and PNG report into ``report_dir``. A run that cannot finish writes its
    partial report (``-INCOMPLETE``) and raises :class:`LoraplaneError` naming it."""
    stem = f"{loaded.suite.name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    try:
        with suite_endpoint(settings, endpoint) as base_url:
            report = asyncio.run(
                run_suite(loaded, base_url, models, api_key=api_key, on_progress=on_progress)
            )
    except SuiteIncompleteError as exc:
        files = write_report(exc.report, report_dir, stem + "-INCOMPLETE")
        raise LoraplaneError(str(exc), hint=f"partial report: {files.markdown}") from None
    return report, write_report(report, report_dir, stem)
