"""The control layer's library API: register, load, evaluate and promote adapter versions.

The CLI is a thin layer over these functions; tests and users call them directly. Each one checks
everything it can before it changes anything, and changes the registry in a single transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from loraplane.common.adapter_dir import WEIGHTS_FILE
from loraplane.common.errors import ExitCode, InvalidInputError, LoraplaneError
from loraplane.common.settings import Settings
from loraplane.evals.render import write_report
from loraplane.evals.runner import SuiteIncompleteError, run_suite
from loraplane.evals.suite import (
    LoadedSuite,
    load_suite,
    refuse_perplexity_on_shared_servers,
    suite_for_dataset,
)
from loraplane.platform.convergence import (
    DEFAULT_TIMEOUT_S,
    ReplicasDidNotConvergeError,
    reconciling_replicas,
    wait_for_replicas,
)
from loraplane.platform.pod_checks import check_in_vllm_pod, files_are_here
from loraplane.platform.template_check import check_chat_template
from loraplane.registry.backends import open_registry
from loraplane.registry.model import (
    REF_PATTERN,
    Adapter,
    AdapterVersion,
    CanaryWeight,
    EvalRecord,
    HistoryEvent,
    RegistryError,
    RegistryState,
    aliases_of,
    mark_load_failed,
    mark_serving,
    move_alias,
    record_eval,
    record_stop,
    rehearse,
    rollback_target,
    verify_weights,
)
from loraplane.registry.version_states import Command, transition
from loraplane.serving.adapter_weights import verify_adapter_weights
from loraplane.serving.capacity import require_room
from loraplane.serving.client import VLLMAdminClient
from loraplane.serving.limits import adapter_capacity, max_lora_rank
from loraplane.serving.output_probe import AdapterHasNoEffectError, require_effect
from loraplane.serving.preflight import preflight_adapter
from loraplane.serving.reconcile import (
    SyncReport,
    check_servable,
    servable_versions,
    served_base,
    sync_replicas,
)
from loraplane.serving.replicas import list_vllm_pods, replica_urls
from loraplane.trainer.merge import MergedModel, merge_adapter

log = logging.getLogger("loraplane.platform")

NAME_CHARS = "lowercase letters, digits and '-'"


class PromotionRefusedError(LoraplaneError):
    """The promotion gate said no (no evaluation, or the evaluation failed)."""

    exit_code = ExitCode.REFUSED


def register_adapter(
    settings: Settings,
    path: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    allow_template_mismatch: bool = False,
    reason: str | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> AdapterVersion:
    """Check an adapter directory and record it as ``name@version``.

    Name and version default to those in the adapter's ``manifest.json`` (written by the trainer).
    The chat template the manifest records must be the one the server uses for the base model
    (``platform/template_check.py``): a mismatch is refused unless ``allow_template_mismatch`` with a
    ``reason`` (kept in the history's ``register`` event). An adapter with no recorded template, or a
    server whose template cannot be known here, is registered with a warning (``on_warning``, default:
    the log).
    """
    info = preflight_adapter(path, adapters_root=settings.adapters_dir, max_lora_rank=max_lora_rank(settings))
    weights = verify_adapter_weights(info.path / WEIGHTS_FILE, info.config)  # every byte, once
    manifest: dict[str, object] = {}
    manifest_file = info.path / "manifest.json"
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{manifest_file}: not valid JSON ({exc.msg})") from None
    name = name or str(manifest.get("name") or "")
    version = version or str(manifest.get("version") or "")
    if not name or not version:
        raise InvalidInputError(
            f"{info.path} has no manifest.json naming the adapter", hint="pass --name NAME --version vN"
        )
    if not REF_PATTERN.match(f"{name}@{version}"):
        raise InvalidInputError(
            f"{name}@{version} is not a valid adapter name and version",
            hint=f"names use {NAME_CHARS}; versions look like v1, v2, ...",
        )
    template = check_chat_template(
        settings, manifest, ref=f"{name}@{version}", allow_mismatch=allow_template_mismatch, reason=reason
    )
    if template.warning is not None:
        (on_warning or log.warning)(template.warning)
    elif template.outcome == "mismatch-allowed":
        (on_warning or log.warning)(f"{template.message}\n  registered anyway: {reason}")
    base = manifest.get("base_model")
    entry = AdapterVersion(
        name=name,
        version=version,
        served_name=f"{name}@{version}",
        path=str(info.path),
        weights_sha256=weights.sha256,
        base_model=str(base["path"]) if isinstance(base, dict) and "path" in base else None,
        manifest=manifest,
    )
    with open_registry(settings).transaction() as state:
        adapter = state.adapters.setdefault(name, Adapter(name=name))
        if version in adapter.versions:
            existing = adapter.versions[version]
            raise RegistryError(
                f"{name}@{version} is already registered (path {existing.path})",
                hint="versions are immutable: publish new weights as a new version",
            )
        adapter.versions[version] = entry
        allowed = template.outcome == "mismatch-allowed"
        state.history.append(
            HistoryEvent(
                action="register",
                adapter=name,
                version=version,
                reason=f"chat template mismatch allowed: {reason}" if allowed else None,
                forced=allowed,
            )
        )
    return entry


def merge_to_directory(
    settings: Settings,
    source: str,
    out_dir: Path,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> MergedModel:
    """Merge an adapter into its base model and write the full model to ``out_dir``.

    ``source`` is an existing adapter directory, or else a registry reference (``NAME@VERSION``,
    ``NAME:ALIAS``, ``NAME``) whose weights must still match the sha256 recorded at registration.
    """
    path = Path(source).expanduser()
    if path.exists() or not REF_PATTERN.match(source):
        return merge_adapter(
            path, out_dir, base_model=base_model, dtype=dtype, trust_remote_code=trust_remote_code
        )
    entry = open_registry(settings).read().resolve(source)
    verify_weights(entry)
    return merge_adapter(
        Path(entry.path),
        out_dir,
        base_model=base_model,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        ref=entry.ref,
    )


async def load_adapter(
    settings: Settings,
    ref: str,
    *,
    server_urls: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> AdapterVersion:
    """Make every server serve ``ref`` under its served name.

    With the Kubernetes registry and vLLM pods that watch it (``platform/convergence.py``), and no
    ``server_urls``: record it as served and wait (``timeout`` seconds) until every Ready pod reports
    it loaded; when one reports a failure or does not report in time, the record is undone (with the
    reason in the history) and the error names those pods. Otherwise every listed server (default:
    :func:`replica_urls`) is asked directly: its base model is read from its model list, and the
    version is checked against it first (``serving/preflight.py``); when a server fails, the servers
    that loaded it in this call unload it again and the registry is unchanged.
    """
    registry = open_registry(settings)

    def record(state: RegistryState, ref: str) -> AdapterVersion:
        entry = state.resolve(ref)
        mark_serving(state, entry, "load")
        return entry

    entry = rehearse(registry.read(), lambda state: record(state, ref))  # refusals, before any server
    if server_urls is None and reconciling_replicas(settings) is not None:
        await asyncio.to_thread(_serve_through_registry, settings, entry, "load", timeout)
        return open_registry(settings).read().resolve(entry.ref)
    await _load_everywhere(settings, entry, server_urls or replica_urls(settings))
    with registry.transaction() as state:
        return record(state, entry.ref)


def _serve_through_registry(
    settings: Settings, entry: AdapterVersion, command: Command, timeout: float
) -> tuple[str, ...]:
    """Record ``entry`` as served and wait until every Ready reconciling pod serves it; undo the
    record when one fails it or does not report in time. Returns the pods that serve it."""
    if files_are_here(settings, entry):
        verify_weights(entry)  # refused here, before the registry changes
    registry = open_registry(settings)
    with registry.transaction() as state:
        current = state.resolve(entry.ref)
        before = current.state
        mark_serving(state, current, command)
    try:
        return wait_for_replicas(settings, entry, serving=True, timeout=timeout)
    except ReplicasDidNotConvergeError as exc:
        if before != "serving":
            with registry.transaction() as state:  # back to what it was, with why in the history
                current = state.resolve(entry.ref)
                if current.state == "serving" and not aliases_of(state, current):
                    current.state = before
                    mark_load_failed(state, current, exc.message[:4000], server=None)
        raise


async def _load_everywhere(settings: Settings, entry: AdapterVersion, urls: list[str]) -> None:
    """Check and load ``entry`` on every server in ``urls``, or on none: all or nothing.

    The checks run here when this process can read the files; from outside a cluster they run once in
    a vLLM pod, which mounts the shared volume (``platform/pod_checks.py``)."""
    here = files_are_here(settings, entry)
    if here:
        verify_weights(entry)
        preflight_adapter(  # the checks that need no server, once, before any server is asked
            Path(entry.path), adapters_root=settings.adapters_dir
        )
    else:
        async with VLLMAdminClient(urls[0], api_key=settings.api_key) as client:
            cards = await client.list_models()
        pod = check_in_vllm_pod(settings, entry, cards)
        log.info("checked in a vLLM pod", extra={"adapter": entry.ref, "pod": pod})
    newly: list[str] = []
    url = urls[0]
    try:
        for url in urls:
            async with VLLMAdminClient(url, api_key=settings.api_key) as client:
                cards = await client.list_models()
                if here:
                    check_servable(settings, entry, served_base(cards), url=url)
                served = [c.id for c in cards if c.is_adapter]
                require_room(served, entry.served_name, adapter_capacity(settings, url), server=url)
                loaded = await client.load_adapter(entry.served_name, entry.path)
                if loaded:
                    newly.append(url)
                try:  # does it change the answers? (serving/output_probe.py)
                    await require_effect(client, entry.served_name, unload=False)
                except AdapterHasNoEffectError:
                    if not loaded and entry.state != "serving":
                        newly.append(url)  # loaded before (a sync, a restart): useless there too
                    raise
    except AdapterHasNoEffectError as exc:
        await _undo_loads(settings, entry, newly)
        with open_registry(settings).transaction() as state:  # why, in the history; state unchanged
            mark_load_failed(state, state.resolve(entry.ref), exc.message[:4000], server=url)
        raise
    except BaseException:
        await _undo_loads(settings, entry, newly)
        raise


async def _undo_loads(settings: Settings, entry: AdapterVersion, urls: list[str]) -> None:
    """Unload ``entry`` from ``urls``, so that a failed load or promotion leaves every server as it was."""
    for url in urls:
        try:
            async with VLLMAdminClient(url, api_key=settings.api_key, retries=1) as client:
                await client.unload_adapter(entry.served_name)
        except LoraplaneError as exc:
            log.warning(
                "could not undo a load", extra={"adapter": entry.ref, "server": url, "why": exc.message}
            )


async def base_model_name(settings: Settings) -> str:
    async with VLLMAdminClient(settings.server_url, api_key=settings.api_key) as client:
        bases = [m.id for m in await client.list_models() if not m.is_adapter]
    if not bases:
        raise LoraplaneError(f"the server at {settings.server_url} serves no base model")
    return bases[0]


def _report_stem(entry: AdapterVersion, created_at: str) -> str:
    return f"{entry.name}-{entry.version}-{created_at.replace(':', '').replace('-', '')}"


async def evaluate_adapter(
    settings: Settings,
    ref: str,
    suite: LoadedSuite | Path,
    *,
    report_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> EvalRecord:
    """Run an eval suite on ``ref``, the current ``prod`` of that adapter and the base model, side by side,
    through the live server; write the report files and store the verdict with the version.

    ``suite`` is a loaded suite, a suite YAML file, or a JSONL eval set (then the default suite:
    common metrics, gated on beating the base model beyond noise). A run that cannot finish writes
    a partial report marked incomplete and records nothing in the registry. When the version's
    manifest names the MLflow run that trained it (``tracking.mlflow``), the figures and the report
    are logged to that run too; a tracking server that fails is a warning (``on_warning``, default:
    the log), the registry's record stands.
    """
    target = open_registry(settings).read().resolve(ref)
    transition("eval", target.state, ref=target.ref, path=target.path)  # a retired one: refused first
    if isinstance(suite, Path):
        loaded = suite_for_dataset(suite) if suite.suffix in (".jsonl", ".json") else load_suite(suite)
    else:
        loaded = suite
    if settings.registry == "kubernetes":  # the release's vLLM pods: readiness completions, users
        refuse_perplexity_on_shared_servers(
            loaded,
            str(suite) if isinstance(suite, Path) else loaded.suite.name,
            f"an eval against release {settings.release!r}",
        )
    report_dir = report_dir or settings.home / "reports"
    entry = await load_adapter(settings, ref)
    models = {"candidate": entry.served_name}
    adapter = open_registry(settings).read().adapter(entry.name)
    prod_version = adapter.aliases.get("prod")
    if prod_version and prod_version != entry.version:
        models["prod"] = (await load_adapter(settings, f"{entry.name}@{prod_version}")).served_name
    models["base"] = await base_model_name(settings)
    try:
        report = await run_suite(
            loaded, settings.server_url, models, api_key=settings.api_key, on_progress=on_progress
        )
    except SuiteIncompleteError as exc:
        files = write_report(
            exc.report, report_dir, _report_stem(entry, exc.report.created_at) + "-INCOMPLETE"
        )
        raise LoraplaneError(
            f"evaluation of {entry.ref} did not finish: {exc.message}",
            hint=f"nothing was recorded in the registry; the partial report is {files.markdown}",
        ) from None
    files = write_report(report, report_dir, _report_stem(entry, report.created_at))
    gate = report.gate
    record = EvalRecord(
        suite=report.suite,
        suite_path=report.suite_path,
        suite_sha256=report.suite_sha256,
        endpoint=settings.server_url,
        created_at=report.created_at,
        candidate_model=entry.served_name,
        models=report.models,
        scores=report.scores(),
        checks=gate.checks if gate else [],
        passed=gate.passed if gate else False,  # no policy, no promotion without --force
        report_path=str(files.json),
    )
    with open_registry(settings).transaction() as state:
        record_eval(state, entry.ref, record)  # refused if it was retired meanwhile: nothing recorded
        evaluations = len(state.resolve(entry.ref).evals)
    from loraplane.trainer.tracking import log_eval_to_mlflow  # light; mlflow only when a run is named

    log_eval_to_mlflow(
        entry.manifest,
        scores=record.scores,
        passed=record.passed,
        suite=record.suite,
        report=report.model_dump(mode="json"),
        files=[files.markdown, files.png],
        step=evaluations,
        on_warning=on_warning,
    )
    return record


async def promote_adapter(
    settings: Settings,
    ref: str,
    *,
    alias: str = "prod",
    force: bool = False,
    reason: str | None = None,
    server_urls: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[AdapterVersion, str | None]:
    """Point ``<name>:<alias>`` at ``ref``. Returns the version and the alias's previous target.

    Refused unless the version's weights are unchanged and its latest evaluation passed; ``force``
    (with a ``reason``, kept in the history) overrides the evaluation gate only. Every replica
    (``server_urls``, default :func:`replica_urls`) loads the version before the alias moves; when
    one cannot, the others unload what this call loaded and the registry is unchanged.
    """
    if force and not (reason and reason.strip()):
        raise InvalidInputError("--force needs --reason: say why the evaluation gate is overridden")
    seen = open_registry(settings).read()
    entry = seen.resolve(ref)
    expected = seen.adapter(entry.name).aliases.get(alias)  # what this promotion replaces

    def record(state: RegistryState) -> tuple[AdapterVersion, str | None]:
        current = state.resolve(entry.ref)
        mark_serving(state, current, "promote")
        previous = move_alias(
            state,
            entry.name,
            alias,
            entry.version,
            expected=expected,
            action="promote",
            reason=reason,
            forced=force,
        )
        return current, previous

    rehearse(seen, record)  # retired, or already the alias's version: refused before anything else
    if files_are_here(settings, entry):  # else checked in a vLLM pod before any replica loads it
        verify_weights(entry)
    latest = entry.latest_eval()
    if not force:
        if latest is None:
            raise PromotionRefusedError(
                f"{entry.ref} has never been evaluated",
                hint=f"run: loraplane adapters eval {entry.ref} --dataset FILE",
            )
        if not latest.passed and not latest.checks:
            raise PromotionRefusedError(
                f"{entry.ref}: its latest evaluation (suite {latest.suite!r}) has no promotion gate",
                hint="add a 'gate:' section to the suite and evaluate again, or use --force --reason",
            )
        if not latest.passed:
            failed = "\n".join(f"  - {c.rule}: {c.message}" for c in latest.failed_checks())
            raise PromotionRefusedError(
                f"{entry.ref} failed the gate of its latest evaluation "
                f"(suite {latest.suite!r}, {latest.created_at}):\n{failed}",
                hint='improve the adapter and evaluate again, or override with --force --reason "..."',
            )
    # every replica must serve it before the alias points at it; on any failure nothing changes
    if server_urls is None and reconciling_replicas(settings) is not None:
        await asyncio.to_thread(_serve_through_registry, settings, entry, "promote", timeout)
    else:
        await _load_everywhere(settings, entry, server_urls or replica_urls(settings))
    with open_registry(settings).transaction() as state:
        return record(state)


async def rollback_alias(
    settings: Settings,
    name: str,
    *,
    alias: str = "prod",
    to: str | None = None,
    reason: str | None = None,
    server_urls: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[AdapterVersion, str]:
    """Point ``name:alias`` back at the version it had before its last change (or at ``to``).

    The target must still be registered, not retired, with unchanged weights, and is loaded on the
    server before the alias moves; the evaluation gate is not asked again (the version served this
    alias before). Returns the version now served and the one it replaced.
    """
    seen = open_registry(settings).read()
    current = seen.adapter(name).aliases.get(alias)
    if current is None:
        raise RegistryError(f"{name}:{alias} is not set: there is nothing to roll back")
    version = to or rollback_target(seen, name, alias)
    entry = seen.resolve(f"{name}@{version}")

    def record(state: RegistryState) -> AdapterVersion:
        target = state.resolve(entry.ref)
        mark_serving(state, target, "rollback")
        move_alias(state, name, alias, entry.version, expected=current, action="rollback", reason=reason)
        return target

    rehearse(seen, record)  # retired, or already the alias's version: refused before any server
    if server_urls is None and reconciling_replicas(settings) is not None:
        await asyncio.to_thread(_serve_through_registry, settings, entry, "rollback", timeout)
    else:
        await _load_everywhere(settings, entry, server_urls or replica_urls(settings))
    with open_registry(settings).transaction() as state:
        return record(state), current


def set_canary(settings: Settings, name: str, *, percent: float | None, alias: str = "canary") -> Adapter:
    """Keep a weighted canary with adapter ``name``: ``percent`` of the requests for ``NAME`` and
    ``NAME:prod`` go to the version ``NAME:<alias>`` points at, from the gateway's next registry read
    (no restart); it overrides the gateway's own rule for this adapter, and 0 sends nothing there.
    ``percent`` None removes it (the gateway's own rule, if any, applies again). One ``canary`` event
    in the history; setting what is already set changes nothing."""
    try:
        weight = None if percent is None else CanaryWeight(alias=alias, percent=percent)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'alias'}: {e['msg']}" for e in exc.errors())
        raise InvalidInputError(
            f"canary {alias}={percent}: {problems}",
            hint="use a percent from 0 to 100 and an alias other than prod, e.g. --percent 10 --alias canary",
        ) from None
    with open_registry(settings).transaction() as state:
        adapter = state.adapter(name)
        if adapter.canary == weight:
            return adapter
        adapter.canary = weight
        said = "removed" if weight is None else f"{weight.percent:g}% to {name}:{weight.alias}"
        state.history.append(
            HistoryEvent(
                action="canary", adapter=name, alias=None if weight is None else weight.alias, reason=said
            )
        )
    return adapter


def _servable(state: RegistryState, entry: AdapterVersion) -> bool:
    return entry.served_name in {v.served_name for v in servable_versions(state)}


async def unload_adapter(
    settings: Settings, ref: str, *, server_urls: list[str] | None = None, retire: bool = False
) -> AdapterVersion:
    """Stop serving ``ref`` (and with ``retire``, mark it retired for good). Refused while an alias
    points at it, and for a retired version (retired is terminal). The servers are asked first: when
    one cannot be reached, the registry is unchanged.

    A ``serving`` version is unloaded from every server first (when one cannot be reached, the
    registry is unchanged); a ``registered`` one (which a restart or ``sync`` may have loaded) is
    unloaded where a server answers. Either is recorded as unloaded: neither a restart nor ``sync``
    loads it again until ``adapters load`` does.
    """
    entry, _ = await _stop(settings, ref, retire=retire, server_urls=server_urls)
    return entry


async def retire_adapter(
    settings: Settings, ref: str, *, server_urls: list[str] | None = None
) -> tuple[AdapterVersion, bool]:
    """Unload ``ref`` everywhere and mark it retired for good (see :func:`unload_adapter`).

    Returns the version and whether it was retired now: False when it already was (nothing changed).
    """
    return await _stop(settings, ref, retire=True, server_urls=server_urls)


async def _stop(
    settings: Settings,
    ref: str,
    *,
    retire: bool,
    server_urls: list[str] | None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> tuple[AdapterVersion, bool]:
    registry = open_registry(settings)
    seen = registry.read()
    entry = seen.resolve(ref)
    servable = _servable(seen, entry)
    _, changes = rehearse(seen, lambda s: record_stop(s, entry.ref, retire=retire, servable=servable))
    if not changes:  # already stopped, or already retired: no server to ask, nothing to record
        return entry, False
    if server_urls is None and reconciling_replicas(settings) is not None:
        # the pods unload what the registry no longer serves: record it, then wait for them
        with registry.transaction() as state:
            current = state.resolve(entry.ref)
            was = servable or _servable(state, current)
            stopped = record_stop(state, entry.ref, retire=retire, servable=was)
        if servable:
            await asyncio.to_thread(wait_for_replicas, settings, entry, serving=False, timeout=timeout)
        return stopped
    for url in server_urls or replica_urls(settings) if servable else []:
        if entry.state == "serving":  # it is served: every server must drop it, else nothing changes
            async with VLLMAdminClient(url, api_key=settings.api_key) as client:
                await client.unload_adapter(entry.served_name)
            continue
        try:  # registered: served only if a restart or sync loaded it; sync removes it later anyway
            async with VLLMAdminClient(url, api_key=settings.api_key, retries=0) as client:
                await client.unload_adapter(entry.served_name)
        except LoraplaneError as exc:
            log.info(
                "could not unload; sync will", extra={"adapter": entry.ref, "server": url, "why": exc.message}
            )
    with registry.transaction() as state:  # refused if an alias moved onto it meanwhile
        current = state.resolve(entry.ref)
        return record_stop(state, entry.ref, retire=retire, servable=servable or _servable(state, current))


async def sync_adapters(
    settings: Settings,
    server_urls: list[str] | None = None,
    *,
    release: str = "platform",
    prune_unknown: bool = True,
    dry_run: bool = False,
) -> SyncReport:
    """Make every replica serve exactly the registry's servable versions (see ``serving/reconcile.py``).

    Replicas: ``server_urls`` if given; else, with the Kubernetes registry, the Ready pods of
    ``release``'s vLLM Deployment; else :func:`replica_urls`.
    """
    if server_urls:
        urls = server_urls
    elif settings.registry == "kubernetes":
        urls = list_vllm_pods(settings, release=release)
        if not urls:
            raise LoraplaneError(
                f"release {release!r} has no Ready vLLM pod in namespace {settings.namespace!r}",
                hint="check the release name (--release) and the pods: kubectl get pods -l "
                "app.kubernetes.io/component=vllm",
            )
    else:
        urls = replica_urls(settings)
    return await sync_replicas(settings, urls, prune_unknown=prune_unknown, dry_run=dry_run)
