"""Datasets and checkpoints in S3: ``s3://bucket/prefix`` URIs beside local paths.

Credentials and the endpoint come from the usual AWS variables (``AWS_ENDPOINT_URL`` for MinIO,
Ceph or moto), read by boto3 itself. Downloads go to a local cache folder that mirrors the bucket
(``<cache>/<bucket>/<key>``); an object already there with the same size and modification time is
not fetched again, and each file is written atomically. A :class:`FolderMirror` uploads a folder's
new or changed files while a process runs (training checkpoints that must outlive a pod).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from healthivert.errors import InputDataError
from healthivert.io.atomic import atomic_path

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"


def is_s3_uri(location: str | os.PathLike[str]) -> bool:
    """True for an ``s3://`` URI (a local path otherwise)."""
    return str(location).startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (no trailing slash).

    Raises:
        InputDataError: not an ``s3://`` URI, or no bucket named.
    """
    if not is_s3_uri(uri):
        raise InputDataError(uri, "not an s3:// URI", "expected s3://bucket/prefix")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise InputDataError(uri, "no bucket in the URI", "expected s3://bucket/prefix")
    return bucket, key.strip("/")


def _client() -> Any:
    import boto3

    return boto3.client("s3")


def _explain(uri: str, exc: Exception) -> InputDataError:
    """One line for a failed S3 call: missing bucket, refused credentials, unreachable endpoint."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return InputDataError(uri, "no AWS credentials", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return InputDataError(uri, "bucket or object not found")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return InputDataError(uri, f"access refused ({code})", "check the AWS credentials")
        return InputDataError(uri, f"S3 error {code}", str(exc).splitlines()[0])
    return InputDataError(uri, "S3 endpoint unreachable", f"{type(exc).__name__}; check AWS_ENDPOINT_URL")


