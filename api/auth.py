"""Who is calling: an operator (x-admin: a named key with a role, or the bootstrap ADMIN_KEY)
or a device (bearer token, cached in-process); and from which address."""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any, TypeVar

import gevent
from flask import current_app, g, request
from gevent.event import AsyncResult
from gevent.timeout import Timeout
from sqlalchemy import Engine

from api.audit import audit_after, audit_response
from api.clients import client_address
from api.concurrency import gevent_active
from api.errors import ApiError
from api.metrics import count_token_lookups
from api.throttle import hold_refusal
from db.devices import TokenOwner, changed_devices, find_token_owners, hash_token
from db.engine import reading
from db.errors import DatabaseUnavailable
from db.operator_keys import active_key, hash_key, role_allows

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


BOOTSTRAP_ACTOR = "ADMIN_KEY"


@dataclass(frozen=True, slots=True)
class Principal:
    """The operator behind a request: a named key (``key_id``) or the bootstrap ADMIN_KEY."""

    name: str
    role: str
    key_id: int | None = None


def identify_operator(provided: str | None, bootstrap_key: str, engine: Engine) -> Principal:
    """The operator a key belongs to: 401 when missing, 403 when unknown or revoked.

    The bootstrap key is compared in constant time; a named key is looked up by its SHA-256
    (one indexed read), so a revocation holds on every worker at once."""
    if not provided:
        raise ApiError(401, "admin_key_required", "send the operator key in the x-admin header")
    if hmac.compare_digest(provided.encode(), bootstrap_key.encode()):
        return Principal(BOOTSTRAP_ACTOR, "admin")
    if len(provided) <= 256:
        with reading(engine) as conn:
            found = active_key(conn, hash_key(provided))
        if found is not None:
            return Principal(found.name, found.role, found.id)
    raise ApiError(403, "admin_key_invalid", "the x-admin key is not valid")


def require_role(principal: Principal, needed: str) -> None:
    """403 unless the principal's role covers ``needed`` (viewer < operator < admin)."""
    if not role_allows(principal.role, needed):
        raise ApiError(403, "role_forbidden",
                       f"key {principal.name!r} has role {principal.role}; this needs {needed}")


