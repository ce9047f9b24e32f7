"""MONAI Label serving and fine-tuning the bundles: a real server on 127.0.0.1, run from the MONAI Label environment.

The environment (``.venv-monailabel``, or ``$TPP_MONAILABEL_ENV``) is created on first use with
``tpp_monai.label.environment`` (several minutes); the tests skip only when it cannot be created because PyPI is
unreachable, and never under CI. Three demo-sized bundles (2D segmentation, classification, 3D segmentation) are
fine-tuned briefly in this environment first, so each has a ``model.pt`` for the server to serve.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BUNDLES, REPO, bundle_dataset, free_port, run_workflow

from tpp_monai.label import app_conf, environment, guard

pytestmark = pytest.mark.slow

SEG2D, CLS, SEG3D = "glas_adapter", "mhist_adapter", "lits_conv_adapter"
MODELS = (SEG2D, CLS, SEG3D)
STARTUP_S, TRAIN_S, REQUEST_S = 240, 420, 300
MAX_UPLOAD_MB = 1  # the served fixture's upload limit (every demo image and label is smaller)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: loopback traffic only


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The app's --conf keys (main environment: no MONAI Label needed)


def test_conf_resolves_bundles_models_and_overlays(tmp_path) -> None:
    specs = app_conf.bundle_specs({"models": f"{SEG2D}, {CLS},{SEG3D}", "ckpt_dir": str(tmp_path / "ck"),
                                   "runs_dir": str(tmp_path / "runs"), "overlays": "demo"})  # fmt: skip
    assert list(specs) == list(MODELS)
    spec = specs[SEG2D]
    assert spec.path == str(BUNDLES / SEG2D) and spec.model_path == str(tmp_path / "ck" / SEG2D / "model.pt")
    assert spec.overlays == (str(BUNDLES / SEG2D / "configs" / "demo.json"),)
    assert spec.path_overrides() == {
        "ckpt_dir": str(tmp_path / "ck" / SEG2D),
        "runs_dir": str(tmp_path / "runs" / SEG2D),
    }
    kinds = {n: (app_conf.output_kind(s.metadata()), app_conf.spatial_dims(s.metadata())) for n, s in specs.items()}
    assert kinds == {SEG2D: ("segmentation", 2), CLS: ("classification", 2), SEG3D: ("segmentation", 3)}
    assert app_conf.class_names(specs[CLS].metadata()) == ["HP", "SSA"]

    default = app_conf.bundle_specs({"models": str(BUNDLES / CLS)})[CLS]  # a path works as well as a name
    assert default.model_path == str(BUNDLES / CLS / "models" / "model.pt") and default.runs_dir is None
    finetune = json.loads((BUNDLES / CLS / "configs" / "finetune.json").read_text())
    assert finetune["ckpt_dir"] == "$@bundle_root + '/models'"  # where `finetune` saves model.pt by default
    with pytest.raises(ValueError, match="no bundles"):
        app_conf.bundle_specs({})
    with pytest.raises(ValueError, match="not a bundle folder"):
        app_conf.bundle_specs({"models": "no_such_bundle"})
    with pytest.raises(ValueError, match="overlay"):
        app_conf.bundle_specs({"models": SEG2D, "overlays": "no_such_overlay"})


# --------------------------------------------------------------------------------------------------------------
# The app's request rules (main environment)


def test_guard_refuses_expressions_unknown_and_out_of_range_params() -> None:
    accepted = {"max_epochs": guard.number(int, 1, 10), "device": guard.DEVICE_PARAM, "flag": guard.BOOL}
    guard.check_params({"max_epochs": 3, "device": "cuda:1", "flag": False}, accepted, "t")
    for value in ("$1", " $x", "@network", "%configs/x.json#y"):
        with pytest.raises(guard.RequestRefused, match=r"'device'.*may not start with"):
            guard.check_params({"device": value}, accepted, "t")
    with pytest.raises(guard.RequestRefused, match=r"\[0\]\['k'\]"):  # at any depth
        guard.refuse_expressions({"a": [{"k": "$x"}]}, "params")
    with pytest.raises(guard.RequestRefused) as err:  # every bad value named in one message
        guard.check_params({"max_epochs": 0, "device": "tpu", "flag": 1, "other": 1}, accepted, "t")
    message = str(err.value)
    assert all(s in message for s in ("max_epochs=0", 'device="tpu"', "flag=1", "unknown parameter 'other'"))
    assert not guard.number(int, 1, 10).accepts(True) and not guard.number(float, 0, 1).accepts(float("nan"))


def test_guard_names_and_paths_stay_inside(tmp_path) -> None:
    assert guard.check_name("image", "testA_1.x") == "testA_1.x"
    for bad in ("../x", "a/b", "/etc/passwd", "..", ".hidden", "a\\b", "", "a\x00b", 3):
        with pytest.raises(guard.RequestRefused, match="not a plain name"):
            guard.check_name("image", bad)
    root = tmp_path / "studies"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(root / "sub")
    assert guard.confined("p", str(root / "sub" / "x.png"), [str(root)]) == str(root / "sub" / "x.png")
    assert guard.confined("p", str(tmp_path / "link" / "x"), [str(root)]) == str(root / "sub" / "x")
    for bad in (root / ".." / "x", tmp_path / "studies2" / "x", Path("/etc/passwd")):
        with pytest.raises(guard.RequestRefused, match="outside"):
            guard.confined("p", str(bad), [str(root)])


def test_stratified_split_keeps_every_class_in_training() -> None:
    classes = ["HP", "SSA"]
    records = [{"image": f"h{i}", "label": 0} for i in range(7)] + [{"image": f"s{i}", "label": 1} for i in range(3)]
    train, val = guard.stratified_split(records, classes, 0.3)
    assert sorted(r["image"] for r in train + val) == sorted(r["image"] for r in records)
    assert {r["label"] for r in train} == {0, 1} and {r["label"] for r in val} == {0, 1}
    assert sum(r["label"] == 0 for r in val) == round(7 * 0.3) and sum(r["label"] == 1 for r in val) == 1
    one_each = [{"image": "h", "label": 0}, {"image": "s", "label": 1}]
    assert guard.stratified_split(one_each, classes, 0.5) == (one_each, [])  # a lone image stays in training
    with pytest.raises(guard.RequestRefused, match=r"every class.*SSA"):
        guard.stratified_split(records[:7], classes, 0.2)


def test_check_scores_refuses_missing_and_non_finite(tmp_path) -> None:
    history = tmp_path / "history.csv"
    with pytest.raises(guard.RequestRefused, match="no validation score"):
        guard.check_scores(history, "val_score")
    history.write_text("epoch,train_loss,val_score\n1,0.7,0.25\n2,0.6,0.75\n")
    assert guard.check_scores(history, "val_score") == 0.75
    history.write_text("epoch,train_loss,val_score\n1,0.7,0.25\n2,0.6,nan\n")
    with pytest.raises(guard.RequestRefused, match="epoch 2: nan"):
        guard.check_scores(history, "val_score")


# --------------------------------------------------------------------------------------------------------------
# The MONAI Label environment


def _pypi_reachable() -> bool:
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "monailabel==0.8.5"]
        probe = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
        return probe.returncode == 0
    return False


@pytest.fixture(scope="session")
def monailabel_env() -> Path:
    env = Path(os.environ.get("TPP_MONAILABEL_ENV") or environment.DEFAULT_PATH)
    if environment.is_current(env):
        return env
    if not os.environ.get("CI") and not _pypi_reachable():
        pytest.skip(f"the MONAI Label environment {env} is missing and PyPI is unreachable, so it cannot be created "
                    "(python -m tpp_monai.label.environment creates it)")  # fmt: skip
    try:
        return environment.create(env)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"creating the MONAI Label environment failed: {' '.join(err.cmd)} exited {err.returncode}")
    except FileExistsError as err:
        pytest.fail(str(err))


def test_environment_pins_hold(monailabel_env) -> None:
    """MONAI Label 0.8.5 next to the project's own requirements: pydicom<3, torchvision for torch 2.13, and
    ``pip check`` finds only the requirements left out on purpose (requirements-monailabel*.txt say why)."""
    py = str(environment.python_of(monailabel_env))
    code = ("import importlib.metadata as m, torch, monai, monailabel, pydicom; "
            "print(m.version('torch'), m.version('torchvision'), monai.__version__, monailabel.__version__, "
            "pydicom.__version__)")  # fmt: skip
    versions = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    torch_v, tv_v, monai_v, ml_v, dicom_v = versions
    assert torch_v.startswith("2.13.0") and tv_v.startswith("0.28.0"), versions
    assert monai_v == "1.6.1" and ml_v == "0.8.5" and dicom_v.startswith("2."), versions
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, check=False).stdout
    problems = [line for line in check.splitlines() if line.strip() and not line.startswith("No broken")]
    expected = ("monailabel 0.8.5 requires sam2", "monailabel 0.8.5 requires numpymaxflow",
                "pydicom-seg 0.4.1 has requirement")  # fmt: skip
    assert all(line.startswith(expected) for line in problems), check


# --------------------------------------------------------------------------------------------------------------
# The server


class Client:
    """A few MONAI Label REST calls (stdlib only) against one server."""

    def __init__(self, base: str, log: Path, headers: dict[str, str] | None = None) -> None:
        self.base, self.log, self.headers = base, log, headers or {}

    def bearer(self, token: str) -> Client:
        """The same server, each request sending ``Authorization: Bearer <token>``."""
        return Client(self.base, self.log, {"Authorization": f"Bearer {token}"})

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = REQUEST_S) -> tuple[int, bytes, str]:  # fmt: skip
        """The HTTP status, body and content type of one request."""
        headers = {**self.headers, **(headers or {})}
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with _LOOPBACK.open(req, timeout=timeout) as resp:
                return resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("content-type", "")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = REQUEST_S) -> tuple[bytes, str]:  # fmt: skip
        status, data, ctype = self.send(method, path, body, headers, timeout)
        if status >= 400:  # MONAI Label's answer and the server's last lines say what failed
            detail = data.decode(errors="replace")[-2000:]
            raise AssertionError(f"{method} {path}: HTTP {status} {detail}\n{_log_tail(self.log)}")
        return data, ctype

    def refused(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str]:  # fmt: skip
        """The 4xx status and the ``detail`` sentence of a request the server must refuse."""
        status, data, _ = self.send(method, path, body, headers)
        assert 400 <= status < 500, f"{method} {path}: got {status}, not a 4xx: {data[:300]!r}\n{_log_tail(self.log)}"
        return status, str(json.loads(data).get("detail", "")) if data.startswith(b"{") else data.decode()

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        data, _ = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return json.loads(data)

    @staticmethod
    def multipart(fields: dict[str, str], files: dict[str, Path] | None = None) -> tuple[bytes, dict[str, str]]:
        """A ``multipart/form-data`` body (how MONAI Label takes params, labels and image info) and its header."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]  # fmt: skip
        for key, file in (files or {}).items():
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{file.name}"\r\n\r\n'
            parts.append(head.encode() + file.read_bytes() + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def form(self, method: str, path: str, fields: dict[str, str], files: dict[str, Path] | None = None):
        return self.request(method, path, *self.multipart(fields, files))

    def refused_before_body(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> int:
        """The status of a request whose body the server must refuse unread. ``Expect: 100-continue`` makes the
        server answer from the headers alone (it sends "100 Continue" only when the app reads the body), so the
        answer does not race the upload, whatever the machine's load."""
        url = urllib.parse.urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_S)
        try:
            conn.putrequest(method, path)
            for key, value in {
                **self.headers,
                **headers,
                "Content-Length": str(len(body)),
                "Expect": "100-continue",
            }.items():
                conn.putheader(key, value)
            conn.endheaders()
            return conn.getresponse().status
        finally:
            conn.close()

    def form_refused(self, method: str, path: str, fields: dict[str, str],
                     files: dict[str, Path] | None = None) -> tuple[int, str]:  # fmt: skip
        return self.refused(method, path, *self.multipart(fields, files))

    def infer(self, model: str, image: str, output: str, **params: Any) -> tuple[bytes, str]:
        params = {"device": "cpu", **params}
        return self.form("POST", f"/infer/{model}?image={image}&output={output}", {"params": json.dumps(params)})


def _log_tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no log)"