def _s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def list_objects(uri: str) -> list[dict[str, Any]]:
    """Every object under ``uri`` (treated as a folder): dicts with ``Key``, ``Size``, ``LastModified``.

    Raises:
        InputDataError: the bucket does not exist, access is refused, or the endpoint is unreachable.
    """
    bucket, prefix = split_s3_uri(uri)
    folder = f"{prefix}/" if prefix else ""
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        return [item for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/")]
    except _s3_errors() as exc:
        raise _explain(uri, exc) from exc


def _fetch(client: Any, bucket: str, item: dict[str, Any], target: Path) -> bool:
    """Download one object to ``target`` unless it is there already; True when it was downloaded."""
    stamp = item["LastModified"].timestamp()
    if target.is_file() and target.stat().st_size == item["Size"] and target.stat().st_mtime == stamp:
        return False
    with atomic_path(target) as tmp:
        client.download_file(bucket, item["Key"], str(tmp))
    os.utime(target, (stamp, stamp))
    return True


def download_prefix(uri: str, cache: str | os.PathLike[str]) -> Path:
    """Mirror every object under ``uri`` into ``cache``; returns the local folder of the prefix.

    Raises:
        InputDataError: no object under the prefix, or an S3 failure (see :func:`list_objects`).
    """
    bucket, prefix = split_s3_uri(uri)
    items = list_objects(uri)
    if not items:
        raise InputDataError(uri, "no objects under this prefix", "check the bucket and the dataset prefix")
    local = Path(cache) / bucket / prefix
    client = _client()
    fetched = 0
    try:
        for item in items:
            fetched += _fetch(client, bucket, item, Path(cache) / bucket / item["Key"])
    except _s3_errors() as exc:
        raise _explain(uri, exc) from exc
    log.info("%s: %d object(s), %d downloaded into %s", uri, len(items), fetched, local)
    return local


def download_file(uri: str, cache: str | os.PathLike[str]) -> Path:
    """Fetch one object (e.g. a grades file) into ``cache``; returns its local path.

    Raises:
        InputDataError: the object or bucket does not exist, or another S3 failure.
    """
    bucket, key = split_s3_uri(uri)
    client = _client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except _s3_errors() as exc:
        raise _explain(uri, exc) from exc
    target = Path(cache) / bucket / key
    try:
        item = {"Key": key, "Size": head["ContentLength"], "LastModified": head["LastModified"]}
        _fetch(client, bucket, item, target)
    except _s3_errors() as exc:
        raise _explain(uri, exc) from exc
    return target


def local_copy(location: str, cache: str | os.PathLike[str], folder: bool) -> Path:
    """A local path for ``location``: itself when local, else its download into ``cache``."""
    if not is_s3_uri(location):
        return Path(location)
    return download_prefix(location, cache) if folder else download_file(location, cache)


def upload_file(path: str | os.PathLike[str], uri: str) -> None:
    """Upload one local file to the object ``uri``.

    Raises:
        InputDataError: the bucket does not exist, access is refused, or the endpoint is unreachable.
    """
    bucket, key = split_s3_uri(uri)
    try:
        _client().upload_file(str(path), bucket, key)
    except _s3_errors() as exc:
        raise _explain(uri, exc) from exc


def upload_folder(folder: str | os.PathLike[str], uri: str, sent: dict[str, tuple[int, float]] | None = None) -> int:
    """Upload the files of ``folder`` under ``uri``, skipping those ``sent`` records unchanged.

    Args:
        folder: local folder (missing: nothing to send).
        uri: ``s3://bucket/prefix`` the relative paths are appended to.
        sent: relative path -> (size, mtime) of files already uploaded; updated in place.

    Returns:
        The number of files uploaded.
    """
    bucket, prefix = split_s3_uri(uri)
    folder = Path(folder)
    sent = {} if sent is None else sent
    count = 0
    client = _client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # an atomic writer's temporary: sent once it is renamed into place
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        if sent.get(relative) == (stat.st_size, stat.st_mtime):
            continue
        key = f"{prefix}/{relative}" if prefix else relative
        try:
            client.upload_file(str(path), bucket, key)
        except _s3_errors() as exc:
            raise _explain(f"{S3_SCHEME}{bucket}/{key}", exc) from exc
        sent[relative] = (stat.st_size, stat.st_mtime)
        count += 1
    return count


class FolderMirror:
    """Keeps ``uri`` up to date with a local folder: uploads new or changed files every ``interval_s``.

    Only uploads, never deletes. Files whose name starts with a dot (atomic writers' temporaries)
    are left out, so a checkpoint is sent only once it is complete.
    """

    def __init__(self, folder: str | os.PathLike[str], uri: str, interval_s: float = 30.0) -> None:
        split_s3_uri(uri)
        self.folder = Path(folder)
        self.uri = uri
        self.interval_s = interval_s
        self._sent: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._lock = threading.Lock()

    def restore(self) -> int:
        """Download what ``uri`` holds into the folder (a restarted step's starting point); returns the count."""
        items = list_objects(self.uri)
        bucket, prefix = split_s3_uri(self.uri)
        client = _client()
        for item in items:
            relative = item["Key"][len(prefix) + 1:] if prefix else item["Key"]
            target = self.folder / relative
            _fetch(client, bucket, item, target)
            stat = target.stat()
            self._sent[relative] = (stat.st_size, stat.st_mtime)
        if items:
            log.info("restored %d file(s) from %s into %s", len(items), self.uri, self.folder)
        return len(items)

    def sync(self) -> int:
        """Upload what changed since the last sync; returns the count."""
        with self._lock:
            return upload_folder(self.folder, self.uri, self._sent)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except (InputDataError, OSError) as exc:  # transient (S3, or a file replaced mid-scan): retried next round
                log.warning("checkpoint upload failed: %s", exc)

    def start(self) -> None:
        """Start uploading in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the background uploads and send what changed since the last round."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sync()


@contextlib.contextmanager
def mirrored_folder(folder: str | os.PathLike[str], uri: str, interval_s: float = 30.0) -> Iterator[Path]:
    """Restore ``folder`` from ``uri``, keep ``uri`` updated while the block runs, send the rest at the end."""
    mirror = FolderMirror(folder, uri, interval_s)
    mirror.folder.mkdir(parents=True, exist_ok=True)
    mirror.restore()
    mirror.start()
    try:
        yield mirror.folder
    finally:
        mirror.stop()
