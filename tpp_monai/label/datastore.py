"""The app's datastore: MONAI Label's ``LocalDatastore`` confined to its studies folder. Ids and tags are plain
names, symbolic links are not followed out of the folder, one stored file per id, and an image or label is decoded
and checked on arrival (its size, kind and, for classification, its class) before it is kept."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from tpp_monai.label.app_conf import CLASS_INFO_KEY
from tpp_monai.label.files import DEFAULT_MAX_PIXELS, IMAGE_2D, IMAGE_3D, check_label, dims_of, read_image
from tpp_monai.label.guard import RequestRefused, check_name, confined

logger = logging.getLogger(__name__)

SERVED_EXTENSIONS = [f"*{e}" for e in IMAGE_3D + IMAGE_2D]  # what the bundles read; nothing else is listed


@dataclass(frozen=True)
class StudyRules:
    """What the served bundles accept: label values per spatial dimension (2, 3) with a description of them, the
    class values of the classification bundles (lower-case names and indices), and the pixel limit."""

    label_values: dict[int, list[int]] = field(default_factory=dict)
    label_classes: dict[int, str] = field(default_factory=dict)
    classes: frozenset[str] = frozenset()
    class_names: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check_class(self, info: Any, where: str) -> None:
        """An image info's ``class`` (when given) is one of the classification bundles' classes."""
        if not isinstance(info, dict) or info.get(CLASS_INFO_KEY) is None:
            return
        value = info[CLASS_INFO_KEY]
        if not self.classes:
            raise RequestRefused(f"{where}: {CLASS_INFO_KEY}={value!r}, but no classification model is served here")
        known = isinstance(value, (str, int)) and not isinstance(value, bool)
        if not known or str(value).strip().lower() not in self.classes:
            raise RequestRefused(
                f"{where}: {CLASS_INFO_KEY}={json.dumps(value)} is not one of the served models' classes "
                f"({self.class_names}); give a class name or its index"
            )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ConfinedDatastore(LocalDatastore):
    """``LocalDatastore`` that reads and writes only inside the studies folder and stores only checked files.

    * nothing is read through a symbolic link that leaves the folder: such images and labels are not listed (a
      warning names them), and ids resolving outside are not found; the datastore's own files and label folders
      must not leave it (refused at start);
    * one image id is one file: files sharing a stem under two extensions are not served (a warning names them),
      and an upload whose id is taken is refused (409) unless it is the same file;
    * an uploaded image is decoded in full within the pixel limit; a label is decoded in full and must be
      single-channel, lossless, of its image's size, with values among the served segmentation models' classes; an
      image's ``class`` info is one of the classification models' classes. Nothing is written before these pass.
    """

    def __init__(self, datastore_path: str, rules: StudyRules | None = None, **kwargs: Any) -> None:
        self.root = os.path.realpath(datastore_path)
        self.rules = rules or StudyRules()
        labels = os.path.join(datastore_path, kwargs.get("labels_dir", "labels"))
        own = [os.path.join(datastore_path, kwargs.get("datastore_config", "datastore_v2.json")),
               os.path.join(datastore_path, ".lock"), labels,
               *(os.path.join(labels, t.value) for t in DefaultLabelTag)]  # fmt: skip
        if os.path.isdir(labels):
            own += [os.path.join(labels, t) for t in os.listdir(labels)]
        leaving = [p for p in own if os.path.lexists(p) and not self._inside(p)]
        if leaving:
            raise ValueError(
                f"studies folder {datastore_path}: {', '.join(leaving)} lead(s) outside it (symbolic links); the "
                "server reads and writes only inside its studies folder: replace them by real files and folders"
            )
        super().__init__(datastore_path, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Reading: only inside the folder, one file per id

    def _inside(self, path: str) -> bool:
        resolved = os.path.realpath(path)
        return resolved == self.root or resolved.startswith(self.root.rstrip(os.sep) + os.sep)

    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        by_id: dict[str, list[str]] = {}
        for name in files:
            by_id.setdefault(self._to_id(name)[0], []).append(name)
        kept = {}
        for image_id, names in by_id.items():
            if len(names) > 1:
                logger.warning("not served: %s in %s share the id %r; rename all but one", ", ".join(sorted(names)),
                               path, image_id)  # fmt: skip
                continue
            name = names[0]
            full = os.path.join(path, name)
            if not self._inside(full) or not os.path.isfile(full):
                logger.warning("not served: %s leads outside the studies folder %s (or is no file)", full, self.root)
                continue
            kept[name] = files[name]
        return kept

    def _reconcile_datastore(self) -> None:
        super()._reconcile_datastore()
        # Entries of an earlier datastore file that now lead outside or share their id with another file go too.
        listed = set(self._list_files(self._datastore.image_path(), self._extensions))
        dropped = [i for i, obj in self._datastore.objects.items() if self._filename(i, obj.image.ext) not in listed]
        for image_id in dropped:
            logger.warning("not served: image id %r (its file leads outside the studies folder or is ambiguous)",
                           image_id)  # fmt: skip
            del self._datastore.objects[image_id]
        for image_id, obj in self._datastore.objects.items():
            for tag in [t for t in obj.labels if not self._inside(self._label_file(image_id, t, obj.labels[t].ext))]:
                logger.warning("not served: label %s/%s leads outside the studies folder", tag, image_id)
                del obj.labels[tag]
                dropped.append(image_id)
        if dropped:
            self._update_datastore_file()

    def _label_file(self, image_id: str, tag: str, ext: str) -> str:
        return os.path.join(self._datastore.label_path(tag), self._filename(image_id, ext))

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if uri and not self._inside(uri):
            logger.warning("image %r leads outside the studies folder (%s): not served", image_id, uri)
            return ""
        return uri

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        if uri and not self._inside(uri):
            logger.warning("label %s/%s leads outside the studies folder (%s): not served", label_tag, label_id, uri)
            return ""
        return uri

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        return [d for d in super().datalist(full_path) if all(self._inside(str(d[k])) for k in ("image", "label"))]

    # ------------------------------------------------------------------------------------------------------------
    # Writing: checked first, never outside, never replacing another file

    def _served_extension(self, filename: str) -> str:
        _, ext = self._to_id(os.path.basename(filename))
        served = [e.replace("*", "") for e in self._extensions]
        if ext.lower() not in served:
            raise RequestRefused(f"file type {ext!r} is not served here; upload one of {', '.join(served)}", 415)
        return ext

    def _stored_files(self, folder: str, image_id: str) -> list[str]:
        """Files in ``folder`` whose id is ``image_id`` (any served extension)."""
        if not os.path.isdir(folder):
            return []
        return sorted(n for n in super()._list_files(folder, self._extensions) if self._to_id(n)[0] == image_id)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        ext = self._served_extension(image_filename)
        image_id = check_name("image id", image_id or self._to_id(os.path.basename(image_filename))[0])
        folder = self._datastore.image_path()
        dest = os.path.join(folder, image_id + ext)
        confined("image", dest, [self.root])
        self.rules.check_class(image_info, f"image {image_id!r} info")
        read_image(image_filename, f"image {image_id!r}", self.rules.max_pixels)
        stored = self._stored_files(folder, image_id)
        if stored:
            if stored == [image_id + ext] and _sha256(dest) == _sha256(image_filename):
                return image_id  # the same file again: nothing to store
            raise RequestRefused(
                f"image id {image_id!r} is taken ({', '.join(stored)}); an image id names one file: upload this one "
                "under another id",
                409,
            )
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name("image id", image_id)
        check_name("label tag", label_tag)
        ext = self._served_extension(label_filename)
        folder = self._datastore.label_path(label_tag)
        confined("label tag", folder, [self.root])
        image = self.get_image_uri(image_id)
        if not image:
            raise RequestRefused(f"image {image_id!r} is not in the studies folder; upload it first", 404)
        dims = dims_of(image)
        name = f"label {label_tag}/{image_id}"
        if dims_of(label_filename) != dims:
            raise RequestRefused(f"{name}: a {dims}D image takes a {dims}D label file, not {ext!r}", 415)
        values = self.rules.label_values.get(dims)
        if not values:
            raise RequestRefused(f"{name}: no segmentation model served here takes {dims}D labels")
        shape = read_image(image, f"image {image_id!r}", self.rules.max_pixels).shape
        check_label(label_filename, name, shape, values, self.rules.label_classes[dims], self.rules.max_pixels)
        others = [n for n in self._stored_files(folder, image_id) if n != image_id + ext]
        if others:
            raise RequestRefused(
                f"{name} is stored as {', '.join(others)}; a new version must have the same file type ({others[0]})",
                409,
            )
        confined("label", os.path.join(folder, image_id + ext), [self.root])
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self.rules.check_class(info, f"image {image_id!r} info")
        super().update_image_info(image_id, info)


# --------------------------------------------------------------------------------------------------------------
# Authentication: MONAI Label's own settings, with its token check made to work
