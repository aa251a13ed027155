"""moto's standalone S3 server for tests: a real HTTP endpoint, so presigned URLs, multipart
uploads and other processes (Ray workers, given `env`) all work against it.

    with s3_server() as s3:
        store = S3Store(s3.bucket, "hub", s3.endpoint_url)
        endpoint_url, bucket = s3   # it is a (endpoint_url, bucket) tuple too
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import boto3

# moto accepts any credentials; fixed ones keep a developer's real ones out of the requests
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# would otherwise travel with the fake keys, or replace them
_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


class S3Server(NamedTuple):
    endpoint_url: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """Environment a process (a Ray worker) needs to reach the server with boto3."""
        return dict(CREDENTIALS)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def client(self) -> Any:
        """A boto3 client of the server, for what tests check behind a store's back."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


@contextmanager
def s3_server(bucket: str | None = None, ip_address: str = "127.0.0.1") -> Iterator[S3Server]:
    """Start moto's S3 server on a free port with one empty bucket; stop it afterwards.

    Sets the credentials in os.environ while it runs (restored after). The bucket name is
    unique by default: moto's state is per process, shared by every server it runs.
    """
    from moto.server import ThreadedMotoServer  # slow import; only tests that use S3 pay

    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, *_CLEARED)}
    os.environ.update(CREDENTIALS)
    for k in _CLEARED:
        os.environ.pop(k, None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=ip_address, port=0, verbose=False)  # 0: a free port
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"http://{host}:{port}", bucket or f"raydock-test-{uuid.uuid4().hex[:12]}")
        client = s3.client()
        client.create_bucket(Bucket=s3.bucket)
        try:
            yield s3
        finally:
            drop_bucket(client, s3.bucket)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def drop_bucket(client: Any, bucket: str) -> None:
    """Delete a bucket and its objects: moto's state outlives its server in this process."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
