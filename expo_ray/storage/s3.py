"""S3 (and S3-compatible) storage with boto3: concurrent ranged reads, streaming multipart writes.

Endpoint, region and credentials come from the standard AWS chain and environment
(AWS_ENDPOINT_URL for S3-compatible stores); credentials are never printed. Transient errors
(throttling, 5xx, dropped connections, truncated bodies, no answer) are retried with exponential
backoff, for at most EXPO_RAY_S3_ATTEMPTS attempts and EXPO_RAY_S3_TIMEOUT seconds per operation:
an endpoint that accepts connections and never answers is reported within that time (each
request waits at most a quarter of it for an answer).
"""
from __future__ import annotations

import base64
import math
import os
import random
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import AlreadyExists, ExpoError, NotFound, SourceChanged, StorageError
from .base import RangedReader, Storage, Writer, clean_key

MiB = 1024 * 1024
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
DEFAULT_PART_MIB = int(os.environ.get("EXPO_RAY_S3_PART_MIB", "16"))
RANGED_PART = 16 * MiB            # parts of ranged uploads (pieces start on these boundaries)
PARTS_IN_FLIGHT = int(os.environ.get("EXPO_RAY_S3_PARTS_IN_FLIGHT", "3"))
RANGE_BYTES = 16 * MiB            # a large read is split into ranged GETs of this size
READ_CONCURRENCY = int(os.environ.get("EXPO_RAY_S3_READ_CONCURRENCY", "8"))
WINDOW = 8 * MiB                  # reads under half this size are served from whole windows of the object,
WINDOWS_KEPT = 2                  # the last this many kept per reader;
DIRECT_BELOW = 64 * 1024          # tiny reads (norms, headers) go direct unless their window is at hand
ATTEMPTS = int(os.environ.get("EXPO_RAY_S3_ATTEMPTS", "10"))
BACKOFF_CAP_S = 20.0
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "EXPO_RAY_S3_TIMEOUT"

_lock = threading.Lock()
_clients: dict = {}
_pool: ThreadPoolExecutor | None = None
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}


def timeout_s() -> float:
    """How long one S3 operation may go on failing, or waiting for an answer, before it is
    reported (EXPO_RAY_S3_TIMEOUT, read when used: `expo-ray --s3-timeout` sets it)."""
    text = os.environ.get(TIMEOUT_ENV) or str(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise StorageError(f"{TIMEOUT_ENV}={text!r}: the S3 timeout must be a positive number of seconds")
    return value


def client():
    """One boto3 client per process and endpoint/credential settings (clients are thread-safe)."""
    settings = (*(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                              "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_REGION",
                                              "AWS_DEFAULT_REGION")), timeout_s())
    with _lock:
        if settings not in _clients:
            import boto3
            from botocore.config import Config

            # Every retry is with_retries()'s, so that its time limit holds (botocore's own retries
            # would multiply it): one attempt per request here, which waits at most a quarter of
            # the limit for an answer. No checksums or payload hashes by botocore itself: every
            # part and small object carries the CRC32 computed here (the server refuses bytes that
            # do not match it), every object's size is checked after its upload and each read's
            # length, and the manifest's content hashes are computed from the bytes written. Over
            # plain http botocore would otherwise sha256 each part for the signature (as https
            # endpoints it skips), and the server hash it again: two passes over every byte that
            # guard against nothing the CRC32 misses.
            limit = settings[-1]
            config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=64,
                            connect_timeout=min(10.0, limit / 4), read_timeout=limit / 4,
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required", s3={"payload_signing_enabled": False})
            _clients[settings] = boto3.session.Session().client("s3", config=config)
        return _clients[settings]


def pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(READ_CONCURRENCY, PARTS_IN_FLIGHT) * 2,
                                       thread_name_prefix="expo-s3")
        return _pool


class _PartBuffers:
    """Part buffers reused across parts and writers of a process: a new 16 MiB buffer per part
    costs page faults and zeroing on every part, about as much CPU as the copy into it."""

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes  # at most this much kept for reuse (less than a task's writers hold)
        self.kept = 0
        self.free: dict[int, list[bytearray]] = {}
        self.lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self.lock:
            free = self.free.get(size)
            if free:
                self.kept -= size
                return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        with self.lock:
            if self.kept + len(buffer) <= self.keep_bytes:
                self.free.setdefault(len(buffer), []).append(buffer)
                self.kept += len(buffer)


_buffers = _PartBuffers(keep_bytes=2 * (PARTS_IN_FLIGHT + 1) * RANGED_PART)


def _code(exc) -> str:
    response = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or "")


