"""A small admin HTTP client for the console: JSON and text, errors sorted by what the operator
should do about them (server down, wrong key, endpoint not there, anything else)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

DOWN = "down"  # nothing answers at the URL (refused, timed out, reset)
AUTH = "auth"  # 401/403: the admin key is missing or wrong
UNAVAILABLE = "unavailable"  # 404/405: this server does not have the endpoint (yet)
ERROR = "error"  # anything else: 5xx, bad JSON


class EndpointError(Exception):
    """One failed call, with its kind (DOWN, AUTH, UNAVAILABLE, ERROR) and a short message."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


@dataclass
class ApiClient:
    """Calls the NexMDM API as the operator (``x-admin``). Thread-safe: it holds no connection."""

    url: str
    admin_key: str | None
    timeout_s: float = 3.0

    def get_text(self, path: str) -> str:
        """GET ``path`` and return the body as text."""
        return self._call("GET", path, None).decode("utf-8", "replace")

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON body."""
        return _decode(self._call("GET", path, None), path)

    def post_json(self, path: str, body: Any = None) -> Any:
        """POST ``body`` (JSON) to ``path`` and decode the JSON answer."""
        return _decode(self._call("POST", path, json.dumps(body if body is not None else {}).encode()), path)

    def _call(self, method: str, path: str, data: bytes | None) -> bytes:
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method)
        if self.admin_key:
            req.add_header("x-admin", self.admin_key)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            raise _http_error(err, path) from None
        except urllib.error.URLError as err:
            raise EndpointError(DOWN, f"no answer at {self.url}: {_reason(err.reason)}") from None
        except TimeoutError:
            raise EndpointError(DOWN, f"no answer at {self.url} within {self.timeout_s:g} s") from None
        except (ConnectionError, OSError) as err:
            raise EndpointError(DOWN, f"no answer at {self.url}: {_reason(err)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason)


def _http_error(err: urllib.error.HTTPError, path: str) -> EndpointError:
    try:
        body = json.loads(err.read() or b"{}")
        detail = body.get("detail") or body.get("error") or ""
        if isinstance(detail, dict):  # e.g. a job's report: its error or detail says what happened
            detail = detail.get("error") or detail.get("detail") or body.get("error") or ""
        detail = str(detail)
    except (ValueError, AttributeError, OSError):
        detail = ""
    if err.code == 409:
        return EndpointError(ERROR, f"{path}: {detail or 'conflict'} (409)", err.code)
    if err.code in (401, 403):
        return EndpointError(AUTH, f"admin key rejected ({err.code}): {detail}".rstrip(": "), err.code)
    if err.code in (404, 405):
        return EndpointError(UNAVAILABLE, f"{path} unavailable on this server ({err.code})", err.code)
    return EndpointError(ERROR, f"{path}: HTTP {err.code} {detail}".rstrip(), err.code)


def _decode(raw: bytes, path: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise EndpointError(ERROR, f"{path}: answer is not JSON") from None
