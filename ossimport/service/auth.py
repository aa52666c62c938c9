"""Who may call: the ACS3-HMAC-SHA256 signature of the Alibaba Cloud OpenAPI (both doors), HTTP
Basic with the service key pair (the JSON door, for curl), and the web UI's session cookie.

The signature is the V3 one the official SDKs send: HMAC-SHA256 over
`ACS3-HMAC-SHA256\\n` + hex SHA-256 of the canonical request (method, URI, sorted query,
canonical headers, signed header names, payload hash). A request is refused when its date is more
than 15 minutes off, or its nonce was seen within that window (a replay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from ossimport.service.errors import ApiError

WINDOW = 15 * 60  # seconds a signed request's date may be off, and a nonce is remembered
ALGORITHM = "ACS3-HMAC-SHA256"


def canonical_query(pairs: list[tuple[str, str]]) -> str:
    """As the SDK builds it: keys sorted, values percent-encoded with only '~' kept (keys as-is)."""
    return "&".join(f"{k}={quote(v, safe='~')}" for k, v in sorted(pairs))


def string_to_sign(method: str, path: str, pairs: list[tuple[str, str]], headers: Mapping[str, str],
                   signed: list[str], payload_hash: str) -> str:
    canon_headers = "".join(f"{name}:{headers.get(name, '').strip()}\n" for name in signed)
    request = "\n".join([method, path or "/", canonical_query(pairs), canon_headers, ";".join(signed), payload_hash])
    return f"{ALGORITHM}\n{hashlib.sha256(request.encode()).hexdigest()}"


def sign(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


class Nonces:
    """Nonces seen in the last 2 x WINDOW seconds, kept in the service's database so that a
    restart does not reopen the window for replays (older requests fail the date check)."""

    def __init__(self, db: Any) -> None:
        self.db = db  # its table is created with the others (db.SCHEMA)
        self._count = 0

    def use(self, nonce: str) -> bool:
        now = time.time()
        self._count += 1
        if self._count % 1000 == 1:
            self.db.execute("DELETE FROM nonces WHERE seen < ?", (now - 2 * WINDOW,))
        return self.db.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?)", (nonce, now)) == 1


def verify_signature(method: str, path: str, pairs: list[tuple[str, str]], headers: Mapping[str, str],
                     body: bytes, credentials: Mapping[str, str], nonces: Nonces) -> str:
    """Check an ACS3 signature; the access key id on success. `headers` has lower-case names."""
    auth = headers.get("authorization", "")
    scheme, _, rest = auth.partition(" ")
    if scheme != ALGORITHM:
        raise ApiError("IncompleteSignature", f"the request is not signed; sign it with {ALGORITHM} "
                       "and the service's AccessKey (serviceAccessKeyId)")
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    ak, signed, signature = fields.get("Credential", ""), fields.get("SignedHeaders", ""), fields.get("Signature", "")
    if not (ak and signed and signature):
        raise ApiError("IncompleteSignature", "Authorization needs Credential, SignedHeaders and Signature")
    secret = credentials.get(ak)
    if secret is None:
        raise ApiError("InvalidAccessKeyId.NotFound", "the AccessKey id is not the service's (serviceAccessKeyId)")
    names = signed.split(";")
    for required in ("host", "x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256"):
        if required not in names:
            raise ApiError("IncompleteSignature", f"the signature must cover the {required} header")
    payload_hash = hashlib.sha256(body).hexdigest()
    if headers.get("x-acs-content-sha256", "").lower() != payload_hash:
        raise ApiError("SignatureDoesNotMatch", "x-acs-content-sha256 is not the SHA-256 of the body")
    expected = sign(secret, string_to_sign(method, path, pairs, headers, names, payload_hash))
    if not hmac.compare_digest(expected, signature.lower()):
        raise ApiError("SignatureDoesNotMatch", "the signature does not match: check the AccessKey secret "
                       "(serviceAccessKeySecret) and the signing of the request")
    try:
        when = datetime.strptime(headers.get("x-acs-date", ""), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise ApiError("InvalidTimeStamp.Expired", "x-acs-date must be UTC as 2006-01-02T15:04:05Z") from None
    if abs(time.time() - when.timestamp()) > WINDOW:
        raise ApiError("InvalidTimeStamp.Expired", "x-acs-date is more than 15 minutes off the service's "
                       "clock; check the client's clock")
    if not nonces.use(headers.get("x-acs-signature-nonce", "")):
        raise ApiError("SignatureNonceUsed", "x-acs-signature-nonce was used before (a replayed request)")
    return ak


def verify_basic(headers: Mapping[str, str], credentials: Mapping[str, str]) -> bool:
    """HTTP Basic with the service key pair (for curl on the JSON door)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        ak, _, sk = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    secret = credentials.get(ak)
    return secret is not None and hmac.compare_digest(secret.encode(), sk.encode())


class Sessions:
    """Web UI logins, kept in the service's database so that a restart (kill -9 included) signs
    no browser out. A row holds the SHA-256 of the session id (the cookie), never the id itself,
    so the database file cannot be replayed as a login; its CSRF token; its expiry; and `binding`,
    an HMAC of the session id keyed with the key pair that signed in: changing serviceAccessKeyId
    or serviceAccessKeySecret signs every browser out, and the row holds nothing from which the
    secret could be guessed without the cookie."""

    def __init__(self, db: Any, ttl: float = 12 * 3600) -> None:
        self.db = db  # its table is created with the others (db.SCHEMA)
        self.ttl = ttl
        self.sweep()

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    @staticmethod
    def _binding(sid: str, ak: str, sk: str) -> str:
        return hmac.new(f"{ak}\0{sk}".encode(), sid.encode(), hashlib.sha256).hexdigest()

    def sweep(self) -> None:
        self.db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))

    def create(self, ak: str, sk: str) -> tuple[str, str]:
        """A new login by the key pair (ak, sk): (session id for the cookie, CSRF token)."""
        self.sweep()  # logins are rare: old rows go here
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.db.insert("sessions", {"id_hash": self._key(sid), "csrf": csrf, "binding": self._binding(sid, ak, sk),
                                    "expires": time.time() + self.ttl})
        return sid, csrf

    def csrf(self, sid: str, credentials: Mapping[str, str]) -> str | None:
        """The CSRF token of a live session signed in with today's credentials; None otherwise."""
        row = self.db.one("SELECT csrf, binding, expires FROM sessions WHERE id_hash = ?", (self._key(sid),))
        if row is None:
            return None
        bound = any(hmac.compare_digest(row["binding"], self._binding(sid, ak, sk)) for ak, sk in credentials.items())
        if row["expires"] < time.time() or not bound:
            self.end(sid)
            return None
        return str(row["csrf"])

    def end(self, sid: str) -> None:
        """Sign out: the row goes, so the cookie is refused from now on."""
        self.db.execute("DELETE FROM sessions WHERE id_hash = ?", (self._key(sid),))
