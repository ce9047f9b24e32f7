"""The app's guards inside MONAI Label's server: a confined datastore, an upload limit and checked endpoints.

MONAI Label's REST endpoints (``monailabel.endpoints``) pass query values and form parameters on unchecked; its
``LocalDatastore`` joins ids and tags to the studies folder as given. The app therefore supplies its own datastore
(:class:`ConfinedDatastore`), adds Starlette's ``RequestBodyLimitMiddleware`` (413 before an upload is stored), and
wraps each endpoint (:func:`install`) so that id-like query values are plain names, ``/infer`` and ``/train``
parameters are checked by the app before MONAI Label sees them, and the app's refusals and MONAI Label's
"not found" errors become 4xx answers with their sentence instead of a bare 500.
"""

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.routing import APIRoute
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from tpp_monai.label.guard import RequestRefused, check_name, confined

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


def _as_http(err: Exception) -> HTTPException:
    if isinstance(err, RequestRefused):
        return HTTPException(status_code=err.status, detail=str(err))
    if isinstance(err, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(status_code=404, detail=err.msg)
    return HTTPException(status_code=400, detail=err.msg)  # type: ignore[attr-defined]


def _is_client_error(err: Exception) -> bool:
    return isinstance(err, (RequestRefused, ImageNotFoundException, LabelNotFoundException)) or (
        isinstance(err, MONAILabelException) and err.error == MONAILabelError.INVALID_INPUT
    )


def guarded(endpoint: Callable, check: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """``endpoint`` (an async FastAPI endpoint) with its id-like query values checked as plain names, ``check``
    run on its arguments first, and client errors answered 4xx with their message."""

    @functools.wraps(endpoint)  # FastAPI reads the parameters from the wrapped signature
    async def wrapper(**kwargs: Any) -> Any:
        try:
            for key in ID_QUERY_PARAMS:
                if isinstance(kwargs.get(key), str) and kwargs[key]:
                    check_name(key, kwargs[key])
            if check is not None:
                check(kwargs)
            return await endpoint(**kwargs)
        except (RequestRefused, MONAILabelException) as err:
            if not _is_client_error(err):
                raise
            logger.warning("refused %s: %s", endpoint.__name__, err)
            raise _as_http(err) from None

    return wrapper


def install(api: FastAPI, checks: dict[tuple[str, str], Callable[[dict[str, Any]], None]],
            max_upload_bytes: int) -> None:  # fmt: skip
    """Guard MONAI Label's FastAPI app: an upload limit, and every async endpoint wrapped by :func:`guarded`
    (``checks[(method, path)]`` added for the ones the app checks itself). Runs once per ``api``."""
    if getattr(api.state, "tpp_guarded", False):
        return
    # The middleware stack is built on the server's first event (before the app exists); rebuilt on the next one.
    api.middleware_stack = None
    api.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_upload_bytes)
    routes: Sequence[Any] = api.router.routes
    for i, route in enumerate(routes):
        if not isinstance(route, APIRoute) or not _is_async(route.endpoint):
            continue
        check = next((c for (method, path), c in checks.items() if method in route.methods and path == route.path),
                     None)  # fmt: skip
        api.router.routes[i] = APIRoute(
            route.path,
            guarded(route.endpoint, check),
            methods=list(route.methods),
            name=route.name,
            summary=route.summary,
            include_in_schema=route.include_in_schema,
            response_model=route.response_model,
            responses=route.responses,
            tags=route.tags,
            deprecated=route.deprecated,
        )
    api.openapi_schema = None
    api.state.tpp_guarded = True
    logger.info("request guards installed: upload limit %d bytes, %d checked endpoints", max_upload_bytes, len(checks))


def _is_async(func: Callable) -> bool:
    import inspect

    return inspect.iscoroutinefunction(func)
