"""The web page (tools/web_demo.py): its predict function through Gradio's own client, its error
messages, and a real headless browser (Debian's chromium, driven by Selenium).

The page is served by the tool's own ``build`` and ``launch`` on a free localhost port, with
conftest's ``spread_checkpoint`` (a tiny random model whose segmentations hold several classes;
class names embedded by the benchmark's attribute file). What the page returns is compared with
``ZeroShotPredictor`` on the same image and with what ``tools/segment.py`` writes.

Gradio, its client and Selenium come with ``make test`` (``make setup-web``), chromium and
chromedriver with ``tools/install_browser.sh``. Without them the tests are skipped with the
reason, except under CI (``CI`` set), where they must run and fail instead.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ocz_d2.config import load_config
from ocz_d2.engine import ZeroShotPredictor
from ocz_d2.engine.outputs import render_segmentation
from ocz_d2.engine.web_demo import WebSegmenter, example_images
from tools import segment, web_demo

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: The page's pixel limit in these tests: the benchmark's 64 x 64 images pass, 96 x 96 does not.
PIXEL_LIMIT = 80 * 80


def _needs(condition: bool, what: str) -> None:
    """Skip without ``what``, with the reason; under CI, fail instead (the test must run)."""
    if condition:
        return
    message = f"{what} is not installed: run `make setup-web` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        _needs(False, f"the Python package {name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(synthetic_benchmark, spread_checkpoint, tmp_path_factory):
    """The served page, its Gradio client, the inputs and a predictor like the page's."""
    _module("gradio")
    client_module = _module("gradio_client")
    data = synthetic_benchmark
    base = tmp_path_factory.mktemp("web")
    patch = pytest.MonkeyPatch()
    patch.setenv("GRADIO_TEMP_DIR", str(base / "gradio"))  # the page's files stay in the test
    files = sorted((Path(data.root) / "images" / "test").glob("*.png"))
    photo = base / "photo.png"
    shutil.copy(files[0], photo)
    large = base / "large.png"
    Image.open(files[1]).resize((96, 96)).save(large)
    opts = data.predictor_overrides(**{"MODEL.WEIGHTS": spread_checkpoint[2]})
    args = web_demo.parse_args(
        ["--config-file", str(CONFIG), "--max-image-pixels", str(PIXEL_LIMIT), "--examples",
         str(files[2]), "--example-classes", ", ".join(data.classes[:4]), *opts]
    )  # fmt: skip
    segmenter, demo = web_demo.build(args)
    for attempt in range(5):  # a free port can be taken by another process before the launch
        args.port = _free_port()
        try:
            _, url, _ = web_demo.launch(demo, args, block=False)
            break
        except OSError:
            if attempt == 4:
                raise
    assert url.startswith(f"http://127.0.0.1:{args.port}")
    client = client_module.Client(url, verbose=False, download_files=str(base / "downloads"))
    predictor = ZeroShotPredictor(load_config(CONFIG, opts))
    yield SimpleNamespace(
        url=url, client=client, handle_file=client_module.handle_file, segmenter=segmenter,
        predictor=predictor, data=data, photo=photo, large=large, opts=opts, base=base,
    )  # fmt: skip
    demo.close()
    patch.undo()


def _segment(page, path, classes, mode="whole", ensemble=False):
    out = page.client.predict(
        page.handle_file(str(path)), classes, mode, ensemble, api_name="/segment"
    )
    names = ("status", "overlay", "legend", "table", "labels", "json")
    return SimpleNamespace(**dict(zip(names, out)))


def _vocabulary_text(data) -> str:
    """The benchmark's classes, the last one with a synonym (both names are in its file)."""
    return ", ".join(data.classes[:-2]) + f", {data.classes[-2]}|{data.classes[-1]}"


