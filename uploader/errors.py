"""Upload failures sorted into permanent (park at once) and transient (back off and retry)."""

from __future__ import annotations

from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

PERMANENT = "permanent"
TRANSIENT = "transient"

# S3 error codes that no retry can fix: wrong bucket, wrong or missing rights, wrong keys.
PERMANENT_S3_CODES = frozenset(
    {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName"}
)

# HTTP 4xx statuses that mean "try again later" rather than "this request is wrong"; 409 is the
# ingest function missing a delta's base, which the next try answers with a keyframe.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 409, 429})


class IngestRejected(Exception):
    """The ingest endpoint answered with a non-2xx status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"ingest endpoint answered HTTP {status}: {reason}")
        self.status = status


class SnapshotUnavailable(Exception):
    """The snapshot, its image file or its detection result is not there to upload."""


class ImageMissing(SnapshotUnavailable):
    """The snapshot's JPEG is not on disk: retention deleted it (deleted_at set) or a real fault."""


def s3_error_code(error: ClientError) -> str:
    """The S3 error code of a botocore ClientError, or '' when it has none."""
    return str(error.response.get("Error", {}).get("Code", ""))


def classify(error: BaseException) -> str:
    """PERMANENT for errors a retry cannot fix, else TRANSIENT."""
    if isinstance(error, ClientError):
        return PERMANENT if s3_error_code(error) in PERMANENT_S3_CODES else TRANSIENT
    if isinstance(error, IngestRejected):
        client_error = 400 <= error.status < 500
        return PERMANENT if client_error and error.status not in RETRYABLE_CLIENT_STATUSES else TRANSIENT
    if isinstance(error, NoCredentialsError | PartialCredentialsError | SnapshotUnavailable):
        return PERMANENT
    return TRANSIENT


def describe(error: BaseException) -> str:
    """A one-line description for logs and jobs.last_error."""
    if isinstance(error, ClientError | IngestRejected | SnapshotUnavailable):
        return str(error)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