def is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, ClientError):
        return _code(exc) in TRANSIENT_CODES
    return isinstance(exc, (BotoConnectionError, HTTPClientError, Urllib3Error, ConnectionError, TimeoutError))


def _silent(exc: BaseException) -> bool:
    """The endpoint did not answer in time (accepted the connection, or not even that)."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    return isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, Urllib3Timeout, TimeoutError))


def explain(exc: BaseException, label: str, timed: bool = False) -> StorageError:
    """One clear message for an S3 failure (never includes credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{label}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "AWS_PROFILE, or use an instance role / IRSA)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{label}: cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url', '')} "
                            "(is AWS_ENDPOINT_URL right and the server up?)")
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code == "NoSuchBucket":
            return StorageError(f"{label}: the bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{label}: not found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(f"{label}: the S3 credentials were rejected ({code})")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            kind = _Forbidden if code == "403" else StorageError
            return kind(f"{label}: access denied (check the credentials and the bucket policy)")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return AlreadyExists(f"{label}: already exists (written by another run)")
        return StorageError(f"{label}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")
    if _silent(exc) and timed:
        return StorageError(f"{label}: S3 did not answer within the {timeout_s():g}-second limit "
                            f"({type(exc).__name__}); for a slow endpoint raise --s3-timeout (or {TIMEOUT_ENV})")
    if is_transient(exc):
        return StorageError(f"{label}: S3 did not answer after {ATTEMPTS} attempts ({type(exc).__name__}: {exc})")
    return StorageError(f"{label}: {type(exc).__name__}: {exc}")


class _Forbidden(StorageError):
    """A 403 without an error code: the answer to a HEAD, which has no body to say why."""


def head(bucket: str, key: str, label: str) -> dict:
    """HEAD an object. A bare 403 is asked again as a listing, whose answer says why (rejected
    credentials, or a permission the bucket policy denies)."""
    try:
        return with_retries(lambda: client().head_object(Bucket=bucket, Key=key), label)
    except _Forbidden:
        with_retries(lambda: client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1), label)
        raise


def with_retries(fn, label: str):
    """Run fn(), retrying transient failures (including truncated bodies) with backoff, for at most
    ATTEMPTS attempts and timeout_s() seconds (a request waits at most a quarter of that)."""
    began, limit = time.monotonic(), timeout_s()
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except ExpoError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            wait = min(BACKOFF_CAP_S, 0.25 * 2 ** attempt) * (0.5 + random.random())
            spent = time.monotonic() - began
            # Give up where one more silent attempt could end past the limit.
            if not is_transient(exc) or attempt == ATTEMPTS - 1 or spent + wait + limit / 4 > limit:
                raise explain(exc, label, timed=True) from None
            time.sleep(wait)


def head_version(head: dict) -> str:
    """An object's version from a HEAD (or GET) answer: S3Storage.version's and readers' pins."""
    return f"etag={head.get('ETag', '')},size={head['ContentLength']},version={head.get('VersionId', '')}"


