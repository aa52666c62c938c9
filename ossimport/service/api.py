"""One action dispatcher for both doors (JSON `POST /api/<Action>` and the OpenAPI RPC door).

An action is a name, a request dataclass and a handler. The dispatcher turns the door's
parameters into the typed request (JSON values, or the RPC door's strings, by the field's type),
applies ClientToken idempotency and leaves DryRun to the handler (it validates, then returns
before changing anything). Validation, errors and paging therefore live once, here and in the
handlers, whichever door a request came through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ossimport.service.errors import ApiError, invalid, missing

Handler = Callable[[Any, Any], dict[str, Any]]  # (service, request) -> response fields


@dataclass(frozen=True)
class Action:
    name: str
    request: type
    handler: Handler
    doc: str
    creates: bool = False  # ClientToken makes it idempotent


ACTIONS: dict[str, Action] = {}


def action(request: type, *, creates: bool = False) -> Callable[[Handler], Handler]:
    """Register `handler` under its function name (CreateDataFlow, ...)."""

    def register(handler: Handler) -> Handler:
        ACTIONS[handler.__name__] = Action(handler.__name__, request, handler,
                                           (handler.__doc__ or "").strip(), creates)
        return handler

    return register


# ---- typed requests ------------------------------------------------------------------------------
_TOKEN = re.compile(r"[\x20-\x7e]{1,64}")


@dataclass(kw_only=True)
class Common:
    """Every action takes these two."""

    ClientToken: str = ""
    DryRun: bool = False


def paging(max_results: int, lo: int, hi: int, default: int) -> int:
    if max_results == 0:
        return default
    if not lo <= max_results <= hi:
        raise invalid("MaxResults", f"{max_results} is not allowed; use {lo} to {hi}")
    return max_results


def _coerce(name: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise invalid(name, "must be a string")
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise invalid(name, f"{value!r} is not allowed; use true or false")
    if kind is int:
        if isinstance(value, bool):
            raise invalid(name, "must be a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value.strip()):
            return int(value)
        raise invalid(name, f"{value!r} is not allowed; use a whole number")
    if origin is list:
        if isinstance(value, dict):  # the RPC door's Filters.1.Key=... arrives as {"1": {...}}
            value = [value[k] for k in sorted(value, key=lambda k: int(k) if str(k).isdigit() else 0)]
        if not isinstance(value, list):
            raise invalid(name, "must be a list")
        return value
    if origin is dict or kind is dict:
        if isinstance(value, str) and value.startswith("{"):  # the RPC door may send JSON text
            try:
                value = json.loads(value)
            except ValueError:
                raise invalid(name, "is not a JSON object") from None
        if not isinstance(value, dict):
            raise invalid(name, "must be an object")
        return value
    return value


def parse(cls: type, params: dict[str, Any]) -> Any:
    """The typed request of `cls` from a door's parameters. A field without a default is required
    (MissingXxx); unknown parameters are ignored, as the OpenAPI gateway does."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in params and params[f.name] is not None and params[f.name] != "":
            values[f.name] = _coerce(f.name, hints[f.name], params[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise missing(f.name)
    return cls(**values)


# ---- the dispatcher ------------------------------------------------------------------------------
def new_request_id() -> str:
    return str(uuid.uuid4()).upper()


def dispatch(service: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run action `name`; the response with its RequestId. Raises ApiError."""
    act = ACTIONS.get(name)
    if act is None:
        raise ApiError("InvalidAction.NotFound", f"unknown action {name!r}; see /openapi.json for the actions")
    req = parse(act.request, params)
    token = getattr(req, "ClientToken", "")
    if token and not _TOKEN.fullmatch(token):
        raise invalid("ClientToken", "use at most 64 printable ASCII characters")
    remember = act.creates and token and not getattr(req, "DryRun", False)
    if remember:
        fingerprint = _fingerprint(params)
        row = service.db.one("SELECT fingerprint, response FROM tokens WHERE action = ? AND token = ?",
                             (name, token))
        if row is not None:
            if row["fingerprint"] != fingerprint:
                raise ApiError("IdempotentParameterMismatch",
                               f"ClientToken {token!r} was used before with other parameters")
            return {"RequestId": new_request_id(), **json.loads(row["response"])}
    with service.lock_for(name, token) if remember else _nothing():
        if remember:  # a second request with the token may have finished while this one waited
            row = service.db.one("SELECT response FROM tokens WHERE action = ? AND token = ?", (name, token))
            if row is not None:
                return {"RequestId": new_request_id(), **json.loads(row["response"])}
        body = act.handler(service, req)
        if remember:
            service.db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)",
                               (name, token, _fingerprint(params), json.dumps(body)))
    return {"RequestId": new_request_id(), **body}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fingerprint(params: dict[str, Any]) -> str:
    """The parameters that make a request what it is (not its token or the door's extras)."""
    clean = {k: v for k, v in params.items() if k not in ("ClientToken", "RequestId")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()
