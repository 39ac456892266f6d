"""A real S3 API server for tests: moto's standalone server on 127.0.0.1, with IAM credentials enforced.

Why: the code under test reads ``s3://`` prefixes with boto3, and no S3 service can be reached from here.
moto's server (``moto.server.ThreadedMotoServer``, a werkzeug server in a background thread) speaks the
S3 wire protocol, so boto3 runs unmodified against ``endpoint_url``: signing, XML parsing, pagination,
errors and all.

Credentials matter here, as on AWS: the server runs with moto's IAM enforcement on (its
``/moto-api/reset-auth`` switch, which moto's server mode honours: every request's SigV4 signature is
checked against the IAM users' keys and the action against their policies). Three kinds of credentials:

* ``admin_credentials``: allowed everything; the helpers (``create_bucket``, ``upload_dir``, ...) use them.
* ``credentials``: what the code under test should use: ``s3:*`` on every bucket except those passed
  to ``deny_bucket``, where an explicit IAM ``Deny`` makes ``ListObjects``/``GetObject`` fail with
  ``AccessDenied`` (a ``HeadObject`` fails with a bare ``403``: a HEAD answer has no body, as on AWS).
* ``unknown_credentials()``: a key pair IAM does not know: ``InvalidAccessKeyId``.

Bucket policies would not do for a denied bucket: moto evaluates them only for object requests (and
without the principal), answering an empty 403, never for listings. IAM identity policies are evaluated
for every S3 request.

moto keeps its state (buckets, IAM users, the enforcement switch) in module globals of this process, so
one ``S3Server`` may run at a time per process; it resets moto's state and the switch when it stops.

Usage::

    with S3Server() as s3:
        s3.create_bucket("models")
        keys = s3.upload_dir("models", "llama/v1", Path("model-dir"))
        s3.deny_bucket("secret-models")            # s3.credentials get AccessDenied there
        client = s3.client()                       # boto3 client with s3.credentials
        env = s3.env()                             # AWS_* variables for the code under test (a subprocess or
                                                   # monkeypatch.setenv): credentials, region, endpoint
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import httpx
from botocore.config import Config
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
_BOOTSTRAP_CREDENTIALS = ("testing", "testing")  # any key works while enforcement is off
_READY_DEADLINE_S = 10.0
_RUNNING = threading.Lock()  # moto's state is per process: one server at a time


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    region: str = REGION

    def env(self, endpoint_url: str) -> dict[str, str]:
        """AWS_* variables pointing boto3 (1.28 or later) at ``endpoint_url`` with these keys."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": endpoint_url,
        }


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


