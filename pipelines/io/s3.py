"""Filesystems for every reader and writer: a pyarrow S3FileSystem that honours custom endpoints (MinIO, moto,
any S3-compatible store) and `resolve_path`, which turns a URI or local path into a (filesystem, path) pair."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem; credentials come from the usual AWS chain (environment, profile, instance role).

    `endpoint_url` (or `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`) such as `http://127.0.0.1:9000` selects an
    S3-compatible server; its scheme decides http or https. Region: `region`, `AWS_REGION`,
    `AWS_DEFAULT_REGION`, else us-east-1.
    """
    endpoint_url = endpoint_url or next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint_url:
        return pafs.S3FileSystem(region=region)
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"S3 endpoint must look like http(s)://host[:port], got {endpoint_url!r}")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region)


def resolve_path(uri: str, filesystem: pafs.FileSystem | None = None,
                 s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `uri`: `s3://bucket/key` (via `s3_filesystem`), any other scheme
    pyarrow knows (`gs://`, `hdfs://`, `file://`), or a local path (made absolute). A given `filesystem` wins
    and only the scheme is stripped."""
    if not uri:
        raise ValueError("expected a path or URI, got an empty string")
    parsed = urlparse(uri)
    has_scheme = len(parsed.scheme) > 1  # one letter is a Windows drive, not a scheme
    if filesystem is not None:
        path = (parsed.netloc + parsed.path) if has_scheme else uri
        return filesystem, path.rstrip("/") or "/"
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI needs a bucket: expected s3://bucket/prefix, got {uri!r}")
        return s3_filesystem(s3_endpoint), (parsed.netloc + parsed.path).rstrip("/")
    if has_scheme:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(uri)