# ---------------------------------------------------------------------- the predict function
def test_page_returns_the_predictors_segmentation(page, tmp_path, capsys):
    classes = _vocabulary_text(page.data)
    got = _segment(page, page.photo, classes)
    assert got.status.startswith("Segmented photo.png (64 x 64 px) with 15 classes"), got.status
    image = np.asarray(Image.open(page.photo).convert("RGB"))
    expected = page.predictor(image, classes)
    assert len(expected.present) >= 3, "the spread model should use several classes"

    labels = np.asarray(Image.open(got.labels))
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected.labels)
    # the overlay is the drawing of the predictor's result, pixel for pixel (PNG: lossless)
    overlay = np.asarray(Image.open(got.overlay).convert("RGB"))
    assert np.array_equal(overlay, render_segmentation(image, expected).overlay)
    # legend and table: the classes present; area share and mean score computed here
    names = expected.vocabulary.names
    for k in expected.present:
        assert f"</span>{names[k]}</li>" in got.legend
    assert got.legend.count("<li") == len(expected.present)
    rows = {row[0]: row[1:] for row in got.table["data"]}
    assert got.table["headers"] == ["class", "area %", "mean score"]
    assert set(rows) == {names[k] for k in expected.present}
    for k in expected.present:
        share = 100 * (expected.labels == k).mean()
        score = expected.scores[k][expected.labels == k].mean()
        assert rows[names[k]][0] == pytest.approx(share, abs=0.006)
        assert rows[names[k]][1] == pytest.approx(score, rel=1e-3, abs=1e-4)
    shares = [row[1] for row in got.table["data"]]
    assert shares == sorted(shares, reverse=True)

    # the JSON is the one tools/segment.py writes for the same image, but for "input" (the
    # uploaded file's name here, the absolute path there)
    out = tmp_path / "segment"
    code = segment.main(
        ["--config-file", str(CONFIG), "--input", str(page.photo), "--classes", classes,
         "--output", str(out), *page.opts]
    )  # fmt: skip
    capsys.readouterr()
    assert code == 0
    written = json.loads((out / "photo.json").read_text())
    served = json.loads(Path(got.json).read_text())
    assert served.pop("input") == "photo.png"
    assert written.pop("input") == str(page.photo.resolve())
    assert served == written
    assert np.array_equal(np.asarray(Image.open(out / "photo_labels.png")), labels)


def test_slide_and_the_segment_clip_ensemble(page):
    classes = ", ".join(page.data.classes[:6])
    image = np.asarray(Image.open(page.photo).convert("RGB"))
    plain = json.loads(Path(_segment(page, page.photo, classes).json).read_text())
    got = _segment(page, page.photo, classes, mode="slide", ensemble=True)
    served = json.loads(Path(got.json).read_text())
    assert served["mode"] == "slide" and served["segment_clip"] is True
    assert "slide inference, CLIP segment ensemble" in got.status
    predictor = copy.copy(page.predictor)
    predictor.mode, predictor.segment_clip = "slide", True
    expected = predictor(image, classes)
    assert np.array_equal(np.asarray(Image.open(got.labels)), expected.labels)
    # the switch is real: the ensemble changes the scores
    assert [c["mean_score"] for c in served["classes"]] != [
        c["mean_score"] for c in plain["classes"]
    ]


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "classes, message",
    [
        ("", "no classes: type the class names"),
        (" , | ", "no classes"),
        ("orange plain, green dotted, Orange Plain", "'Orange Plain' is given in classes 1 and 3"),
        ("orange plain|orange plain", "twice in class 1"),
    ],
)
def test_bad_classes_get_a_message(page, classes, message):
    got = _segment(page, page.photo, classes)
    assert got.status.startswith("**Error:** ") and message in got.status, got.status
    assert got.overlay is None and got.labels is None and got.json is None


