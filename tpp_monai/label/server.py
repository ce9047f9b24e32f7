"""The app's guards inside MONAI Label's server: a route policy, authentication, checked requests and an upload
limit (the confined datastore is :mod:`tpp_monai.label.datastore`).

MONAI Label's REST endpoints (``monailabel.endpoints``) pass query values and form parameters on unchecked; its
``LocalDatastore`` joins ids and tags to the studies folder as given, follows symbolic links and stores whatever
file arrives. The app therefore supplies its own datastore, and :func:`install` puts Starlette's
``RequestBodyLimitMiddleware`` (413 before an upload is stored) and :class:`RequestGuard` in front of the endpoints:
the route policy (:mod:`tpp_monai.label.routes`) first, then the caller's token and role when MONAI Label's
authentication is on, then the request's own values; the app's refusals and MONAI Label's "not found" errors become
4xx answers with their sentence instead of a bare 500.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.concurrency import run_in_threadpool
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request

from tpp_monai.label.guard import RequestRefused, check_name, parse_params
from tpp_monai.label.routes import ADMIN, ANNOTATOR, USER, RoutePolicy

logger = logging.getLogger(__name__)

ID_QUERY_PARAMS = ("image", "label", "tag", "id", "session_id")  # query values that name a stored file
Check = Callable[[str, str, dict[str, str], dict[str, Any]], None]


def fix_token_check() -> None:
    """MONAI Label 0.8.5's ``from_token`` calls ``jwt.decode`` without ``algorithms``, which PyJWT 2 requires, so
    with ``MONAI_LABEL_AUTH_ENABLE`` every token is refused (401). Replaced by the same check (the realm's public
    key, signature and expiry verified, audience not) naming the RSA algorithms the realm key signs with."""
    import jwt
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    def from_token(token: str) -> auth.User:
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return auth.DEFAULT_USER
        key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
        payload = jwt.decode(token, key, algorithms=["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
                             options={"verify_signature": True, "verify_aud": False, "verify_exp": True})  # fmt: skip
        roles: Any = payload
        for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        return auth.User(
            username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
            email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
            name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
            roles=list(roles or []),
        )

    auth.from_token = from_token  # looked up at call time by get_current_user, so every endpoint uses this one


def _role_names() -> dict[str, list[str]]:
    from monailabel.config import settings

    admin, annotator = settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
    return {ADMIN: [admin], ANNOTATOR: [annotator], USER: [settings.MONAI_LABEL_AUTH_ROLE_USER]}


async def _authorize(scope: dict, role: str) -> None:
    """The caller's bearer token is valid and carries ``role`` (MONAI Label's RBAC, checked before any body is
    read); raises :class:`RequestRefused` 401/403, or 503 when the realm's key cannot be fetched."""
    import jwt
    from monailabel.endpoints.user import auth

    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestRefused("not authenticated: send Authorization: Bearer <token> (POST /auth/token gives one)", 401)
    try:
        user = await run_in_threadpool(auth.from_token, token.strip())
    except jwt.InvalidTokenError as err:
        raise RequestRefused(f"the token is not valid: {err}", 401) from None
    except Exception as err:  # the realm (its public key) could not be reached
        raise RequestRefused(f"the authentication server could not be asked: {type(err).__name__}", 503) from None
    needed = _role_names()[role]
    if not set(needed) & set(user.roles):
        raise RequestRefused(f"role {needed[0]!r} is required for this request (user {user.username!r})", 403)


# --------------------------------------------------------------------------------------------------------------
# Endpoints


