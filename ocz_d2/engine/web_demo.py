"""The web page: open-vocabulary segmentation of an uploaded image in a browser (Gradio).

:class:`WebSegmenter` is the page's logic, with no Gradio in it: one request (an image file,
class names, whole or slide, the segment-CLIP ensemble) gives the overlay, a legend, a table of
the classes present and the files that ``tools/segment.py`` writes, or a message saying what is
wrong with the request. :func:`build_web_demo` lays it out as a Gradio page; Gradio is an
optional extra (``pip install -e .[web]``), imported only there.

    segmenter = WebSegmenter(predictor, output_root="/tmp/ocz_web")
    demo = build_web_demo(segmenter, examples=example_images(cfg))
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1")
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..modeling.meta_arch.zero_shot_segmentor import TEST_MODES
from ..modeling.text.vocabulary import Vocabulary
from ..utils.errors import UserError
from .outputs import class_table, render_segmentation, write_segmentation
from .predictor import ZeroShotPredictor, check_image_pixels, load_image

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "TABLE_HEADERS",
    "WebResponse",
    "WebSegmenter",
    "build_web_demo",
    "example_images",
]

logger = logging.getLogger(__name__)

#: The page's pixel limit when neither ``--max-image-pixels`` nor
#: ``MODEL.OCZ.TEST.MAX_IMAGE_PIXELS`` sets one: a page open to others is never unbounded.
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
#: Columns of the class table.
TABLE_HEADERS = ["class", "area %", "mean score"]
#: Request folders kept on disk (the downloads of the latest requests); older ones are deleted.
_KEPT_REQUESTS = 32
_CLASSES_HINT = "comma-separated, synonyms joined by |, e.g. 'cat, dog, sofa|couch'"


@dataclass
class WebResponse:
    """The page's outputs for one request (``ok`` False: only ``message`` is set).

    Attributes:
        ok: whether the image was segmented.
        message: markdown for the status line: what was done, or what is wrong and what to do.
        overlay: uint8 RGB picture with legend (:func:`~ocz_d2.utils.visualize.draw_segmentation`).
        legend_html: the classes present as colour swatches and names.
        table: rows of :data:`TABLE_HEADERS` (present classes, largest first).
        labels_file, json_file: the label PNG and the JSON, as ``tools/segment.py`` writes them.
    """

    ok: bool
    message: str
    overlay: np.ndarray | None = None
    legend_html: str = ""
    table: list[list] = field(default_factory=list)
    labels_file: str | None = None
    json_file: str | None = None


class WebSegmenter:
    """One page request at a time: check it, segment, write the downloads.

    Requests are serialised by a lock (the predictor's mode and ensemble switch are set per
    request, and one model forward at a time keeps memory bounded); the page's queue runs them
    one by one anyway. Bad requests never raise: they return a :class:`WebResponse` with the
    message.
    """

    def __init__(
        self,
        predictor: ZeroShotPredictor,
        *,
        output_root: str | os.PathLike | None = None,
        max_image_pixels: int | None = None,
    ):
        """
        Args:
            predictor: the model; its ``mode`` and ``segment_clip`` are set per request.
            output_root: folder for the request folders (downloads); None: a new temporary one.
            max_image_pixels: larger images are refused (> 0); None: the predictor's
                ``MODEL.OCZ.TEST.MAX_IMAGE_PIXELS``, or :data:`DEFAULT_MAX_IMAGE_PIXELS` when
                that is 0.
        """
        if max_image_pixels is None:
            max_image_pixels = predictor.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        if max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be > 0, got {max_image_pixels}")
        self.predictor = predictor
        self.max_image_pixels = int(max_image_pixels)
        root = output_root or tempfile.mkdtemp(prefix="ocz_web_")
        self.output_root = Path(root)
        self.output_root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._requests = 0

    # ------------------------------------------------------------------ checks
    @staticmethod
    def parse_classes(text: str | None) -> Vocabulary:
        """The vocabulary typed on the page.

        Raises:
            UserError: no class, an empty synonym, a name given twice.
        """
        if not text or not text.replace(",", "").replace("|", "").strip():
            raise UserError(f"no classes: type the class names ({_CLASSES_HINT})")
        try:
            return Vocabulary.from_text(text)
        except ValueError as e:
            raise UserError(f"classes: {e} ({_CLASSES_HINT})") from None

    def read_image(self, path: str | os.PathLike | None) -> np.ndarray:
        """The uploaded file as RGB uint8, its size checked from the header before decoding.

        Raises:
            UserError: no file, not an image, over the pixel limit.
        """
        if path is None or not str(path):
            raise UserError("no image: upload one, or pick an example below")
        name = Path(path).name
        try:
            with Image.open(path) as header:
                width, height = header.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise UserError(
                f"{name} is not an image that can be read: upload a PNG, JPEG, BMP, TIFF or "
                "WebP file"
            ) from None
        check_image_pixels(height, width, self.max_image_pixels, name)
        try:
            return load_image(path)
        except ValueError as e:
            raise UserError(str(e)) from None

    @staticmethod
    def check_mode(mode: str | None) -> str:
        mode = mode or "whole"
        if mode not in TEST_MODES:
            raise UserError(f"inference {mode!r}: choose one of {', '.join(TEST_MODES)}")
        return mode

    # ------------------------------------------------------------------ a request
    def segment(
        self,
        image_path: str | os.PathLike | None,
        classes: str | None,
        mode: str | None = "whole",
        segment_clip: bool = False,
    ) -> WebResponse:
        """Segment one uploaded image with the typed classes.

        Args:
            image_path: the uploaded file (its name, without folder, is recorded as the JSON's
                ``"input"`` and names the downloads).
            classes: comma-separated class names with ``a|b`` synonyms.
            mode: "whole" or "slide".
            segment_clip: ZegFormer's ensemble with CLIP's classification of the segments.
        """
        try:
            vocabulary = self.parse_classes(classes)
            mode = self.check_mode(mode)
            image = self.read_image(image_path)
            with self._lock:
                return self._segment(Path(image_path).name, image, vocabulary, mode, segment_clip)
        except (UserError, ValueError) as e:
            return WebResponse(ok=False, message=f"**Error:** {e}")
        except RuntimeError as e:  # e.g. out of memory: the server stays up
            logger.exception("segmentation failed")
            return WebResponse(ok=False, message=f"**Error:** the model failed on this image: {e}")

    def _segment(
        self, file_name: str, image: np.ndarray, vocabulary: Vocabulary, mode: str, ensemble: bool
    ) -> WebResponse:
        start = time.perf_counter()
        predictor = self.predictor
        predictor.mode = mode
        predictor.segment_clip = bool(ensemble)
        result = predictor(image, vocabulary)
        rendered = render_segmentation(image, result)
        folder = self._request_folder()
        files = write_segmentation(
            folder, Path(file_name).stem, file_name, image, result, predictor, rendered
        )
        table = [[name, round(share, 2), round(float(score), 4)] for name, share, score in
                 class_table(result)]  # fmt: skip
        seconds = time.perf_counter() - start
        height, width = image.shape[:2]
        message = (
            f"Segmented {file_name} ({width} x {height} px) with {len(vocabulary)} classes, "
            f"{mode} inference{', CLIP segment ensemble' if ensemble else ''}, in {seconds:.1f} s: "
            f"{len(result.present)} present."
        )
        return WebResponse(
            ok=True,
            message=message,
            overlay=rendered.overlay,
            legend_html=legend_html(
                [result.vocabulary.names[k] for k in rendered.legend],
                rendered.colors[rendered.legend],
            ),
            table=table,
            labels_file=str(files["labels"]),
            json_file=str(files["json"]),
        )

    def _request_folder(self) -> Path:
        """A new folder for this request's files; the folders of old requests are deleted."""
        self._requests += 1
        folder = self.output_root / f"{self._requests:06d}"
        folder.mkdir()
        old = self.output_root / f"{self._requests - _KEPT_REQUESTS:06d}"
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        return folder