class S3Reader(RangedReader):
    range_bytes = RANGE_BYTES
    # What a read of an object replaced since this reader opened it says (sources: "changed since the plan").
    changed = "replaced while being read"

    def __init__(self, bucket: str, key: str, label: str):
        self.bucket, self.key, self.label = bucket, key, label
        answer = head(bucket, key, label)
        self.size = answer["ContentLength"]
        self.etag = answer.get("ETag")
        self.pin = head_version(answer)
        self._windows: OrderedDict[int, bytes] = OrderedDict()
        self._windows_lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """A checkpoint of small tensors would cost one request per tensor, and each request costs
        the server several times what its bytes do: small reads come from whole windows instead."""
        if not 0 < length < WINDOW // 2 or offset < 0 or offset + length > self.size:
            return super().read(offset, length)
        keys = range(offset // WINDOW, (offset + length - 1) // WINDOW + 1)
        with self._windows_lock:
            if length < DIRECT_BELOW and not all(k in self._windows for k in keys):
                windows = None
            else:
                windows = [self._window(k) for k in keys]
        if windows is None:
            return self._get(offset, length)
        start = offset - keys[0] * WINDOW
        if len(windows) == 1:
            return windows[0][start:start + length]
        return windows[0][start:] + windows[1][:length - (WINDOW - start)]

    def _window(self, k: int) -> bytes:
        if k in self._windows:
            self._windows.move_to_end(k)
        else:
            self._windows[k] = self._get(k * WINDOW, min(WINDOW, self.size - k * WINDOW))
            while len(self._windows) > WINDOWS_KEPT:
                self._windows.popitem(last=False)
        return self._windows[k]

    def close(self) -> None:
        self._windows.clear()

    def _get(self, offset: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        def once():
            # IfMatch: a read never mixes two versions of an object replaced meanwhile (and the
            # answer's ETag is checked too, for servers that ignore the condition).
            kwargs = {"IfMatch": self.etag} if self.etag else {}
            byte_range = f"bytes={offset}-{offset + length - 1}"
            try:
                response = client().get_object(Bucket=self.bucket, Key=self.key, Range=byte_range, **kwargs)
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412"):
                    raise SourceChanged(f"{self.label}: {self.changed}") from None
                raise
            if self.etag and response.get("ETag", self.etag) != self.etag:
                raise SourceChanged(f"{self.label}: {self.changed}")
            data = response["Body"].read()
            if len(data) != length:
                raise ConnectionError(f"short read: {len(data)} of {length} bytes")
            return data
        return with_retries(once, self.label)

    def executor(self) -> ThreadPoolExecutor:
        return pool()


def crc32_b64(data) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def part_size_for(size_hint: int | None, configured: int) -> int:
    """Parts of at least `configured` bytes, grown so the object needs at most 10,000 parts."""
    size = max(MIN_PART, configured)
    if size_hint:
        size = max(size, math.ceil(size_hint / (MAX_PARTS - 1) / MiB) * MiB)
    return min(size, MAX_PART)


class S3Writer(Writer):
    """Streaming multipart upload: parts go up while later data is produced; at most
    PARTS_IN_FLIGHT parts are buffered; the server checks each part's CRC32."""

    def __init__(self, bucket: str, key: str, label: str, size_hint: int | None, if_absent: bool, part_size: int):
        self.bucket, self.key, self.label = bucket, key, label
        self.if_absent = if_absent
        self.size_hint = size_hint
        self.part_size = part_size_for(size_hint, part_size)
        self.buffer: bytearray | None = None  # the part being filled (copied into: callers reuse theirs)
        self.filled = 0
        self.upload_id: str | None = None
        self.first_part = 1             # number of the first part this writer sends
        self.parts: dict[int, Future] = {}
        self.slots = threading.Semaphore(PARTS_IN_FLIGHT)
        self.total = 0
        self.closed = False

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.total += len(view)
        while len(view):
            if self.buffer is None:
                self.buffer = _buffers.take(self.part_size)
            take = min(len(view), self.part_size - self.filled)
            self.buffer[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == self.part_size:
                self._upload_part(self._take_part())

    def _take_part(self) -> bytes | bytearray:
        """The part filled so far: a full buffer itself (given back once sent), a short one copied."""
        buffer, filled = self.buffer, self.filled
        self.buffer, self.filled = None, 0
        if buffer is None:
            return b""
        if filled == len(buffer):
            return buffer
        data = bytes(memoryview(buffer)[:filled])
        _buffers.give(buffer)
        return data

    def _upload_part(self, data: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = with_retries(lambda: client().create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="CRC32")["UploadId"], self.label)
        number = self.first_part + len(self.parts)
        if number > MAX_PARTS:
            raise StorageError(f"{self.label}: more than {MAX_PARTS} parts; raise EXPO_RAY_S3_PART_MIB")
        self.slots.acquire()
        try:
            self.parts[number] = pool().submit(self._send_part, number, data)
        except BaseException:
            self.slots.release()
            raise

    def _send_part(self, number: int, data: bytes) -> dict:
        try:
            crc = crc32_b64(data)  # the server rejects the part if its bytes do not match
            response = with_retries(lambda: client().upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data,
                ChecksumCRC32=crc), f"{self.label} (part {number})")
            if response.get("ChecksumCRC32", crc) != crc:
                raise StorageError(f"{self.label}: part {number} checksum mismatch after upload")
            return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc}
        finally:
            if isinstance(data, bytearray):
                _buffers.give(data)
            self.slots.release()

    def commit(self) -> None:
        conditional = {"IfNoneMatch": "*"} if self.if_absent else {}
        try:
            if self.upload_id is None:
                data = self._take_part()
                with_retries(lambda: client().put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                                         ChecksumCRC32=crc32_b64(data), **conditional), self.label)
            else:
                if self.filled or not self.parts:
                    self._upload_part(self._take_part())
                parts = [self.parts[n].result() for n in sorted(self.parts)]
                with_retries(lambda: client().complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts},
                    **conditional), self.label)
                self.upload_id = None
        except BaseException:
            self.abort()
            raise
        size = with_retries(lambda: client().head_object(Bucket=self.bucket, Key=self.key)["ContentLength"], self.label)
        if size != self.total:
            raise StorageError(f"{self.label}: stored object has {size} bytes, {self.total} were written")
        self.closed = True

    def abort(self) -> None:
        for f in self.parts.values():
            f.cancel()
        for f in self.parts.values():
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - the upload is being thrown away
                pass
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            try:
                client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - cleanup_incomplete() catches what is left
                pass
        self.buffer, self.filled = None, 0
        self.closed = True


