"""Which of MONAI Label 0.8.5's routes the app serves, and why the others are refused.

MONAI Label registers every endpoint it has (model upload and delete, batch inference, active learning, scoring,
WSI, sessions, logs, the OHIF viewer, a DICOMweb proxy, ...); this app needs only ``/info/``, ``/infer/<model>``,
``/train/`` and the datastore's reads and writes. :class:`RoutePolicy` answers, for a request's method and path:
served, refused (403, with the reason and the ``--conf open_routes`` group that opens it), another method of a
served path (405), or no route (404). A route MONAI Label adds that is not listed here is therefore refused too
(``tests/test_monailabel.py`` checks that every route the installed MONAI Label registers is listed).

``role`` is the MONAI Label authentication role a route requires when ``MONAI_LABEL_AUTH_ENABLE`` is on (as its
endpoint declares it, except ``PUT``/``DELETE /model``: MONAI Label asks only an annotator, this app an admin);
``None``: open (the login routes and the API docs). No ``monailabel`` import: testable in the main environment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

USER, ANNOTATOR, ADMIN = "user", "annotator", "admin"
SERVED = "served"


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str  # FastAPI path template, e.g. /infer/{model}; under the API prefix unless top_level
    group: str  # SERVED, or the open_routes group that opens it
    role: str | None = USER
    top_level: bool = False  # registered on the app itself, not under MONAI_LABEL_API_STR
    mount: bool = False  # a mounted app: the path and everything below it


def _routes() -> tuple[Route, ...]:
    r = Route
    return (
        r(("GET",), "/info/", SERVED),
        r(("POST",), "/infer/{model}", SERVED),
        r(("GET",), "/train/", SERVED),
        r(("POST",), "/train/", SERVED, ADMIN),  # every model (OHIF's "update model"); params per model
        r(("POST",), "/train/{model}", SERVED, ADMIN),
        r(("DELETE",), "/train/", SERVED, ADMIN),  # stop the running training
        r(("GET",), "/datastore/", SERVED),
        r(("PUT",), "/datastore/", SERVED, ANNOTATOR),  # MONAILabelClient.upload_image uses this deprecated path
        r(("PUT",), "/datastore/image", SERVED, ANNOTATOR),
        r(("GET",), "/datastore/image", SERVED),
        r(("GET",), "/datastore/image/info", SERVED),
        r(("PUT",), "/datastore/image/info", SERVED, ANNOTATOR),
        r(("PUT",), "/datastore/label", SERVED, ANNOTATOR),
        r(("GET",), "/datastore/label", SERVED),
        r(("GET",), "/datastore/label/info", SERVED),
        r(("PUT",), "/datastore/label/info", SERVED, ANNOTATOR),
        r(("PUT",), "/datastore/updatelabelinfo", SERVED, ANNOTATOR),
        r(("GET",), "/auth/", SERVED, None),  # registered only with MONAI_LABEL_AUTH_ENABLE
        r(("POST",), "/auth/token", SERVED, None),
        r(("GET",), "/auth/token/valid", SERVED, None),
        r(("GET",), "/model/{model}", "model_download", ADMIN),
        r(("GET",), "/model/info/{model}", "model_download", ADMIN),
        r(("PUT",), "/model/{model}", "model_upload", ADMIN),
        r(("DELETE",), "/model/{model}", "model_delete", ADMIN),
        r(("DELETE",), "/datastore/", "datastore_delete", ADMIN),
        r(("DELETE",), "/datastore/image", "datastore_delete", ADMIN),
        r(("DELETE",), "/datastore/label", "datastore_delete", ADMIN),
        r(("GET",), "/datastore/dataset", "dataset_download", ANNOTATOR),
        r(("PUT",), "/session/", "sessions"),
        r(("GET", "DELETE"), "/session/{session_id}", "sessions"),
        r(("GET", "DELETE"), "/batch/infer", "batch_infer", ADMIN),
        r(("POST",), "/batch/infer/{model}", "batch_infer", ADMIN),
        r(("POST",), "/activelearning/{strategy}", "activelearning"),
        r(("GET", "POST", "DELETE"), "/scoring/", "scoring", ANNOTATOR),
        r(("POST",), "/scoring/{method}", "scoring", ANNOTATOR),
        r(("POST",), "/infer/wsi/{model}", "wsi"),
        r(("POST",), "/infer/wsi_v2/{model}", "wsi"),
        r(("GET",), "/logs/", "logs", ADMIN),
        r(("GET",), "/logs/gpu", "logs", ADMIN),
        r(("GET",), "/ohif/{path:path}", "ohif"),
        r(("GET", "POST"), "/proxy/dicom/wado/{path:path}", "dicom_proxy"),
        r(("GET", "POST"), "/proxy/dicom/qido/{path:path}", "dicom_proxy"),
        r(("GET", "POST"), "/proxy/dicom/stow/{path:path}", "dicom_proxy"),
        r(("GET", "POST"), "/proxy/dicom/{path:path}", "dicom_proxy"),
        r(("POST",), "/reload", "reload", ADMIN, top_level=True),
        r(("GET",), "/", "docs", None, top_level=True),
        r(("GET",), "/docs", "docs", None, top_level=True),
        r(("GET",), "/openapi.json", "docs", None, top_level=True),
        r(("GET",), "/favicon.ico", "docs", None, top_level=True),
        r(("GET",), "/static", "docs", None, top_level=True, mount=True),
    )


ROUTES = _routes()

# Why each group is refused (the 403's sentence) and what opening it does.
GROUPS: dict[str, str] = {
    "model_download": "the app's model files are not handed out; /infer uses them",
    "model_upload": "the served model is written only by the app's own /train, which publishes a model only after "
    "its validation check (opened: an upload must hold the served model's weights, same names and shapes)",
    "model_delete": "the served model is replaced only by a /train that passed its check, never removed",
    "datastore_delete": "stored images and labels are not deleted over the network",
    "dataset_download": "it writes a ZIP archive of every image and label outside the studies folder",
    "sessions": "sessions store uploaded images outside the studies folder",
    "batch_infer": "batch inference runs every image of the studies folder at once, unchecked by this app",
    "activelearning": "the app offers no active-learning strategy (MONAI Label's default picks an unlabelled image "
    "at random)",
    "scoring": "the app has no scoring method",
    "wsi": "the bundles take whole images, not whole-slide regions",
    "logs": "the server's logs are for its operator",
    "ohif": "the bundled OHIF viewer needs a DICOMweb datastore; this app serves a studies folder",
    "dicom_proxy": "the app serves a studies folder, not a DICOMweb server",
    "reload": "it rebuilds the app (bundles, datastore) on a request",
    "docs": "the API documentation is not needed by a client",
}


def _regex(route: Route, api_prefix: str) -> re.Pattern[str]:
    path = route.path if route.top_level else api_prefix.rstrip("/") + route.path
    parts = re.split(r"(\{[^}]+\})", path.rstrip("/") or "/")
    body = "".join((".*" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p) for p in parts)
    tail = "(/.*)?" if route.mount else "/?"
    return re.compile((body.rstrip("/") if body != "/" else "") + tail)


@dataclass(frozen=True)
class Decision:
    """What to answer: ``status`` 0 passes the request on; otherwise a refusal with ``detail``."""

    status: int
    detail: str = ""
    route: Route | None = None


def open_groups(value: str | None) -> frozenset[str]:
    """``--conf open_routes a,b`` as group names; raises ``ValueError`` naming an unknown one."""
    names = frozenset(v.strip() for v in (value or "").split(",") if v.strip())
    unknown = sorted(names - set(GROUPS))
    if unknown:
        raise ValueError(f"--conf open_routes: unknown group(s) {', '.join(unknown)}; groups: {', '.join(GROUPS)}")
    return names


class RoutePolicy:
    """Decides each request by its method and path (no routing internals of FastAPI involved)."""

    def __init__(self, opened: Iterable[str] = (), api_prefix: str = "") -> None:
        self.opened = frozenset(opened)
        self.api_prefix = api_prefix
        self._compiled = [(route, _regex(route, api_prefix)) for route in ROUTES]

    def routes_for(self, path: str) -> list[Route]:
        return [route for route, regex in self._compiled if regex.fullmatch(path)]

    def decide(self, method: str, path: str) -> Decision:
        candidates = self.routes_for(path)
        if not candidates:
            return Decision(404, f"{path} is not a route of this server")
        wanted = "GET" if method == "HEAD" else method
        if method == "OPTIONS" and any(c.group == SERVED or c.group in self.opened for c in candidates):
            return Decision(0, route=candidates[0])  # a CORS preflight: MONAI Label's CORS middleware answers it
        for route in candidates:
            if wanted in route.methods or route.mount:
                if route.group == SERVED or route.group in self.opened:
                    return Decision(0, route=route)
                return Decision(
                    403,
                    f"{method} {path} is refused by this server: {GROUPS[route.group]}. Its operator can open it "
                    f"with --conf open_routes {route.group}",
                    route,
                )
        methods = sorted({m for c in candidates for m in c.methods})
        return Decision(405, f"{method} is not served on {path}; methods there: {', '.join(methods)}")


def classify(registered: Iterable[tuple[str, str]], policy: RoutePolicy) -> Mapping[tuple[str, str], str]:
    """``(method, path template)`` of each registered route -> its group, or ``"unlisted"``."""
    out: dict[tuple[str, str], str] = {}
    for method, path in registered:
        sample, wanted = re.sub(r"\{[^}]+\}", "x", path), "GET" if method == "HEAD" else method
        matches = [r for r in policy.routes_for(sample) if wanted in r.methods or r.mount]
        out[(method, path)] = matches[0].group if matches else "unlisted"
    return out
