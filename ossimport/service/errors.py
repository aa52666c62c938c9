"""The service's error answers: one code each, with the HTTP status it travels with.

Every failed request answers `{RequestId, HostId, Code, Message}`. The codes are those of the
Alibaba Cloud OpenAPI (and the CPFS dataflow API where it names one), so SDK users can match
them; the table below is the whole list (README "Service" documents it).
"""

from __future__ import annotations

# code -> HTTP status
CODES: dict[str, int] = {
    "InvalidParameter": 400,  # a value that is not allowed; the message names it and the fix
    "MissingParameter": 400,  # a required parameter is absent (MissingFileSystemId etc. for ids)
    "MissingFileSystemId": 400,
    "MissingDataFlowId": 400,
    "MissingTaskId": 400,
    "MissingDataFlowSubTaskId": 400,
    "MissingJobName": 400,
    "IllegalCharacters": 400,  # '..', NUL or a control character in a path
    "InvalidStatus.ResourceMismatch": 400,  # the resource is not in a state that allows the action
    "IdempotentParameterMismatch": 400,  # a ClientToken reused with other parameters
    "QuotaExceeded.DataFlow": 400,  # more than 10 dataflows on one file system
    "InvalidFileSystem.NotFound": 404,
    "InvalidDataFlow.NotFound": 404,
    "InvalidTask.NotFound": 404,
    "InvalidSubTask.NotFound": 404,
    "InvalidJob.NotFound": 404,
    "InvalidAction.NotFound": 404,
    "Job.AlreadyExists": 409,
    "IncompleteSignature": 400,  # credentials are set and the request is not signed
    "SignatureDoesNotMatch": 400,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidTimeStamp.Expired": 400,  # x-acs-date more than 15 minutes off
    "SignatureNonceUsed": 400,  # a replayed x-acs-signature-nonce
    "Forbidden.CSRF": 403,  # a browser request from another site, or a form without the session's token
    "Forbidden.Host": 403,  # a loopback service reached under another host name (DNS rebinding)
    "DryRunOperation": 200,  # never raised: a DryRun that passes answers 200 with the usual body
    "InternalError": 500,
}


class ApiError(Exception):
    """An answer of the API other than success. The message must never hold a secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in CODES, code
        self.code = code
        self.message = " ".join(message.splitlines())

    @property
    def status(self) -> int:
        return CODES[self.code]


_MISSING_ALIASES = {"DataFlowTaskId": "MissingTaskId"}


def missing(name: str) -> ApiError:
    code = _MISSING_ALIASES.get(name) or (f"Missing{name}" if f"Missing{name}" in CODES else "MissingParameter")
    return ApiError(code, f"{name} is required")


def invalid(name: str, why: str) -> ApiError:
    return ApiError("InvalidParameter", f"{name}: {why}")
