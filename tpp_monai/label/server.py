"""The app's guards inside MONAI Label's server: a confined datastore, an upload limit and checked endpoints.

MONAI Label's REST endpoints (``monailabel.endpoints``) pass query values and form parameters on unchecked; its
``LocalDatastore`` joins ids and tags to the studies folder as given. The app therefore supplies its own datastore
(:class:`ConfinedDatastore`), and :func:`install` puts Starlette's ``RequestBodyLimitMiddleware`` (413 before an
upload is stored) and :class:`RequestGuard` in front of the endpoints: id-like query values are plain names,
``/infer`` and ``/train`` parameters are checked by the app before MONAI Label sees them, and the app's refusals and
MONAI Label's "not found" errors become 4xx answers with their sentence instead of a bare 500.
"""

import json
import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request

from tpp_monai.label.guard import RequestRefused, check_name, confined, parse_params

logger = logging.getLogger(__name__)

IMAGE_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ID_QUERY_PARAMS = ("image", "label", "tag", "id", "session_id")  # query values that name a stored file


def spatial_shape(path: str) -> tuple[int, ...]:
    """An image file's spatial shape from its header: ``(H, W)`` for 2D files, the volume's shape otherwise."""
    name = path.lower()
    if name.endswith(IMAGE_2D):
        from PIL import Image

        with Image.open(path) as img:
            return img.size[1], img.size[0]
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return tuple(int(n) for n in nib.load(path).shape[:3])
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(int(n) for n in reader.GetSize())[::-1]


def _readable_shape(kind: str, path: str, name: str) -> tuple[int, ...]:
    try:
        return spatial_shape(path)
    except Exception as err:  # any reader error means the upload is not an image this server can use
        raise RequestRefused(f"{kind} {name!r} is not a readable image ({type(err).__name__}: {err})") from None


class ConfinedDatastore(LocalDatastore):
    """``LocalDatastore`` whose writes stay inside the studies folder and whose labels fit their images.

    Image ids and label tags must be plain names and resolve inside the folder; an image's file type must be one
    the datastore lists; a label is refused unless it is readable and has its image's spatial shape.
    """

    def _served_extension(self, filename: str) -> str:
        _, ext = self._to_id(os.path.basename(filename))
        served = [e.replace("*", "") for e in self._extensions]
        if ext.lower() not in served:
            raise RequestRefused(f"file type {ext!r} is not served here; upload one of {', '.join(served)}", 415)
        return ext

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        ext = self._served_extension(image_filename)
        image_id = check_name("image id", image_id or self._to_id(os.path.basename(image_filename))[0])
        confined("image", os.path.join(self._datastore.image_path(), image_id + ext), [self._datastore.image_path()])
        _readable_shape("image", image_filename, image_id)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name("image id", image_id)
        check_name("label tag", label_tag)
        labels_root = self._datastore.label_path(None)
        confined("label tag", self._datastore.label_path(label_tag), [labels_root])
        image = self.get_image_uri(image_id)
        if not image:
            raise RequestRefused(f"image {image_id!r} is not in the studies folder; upload it first", 404)
        label_shape = _readable_shape("label", label_filename, f"{label_tag}/{image_id}")
        image_shape = spatial_shape(image)
        if label_shape != image_shape:
            raise RequestRefused(
                f"label for image {image_id!r} has shape {label_shape}, its image {image_shape}: a label must have "
                "its image's size (one value per pixel/voxel)"
            )
        return super().save_label(image_id, label_filename, label_tag, label_info)


# --------------------------------------------------------------------------------------------------------------
# Endpoints


class RequestGuard:
    """ASGI middleware in front of MONAI Label's endpoints (plain ASGI: independent of FastAPI's routing internals).

    * id-like query values (``image``, ``label``, ``tag``, ``id``, ``session_id``) must be plain names;
    * ``POST /infer/<model>`` and ``POST /train[/<model>]``: the body is read (within the upload limit, which the
      ``RequestBodyLimitMiddleware`` outside this one enforces), its parameters (the ``params`` form field, or the
      JSON body) are handed to ``check(kind, model, query, params)``, then the body is passed on unchanged;
    * a :class:`RequestRefused` or MONAI Label's "not found"/"invalid input" error raised by an endpoint (the app's
      own checks, the datastore's) is answered 4xx with its sentence instead of a bare 500.
    """

    def __init__(self, app: Any, check: Callable[[str, str, dict[str, str], dict[str, Any]], None],
                 prefix: str = "") -> None:  # fmt: skip
        self.app, self.check, self.prefix = app, check, prefix.rstrip("/")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
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
            await _send_json(send, status, {"detail": detail})

    async def _checked_body(self, scope: dict, receive: Callable, query: dict[str, str]) -> Callable:
        path = scope["path"][len(self.prefix) :] if scope["path"].startswith(self.prefix) else scope["path"]
        parts = [p for p in path.split("/") if p]
        if scope["method"] != "POST" or not parts or parts[0] not in ("infer", "train") or len(parts) > 2:
            return receive
        body = await _read_body(receive)
        replay = _replayer(body, receive)
        model = unquote(parts[1]) if len(parts) == 2 else ""
        if parts[0] == "infer":
            form = await Request(scope, _replayer(body)).form()
            params = parse_params(form.get("params") if isinstance(form.get("params"), str) else None, "/infer params")
            await form.close()
        else:
            params = parse_params(body, f"/train/{model} params") if body.strip() else {}
        self.check(parts[0], model, query, params)
        return replay


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


async def _send_json(send: Callable, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(api: Any, check: Callable[[str, str, dict[str, str], dict[str, Any]], None], max_upload_bytes: int,
            prefix: str = "") -> None:  # fmt: skip
    """Put :class:`RequestGuard` and Starlette's ``RequestBodyLimitMiddleware`` (outside it) in front of MONAI
    Label's FastAPI app ``api``. Runs once per ``api``."""
    if getattr(api.state, "tpp_guarded", False):
        return
    # The server builds the middleware stack on its first event, before the app exists; reset, it is rebuilt with
    # these on the next request (add_middleware puts the later one outside).
    api.middleware_stack = None
    api.add_middleware(RequestGuard, check=check, prefix=prefix)
    api.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_upload_bytes)
    api.state.tpp_guarded = True
    logger.info("request guards installed: upload limit %d bytes", max_upload_bytes)