class S3RangeWriter(S3Writer):
    """Writes one byte range of a multipart upload that the driver opened (ranged upload): the
    range starts on a RANGED_PART boundary, so its parts have fixed numbers and any number of
    writers can send theirs at the same time. The driver completes (or aborts) the upload."""

    def __init__(self, bucket: str, key: str, label: str, upload_id: str, offset: int):
        super().__init__(bucket, key, label, None, False, RANGED_PART)
        if offset % RANGED_PART:
            raise StorageError(f"{label}: a ranged write must start on a {RANGED_PART}-byte boundary, not {offset}")
        self.part_size = RANGED_PART
        self.upload_id = upload_id
        self.first_part = offset // RANGED_PART + 1

    def finish(self) -> list[dict]:
        """Send the last (short) part, wait for all; returns the parts for the completion."""
        try:
            if self.filled:
                self._upload_part(self._take_part())
            return [self.parts[n].result() for n in sorted(self.parts)]
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.upload_id = None  # the upload itself is the driver's to abort
        super().abort()


class S3Storage(Storage):
    ranged_writes = True

    def __init__(self, bucket: str, prefix: str = "", part_mib: int = DEFAULT_PART_MIB):
        if len(bucket) < 3:
            raise StorageError(f"s3://{bucket}: bucket names have at least 3 characters")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if part_mib < 8:
            raise StorageError(f"S3 part size {part_mib} MiB: must be at least 8 MiB")
        self.part_size = part_mib * MiB
        # Memory one open writer may hold: the parts in flight plus the one being filled.
        self.write_buffer_bytes = (PARTS_IN_FLIGHT + 1) * self.part_size
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_reader(self, key: str) -> S3Reader:
        return S3Reader(self.bucket, self._key(key), self.describe(key))

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            head(self.bucket, full, self.describe(key))
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        full = self._key(key)
        return head(self.bucket, full, self.describe(key))["ContentLength"]

    def version(self, key: str) -> str:
        full = self._key(key)
        return head_version(head(self.bucket, full, self.describe(key)))

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        full = base + (clean_key(prefix) + "/" if prefix else "")

        def run():
            keys = []
            for page in client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(o["Key"][len(base):] for o in page.get("Contents", []))
            return keys
        return sorted(with_retries(run, self.describe(prefix)))

    def open_writer(self, key: str, size_hint: int | None = None, if_absent: bool = False) -> S3Writer:
        return S3Writer(self.bucket, self._key(key), self.describe(key), size_hint, if_absent, self.part_size)

    def begin_ranged(self, key: str, size: int) -> str:
        if size > MAX_PARTS * RANGED_PART:
            raise StorageError(f"{self.describe(key)}: {size} bytes need more than {MAX_PARTS} parts of {RANGED_PART} "
                               "bytes")
        full = self._key(key)
        return with_retries(lambda: client().create_multipart_upload(
            Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32")["UploadId"], self.describe(key))

    def open_range_writer(self, key: str, upload: str, offset: int) -> S3RangeWriter:
        return S3RangeWriter(self.bucket, self._key(key), self.describe(key), upload, offset)

    def finish_ranged(self, key: str, upload: str, parts: list) -> None:
        full = self._key(key)
        ordered = sorted((p for group in parts for p in group), key=lambda p: p["PartNumber"])
        with_retries(lambda: client().complete_multipart_upload(
            Bucket=self.bucket, Key=full, UploadId=upload, MultipartUpload={"Parts": ordered}), self.describe(key))

    def abort_ranged(self, key: str, upload: str) -> None:
        full = self._key(key)
        with_retries(lambda: client().abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload),
                     self.describe(key))

    def delete(self, key: str) -> None:
        full = self._key(key)
        with_retries(lambda: client().delete_object(Bucket=self.bucket, Key=full), self.describe(key))

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Abort multipart uploads left under `prefix` by interrupted runs."""
        full = self._key(prefix) if prefix else self.prefix

        def run():
            uploads = []
            for page in client().get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
                uploads.extend(page.get("Uploads", []))
            for u in uploads:
                client().abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
            return len(uploads)
        return with_retries(run, self.describe(prefix))

    def location(self) -> tuple[str, ...]:
        return ("s3", self.bucket, *(p for p in self.prefix.split("/") if p))

    def child(self, prefix: str) -> "S3Storage":
        return S3Storage(self.bucket, self._key(prefix), self.part_size // MiB)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: expected s3://bucket/prefix")
    return bucket, prefix
