"""The S3 test server (tests/s3_server.py): boto3, unmodified, against moto's real S3 API server."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from moto import settings as moto_settings
from s3_server import S3Server


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the developer's AWS setup reaches boto3 here (a profile, keys, an endpoint)."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_bytes(b'{"layers": 2}')
    (root / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
    (root / "tokenizer" / "vocab.json").write_bytes(b'{"a": 0}')
    return root


def error_code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def test_boto3_lists_and_downloads_what_was_uploaded(s3: S3Server, model_dir: Path, tmp_path: Path) -> None:
    s3.create_bucket("models")
    keys = s3.upload_dir("models", "base/tiny/", model_dir)
    assert keys == ["base/tiny/config.json", "base/tiny/model.safetensors", "base/tiny/tokenizer/vocab.json"]

    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="models", Prefix="base/tiny/")
    listed = {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
    assert listed == {key: (model_dir / key.removeprefix("base/tiny/")).stat().st_size for key in keys}
    for key in keys:
        target = tmp_path / "download" / key
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("models", key, str(target))
        assert target.read_bytes() == (model_dir / key.removeprefix("base/tiny/")).read_bytes()
    body = client.get_object(Bucket="models", Key="base/tiny/config.json", Range="bytes=1-8")["Body"].read()
    assert body == b'"layers"'


def test_a_denied_bucket_answers_access_denied_to_the_same_credentials(s3: S3Server, model_dir: Path) -> None:
    for bucket in ("open-models", "secret-models"):
        s3.create_bucket(bucket)
        s3.upload_dir(bucket, "tiny", model_dir)
    s3.deny_bucket("secret-models")
    client = s3.client()

    assert client.list_objects_v2(Bucket="open-models", Prefix="tiny/")["KeyCount"] == 3
    assert client.get_object(Bucket="open-models", Key="tiny/config.json")["Body"].read() == b'{"layers": 2}'
    with pytest.raises(ClientError) as listing:
        client.list_objects_v2(Bucket="secret-models", Prefix="tiny/")
    assert error_code(listing) == "AccessDenied"
    with pytest.raises(ClientError) as reading:
        client.get_object(Bucket="secret-models", Key="tiny/config.json")
    assert error_code(reading) == "AccessDenied"
    with pytest.raises(ClientError) as heading:  # a HEAD answer has no body: only the status says it
        client.head_object(Bucket="secret-models", Key="tiny/config.json")
    assert (error_code(heading), heading.value.response["ResponseMetadata"]["HTTPStatusCode"]) == ("403", 403)
    # the bucket is there and full for whoever may read it
    assert s3.client(s3.admin_credentials).list_objects_v2(Bucket="secret-models")["KeyCount"] == 3


def test_credentials_are_checked(s3: S3Server) -> None:
    s3.create_bucket("models")
    s3.put_object("models", "a.txt", b"a")
    other = s3.add_user("trainer", denied_buckets=("models",))

    with pytest.raises(ClientError) as unknown:
        s3.client(s3.unknown_credentials()).list_objects_v2(Bucket="models")
    assert error_code(unknown) == "InvalidAccessKeyId"
    wrong_secret = type(s3.credentials)(s3.credentials.access_key_id, "wrong-secret", s3.region)
    with pytest.raises(ClientError) as forged:
        s3.client(wrong_secret).list_objects_v2(Bucket="models")
    assert error_code(forged) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as denied:
        s3.client(other).get_object(Bucket="models", Key="a.txt")
    assert error_code(denied) == "AccessDenied"
    assert s3.client().get_object(Bucket="models", Key="a.txt")["Body"].read() == b"a"


def test_the_environment_points_a_subprocess_at_the_server(s3: S3Server) -> None:
    """``env()`` is all another process needs (boto3's own lookup of keys, region and endpoint)."""
    s3.create_bucket("models")
    s3.put_object("models", "k", b"from the server")
    code = (
        "import boto3; print(boto3.client('s3').get_object(Bucket='models', Key='k')['Body'].read().decode())"
    )
    env = {**os.environ, **s3.env()}

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    assert (out.returncode, out.stdout.strip()) == (0, "from the server"), out.stderr
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # set for that process only


def test_one_server_at_a_time_and_state_is_reset(s3: S3Server) -> None:
    s3.create_bucket("leftover")
    with pytest.raises(RuntimeError, match="already running"):
        S3Server().start()
    s3.stop()
    assert math.isinf(moto_settings.INITIAL_NO_AUTH_ACTION_COUNT)  # moto's switch is back as it was
    with S3Server() as fresh:
        assert fresh.client(fresh.admin_credentials).list_buckets()["Buckets"] == []
