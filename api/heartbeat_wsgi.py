"""The heartbeat's lean WSGI path: ``POST /v1/heartbeat`` without Flask's per-request machinery.

Flask spends more of a heartbeat's CPU on itself than the heartbeat needs: a request context,
URL matching, the before/after-request hooks of every extension, a Response object. This
middleware answers ``POST /v1/heartbeat`` before Flask sees it, by running the same
``accept_heartbeat`` as the Flask route (admission, authentication, body, validation, group
commit, metrics) and writing the same answer bytes; every other request goes to Flask.

Errors: a load-shedding refusal (the hot error under overload) is answered here, with the body
and headers ``api/errors.py`` gives it; any other error is handed to Flask's own error handling
inside a request context, so every error answer, and the rejection metric the blueprint counts,
is the Flask path's. ``HEARTBEAT_LEAN_PATH=false`` serves the heartbeat by Flask alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from flask import Flask

from api.errors import overloaded_answer
from api.metrics import reject_heartbeat
from api.routes.heartbeats import accept_heartbeat
from api.state import AppState
from db.errors import Overloaded

HEARTBEAT_PATH = "/v1/heartbeat"
StartResponse = Callable[..., Any]

_encode = msgspec.json.Encoder().encode


class LeanHeartbeatPath:
    """WSGI middleware in front of the Flask app (``app.wsgi_app``)."""

    def __init__(self, app: Flask, state: AppState) -> None:
        self._app = app
        self._flask = app.wsgi_app
        self._state = state

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Answer a heartbeat here; hand anything else to Flask."""
        if environ.get("PATH_INFO") != HEARTBEAT_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self._flask(environ, start_response)
        try:
            ack = accept_heartbeat(self._state, environ)
        except Overloaded as exc:
            status, headers, body = overloaded_answer(exc)
            reject_heartbeat("overloaded")
            start_response(status, headers)
            return [body]
        except Exception as exc:  # every other error is answered by Flask's handlers
            return self._answer_by_flask(environ, start_response, exc)
        body = _encode(ack)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _answer_by_flask(self, environ: dict[str, Any], start_response: StartResponse,
                         exc: Exception) -> Iterable[bytes]:
        """The answer Flask gives this exception on the heartbeat route (its error handlers and
        after-request hooks, in a request context); under testing, an unexpected one is raised."""
        app = self._app
        with app.request_context(environ):
            try:
                result = app.handle_user_exception(exc)
            except Exception as unhandled:  # Flask's last resort, as in its wsgi_app
                result = app.handle_exception(unhandled)
            response = app.process_response(app.make_response(result))
            return response(environ, start_response)


def install(app: Flask, state: AppState) -> None:
    """Put the lean path in front of ``app`` (the Flask test client goes through it too)."""
    app.wsgi_app = LeanHeartbeatPath(app, state)  # type: ignore[method-assign]
