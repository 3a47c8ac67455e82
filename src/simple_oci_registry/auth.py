"""Optional HTTP basic authentication against an htpasswd file of bcrypt hashes.

Anonymous pull is the default; with ``--htpasswd`` every /v2/ request needs credentials
(distribution-spec, "Authentication": a 401 with ``WWW-Authenticate`` and the UNAUTHORIZED
code). bcrypt is deliberately slow, so a verified (user, password) pair is remembered by its
SHA-256 for a while instead of being re-hashed on every blob request; the file is re-read when
its fingerprint changes, so users can be added or revoked without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import bcrypt

from simple_oci_registry.errors import ErrorCode, RegistryError
from simple_oci_registry.fingerprint import Fingerprint

__all__ = ["BasicAuth", "parse_htpasswd"]

log = logging.getLogger(__name__)

REALM: Final = "simple-oci-registry"
_REMEMBER_SECONDS: Final = 300.0
_MAX_REMEMBERED: Final = 10_000
_RECHECK_SECONDS: Final = 2.0


def parse_htpasswd(text: str) -> dict[str, bytes]:
    """``user:hash`` lines; only bcrypt hashes ($2a$, $2b$, $2y$) are accepted."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            log.warning("htpasswd line %d ignored: only user:bcrypt-hash lines are supported",
                        number)
            continue
        # htpasswd -B writes $2y$, which the bcrypt library reads as $2b$.
        users[user] = ("$2b$" + hashed[4:]).encode()
    return users


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against the htpasswd file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fingerprint: Fingerprint | None = None
        self._users: dict[str, bytes] = {}
        self._remembered: dict[bytes, float] = {}
        self._checked_at = 0.0
        self._decoy_hash: bytes | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcrypt")
        self._reload()

    def _reload(self) -> None:
        try:
            fingerprint = Fingerprint.of_path(str(self._path))
        except OSError as exc:
            log.error("cannot read htpasswd file %s: %s", self._path, exc.strerror)
            self._users, self._remembered = {}, {}
            return
        if fingerprint != self._fingerprint:
            self._users = parse_htpasswd(self._path.read_text(errors="replace"))
            self._remembered = {}
            self._fingerprint = fingerprint

    async def _bcrypt(self, check: Callable[[], bool]) -> bool:
        """Run a bcrypt check on auth's own thread: a flood of wrong passwords then queues
        behind itself instead of occupying the shared pool that stats and opens archives."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, check)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _decoy(self) -> bytes:
        """A hash as costly to check as the file's own (their first user's cost factor)."""
        rounds = 12
        for hashed in self._users.values():
            cost = hashed[4:6]
            if cost.isdigit():
                rounds = int(cost)
            break
        if self._decoy_hash is None or self._decoy_hash[4:6] != f"{rounds:02d}".encode():
            self._decoy_hash = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=rounds))
        return self._decoy_hash

    def challenge(self, detail: str) -> RegistryError:
        return RegistryError(ErrorCode.UNAUTHORIZED, detail,
                             headers={"WWW-Authenticate": f'Basic realm="{REALM}"'})

    async def check(self, header: str | None) -> str:
        """The authenticated user name, or raise UNAUTHORIZED (401)."""
        if header is None or not header.lower().startswith("basic "):
            raise self.challenge("credentials required")
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text (a 500)
            raise self.challenge("malformed credentials") from None
        user, _, password = decoded.partition(":")
        now = time.monotonic()
        if now - self._checked_at > _RECHECK_SECONDS:  # users added or revoked in the file
            self._checked_at = now
            await asyncio.to_thread(self._reload)
        hashed = self._users.get(user)
        if hashed is None:
            # Pay for a bcrypt check anyway: answering unknown names at once would let response
            # times tell which user names exist.
            await self._bcrypt(lambda: _checkpw(user, password.encode(), self._decoy()))
            raise self.challenge("unknown user or wrong password")
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        if self._remembered.get(key, 0.0) > now:
            return user
        ok = await self._bcrypt(lambda: _checkpw(user, password.encode(), hashed))
        if not ok:
            raise self.challenge("unknown user or wrong password")
        if len(self._remembered) >= _MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[key] = now + _REMEMBER_SECONDS
        return user


_BCRYPT_MAX_PASSWORD: Final = 72


def _checkpw(user: str, password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw, answering False where bcrypt >= 5 raises ValueError.

    bcrypt hashes only the first 72 bytes of a password, and ``htpasswd -B`` makes hashes of
    longer ones that way; bcrypt 5 refuses longer passwords instead, so without the cut such a
    user (or any client sending a long password) got a 500. A line whose hash is not valid
    bcrypt ("Invalid salt") is a wrong password too, with a warning for the operator.
    """
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError as exc:
        log.warning("htpasswd entry of user %r is not a usable bcrypt hash: %s", user, exc)
        return False