class RequestGuard:
    """ASGI middleware in front of MONAI Label's endpoints (plain ASGI: independent of FastAPI's routing internals).

    * the route policy: a route the app does not serve (and the operator did not open) is answered 403, another
      method of a served path 405, an unknown path 404, before anything else;
    * with ``MONAI_LABEL_AUTH_ENABLE``: the bearer token and the route's role, before the body is read;
    * id-like query values (``image``, ``label``, ``tag``, ``id``, ``session_id``) must be plain names;
    * ``POST /infer/<model>``, ``POST /train[/<model>]``, ``PUT /model/<model>`` (when opened) and the datastore's
      form fields: the body is read (within the upload limit, which the ``RequestBodyLimitMiddleware`` outside this
      one enforces), its parameters are handed to ``check(kind, model, query, params)``, then the body is passed
      on unchanged;
    * a :class:`RequestRefused` or MONAI Label's "not found"/"invalid input" error raised by an endpoint (the app's
      own checks, the datastore's) is answered 4xx with its sentence instead of a bare 500.
    """

    def __init__(self, app: Any, check: Check, policy: RoutePolicy, auth: bool = False, prefix: str = "") -> None:
        self.app, self.check, self.policy, self.auth, self.prefix = app, check, policy, auth, prefix.rstrip("/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, body_done = False, False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def tracking_receive() -> dict:
            nonlocal body_done
            message = await client_receive()
            body_done = body_done or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        client_receive, receive = receive, tracking_receive
        try:
            decision = self.policy.decide(scope["method"], scope["path"])
            if decision.status:
                raise RequestRefused(decision.detail, decision.status)
            if self.auth and decision.route is not None and decision.route.role and scope["method"] != "OPTIONS":
                await _authorize(scope, decision.route.role)
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
            for key in ID_QUERY_PARAMS:
                if query.get(key):
                    check_name(key, query[key])
            receive = await self._checked_body(scope, receive, query)
            await self.app(scope, receive, tracking_send)
        except (RequestRefused, MONAILabelException) as err:
            if started or not _is_client_error(err):
                raise
            status, detail = _client_status(err)
            logger.warning("refused %s %s: %s", scope["method"], scope["path"], detail)
            headers_in = dict(scope.get("headers") or [])
            if not body_done and b"100-continue" not in headers_in.get(b"expect", b"").lower():
                while not body_done:  # the client is still sending: read it to the end (discarded), so it gets this
                    await tracking_receive()  # answer rather than a reset connection (the upload limit applies)
            headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            await _send_json(send, status, {"detail": detail}, headers)

    async def _checked_body(self, scope: dict, receive: Callable, query: dict[str, str]) -> Callable:
        path = scope["path"][len(self.prefix) :] if scope["path"].startswith(self.prefix) else scope["path"]
        parts = [p for p in path.split("/") if p]  # the server decoded the path already
        method = scope["method"]
        if not parts or len(parts) > 3 or method not in ("POST", "PUT"):
            return receive
        kind = self._kind(method, parts)
        if kind is None:
            return receive
        body = await _read_body(receive)
        replay = _replayer(body, receive)
        model = parts[1] if len(parts) == 2 else ""
        if kind == "train":
            if query.get("run_sync", "false").lower() not in ("false", "0", ""):
                raise RequestRefused("run_sync is not served: training runs in the background; poll GET /train/")
            params = parse_params(body, f"/train/{model} params") if body.strip() else {}
            self.check("train" if model else "train_all", model, query, params)
            return replay
        form = await Request(scope, _replayer(body)).form()
        try:
            if kind == "infer":
                params = parse_params(_text(form.get("params")), "/infer params")
                uploads = {k: v for k in ("file", "label") if (v := form.get(k)) is not None and not isinstance(v, str)}
                params_for_check = {"params": params, "uploads": sorted(uploads)}
                self.check("infer", model, query, params_for_check)
            elif kind == "model_upload":
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise RequestRefused("PUT /model/<model>: send the model file in the 'file' field")
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "upload.pt")
                    with open(path, "wb") as out:
                        shutil.copyfileobj(upload.file, out)
                    self.check("model_upload", model, query, {"file": path})
            else:  # the datastore's JSON form fields: an object, or MONAI Label's json.loads fails with a bare 500
                for key in ("params", "info"):
                    if isinstance(form.get(key), str):
                        parse_params(form.get(key), f"{path} {key}")
        finally:
            await form.close()
        return replay

    @staticmethod
    def _kind(method: str, parts: list[str]) -> str | None:
        if method == "POST" and parts[0] == "infer" and len(parts) == 2:
            return "infer"
        if method == "POST" and parts[0] == "train" and len(parts) <= 2:
            return "train"
        if method == "PUT" and parts[0] == "model" and len(parts) == 2:
            return "model_upload"
        if method == "PUT" and parts[0] == "datastore":
            return "datastore"
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _read_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replayer(body: bytes, receive: Callable | None = None) -> Callable:
    """A ``receive`` that hands ``body`` over once, then waits on the client's (a response that streams listens
    for the client's disconnect: an invented one would cut it short)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive() if receive is not None else {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _is_client_error(err: Exception) -> bool:
    return isinstance(err, (RequestRefused, ImageNotFoundException, LabelNotFoundException)) or (
        isinstance(err, MONAILabelException) and err.error == MONAILabelError.INVALID_INPUT
    )


def _client_status(err: Exception) -> tuple[int, str]:
    if isinstance(err, RequestRefused):
        return err.status, str(err)
    if isinstance(err, (ImageNotFoundException, LabelNotFoundException)):
        return 404, err.msg
    return 400, err.msg  # type: ignore[attr-defined]


async def _send_json(send: Callable, status: int, payload: Any, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def registered_routes(routes: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(method, path template)`` of every route of a FastAPI app (its routers included, nested or flat, as
    FastAPI versions keep them; a mounted app as ``GET``)."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI >= 0.165: an included router, kept whole
            yield from registered_routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif getattr(route, "methods", None):
            for method in sorted(route.methods):
                yield method, prefix + route.path
        elif hasattr(route, "path"):
            yield "GET", prefix + route.path


def install(api: Any, check: Check, max_upload_bytes: int, policy: RoutePolicy, auth: bool) -> None:
    """Put :class:`RequestGuard` and Starlette's ``RequestBodyLimitMiddleware`` (outside it) in front of MONAI
    Label's FastAPI app ``api``; with ``auth``, MONAI Label's token check is repaired first. Runs once per ``api``."""
    if getattr(api.state, "tpp_guarded", False):
        return
    if auth:
        fix_token_check()
    unlisted = [f"{m} {p}" for (m, p), g in _classified(api, policy).items() if g == "unlisted"]
    if unlisted:  # refused all the same (the policy lists what it serves); said so the operator knows
        logger.warning("MONAI Label routes this app does not know, refused: %s", ", ".join(unlisted))
    # The server builds the middleware stack on its first event, before the app exists; reset, it is rebuilt with
    # these on the next request (add_middleware puts the later one outside).
    api.middleware_stack = None
    api.add_middleware(RequestGuard, check=check, policy=policy, auth=auth, prefix=policy.api_prefix)
    api.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_upload_bytes)
    api.state.tpp_guarded = True
    opened = ", ".join(sorted(policy.opened)) or "none"
    logger.info("request guards installed: upload limit %d bytes, routes opened: %s, authentication %s",
                max_upload_bytes, opened, "on" if auth else "off")  # fmt: skip


def _classified(api: Any, policy: RoutePolicy) -> dict[tuple[str, str], str]:
    from tpp_monai.label.routes import classify

    return dict(classify(registered_routes(api.routes), policy))