def legend_html(names: list[str], colors: np.ndarray) -> str:
    """A legend as HTML: per class a colour swatch and its name (escaped)."""
    items = []
    for name, color in zip(names, colors):
        rgb = "#" + "".join(f"{int(c):02x}" for c in color)
        items.append(
            f'<li class="ocz-legend-item"><span class="ocz-swatch" style="background:{rgb};'
            "display:inline-block;width:1em;height:1em;margin-right:0.4em;"
            f'vertical-align:middle"></span>{html.escape(name)}</li>'
        )
    return '<ul class="ocz-legend" style="list-style:none;padding:0">' + "".join(items) + "</ul>"


def example_images(root: str | os.PathLike | None, count: int = 4) -> list[str]:
    """Up to ``count`` example images: the miniature's test images under ``root``
    (``$DETECTRON2_DATASETS``; ``ocz_synthetic/images/test``), or none when absent."""
    if root is None:
        return []
    folder = Path(root) / "ocz_synthetic" / "images" / "test"
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.glob("*.png"))[:count]]


def build_web_demo(
    segmenter: WebSegmenter,
    *,
    examples: list[str] | None = None,
    example_classes: str = "",
    title: str = "ocz_d2: open-vocabulary segmentation",
):
    """The page, a ``gradio.Blocks`` (not launched). Its API endpoint ``/segment`` takes
    (image file, classes, mode, ensemble) and returns (status, overlay, legend HTML, table,
    label PNG, JSON).

    Args:
        segmenter: the page's logic.
        examples: image files offered as examples (with ``example_classes``).
        example_classes: the classes filled in with an example.
        title: the page's title.
    """
    import gradio as gr  # the optional extra: only the page needs it

    def run(image_path, classes, mode, ensemble):
        r = segmenter.segment(image_path, classes, mode, ensemble)
        return r.message, r.overlay, r.legend_html, r.table, r.labels_file, r.json_file

    def preview(image_path):
        if not image_path:
            return None, ""
        try:
            return segmenter.read_image(image_path), ""
        except UserError as e:
            return None, f"**Error:** {e}"

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            f"## {html.escape(title)}\nUpload an image (or pick an example), type the classes "
            f"({_CLASSES_HINT}) and press **Segment**. Weights: "
            f"`{segmenter.predictor.weights or 'none (untrained heads)'}`."
        )
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", type="filepath", elem_id="ocz-image")
                shown = gr.Image(
                    label="input", interactive=False, format="png", elem_id="ocz-input"
                )
                classes = gr.Textbox(
                    label="classes", placeholder="cat, dog, sofa|couch", elem_id="ocz-classes"
                )
                mode = gr.Radio(list(TEST_MODES), value="whole", label="inference")
                ensemble = gr.Checkbox(
                    label="CLIP classification of the segments (ZegFormer's ensemble)",
                    value=segmenter.predictor.segment_clip,
                )
                button = gr.Button("Segment", variant="primary", elem_id="ocz-segment")
            with gr.Column():
                status = gr.Markdown(elem_id="ocz-status")
                overlay = gr.Image(
                    label="segmentation",
                    interactive=False,
                    format="png",
                    elem_id="ocz-overlay",
                    buttons=[],  # they would cover the picture's legend; the files are below
                )
                legend = gr.HTML(elem_id="ocz-legend")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="classes present",
                                     interactive=False)  # fmt: skip
                labels_file = gr.File(label="label PNG (pixel value k = k-th class)")
                json_file = gr.File(label="JSON summary")
        if examples:
            gr.Examples(
                examples=[[path, example_classes] for path in examples],
                inputs=[upload, classes],
                label="examples",
            )
        upload.change(preview, inputs=upload, outputs=[shown, status], api_visibility="private")
        button.click(
            run,
            inputs=[upload, classes, mode, ensemble],
            outputs=[status, overlay, legend, table, labels_file, json_file],
            api_name="segment",
            concurrency_limit=1,
        )
    return demo