def requires_role(needed: str, *, audit: str | None = None, key: Callable[[], str | None] | None = None
                  ) -> Callable[[F], F]:
    """Decorator for operator endpoints: the caller's key must have role ``needed`` or above.

    With ``audit`` (an action name), the call is a change and leaves an audit_log row whatever
    happens: refused for the role (denied), failed, or done (ok; the view may write the row in
    its own transaction with api.audit.audit_change). ``key`` reads the key from elsewhere
    than x-admin (/metrics also takes it as a bearer token)."""

    def decorate(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state = current_app.extensions["nexmdm"]
            source = client_address(request.environ, state.trusted_proxies)
            try:
                state.auth_failures.check(source)  # 429 before any look-up for a source that keeps failing
            except ApiError:
                hold_refusal(state.settings.limit_refusal_delay_s)
                raise
            provided = key() if key else request.headers.get("x-admin")
            try:
                principal = identify_operator(provided, state.admin_key, state.engine)
            except ApiError:
                state.auth_failures.failed(source)
                raise
            g.nexmdm_principal = principal
            if audit is None:
                require_role(principal, needed)
                return view(*args, **kwargs)
            with audit_after(audit, principal, source, kwargs, needed):
                require_role(principal, needed)
                response = view(*args, **kwargs)
            return audit_response(response)

        return wrapper  # type: ignore[return-value]

    return decorate


def current_principal() -> Principal | None:
    """The operator of the current request, once identified."""
    return g.get("nexmdm_principal")


admin_required = requires_role("admin")
operator_required = requires_role("operator")
viewer_required = requires_role("viewer")


@dataclass(slots=True)
class _Entry:
    device_id: int | None  # None: an unknown token (returned, never kept in the entries)
    expires_mono: float


class TokenCache:
    """Token hash → device id, for ``ttl_s`` seconds (default a day), so steady-state
    authentication costs no database round trip.

    Revocation and rotation still take effect fast: at most every ``sync_interval_s`` (1 s)
    each worker asks which devices' tokens changed since its last successful look (one indexed
    query on devices.auth_changed_at) and evicts every token it holds for them, whichever ones
    (a token two rotations old is no longer in the database, but may be in a cache); the worker
    that served the call evicts at once. Because each look starts where the last successful one ended, a database outage
    delays evictions but loses none.
    Unknown tokens never enter this cache: they go to a small negative cache of their own
    (NEGATIVE_MAX_ENTRIES, for NEGATIVE_TTL_S), so a flood of bogus tokens can neither grow a
    worker's memory nor push valid tokens out; repeated failures from one source are refused
    before any look-up (api/throttle.py FailureThrottle).

    Under gevent, misses are looked up together: the first miss starts a loader greenlet,
    misses that arrive while it queries wait for the next batch, and one statement answers them
    all. After a restart, or when a freshly enrolled fleet starts reporting, thousands of
    devices miss at once; one query each would add a database round trip to every one of them
    exactly when the server is busiest.
    """

    NEGATIVE_TTL_S = 2.0
    NEGATIVE_MAX_ENTRIES = 10_000
    LOOKUP_BATCH_MAX = 1000
    LOOKUP_TIMEOUT_S = 10.0
    MAX_ENTRIES = 1_000_000
    # Look back this far on each sync: a rotation that committed late (its timestamp is from
    # before the previous sync) is still seen. Evicting twice is harmless.
    SYNC_OVERLAP = timedelta(seconds=15)

    def __init__(
        self, engine: Engine, ttl_s: float, sync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._clock = clock  # monotonic seconds; tests pass their own instead of sleeping
        self._ttl_s = ttl_s
        self._sync_interval_s = sync_interval_s
        self._entries: dict[bytes, _Entry] = {}
        self._negative: OrderedDict[bytes, float] = OrderedDict()  # unknown token hash -> expiry
        # device id -> the token hashes cached for it, so a change evicts all of them
        self._by_device: dict[int, list[bytes]] = {}
        self._synced_mono = clock()
        self._synced_db: datetime | None = None
        self.syncs = 0
        self._grouped = gevent_active()
        self._pending: dict[bytes, AsyncResult] = {}
        self._loading = False

    def authenticate(self, token: str) -> int:
        """The device id a token belongs to; raises 401 ApiError otherwise."""
        digest = hash_token(token)
        now = self._clock()
        if now - self._synced_mono >= self._sync_interval_s:
            self.sync(now)
        entry = self._entries.get(digest)
        if entry is None or entry.expires_mono <= now:
            if self._negative.get(digest, 0.0) > now:
                raise ApiError(401, "token_invalid", "the bearer token is unknown, expired or revoked")
            entry = self._load(digest, now)
        if entry.device_id is None:
            raise ApiError(401, "token_invalid", "the bearer token is unknown, expired or revoked")
        return entry.device_id

    def _load(self, digest: bytes, now: float) -> _Entry:
        if self._grouped:
            result = self._pending.get(digest)
            if result is None:
                result = self._pending[digest] = AsyncResult()
                if not self._loading:
                    self._loading = True
                    gevent.spawn(self._load_pending)
            try:
                return result.get(timeout=self.LOOKUP_TIMEOUT_S)
            except Timeout:
                raise DatabaseUnavailable("the token look-up did not complete in time") from None
        with reading(self._engine) as conn:
            owners = find_token_owners(conn, [digest])
        count_token_lookups(1)
        return self._store(digest, owners.get(digest), now)

    def _load_pending(self) -> None:
        """Answer every pending miss, a batch at a time, until none is left."""
        try:
            while self._pending:
                gevent.sleep(0)  # misses that are ready join this batch
                batch = dict(list(self._pending.items())[: self.LOOKUP_BATCH_MAX])
                for digest in batch:
                    del self._pending[digest]
                try:
                    with reading(self._engine) as conn:
                        owners = find_token_owners(conn, list(batch))
                except Exception as exc:  # every waiter gets the error (503), the loader goes on
                    for result in batch.values():
                        result.set_exception(exc)
                    continue
                count_token_lookups(len(batch))
                now = self._clock()
                for digest, result in batch.items():
                    result.set(self._store(digest, owners.get(digest), now))
        finally:
            self._loading = False

    def _store(self, digest: bytes, owner: TokenOwner | None, now: float) -> _Entry:
        if owner is None:
            self._entries.pop(digest, None)  # a token that stopped working (expired overlap)
            self._negative[digest] = now + self.NEGATIVE_TTL_S
            self._negative.move_to_end(digest)
            while len(self._negative) > self.NEGATIVE_MAX_ENTRIES:
                self._negative.popitem(last=False)
            return _Entry(None, now + self.NEGATIVE_TTL_S)
        self._negative.pop(digest, None)
        ttl = self._ttl_s
        if owner.valid_until is not None:
            ttl = min(ttl, max(0.0, (owner.valid_until - datetime.now(UTC)).total_seconds()))
        entry = _Entry(owner.device_id, now + ttl)
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
            self._by_device.clear()
        self._entries[digest] = entry
        digests = self._by_device.setdefault(entry.device_id, [])
        if digest not in digests:
            digests.append(digest)
        return entry

    def sizes(self) -> tuple[int, int]:
        """(tokens cached, unknown tokens remembered)."""
        return len(self._entries), len(self._negative)

    def sync(self, now_mono: float | None = None) -> None:
        """Evict every cached token of the devices whose tokens changed since the last sync."""
        self._synced_mono = self._clock() if now_mono is None else now_mono
        since = self._synced_db - self.SYNC_OVERLAP if self._synced_db else None
        if since is None:
            # First sync: everything cached so far was loaded after the worker started, so only
            # changes from now on matter.
            since = datetime.now(UTC) - self.SYNC_OVERLAP
        try:
            with reading(self._engine) as conn:
                device_ids, self._synced_db = changed_devices(conn, since)
        except Exception:  # the database is down: keep serving from the cache, retry next second
            log.warning("token cache sync failed; retrying", exc_info=False)
            return
        self.syncs += 1
        for device_id in device_ids:
            self.evict_device(device_id)

    def evict_device(self, device_id: int) -> None:
        """Forget every cached token of a device (after a rotation or revocation)."""
        for digest in self._by_device.pop(device_id, ()):
            self._entries.pop(digest, None)

    def evict(self, digests: list[bytes]) -> None:
        """Forget these token hashes."""
        for digest in digests:
            entry = self._entries.pop(digest, None)
            if entry is not None and entry.device_id is not None:
                cached = self._by_device.get(entry.device_id)
                if cached and digest in cached:
                    cached.remove(digest)


def bearer_token() -> str:
    """The bearer token of the current request (see ``bearer_token_from``)."""
    return bearer_token_from(request.environ)


def bearer_token_from(environ: dict[str, Any]) -> str:
    """The bearer token of a WSGI request; 401 when absent or malformed."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "token_required", "send the device token as 'Authorization: Bearer <token>'")
    token = token.strip()
    if len(token) > 256:
        raise ApiError(401, "token_invalid", "the bearer token is unknown, expired or revoked")
    return token