class S3Server:
    """moto's S3 (and IAM) API on a free 127.0.0.1 port; see the module docstring."""

    def __init__(self, region: str = REGION) -> None:
        self.region = region
        self.endpoint_url = ""
        self.admin_credentials = S3Credentials("", "", region)
        self.credentials = S3Credentials("", "", region)
        self._moto: ThreadedMotoServer | None = None
        self._previous_auth_count = "inf"
        self._previous_werkzeug_level = logging.NOTSET
        self._user_names: dict[str, str] = {}  # access key id -> IAM user
        self._owns_lock = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if not _RUNNING.acquire(blocking=False):
            raise RuntimeError("an S3Server is already running in this process (moto's state is global)")
        self._owns_lock = True
        werkzeug = logging.getLogger("werkzeug")  # moto's request log: one INFO line per request
        self._previous_werkzeug_level = werkzeug.level
        werkzeug.setLevel(logging.WARNING)
        try:
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()  # returns once the port is bound
            host, port = self._moto.get_host_and_port()
            self.endpoint_url = f"http://{host}:{port}"
            # enforcement off while setting up (whatever it was), answering HTTP within the deadline
            self._previous_auth_count = self._set_auth_count("inf", wait=True)
            self._moto_api("reset")
            self.admin_credentials = self._create_user("admin", _policy(_allow("*", "*")))
            self.credentials = self._create_user("reader", _policy(_allow("s3:*", "*")))
            self._set_auth_count("0")  # from now on every request is authenticated and authorized
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if self._moto is not None and self.endpoint_url:
                self._set_auth_count(self._previous_auth_count)
                self._moto_api("reset")
        finally:
            if self._moto is not None:
                self._moto.stop()
                self._moto = None
            logging.getLogger("werkzeug").setLevel(self._previous_werkzeug_level)
            if self._owns_lock:
                self._owns_lock = False
                _RUNNING.release()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- clients and credentials --------------------------------------------------------------

    def client(self, credentials: S3Credentials | None = None, service: str = "s3") -> Any:
        """A boto3 client for this server, signed with ``credentials`` (default: ``self.credentials``).

        Keys, region and endpoint are passed explicitly: the process's AWS_* variables do not matter.
        """
        creds = credentials or self.credentials
        session = boto3.session.Session(
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            region_name=creds.region,
        )
        config = Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"})
        return session.client(service, endpoint_url=self.endpoint_url, config=config)

    def env(self, credentials: S3Credentials | None = None) -> dict[str, str]:
        """AWS_* variables for the code under test: ``credentials`` (default: ``self.credentials``)."""
        return (credentials or self.credentials).env(self.endpoint_url)

    def unknown_credentials(self) -> S3Credentials:
        """Well-formed keys that IAM does not know: every request fails with ``InvalidAccessKeyId``."""
        return S3Credentials("AKIA" + "0" * 16, "not-a-secret-" + "0" * 27, self.region)

    def add_user(self, name: str, *, denied_buckets: tuple[str, ...] = ()) -> S3Credentials:
        """Another IAM user: ``s3:*`` everywhere but on ``denied_buckets``."""
        statements = [_allow("s3:*", "*")]
        if denied_buckets:
            statements.append(_deny_buckets(denied_buckets))
        return self._create_user(name, _policy(*statements))

    def deny_bucket(self, bucket: str, credentials: S3Credentials | None = None) -> None:
        """Deny ``credentials`` (default ``self.credentials``) every S3 action on ``bucket`` and its objects.

        The bucket need not exist (yet): create it and fill it with ``create_bucket``/``upload_dir``.
        """
        user = self._user_names[(credentials or self.credentials).access_key_id]
        self.client(self.admin_credentials, "iam").put_user_policy(
            UserName=user, PolicyName=f"deny-{bucket}", PolicyDocument=_policy(_deny_buckets((bucket,)))
        )

    # --- content ------------------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        s3 = self.client(self.admin_credentials)
        if self.region == "us-east-1":
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client(self.admin_credentials).put_object(Bucket=bucket, Key=key, Body=data)

    def upload_dir(self, bucket: str, prefix: str, directory: Path) -> list[str]:
        """Upload each file under ``directory`` to ``s3://bucket/prefix/<relative path>``; the keys."""
        s3 = self.client(self.admin_credentials)
        base = prefix.strip("/")
        keys: list[str] = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            relative = path.relative_to(directory).as_posix()
            key = f"{base}/{relative}" if base else relative
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    # --- internals ----------------------------------------------------------------------------

    def _create_user(self, name: str, policy: str) -> S3Credentials:
        user = f"{name}-{len(self._user_names) + 1}"
        creds = self.admin_credentials if self.admin_credentials.access_key_id else None
        iam = self.client(creds or S3Credentials(*_BOOTSTRAP_CREDENTIALS, self.region), "iam")
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="access", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._user_names[key["AccessKeyId"]] = user
        return S3Credentials(key["AccessKeyId"], key["SecretAccessKey"], self.region)

    def _set_auth_count(self, count: str, *, wait: bool = False) -> str:
        """Set moto's INITIAL_NO_AUTH_ACTION_COUNT ("0": enforce IAM, "inf": don't); returns the old value."""
        response = self._moto_api("reset-auth", count, wait=wait)
        return str(response.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])

    def _moto_api(self, action: str, body: str = "", *, wait: bool = False) -> httpx.Response:
        deadline = time.monotonic() + (_READY_DEADLINE_S if wait else 0)
        while True:
            try:
                response = httpx.post(f"{self.endpoint_url}/moto-api/{action}", content=body, timeout=5)
                response.raise_for_status()
                return response
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise
                threading.Event().wait(0.05)


def _allow(action: str, resource: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource}


def _deny_buckets(buckets: tuple[str, ...]) -> dict[str, Any]:
    resources = [arn for b in buckets for arn in (f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*")]
    return {"Effect": "Deny", "Action": "s3:*", "Resource": resources}


__all__ = ["REGION", "S3Credentials", "S3Server"]
