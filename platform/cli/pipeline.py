"""``loraplane pipeline export``: train -> evaluate -> promote pipelines for Argo and Kubeflow."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
import typer.core

from loraplane.common.errors import InvalidInputError
from loraplane.platform.cli.app import _settings, err, handled, pipeline_app
from loraplane.platform.cli.release import _release_option


@pipeline_app.command("export")
@handled
def pipeline_export(
    train_config: Path = typer.Argument(..., help="Training config (YAML), as `train submit` takes it."),
    suite: Path = typer.Argument(..., help="Evaluation suite (YAML), as `adapters eval --suite` takes it."),
    fmt: str = typer.Option(..., "--format", help="argo (Workflow YAML) or kfp (a kfp DSL Python file)."),
    release: str = _release_option(),
    image: str | None = typer.Option(
        None, help="Image of the steps (default: the loraplane trainer image of this version)."
    ),
    service_account: str = typer.Option("loraplane-pipeline", help="ServiceAccount of the steps' pods."),
    alias: str = typer.Option("prod", help="Alias the promote step moves."),
    vllm_url: str | None = typer.Option(
        None,
        help="The release's vLLM Service the evaluate step queries (default: http://RELEASE-loraplane-vllm.NS.svc:8000).",
    ),
    api_key_secret: str | None = typer.Option(
        None,
        help="NAME:KEY of vLLM's API key Secret (default: RELEASE-loraplane-vllm-key:api-key, the chart's).",
    ),
    out: Path | None = typer.Option(None, "--out", "-O", help="Write here (default: stdout)."),
) -> None:
    """Write a pipeline that trains TRAIN_CONFIG with the release's template, evaluates the new version
    with SUITE against the live server and promotes it only if the suite's gate passes (the scheduler's
    condition on the promote step). Each step runs this CLI in the loraplane image, in namespace -n.
    argo: the steps' ServiceAccount, Role and RoleBinding, then the Workflow (`kubectl create -f`).
    kfp: a Python file with the kfp DSL; `python pipeline.py pipeline.yaml` compiles it (pip install kfp).

    \b
    Examples:
      loraplane -n ml pipeline export train.yaml suite.yaml --format argo | kubectl create -f -
      loraplane -n ml pipeline export train.yaml suite.yaml --format kfp -O pipeline.py
    """

    from loraplane.platform.pipeline_export import FORMATS, export, load_spec

    if fmt not in FORMATS:
        raise InvalidInputError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    spec = load_spec(
        train_config,
        suite,
        namespace=_settings().namespace,
        release=release,
        image=image,
        service_account=service_account,
        alias=alias,
        vllm_url=vllm_url,
        api_key_secret=api_key_secret,
    )
    text = export(spec, fmt, filename=out.name if out is not None else "pipeline.py")
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err.print(f"wrote {out} ({fmt})", highlight=False)