def test_bad_images_get_a_message_and_the_server_stays_up(page, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    got = _segment(page, text, "orange plain")
    assert got.status == (
        "**Error:** notes.png is not an image that can be read: upload a PNG, JPEG, BMP, TIFF "
        "or WebP file"
    )
    got = _segment(page, page.large, "orange plain")
    assert got.status == (
        f"**Error:** large.png is 96 x 96 = 9,216 pixels, more than the limit of "
        f"{PIXEL_LIMIT:,} (MODEL.OCZ.TEST.MAX_IMAGE_PIXELS): downscale it, or raise the limit"
    )
    assert got.overlay is None
    bad_mode = page.segmenter.segment(str(page.photo), "orange plain", "tiles")
    assert not bad_mode.ok and "choose one of whole, slide" in bad_mode.message
    assert not page.segmenter.segment(None, "orange plain").ok
    # and the page still segments
    assert _segment(page, page.photo, "orange plain, green dotted").status.startswith("Segmented")


def test_requests_keep_a_bounded_number_of_folders(page, monkeypatch, tmp_path):
    segmenter = WebSegmenter(page.predictor, output_root=tmp_path, max_image_pixels=PIXEL_LIMIT)
    monkeypatch.setattr("ocz_d2.engine.web_demo._KEPT_REQUESTS", 2)
    for _ in range(4):
        assert segmenter.segment(str(page.photo), "orange plain, blue dotted").ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003", "000004"]


def test_tool_defaults_and_errors(tmp_path, capsys):
    _module("gradio")  # the tool checks it first
    args = web_demo.parse_args(["--config-file", str(CONFIG)])
    assert args.host == "127.0.0.1" and args.port == 7860  # this machine only, unless asked
    # empty weights: one message and status 2, before anything is served
    assert web_demo.main(["--config-file", str(CONFIG), "MODEL.WEIGHTS", ""]) == 2
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    code = web_demo.main(
        ["--config-file", str(CONFIG), "--allow-untrained", "--max-image-pixels", "0"]
    )
    assert code == 2 and "--max-image-pixels must be > 0" in capsys.readouterr().err
    # the examples: the miniature's test images when they exist
    folder = tmp_path / "ocz_synthetic" / "images" / "test"
    assert example_images(tmp_path) == []
    folder.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8)).save(folder / f"{i:05d}.png")
    assert [Path(p).name for p in example_images(tmp_path)] == [f"{i:05d}.png" for i in range(4)]


# ---------------------------------------------------------------------- a real browser
def test_in_a_headless_browser(page):
    """Load the page, upload an image, type classes, press Segment; the overlay and the legend
    appear, with the classes the predictor finds."""
    _needs(
        os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER),
        f"Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})",
    )
    webdriver = _module("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"):  # fmt: skip
        options.add_argument(flag)
    # The Debian driver, named: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    classes = ", ".join(page.data.classes[:8])
    try:
        driver.get(page.url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#ocz-image input[type=file]"))
        )
        upload.send_keys(str(page.photo))
        # the preview shows the upload before anything is segmented
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ocz-input img")))
        driver.find_element(By.CSS_SELECTOR, "#ocz-classes textarea").send_keys(classes)
        driver.find_element(By.CSS_SELECTOR, "#ocz-segment").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ocz-legend li")))
        overlay = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ocz-overlay img")))
        deadline = time.time() + 30  # the picture loads after its element appears
        while not driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", overlay
        ):
            assert time.time() < deadline, "the overlay never loaded"
            time.sleep(0.2)
        width = driver.execute_script("return arguments[0].naturalWidth", overlay)
        legend = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#ocz-legend li")]
        status = driver.find_element(By.CSS_SELECTOR, "#ocz-status").text
        driver.save_screenshot(str(page.base / "page.png"))
    finally:
        driver.quit()
    image = np.asarray(Image.open(page.photo).convert("RGB"))
    expected = page.predictor(image, classes)
    assert status.startswith("Segmented photo.png"), status
    assert width == render_segmentation(image, expected).overlay.shape[1]
    assert legend == [expected.vocabulary.names[k] for k in expected.present]