@contextlib.contextmanager
def _server(env: Path, studies: Path, conf: dict[str, str], log: Path, extra_env: dict[str, str] | None = None,
            probe: str = "/info/") -> Iterator[Client]:  # fmt: skip
    """``monailabel start_server --app tpp_monai/label`` on a free loopback port, ready once ``probe`` answers;
    stopped (its whole process group, training subprocesses included) on exit."""
    port = free_port()
    cmd = [str(env / "bin" / "monailabel"), "start_server", "--app", str(REPO / "tpp_monai" / "label"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    # Outbound HTTP(S) goes to a closed loopback port, so a network call (such as MONAI Label's model-zoo listing,
    # the offline-start pitfall) fails the test instead of leaving the machine; the server's calls to itself stay.
    offline = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    run_env = {**os.environ, **offline, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
               "PATH": f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               "MONAI_LABEL_SESSION_PATH": str(log.parent / "sessions"), **(extra_env or {})}  # fmt: skip
    run_env.pop("VIRTUAL_ENV", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {proc.returncode}:\n{_log_tail(log)}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                client.request("GET", probe, timeout=10)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label server did not answer within {STARTUP_S} s:\n{_log_tail(log)}")
            time.sleep(1)
        yield client
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _binary_png(mask: Path, out: Path) -> Path:
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(out)
    return out


@pytest.fixture(scope="module")
def served(monailabel_env, demo_roots, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The three bundles fine-tuned for one epoch on demo data, and a server for them over a studies folder with two
    images of each dataset (labels are added by the training tests)."""
    work = tmp_path_factory.mktemp("monailabel")
    ckpt, runs, studies = work / "ckpt", work / "runs", work / "studies"
    studies.mkdir()
    cases: dict[str, list[dict[str, Any]]] = {}
    for bundle in MODELS:
        root = demo_roots(bundle_dataset(bundle))
        run_workflow(bundle, "finetune", tpp_ckpt="none", epochs=1, val_interval=1, dataset_dir=str(root),
                     runs_dir=str(work / "first" / bundle), ckpt_dir=str(ckpt / bundle))  # fmt: skip
        records = json.loads((root / "datalist.json").read_text())["training"][:2]
        cases[bundle] = []
        for rec in records:
            image = root / rec["image"]
            shutil.copy(image, studies / image.name)
            label = root / rec["label"] if isinstance(rec.get("label"), str) else rec.get("label")
            if bundle == SEG2D:  # GlaS masks hold gland instance ids; a binary model's label is 0/1
                label = _binary_png(label, work / "labels" / f"{image.name.split('.')[0]}.png")
            cases[bundle].append({
                "id": image.name.split(".")[0],
                "image": studies / image.name,
                "label": label,
                "class_name": rec.get("class_name"),
            })  # fmt: skip
    # Traps present at startup: links leading out of the studies folder (an image, /etc/passwd, a label) and two
    # files sharing one id. None of them may be served.
    outside = work / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    _binary_png(cases[SEG2D][0]["label"], secret)
    (studies / "escape_link.png").symlink_to(secret)
    (studies / "passwd_link.png").symlink_to("/etc/passwd")
    (studies / "labels" / "final").mkdir(parents=True)
    (studies / "labels" / "final" / f"{cases[CLS][0]['id']}.png").symlink_to(secret)
    shutil.copy(cases[SEG2D][0]["image"], studies / f"twin{cases[SEG2D][0]['image'].suffix}")
    shutil.copy(cases[SEG3D][0]["image"], studies / f"twin{cases[SEG3D][0]['image'].suffix}")
    conf = {
        "models": ",".join(MODELS),
        "ckpt_dir": str(ckpt),
        "runs_dir": str(runs),
        "overlays": "demo",
        "max_upload_mb": str(MAX_UPLOAD_MB),
        "publish_margin": "1",
    }  # fmt: skip  (margin 1: any finite score)
    log = work / "server.log"
    with _server(monailabel_env, studies, conf, log) as client:
        yield {"client": client, "cases": cases, "ckpt": ckpt, "runs": runs, "work": work, "log": log,
               "studies": studies, "outside": outside, "secret": secret, "env": monailabel_env}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Tests against the server


def test_info_lists_models_with_labels(served) -> None:
    info = served["client"].json("GET", "/info/")
    models = info["models"]
    assert set(models) == set(MODELS) and set(info["trainers"]) == set(MODELS)
    assert models[SEG2D]["type"] == "segmentation" and models[SEG2D]["dimension"] == 2
    assert models[SEG2D]["labels"] == {"gland": 1}  # the value of a gland pixel in the returned mask
    assert models[CLS]["type"] == "classification" and models[CLS]["labels"] == {"hp": 0, "ssa": 1}
    assert models[SEG3D]["type"] == "segmentation" and models[SEG3D]["dimension"] == 3
    assert models[SEG3D]["labels"] == {"liver": 1, "tumour": 2}
    assert info["trainers"][SEG2D]["config"]["run_id"] == "finetune"
    assert info["datastore"]["total"] == 6


def test_infer_2d_segmentation_matches_bundle_inference(served, tmp_path) -> None:
    """The served mask is the bundle's own ``inference.json`` prediction, at the input's size and orientation."""
    from PIL import Image

    case = served["cases"][SEG2D][0]
    data, ctype = served["client"].infer(SEG2D, case["id"], "image", result_extension=".png")
    assert ctype.startswith("image/png")
    (tmp_path / "served.png").write_bytes(data)
    served_mask = np.asarray(Image.open(tmp_path / "served.png"))
    width, height = Image.open(case["image"]).size
    assert width != height and served_mask.shape == (height, width)
    assert set(np.unique(served_mask)) <= {0, 1}

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(case["image"], inputs)
    run_workflow(SEG2D, "run", ("inference", "demo"), input_dir=str(inputs), output_dir=str(tmp_path / "out"),
                 runs_dir=str(tmp_path), ckpt_dir=str(served["ckpt"] / SEG2D))  # fmt: skip
    own = np.asarray(Image.open(tmp_path / "out" / f"{case['image'].stem}_mask.png")) > 0
    np.testing.assert_array_equal(served_mask.astype(bool), own)


def test_infer_classification_returns_bundle_scores(served, tmp_path) -> None:
    case = served["cases"][CLS][0]
    result = json.loads(served["client"].infer(CLS, case["id"], "json")[0])
    pred = result["prediction"]
    assert [(p["idx"], p["label"]) for p in pred] == [(0, "hp"), (1, "ssa")]
    scores = np.array([p["score"] for p in pred])
    assert np.all((scores >= 0) & (scores <= 1)) and abs(scores.sum() - 1) < 1e-5

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(case["image"], inputs)
    run_workflow(CLS, "run", ("inference", "demo"), input_dir=str(inputs), output_dir=str(tmp_path / "out"),
                 runs_dir=str(tmp_path), ckpt_dir=str(served["ckpt"] / CLS))  # fmt: skip
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))  # image, prediction, prob_<class> per class
    np.testing.assert_allclose(scores, [float(v) for k, v in row.items() if k.startswith("prob_")], atol=1e-4)


def test_infer_3d_segmentation(served, tmp_path) -> None:
    import nibabel as nib

    case = served["cases"][SEG3D][0]
    data, _ = served["client"].infer(SEG3D, case["id"], "image", result_extension=".nii.gz", result_dtype="uint8")
    (tmp_path / "served.nii.gz").write_bytes(data)
    mask, image = nib.load(tmp_path / "served.nii.gz"), nib.load(case["image"])
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-3)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


# --------------------------------------------------------------------------------------------------------------
# What the server refuses (issue 18): nothing evaluated, nothing read or written outside the studies folder


def _expression(marker: Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 1"


def test_train_and_infer_refuse_expressions_and_unlisted_params(served, tmp_path) -> None:
    client, marker = served["client"], tmp_path / "marker"
    bad_train = [{"max_epochs": _expression(marker)}, {"tpp_ckpt": _expression(marker)},
                 {"backbone_ckpt": _expression(marker)}, {"val_split": _expression(marker)},
                 {"max_epochs": 1, "run_id": _expression(marker)}, {"pretrained": "@network"},
                 {"max_epochs": 1, "run_id": "initialize"}, {"bundle_path": str(tmp_path)},
                 {"tpp_ckpt": "/etc/passwd"}, {"tracking_uri": f"file://{tmp_path}"}, {"max_epochs": "abc"},
                 {"max_epochs": 0}, {"val_split": 1.5}, {"gpus": "0;1"}]  # fmt: skip
    for params in bad_train:
        status, detail = client.refused("POST", f"/train/{SEG2D}", json.dumps({"device": "cpu", **params}).encode(),
                                        {"Content-Type": "application/json"})  # fmt: skip
        key = next(k for k in params if k != "max_epochs" or len(params) == 1)
        assert status == 400 and key in detail, (params, detail)
    case = served["cases"][SEG2D][0]
    for params in ({"device": _expression(marker)}, {"result_extension": _expression(marker)},
                   {"model_filename": _expression(marker)}, {"labels": {"x": "@network"}}):  # fmt: skip
        status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={case['id']}&output=image",
                                             {"params": json.dumps(params)})  # fmt: skip
        assert status == 400 and next(iter(params)) in detail, (params, detail)
    assert not marker.exists()
    assert not (served["runs"] / SEG2D / "monailabel").exists()  # no training run was started
    with contextlib.suppress(AssertionError):  # 404 when no training task ever ran
        assert client.json("GET", "/train/")["status"] != "RUNNING"


def test_paths_outside_the_studies_folder_are_refused(served, tmp_path) -> None:
    client, case = served["client"], served["cases"][SEG2D][0]
    studies = case["image"].parent
    outside = tmp_path / case["image"].name
    shutil.copy(case["image"], outside)
    relative = os.path.relpath(outside, studies)
    images = [str(outside), relative, urllib.parse.quote(str(outside), safe=""), urllib.parse.quote(relative, safe=""),
              "/etc/passwd", "../../../../etc/passwd"]  # fmt: skip
    for image in images:
        status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={image}&output=image", {"params": "{}"})
        assert status == 400 and "not a plain name" in detail, (image, detail)
    status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={case['id']}&output=image",
                                         {"params": json.dumps({"image": str(outside)})})  # fmt: skip
    assert status == 400 and "unknown parameter 'image'" in detail

    model = served["ckpt"] / SEG2D / app_conf.MODEL_FILE
    for name in (str(model), f"../{SEG2D}/{app_conf.MODEL_FILE}", str(tmp_path / "x.pt")):
        status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={case['id']}&output=image",
                                             {"params": json.dumps({"model_filename": name})})  # fmt: skip
        assert status == 400 and "model_filename" in detail, (name, detail)

    escape = "../../escaped_image"
    status, _ = client.form_refused("PUT", f"/datastore/image?image={escape}", {"params": "{}"}, {"file": outside})
    assert status == 400 and not Path(os.path.realpath(studies / f"{escape}{outside.suffix}")).exists()
    label = case["label"]
    for tag in ("../../../escaped_tag", "/tmp/escaped_tag", urllib.parse.quote("../../escaped_tag", safe="")):
        status, _ = client.form_refused("PUT", f"/datastore/label?image={case['id']}&tag={tag}", {"params": "{}"},
                                        {"label": label})  # fmt: skip
        target = Path(os.path.realpath(studies / "labels" / urllib.parse.unquote(tag) / f"{case['id']}{label.suffix}"))
        assert status == 400 and not target.exists(), tag
    status, detail = client.form_refused("PUT", "/datastore/label?image=no_such_image&tag=final", {"params": "{}"},
                                         {"label": label})  # fmt: skip
    assert status == 404 and "no_such_image" in detail


def test_oversized_upload_and_wrong_shaped_label_are_refused(served, tmp_path) -> None:
    from PIL import Image

    client, case = served["client"], served["cases"][SEG2D][1]
    studies = case["image"].parent
    big = tmp_path / "big_upload.png"
    big.write_bytes(os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1))
    status = client.refused_before_body("PUT", "/datastore/image?image=big_upload",
                                        *client.multipart({"params": "{}"}, {"file": big}))  # fmt: skip
    assert status == 413 and not (studies / big.name).exists()

    small = tmp_path / "small_label.png"
    Image.fromarray(np.ones((10, 10), np.uint8)).save(small)
    height, width = np.asarray(Image.open(case["label"])).shape[:2]
    assert (height, width) != (10, 10)
    status, detail = client.form_refused("PUT", f"/datastore/label?image={case['id']}&tag=final", {"params": "{}"},
                                         {"label": small})  # fmt: skip
    assert status == 400 and "(10, 10)" in detail and f"({height}, {width})" in detail
    assert not (studies / "labels" / "final" / f"{case['id']}.png").exists()


def test_jpeg_input_gets_a_png_mask_with_valid_labels(served, tmp_path) -> None:
    from PIL import Image

    client, case = served["client"], served["cases"][SEG2D][0]
    jpeg = tmp_path / "glas_as_jpeg.jpg"
    Image.open(case["image"]).convert("RGB").save(jpeg, quality=75)
    assert client.form("PUT", "/datastore/image?image=glas_as_jpeg", {"params": "{}"}, {"file": jpeg})
    data, ctype = client.infer(SEG2D, "glas_as_jpeg", "image")
    (tmp_path / "mask").write_bytes(data)
    with Image.open(tmp_path / "mask") as mask:
        assert ctype.startswith("image/png") and mask.format == "PNG"
        values = set(np.unique(np.asarray(mask)).tolist())
        assert mask.size == Image.open(jpeg).size
    assert values <= set(served["client"].json("GET", "/info/")["models"][SEG2D]["labels"].values()) | {0}
    status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image=glas_as_jpeg&output=image",
                                         {"params": json.dumps({"result_extension": ".jpg"})})  # fmt: skip
    assert status == 400 and "result_extension" in detail


def test_wrong_dimension_unknown_model_and_unknown_image_get_a_sentence(served) -> None:
    client = served["client"]
    image_2d, image_3d = served["cases"][SEG2D][0]["id"], served["cases"][SEG3D][0]["id"]
    status, detail = client.form_refused("POST", f"/infer/{SEG3D}?image={image_2d}&output=image", {"params": "{}"})
    assert status == 400 and f"model {SEG3D} takes 3D images" in detail and image_2d in detail
    status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={image_3d}&output=image", {"params": "{}"})
    assert status == 400 and f"model {SEG2D} takes 2D images" in detail
    status, detail = client.form_refused("POST", f"/infer/no_such_model?image={image_2d}&output=image",
                                         {"params": "{}"})  # fmt: skip
    assert status == 404 and "no model 'no_such_model'" in detail and SEG2D in detail
    status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image=no_such_image&output=image", {"params": "{}"})
    assert status == 404 and "'no_such_image' is not in the studies folder" in detail
    status, detail = client.refused("POST", "/train/no_such_model", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and "no model 'no_such_model'" in detail


# --------------------------------------------------------------------------------------------------------------
# Issue 25: every route guarded; nothing read through links leaving the studies folder; one file per image id;
# images, labels and classes checked on arrival (a refused upload changes nothing stored)


def _venv_json(env: Path, code: str, *args: str) -> Any:
    """Run ``code`` in the MONAI Label environment (this checkout on its path); the JSON of its last output line."""
    py = str(environment.python_of(env))
    run_env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([py, "-c", code, *args], capture_output=True, text=True, env=run_env, timeout=REQUEST_S,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's SHA-256, a link's target (the lock file, which every write touches,
    left out)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_file() and path.name != ".lock":
            out[rel] = _sha(path)
    return out


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and header claiming ``width`` x ``height`` RGB pixels, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _broken_files(served: dict[str, Any], folder: Path) -> dict[str, Path]:
    """A truncated PNG and NIfTI volume, a text file named .png and a PNG header claiming 100000 x 100000 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    png, volume = served["cases"][SEG2D][0]["label"], served["cases"][SEG3D][0]["image"]
    files = {
        "truncated_png": (folder / "truncated.png", png.read_bytes()[: png.stat().st_size // 2]),
        "truncated_volume": (folder / f"truncated{volume.suffix}", volume.read_bytes()[: volume.stat().st_size // 2]),
        "text": (folder / "text.png", b"this is not an image\n" * 10),
        "huge": (folder / "huge.png", _png_header(100_000, 100_000)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in files.items()}


def test_every_monailabel_route_is_served_or_refused_with_its_reason(served) -> None:
    """Every route the installed MONAI Label registers (enumerated from its FastAPI app) is in the app's policy;
    each one the app does not need answers 403 with the reason and the --conf key that opens it, another method of
    a served path 405, an unknown path 404. PUT/DELETE /model leave the served model as it was."""
    from tpp_monai.label import routes

    code = ("import json; from monailabel.app import app; from tpp_monai.label.server import registered_routes; "
            "print(json.dumps(sorted(set(registered_routes(app.routes)))))")  # fmt: skip
    registered = [tuple(r) for r in _venv_json(served["env"], code)]
    assert {("PUT", "/model/{model}"), ("POST", "/batch/infer/{model}"), ("POST", "/activelearning/{strategy}"),
            ("POST", "/infer/wsi/{model}"), ("POST", "/reload")} <= set(registered)  # fmt: skip
    groups = routes.classify(registered, routes.RoutePolicy())
    assert [r for r, g in groups.items() if g == "unlisted"] == []

    client, model = served["client"], served["ckpt"] / SEG2D / app_conf.MODEL_FILE
    before = _sha(model)
    junk = served["work"] / "junk_model.pt"
    junk.write_bytes(b"not a model")
    body, headers = client.multipart({"params": "{}", "wsi": "{}"}, {"file": junk})
    for (method, template), group in sorted(groups.items()):
        if group == routes.SERVED or method == "HEAD":
            continue
        path = template.replace("{model}", SEG2D).replace("{path:path}", "a/b")
        path = path.replace("{strategy}", "random").replace("{method}", "x").replace("{session_id}", "x")
        status, detail = client.refused(method, path, body if method in ("POST", "PUT") else None, headers)
        assert status == 403 and f"--conf open_routes {group}" in detail, (method, path, status, detail)
    assert model.is_file() and _sha(model) == before

    status, detail = client.refused("PATCH", "/info/")
    assert status == 405 and "GET" in detail
    status, detail = client.refused("DELETE", f"/datastore/image/info?image={served['cases'][SEG2D][0]['id']}")
    assert status == 405 and "PUT" in detail
    status, _ = client.refused("GET", "/no/such/route")
    assert status == 404


def test_nothing_is_read_through_a_link_leaving_the_studies_folder(served) -> None:
    """Links out of the folder (an image, /etc/passwd, a label; present at startup or made later) are not listed,
    not downloadable, not inferred on, and not written through."""
    from PIL import Image

    client, studies, secret = served["client"], served["studies"], served["secret"]
    secret_digest = _sha(secret)
    objects = client.json("GET", "/datastore/?output=all")["objects"]
    cls_id = served["cases"][CLS][0]["id"]
    assert not {"escape_link", "passwd_link", "late_link"} & set(objects)
    assert "final" not in objects[cls_id]["labels"]
    (studies / "late_link.png").symlink_to(secret)  # while the server runs (its file watcher may see it)
    try:
        for image in ("escape_link", "passwd_link", "late_link"):
            status, detail = client.refused("GET", f"/datastore/image?image={image}")
            assert status == 404, (image, detail)
            status, detail = client.form_refused("POST", f"/infer/{SEG2D}?image={image}&output=image",
                                                 {"params": "{}"})  # fmt: skip
            assert status == 404 and "not in the studies folder" in detail, (image, detail)
        status, _ = client.refused("GET", f"/datastore/label?label={cls_id}&tag=final")
        assert status == 404
        label = studies.parent / "cls_label.png"
        Image.fromarray(np.zeros(np.asarray(Image.open(served["cases"][CLS][0]["image"])).shape[:2], np.uint8)).save(
            label
        )
        status, detail = client.form_refused("PUT", f"/datastore/label?image={cls_id}&tag=final", {"params": "{}"},
                                             {"label": label})  # fmt: skip
        assert status == 400 and "outside" in detail, detail
    finally:
        (studies / "late_link.png").unlink()
    assert _sha(secret) == secret_digest


def test_an_image_id_names_one_file(served, tmp_path) -> None:
    """Two files sharing a stem at startup: neither is served. An upload under a taken id (another file type, or
    another image) is refused 409 and changes nothing; the same file again is accepted and changes nothing."""
    client, studies = served["client"], served["studies"]
    case, volume = served["cases"][SEG2D][0], served["cases"][SEG3D][0]["image"]
    status, _ = client.refused("GET", "/datastore/image?image=twin")
    assert status == 404
    stored = _tree(studies)
    for upload in (volume, served["cases"][SEG2D][1]["image"]):
        for path in (f"/datastore/image?image={case['id']}", f"/datastore/?image={case['id']}"):
            status, detail = client.form_refused("PUT", path, {"params": "{}"}, {"file": upload})
            assert status == 409 and f"image id {case['id']!r} is taken" in detail, (upload, detail)
    assert _tree(studies) == stored
    data, _ = client.request("GET", f"/datastore/image?image={case['id']}")
    assert data == case["image"].read_bytes()
    assert json.loads(client.form("PUT", f"/datastore/image?image={case['id']}", {"params": "{}"},
                                  {"file": case["image"]})[0]) == {"image": case["id"]}  # fmt: skip
    assert _tree(studies) == stored


def test_labels_are_checked_on_arrival(served, tmp_path) -> None:
    """A label must decode in full, have one channel, a lossless format, its image's size and the model's class
    values: each violation is a 4xx naming it, and the label stored before stays as it was."""
    import nibabel as nib
    from PIL import Image

    client, studies = served["client"], served["studies"]
    case = served["cases"][SEG2D][1]
    client.form("PUT", f"/datastore/label?image={case['id']}&tag=final", {"params": "{}"}, {"label": case["label"]})
    stored = _tree(studies)
    good = np.asarray(Image.open(case["label"]))
    bad_2d = {
        "instance_ids.png": (
            Image.fromarray((np.arange(good.size) % 8).reshape(good.shape).astype(np.uint8)),
            "value(s) 2, 3",
        ),
        "mask_0_255.png": (Image.fromarray(good * 255), "0/255"),
        "rgb.png": (Image.fromarray(np.stack([good] * 3, -1)), "3 channels"),
        "photo.jpg": (Image.fromarray(good), "lossy"),
    }
    broken = _broken_files(served, tmp_path / "broken")
    uploads = []
    for name, (img, phrase) in bad_2d.items():
        img.save(tmp_path / name)
        uploads.append((tmp_path / name, phrase))
    jpeg_named_png = tmp_path / "jpeg_named.png"
    jpeg_named_png.write_bytes((tmp_path / "photo.jpg").read_bytes())
    uploads += [(jpeg_named_png, "lossy"), (broken["truncated_png"], "not a readable image"),
                (broken["text"], "not a readable image"), (broken["huge"], "max_image_pixels"),
                (served["cases"][SEG3D][0]["label"], "takes a 2D label")]  # fmt: skip
    Image.fromarray(good).save(tmp_path / "other_type.bmp")
    for label, phrase in uploads:
        status, detail = client.form_refused("PUT", f"/datastore/label?image={case['id']}&tag=final",
                                             {"params": "{}"}, {"label": label})  # fmt: skip
        assert 400 <= status < 500 and phrase in detail, (label.name, status, detail)
    status, detail = client.form_refused("PUT", f"/datastore/label?image={case['id']}&tag=final", {"params": "{}"},
                                         {"label": tmp_path / "other_type.bmp"})  # fmt: skip
    assert status == 409 and "same file type" in detail

    vol_case = served["cases"][SEG3D][1]
    reference = nib.load(vol_case["label"])
    values = np.asarray(reference.dataobj)
    bad_3d = {
        "class_3.nii.gz": (np.where(values > 0, 3, 0).astype(np.uint8), "value(s) 3"),
        "halves.nii.gz": ((values > 0) * 0.5, "non-integer"),
        "short.nii.gz": (values[:-1].astype(np.uint8), "shape"),
    }
    for name, (array, phrase) in bad_3d.items():
        nib.save(nib.Nifti1Image(array, reference.affine), tmp_path / name)
        status, detail = client.form_refused("PUT", f"/datastore/label?image={vol_case['id']}&tag=final",
                                             {"params": "{}"}, {"label": tmp_path / name})  # fmt: skip
        assert status == 400 and phrase in detail, (name, detail)
    assert _tree(studies) == stored


def test_class_values_are_checked_on_arrival(served, tmp_path) -> None:
    client, studies = served["client"], served["studies"]
    cls_id = served["cases"][CLS][0]["id"]
    stored = _tree(studies)
    for info, phrase in (({"class": "XYZ"}, "HP"), ({"class": 5}, "HP"), ({"class": True}, "HP"),
                         ({"class": ["SSA"]}, "HP")):  # fmt: skip
        status, detail = client.form_refused("PUT", f"/datastore/image/info?image={cls_id}", {"info": json.dumps(info)})
        assert status == 400 and "not one of the served models' classes" in detail and phrase in detail, detail
    for text in ("{", "[1]"):
        status, detail = client.form_refused("PUT", f"/datastore/image/info?image={cls_id}", {"info": text})
        assert status == 400 and ("not valid JSON" in detail or "JSON object" in detail), detail
    upload = tmp_path / "with_class.png"
    shutil.copy(served["cases"][CLS][1]["image"], upload)
    status, detail = client.form_refused("PUT", "/datastore/image?image=with_class",
                                         {"params": json.dumps({"class": "nope"})}, {"file": upload})  # fmt: skip
    assert status == 400 and "nope" in detail
    assert _tree(studies) == stored
    client.form("PUT", f"/datastore/image/info?image={cls_id}", {"info": json.dumps({"class": "1"})})  # an index
    assert client.json("GET", f"/datastore/image/info?image={cls_id}")["class"] == "1"
    client.form("PUT", f"/datastore/image/info?image={cls_id}", {"info": json.dumps({"class": None})})  # unset


def test_images_are_decoded_in_full_on_arrival(served, tmp_path) -> None:
    client, studies = served["client"], served["studies"]
    broken = _broken_files(served, tmp_path)
    stored = _tree(studies)
    for key, (status_wanted, phrase) in {"truncated_png": (400, "not a readable image"),
                                         "truncated_volume": (400, "not a readable image"),
                                         "text": (400, "not a readable image"),
                                         "huge": (413, "max_image_pixels")}.items():  # fmt: skip
        status, detail = client.form_refused("PUT", f"/datastore/image?image=upload_{key}", {"params": "{}"},
                                             {"file": broken[key]})  # fmt: skip
        assert status == status_wanted and phrase in detail, (key, status, detail)
    assert _tree(studies) == stored


def test_infer_on_a_broken_or_oversized_upload_is_4xx(served, tmp_path) -> None:
    client = served["client"]
    broken = _broken_files(served, tmp_path)
    for key, model in (("truncated_png", SEG2D), ("text", SEG2D), ("huge", SEG2D), ("truncated_volume", SEG3D)):
        status, detail = client.form_refused("POST", f"/infer/{model}?output=image", {"params": "{}"},
                                             {"file": broken[key]})  # fmt: skip
        assert status in (400, 413) and ("not a readable image" in detail or "max_image_pixels" in detail), detail
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(MAX_UPLOAD_MB * 1024 * 1024 + 1))
    status = client.refused_before_body("POST", f"/infer/{SEG2D}?output=image",
                                        *client.multipart({"params": "{}"}, {"file": big}))  # fmt: skip
    assert status == 413
    status, detail = client.form_refused("POST", f"/infer/{SEG2D}?output=image", {"params": "{}"})
    assert status == 400 and "name an image" in detail
    data, ctype = client.form("POST", f"/infer/{SEG2D}?output=image", {"params": "{}"},
                              {"file": served["cases"][SEG2D][0]["image"]})  # fmt: skip
    assert ctype.startswith("image/png") and data.startswith(b"\x89PNG")


def _train(served: dict[str, Any], model: str, params: dict[str, Any], status: str = "DONE") -> dict[str, Any]:
    """``POST /train/<model>``, then poll ``GET /train/`` until the task ends (bounded); check how it ended."""
    client = served["client"]
    client.json("POST", f"/train/{model}", {"device": "cpu", **params})
    deadline = time.monotonic() + TRAIN_S
    while (task := client.json("GET", "/train/"))["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, f"/train/{model} still {task['status']} after {TRAIN_S} s"
        time.sleep(2)
    details = "\n".join(task.get("details", []))
    assert task["status"] == status, f"/train/{model} ended {task['status']}:\n{details}\n{_log_tail(served['log'])}"
    return task


def _one_run(served: dict[str, Any], model: str) -> Path:
    runs = sorted((served["runs"] / model / "monailabel").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_train_2d_segmentation_on_studies_labels(served) -> None:
    """Labels saved through MONAI Label's label store -> ``finetune`` on them -> a new served model."""
    client, cases = served["client"], served["cases"][SEG2D]
    for case in cases:
        client.form("PUT", f"/datastore/label?image={case['id']}&tag=final", {"params": "{}"}, {"label": case["label"]})
    client.infer(SEG2D, cases[0]["id"], "image", result_extension=".png")  # the server now holds the model
    model = served["ckpt"] / SEG2D / app_conf.MODEL_FILE
    before = _sha(model)
    _train(served, SEG2D, {"max_epochs": 1, "val_split": 0.5})

    run = _one_run(served, SEG2D)
    datalist = json.loads((run / "datalist.json").read_text())
    used = {Path(r["image"]).name for r in datalist["training"] + datalist["validation"]}
    assert used == {c["image"].name for c in cases}
    assert all(Path(r["label"]).parent.name == "final" for r in datalist["training"])
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1] and float(history[0]["train_loss"]) > 0
    assert _sha(model) != before and _sha(model) == _sha(run / "models" / app_conf.MODEL_FILE)
    log = served["log"].read_text(errors="replace")
    assert f"Restored all variables from {model}" in log  # the run continued from the served model

    stats = client.json("GET", "/info/")["train_stats"][SEG2D]
    assert stats["run"] == run.name and stats["last_epoch"]["epoch"] == "1"
    client.infer(SEG2D, cases[0]["id"], "image", result_extension=".png")
    assert "Reload model from cache" in served["log"].read_text(errors="replace")[len(log) :]  # the new model


def test_train_classification_without_classes_says_how_to_set_them(served) -> None:
    task = _train(served, CLS, {"max_epochs": 1}, status="ERROR")
    assert any("no image has a class" in line and "/datastore/image/info" in line for line in task["details"])
    runs = served["runs"] / CLS / "monailabel"
    assert not runs.exists() or not any(runs.iterdir())  # no empty run folder left behind


def test_train_classification_refused_unless_every_class_is_labelled(served) -> None:
    """One class only: the stratified split refuses before training, and the served model stays."""
    client, cases = served["client"], served["cases"][CLS]
    for case in cases:
        client.form("PUT", f"/datastore/image/info?image={case['id']}", {"info": json.dumps({"class": "HP"})})
    model = served["ckpt"] / CLS / app_conf.MODEL_FILE
    before = _sha(model)
    task = _train(served, CLS, {"max_epochs": 1, "val_split": 0.5}, status="ERROR")
    assert any("must hold every class" in line and "SSA" in line for line in task["details"]), task["details"]
    assert _sha(model) == before
    runs = served["runs"] / CLS / "monailabel"
    assert not runs.exists() or not any(runs.iterdir())


def test_train_classification_on_image_info_classes(served) -> None:
    client, cases = served["client"], served["cases"][CLS]
    for case in cases:  # the class by name, as a user would set it
        info = json.dumps({"class": case["class_name"]})
        client.form("PUT", f"/datastore/image/info?image={case['id']}", {"info": info})
    model = served["ckpt"] / CLS / app_conf.MODEL_FILE
    before = _sha(model)
    _train(served, CLS, {"max_epochs": 1, "val_split": 0.0})

    run = _one_run(served, CLS)
    datalist = json.loads((run / "datalist.json").read_text())
    assert sorted((Path(r["image"]).name, r["label"]) for r in datalist["training"]) == sorted(
        (c["image"].name, c["label"]) for c in cases
    )
    assert datalist["validation"] == datalist["training"]  # no held-out split asked for: validated on training
    assert _sha(model) != before


# --------------------------------------------------------------------------------------------------------------
# MONAI Label's own client, as a user runs it (no field patched), and a publish the check refuses


_CLIENT_SESSION = r"""
import json, sys, time
from monailabel.client import MONAILabelClient

base, image, label, model, train_s = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
client = MONAILabelClient(base)
out = {"models": sorted(client.info()["models"])}
out["upload"] = client.upload_image(image, image_id="client_upload")
out["label"] = client.save_label("client_upload", label, tag="final")
mask, params = client.infer(model, "client_upload", {})
out["mask"] = mask
out["train_start"] = client.train_start(model, {"max_epochs": 1, "val_split": 0.5})
deadline = time.monotonic() + train_s
while (status := client.train_status())["status"] in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
    time.sleep(2)
out["train_status"] = {k: status.get(k) for k in ("status", "details")}
print(json.dumps(out))
"""


def test_monailabel_client_end_to_end(served, tmp_path) -> None:
    """``monailabel.client.MONAILabelClient`` as it ships: info, upload_image, save_label, infer, train_start and
    train_status against the live server; the trained model is published and served."""
    from PIL import Image

    case = served["cases"][SEG2D][0]
    image = tmp_path / f"client_upload{case['image'].suffix}"
    shutil.copy(case["image"], image)  # the same pixels under a new id
    model = served["ckpt"] / SEG2D / app_conf.MODEL_FILE
    before = _sha(model)
    out = _venv_json(served["env"], _CLIENT_SESSION, served["client"].base, str(image), str(case["label"]), SEG2D,
                     str(TRAIN_S))  # fmt: skip
    assert out["models"] == sorted(MODELS)
    assert out["upload"]["image"] == "client_upload" and out["label"]["image"] == "client_upload"
    assert (
        served["studies"] / "labels" / "final" / Path(case["label"]).name.replace(case["id"], "client_upload")
    ).is_file()
    with Image.open(out["mask"]) as mask:
        assert mask.size == Image.open(image).size and set(np.unique(np.asarray(mask)).tolist()) <= {0, 1}
    status = out["train_status"]
    assert status["status"] == "DONE", "\n".join(status.get("details") or []) + _log_tail(served["log"])
    assert _sha(model) != before  # published (the served fixture's margin accepts any finite score)


def test_a_refused_publish_keeps_the_served_model_and_says_so(served, tmp_path) -> None:
    """A server whose margin no Dice can meet (``publish_margin -1.5``: at least the served score + 1.5): /train
    ends in ERROR, its last status line says the model is not published, publish.json records both scores, and
    the served model's digest is unchanged."""
    studies, ckpt = tmp_path / "studies", tmp_path / "ckpt"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in served["cases"][SEG2D]:
        shutil.copy(case["image"], studies / case["image"].name)
        shutil.copy(case["label"], studies / "labels" / "final" / f"{case['id']}{Path(case['label']).suffix}")
    shutil.copytree(served["ckpt"] / SEG2D, ckpt / SEG2D)
    model = ckpt / SEG2D / app_conf.MODEL_FILE
    before = _sha(model)
    conf = {"models": SEG2D, "ckpt_dir": str(ckpt), "runs_dir": str(tmp_path / "runs"), "overlays": "demo",
            "publish_margin": "-1.5"}  # fmt: skip
    log = tmp_path / "server.log"
    with _server(served["env"], studies, conf, log) as client:
        task = _train({"client": client, "log": log}, SEG2D, {"max_epochs": 1, "val_split": 0.5}, status="ERROR")
        stats = client.json("GET", "/info/")["train_stats"][SEG2D]
    assert any("not published, the served model stays" in line for line in task["details"]), task["details"]
    assert "not published, the served model stays" in log.read_text(errors="replace")
    decision = stats["publish"]
    assert decision["published"] is False and decision["margin"] == -1.5
    assert np.isfinite(decision["score"]) and np.isfinite(decision["served_score"])
    assert _sha(model) == before


_REALM_KEYS = r"""
import base64, json, time
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

realm, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
der = realm.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

def token(key, roles, lifetime=3600):
    claims = {"preferred_username": "tester", "realm_access": {"roles": roles}, "exp": int(time.time()) + lifetime}
    return jwt.encode(claims, key, algorithm="RS256")

print(json.dumps({"public_key": base64.b64encode(der).decode(), "user": token(realm, ["monailabel-user"]),
                  "annotator": token(realm, ["monailabel-user", "monailabel-annotator"]),
                  "admin": token(realm, ["monailabel-admin"]), "forged": token(other, ["monailabel-admin"]),
                  "expired": token(realm, ["monailabel-admin"], -3600)}))
"""


@contextlib.contextmanager
def _realm(public_key: str) -> Iterator[str]:
    """A stand-in OpenID realm on loopback: its URI answers ``{"public_key": ...}``, as Keycloak's realm URI does
    (all MONAI Label's token check asks of it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = json.dumps({"realm": "test", "public_key": public_key}).encode()

    class Realm(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/realms/test"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_monailabel_auth_settings_guard_every_served_route(served, tmp_path) -> None:
    """The server started with MONAI Label's own auth settings (``MONAI_LABEL_AUTH_ENABLE``, a realm URI): no token,
    a forged or expired token: 401; a valid token without the route's role: 403 naming it, before the body is read;
    the right role: the request reaches the app's own checks."""
    keys = _venv_json(served["env"], _REALM_KEYS)
    case = served["cases"][SEG2D][0]
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(case["image"], studies / case["image"].name)
    conf = {"models": SEG2D, "ckpt_dir": str(served["ckpt"]), "runs_dir": str(tmp_path / "runs"), "overlays": "demo"}
    log = tmp_path / "server.log"
    with _realm(keys["public_key"]) as realm_uri:
        auth_env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm_uri}
        with _server(served["env"], studies, conf, log, extra_env=auth_env, probe="/auth/") as client:
            assert client.json("GET", "/auth/")["enabled"] is True
            status, detail = client.refused("GET", "/info/")
            assert status == 401 and "Bearer" in detail
            for name in ("forged", "expired"):
                status, detail = client.bearer(keys[name]).refused("GET", "/info/")
                assert status == 401 and "not valid" in detail, (name, detail)
            user, annotator, admin = (client.bearer(keys[k]) for k in ("user", "annotator", "admin"))
            assert set(user.json("GET", "/info/")["models"]) == {SEG2D}
            body, headers = client.multipart({"params": "{}"}, {"label": case["label"]})
            status = user.refused_before_body("PUT", f"/datastore/label?image={case['id']}&tag=final", body, headers)
            assert status == 403
            status, detail = user.refused("PUT", f"/datastore/label?image={case['id']}&tag=final", body, headers)
            assert status == 403 and "monailabel-annotator" in detail
            train = json.dumps({"max_epochs": 0}).encode(), {"Content-Type": "application/json"}
            status, detail = annotator.refused("POST", f"/train/{SEG2D}", *train)
            assert status == 403 and "monailabel-admin" in detail
            status, detail = admin.refused("POST", f"/train/{SEG2D}", *train)
            assert status == 400 and "max_epochs" in detail  # past the token check, refused by the app's own
            status, detail = admin.refused("PUT", f"/model/{SEG2D}", body, headers)
            assert status == 403 and "--conf open_routes model_upload" in detail
    assert not (studies / "labels" / "final").exists() or not any((studies / "labels" / "final").iterdir())
