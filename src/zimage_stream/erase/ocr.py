"""Finding text in product images: detector backends behind one interface.

**RapidOCR** (the default; PP-OCRv4 models shipped in the wheel, works offline). Only its
detector decides what is text: RapidOCR's own pipeline drops boxes whose *recognition*
score is below ``text_score``, which leaves faint, rotated or stylised text in place.
Here the detector's probability map is computed on one view of the image that makes
faint text stand out, and its boxes are kept, recognition only labelling them, but for
large squarish ones (``_reads_as_text``): enlarged and sharpened, a product's silhouette
or handle can look like one large glyph, so such a box must read clearly as text, unless
it lies on grain, where large faint lines read as little.

The view: the image sharpened with an unsharp mask (``SHARPEN_SIGMA``) and enlarged
(``UPSCALE``, up to a working size of ``DETECT_PX`` on the longer side). The mask's gain
is ``SHARPEN_GAIN`` everywhere and rises by up to ``EDGE_GAIN`` where fine edges are
dense: printed text has crisp edges, while grain, fabric and shading vary more smoothly,
so low-contrast and translucent strokes on a textured background are lifted above the
texture instead of with it. "Dense" is relative to the image itself (between its 90th
and 99th percentile of fine-edge energy), so no absolute threshold depends on the
source. Enlarging gives 12 px text the size the detector was trained on. Images larger
than a tile are cut into overlapping tiles, so a 4000 px photo's small text survives.

Where the image is textured (grain, fabric, stripes fill a cell of it, which a line of
text or a product's edge does not), the detector looks a second time, at a view whose
unsharp mask is narrower (``TEXTURE_SIGMA``) and puts most of its gain on fine edges:
faint, translucent strokes that the first view leaves level with the grain stand out in
it. Its probability joins the first's (the larger of the two) before boxes are cut, so
a line found by both is one box. A plain or gradient background costs one view, and so
does a textured backdrop (``TEXTURED_IMAGE_SHARE`` of the cells or more: grain, wood,
fabric behind everything), seen by the texture view alone: on the bench's 127 textured
images the first view found no line that the texture view did not (the same 4 of 326
not found; one more left over, by the verifier's reading of a handle cut in either run),
and leaving it out took the finding from 0.83 to 0.45 s per image.

Where boxes are read (the first look), a box is lengthened at an end where the recogniser
reads its line on past it: on grain the probability map stops short of a faint line's
first or last glyph (``line_ends``).

The edge-weighted gain, the texture view, and PP-OCRv4 over the v5 and v6 detectors, were
chosen on ``bench/erase_quality.py``'s textured backgrounds; the figures are in the
README.

**Runtimes.** The detector network runs on OpenVINO where it is installed (a dependency),
every view: on this project's 2-core CPUs it ran the 1792x1344 whole-image view in 0.26 s
against onnxruntime's 0.39 s at float32 (the same probability to 1e-4), 0.13-0.22 s at
bfloat16, and look-again crops 2.5-3 times faster than onnxruntime. It takes the view's
RGB pixels as they are, the network's normalisation built into its model (60 ms less per
whole-image view than numpy). OpenVINO prepares kernels for each input shape it has not
run yet (0.08-0.2 s, more than a small view's run), so a view under ``LARGE_VIEW_PX`` (the
look-again crops, a texture view of part of an image) is padded to multiples of
``VIEW_STEP_PX``: a few shapes, each prepared once in a worker's life. ``precision``
``auto`` takes OpenVINO's default for the CPU: bfloat16 on x86 CPUs that compute it
natively (AVX512_BF16, AMX), float32 on other x86 CPUs; ``f32`` keeps the masks the same
on every CPU. The bench measured bfloat16 no worse (README). The recogniser runs on
OpenVINO too, at float32 whatever ``precision`` says (its scores decide which large boxes
are text and where line ends are read on: ``_OpenVinoReader``). Without a usable OpenVINO,
``auto`` runs everything on onnxruntime and logs why.

Some of RapidOCR's internals are used (``DBPostProcess`` for boxes from the probability
map, ``RapidOCR.get_crop_img_list`` for recognition crops, the recogniser's resizing,
session and alphabet for where along a crop it reads each character), so its version is
pinned in ``pyproject.toml`` and the seam has a unit test.

**EasyOCR** (optional: ``pip install 'zimage-stream[easyocr]'``). Its CRAFT detector
and recognisers are downloaded at run time; downloads are off unless allowed, and the
model folder is configurable, so a worker never fetches weights it was not given.

**Languages.** A request's ``languages`` (``en``, ``ch``) name the text the detector looks
for. With both, nothing is filtered. With one, every box is read, even where the caller
asked for no reading, and a box whose recognised text has letters of the other script
only is dropped: CJK ideographs are ``ch``, Latin letters ``en``. A box with letters of
neither kind (digits, prices, symbols, nothing legible) is kept, since both languages
use them; a box with both kinds ("新品 NEW") is kept whole, since a box is the unit.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_args

import cv2
import numpy as np
import structlog

from ..errors import ModelUnavailableError
from ..schemas import TextRegion
from ..settings import OcrSettings
from .line_ends import lengthened

log = structlog.get_logger(__name__)

#: the detector's working image: the source enlarged up to this on its longer side ...
DETECT_PX = 1792
#: ... but never more than this factor (12 px text becomes 24 px)
UPSCALE = 1.75
#: larger working images are cut into tiles this size, overlapping by this much
TILE_PX = 2048
TILE_OVERLAP_PX = 256
SHARPEN_SIGMA = 6.0
SHARPEN_GAIN = 4.0
#: extra gain where fine edges are dense; "fine" = finer than EDGE_SIGMA, averaged over
#: EDGE_SPREAD (both in source pixels)
EDGE_GAIN = 8.0
EDGE_SIGMA = 0.8
EDGE_SPREAD = 3.0
#: a second view for textured areas (grain, fabric, stripes): a narrower unsharp mask
#: with most of its gain on fine edges, which lifts faint strokes that the first view
#: leaves level with the texture
TEXTURE_SIGMA = 3.0
TEXTURE_GAIN = 3.0
TEXTURE_EDGE_GAIN = 16.0
#: a cell of TEXTURE_CELL_PX is textured where the image's detail (finer than
#: TEXTURE_DETAIL px) spreads by at least TEXTURE_LEVELS (over TEXTURE_SPREAD px) in three
#: quarters of it: grain fills a cell, while a line of text or a product's edge leaves
#: most of a cell's pixels calm
TEXTURE_DETAIL = 6.0
TEXTURE_SPREAD = 8.0
TEXTURE_LEVELS = 4.5
TEXTURE_QUANTILE = 25.0
TEXTURE_CELL_PX = 128
#: where at least this share of an image's cells is textured (a grain, wood or fabric
#: backdrop), the texture view alone is computed, over the whole image
TEXTURED_IMAGE_SHARE = 0.5
#: PP-OCRv4's detector, as shipped in the rapidocr-onnxruntime wheel
DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
#: on OpenVINO, a view under LARGE_VIEW_PX pixels is padded to multiples of VIEW_STEP_PX
#: (see the module); larger ones, to multiples of 32 as the network needs
LARGE_VIEW_PX = 1_000_000
VIEW_STEP_PX = 128
#: PP-OCRv4's recogniser (the same wheel), which OpenVINO runs at float32 where it runs
#: the detector (``_OpenVinoReader``), its batches padded to a multiple of READ_WIDTH_STEP
#: px wide
REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
READ_PRECISION = "f32"
READ_WIDTH_STEP = 128
#: the values ZIMAGE_OCR_RUNTIME and ZIMAGE_OCR_PRECISION take (see the module)
RUNTIMES: tuple[str, ...] = get_args(OcrSettings.model_fields["runtime"].annotation)
PRECISIONS: tuple[str, ...] = get_args(OcrSettings.model_fields["precision"].annotation)
#: DB post-processing: pixel threshold, mean box score, and how far a box is grown
#: (PP-OCR's DB boxes hug the text's core; 2.0 covers whole glyphs and line ends)
PIXEL_THRESHOLD = 0.3
BOX_THRESHOLD = 0.3
UNCLIP_RATIO = 2.0
#: a box at least this tall is text only if it has a line's shape (``TextBox.is_line``)
#: or reads as at least SHAPE_MIN_CHARS characters with at least this recognition score
#: (RapidOCR's own default ``text_score``, applied here to these large boxes alone) ...
SHAPE_MIN_PX = 128
SHAPE_MIN_CHARS = 2
SHAPE_MIN_SCORE = 0.5
#: ... and one at least this tall, off grain (``_on_texture``), likewise or when it reads
#: as one CJK ideograph with that score (a mug's handle reads as "D", "C", "O", "福")
GLYPH_MIN_PX = 48
#: a box is on grain when its centre's cell and at least this many cells around it are
#: textured (see ``_on_texture``)
TEXTURED_AROUND = 3
#: what ``detect`` finds in the same pixels changes with this revision (the bench keeps
#: the detector's answers under it): 2, line ends read past (``line_ends``); 3, every
#: view and the recogniser on OpenVINO where it is used, small views padded; 4, the
#: texture view alone on a textured backdrop
BOXES_REVISION = 4
#: the languages a request can name; all of them is the default
LANGUAGES = ("en", "ch")
#: a box this many times longer than high is a line's (a glyph's or two, or a product's
#: silhouette, is squarer)
LINE_ASPECT = 2.0


@dataclass(frozen=True)
class TextBox:
    """A text region: four corner points (x, y) clockwise from top-left."""

    polygon: np.ndarray
    text: str
    confidence: float

    @property
    def height(self) -> float:
        """The text's height: the shorter side of the box."""
        return max(1.0, min(self._sides()))

    @property
    def length(self) -> float:
        """The line's length: the longer side of the box."""
        return max(1.0, max(self._sides()))

    @property
    def is_line(self) -> bool:
        """Whether the box has a line's shape: at least LINE_ASPECT times longer than high."""
        return self.length >= LINE_ASPECT * self.height

    @property
    def slant(self) -> float:
        """How far the line runs from level: its longer side's angle to the image's rows
        (degrees, 0 to 90)."""
        p, (first, second) = self.polygon, self._sides()
        along = p[1] - p[0] if first >= second else p[2] - p[1]
        degrees = abs(float(np.degrees(np.arctan2(along[1], along[0])))) % 180
        return min(degrees, 180 - degrees)

    def _sides(self) -> tuple[float, float]:
        p = self.polygon
        sides = [float(np.linalg.norm(p[i] - p[(i + 1) % 4])) for i in range(4)]
        return (sides[0] + sides[2]) / 2, (sides[1] + sides[3]) / 2

    def shifted(self, dx: float, dy: float) -> TextBox:
        return TextBox(self.polygon + np.array([dx, dy], np.float32), self.text, self.confidence)

    def as_region(self) -> TextRegion:
        """The box as a result event's ``text_regions`` item."""
        corners = [(round(float(x), 1), round(float(y), 1)) for x, y in self.polygon]
        return TextRegion(box=corners, text=self.text, confidence=round(self.confidence, 4))


class TextDetector(Protocol):
    def detect(
        self,
        rgb: np.ndarray,
        read: bool = True,
        languages: Collection[str] = LANGUAGES,
        texture_view: bool = True,
    ) -> list[TextBox]:
        """Text boxes in an RGB image; ``read`` = also recognise their text (labels only:
        every detected box is returned either way). Boxes whose text is of a script outside
        ``languages`` are dropped (read for that whatever ``read`` says); see the module.
        ``texture_view=False`` skips a detector's extra look at textured areas, where it
        has one (the eraser's second look, around what it filled, does without it)."""
        ...


def detector_for(settings: OcrSettings) -> TextDetector:
    """The detector that ``ZIMAGE_OCR_*`` names."""
    return make_detector(
        settings.backend,
        settings.model_dir,
        settings.allow_download,
        runtime=settings.runtime,
        precision=settings.precision,
    )


def make_detector(
    backend: str = "rapidocr",
    model_dir: Path | None = None,
    allow_download: bool = False,
    runtime: str = "auto",
    precision: str = "auto",
) -> TextDetector:
    """The detector a worker's settings name (``ZIMAGE_OCR_*``); ``runtime`` and
    ``precision`` are RapidOCR's (see the module)."""
    if backend == "rapidocr":
        return RapidOcrDetector(runtime, precision)
    if backend == "easyocr":
        return EasyOcrDetector(model_dir=model_dir, allow_download=allow_download)
    raise ValueError(f"unknown OCR backend {backend!r}: use 'rapidocr' or 'easyocr'")


class RapidOcrDetector:
    """PP-OCRv4 detection (and recognition for labels) on OpenVINO where that is installed,
    else onnxruntime (``runtime``, ``precision``: see the module); thread-safe."""

    def __init__(self, runtime: str = "auto", precision: str = "auto") -> None:
        import onnxruntime
        import rapidocr_onnxruntime
        from rapidocr_onnxruntime import RapidOCR
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        if runtime not in RUNTIMES or precision not in PRECISIONS:
            raise ValueError(
                f"OCR runtime {runtime!r} / precision {precision!r}: use one of {RUNTIMES}"
                f" and one of {PRECISIONS}"
            )
        self._engine = RapidOCR()
        # The detector gets its own session: RapidOCR turns the memory arena off, which
        # costs a fifth of every call at the working sizes used here.
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        model = Path(rapidocr_onnxruntime.__file__).parent / "models" / DET_MODEL
        self._session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        compiled = None if runtime == "onnxruntime" else _openvino(model, precision, runtime)
        self._openvino = None if compiled is None else compiled.create_infer_request()
        #: what runs the detector and recogniser networks, for logs and the bench's cache key
        self.runtime = "onnxruntime"
        if compiled is not None:
            chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self.runtime = f"openvino ({chosen})"
            recogniser = _openvino(
                model.with_name(REC_MODEL), READ_PRECISION, runtime, "recogniser"
            )
            reading = "onnxruntime"
            if recogniser is not None:
                self._engine.text_rec.session = _OpenVinoReader(recogniser)
                chosen = recogniser.get_property("INFERENCE_PRECISION_HINT").get_type_name()
                reading = f"openvino ({chosen})"
            self.runtime += f"; reading on {reading}"
        log.info("ocr_detector_loaded", runtime=self.runtime)
        self._postprocess = DBPostProcess(
            thresh=PIXEL_THRESHOLD,
            box_thresh=BOX_THRESHOLD,
            unclip_ratio=UNCLIP_RATIO,
            max_candidates=1000,
            use_dilation=True,
        )
        self._lock = threading.Lock()

    def detect(
        self,
        rgb: np.ndarray,
        read: bool = True,
        languages: Collection[str] = LANGUAGES,
        texture_view: bool = True,
    ) -> list[TextBox]:
        filtering = _filters(languages)
        height, width = rgb.shape[:2]
        if min(height, width) < 4:
            return []
        scale = min(UPSCALE, max(1.0, DETECT_PX / max(height, width)))
        size = (round(width * scale), round(height * scale))
        reading = read or filtering
        textured = _textured_cells(rgb) if texture_view or reading else None
        # On a textured backdrop, the texture view alone (see the module).
        alone = (
            texture_view and textured is not None and float(textured.mean()) >= TEXTURED_IMAGE_SHARE
        )
        view = None if alone else _sharpened(rgb)
        with self._lock:
            if view is None:
                probability = np.zeros((size[1], size[0]), np.float32)
            else:
                enlarged = cv2.resize(view, size, interpolation=cv2.INTER_CUBIC)
                probability = self._probability(enlarged)
            if texture_view:
                assert textured is not None
                self._look_closer(rgb, textured, scale, probability, alone)
            polygons, scores = self._postprocess(probability[None, None], (height, width))
            boxes = [
                TextBox(np.asarray(polygon, np.float32), "", float(score))
                for polygon, score in zip(polygons, scores, strict=True)
            ]
            if reading and boxes:
                assert textured is not None
                boxes = [
                    box
                    for box, score in self._read(rgb, boxes)
                    if _reads_as_text(box, score, _on_texture(textured, box))
                    and _in_languages(box.text, languages)
                ]
            if read and boxes:  # line ends cut short, read past (see ``line_ends``)
                polygons = lengthened(self._engine, rgb, boxes)
                boxes = [
                    TextBox(polygon, box.text, box.confidence)
                    for box, polygon in zip(boxes, polygons, strict=True)
                ]
        return boxes

    def _probability(self, view: np.ndarray) -> np.ndarray:
        """The detector's text probability for every pixel of ``view`` (tiled if large)."""
        height, width = view.shape[:2]
        probability = np.zeros((height, width), np.float32)
        step = TILE_PX - TILE_OVERLAP_PX
        for top in range(0, max(1, height - TILE_OVERLAP_PX), step):
            for left in range(0, max(1, width - TILE_OVERLAP_PX), step):
                tile = view[top : top + TILE_PX, left : left + TILE_PX]
                h, w = tile.shape[:2]
                out = probability[top : top + h, left : left + w]
                np.maximum(out, self._infer(tile), out=out)
        return probability

    def _look_closer(
        self,
        rgb: np.ndarray,
        textured: np.ndarray,
        scale: float,
        probability: np.ndarray,
        everywhere: bool = False,
    ) -> None:
        """Adds the texture view's probability where the image is textured (``textured``,
        its cells; only there: a plain or gradient background gains nothing from it and
        costs nothing), or over the whole image (``everywhere``)."""
        height, width = rgb.shape[:2]
        area = (0, height, 0, width) if everywhere else _textured_area(textured, rgb.shape)
        if area is None:
            return
        y0, y1, x0, x1 = area
        view = _sharpened(rgb[y0:y1, x0:x1], TEXTURE_SIGMA, TEXTURE_GAIN, TEXTURE_EDGE_GAIN)
        top, left = round(y0 * scale), round(x0 * scale)
        height = min(round((y1 - y0) * scale), probability.shape[0] - top)
        width = min(round((x1 - x0) * scale), probability.shape[1] - left)
        enlarged = cv2.resize(view, (width, height), interpolation=cv2.INTER_CUBIC)
        out = probability[top : top + height, left : left + width]
        np.maximum(out, self._probability(enlarged), out=out)

    def _infer(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        # The network wants sides that are multiples of 32: pad (edge pixels), don't resize.
        pad_h = max(32, -(-height // 32) * 32) - height
        pad_w = max(32, -(-width // 32) * 32) - width
        small = (height + pad_h) * (width + pad_w) < LARGE_VIEW_PX
        if self._openvino is not None and small:  # a few shapes (see the module)
            pad_h, pad_w = -height % VIEW_STEP_PX, -width % VIEW_STEP_PX
        padded = rgb
        if pad_h or pad_w:
            padded = cv2.copyMakeBorder(rgb, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
        if self._openvino is not None:
            # OpenVINO's model takes the RGB pixels as they are (``_openvino``).
            prediction = self._openvino.infer({0: np.ascontiguousarray(padded)[None]})[0]
        else:
            # PP-OCR normalisation (mean 0.5, std 0.5) on BGR, NCHW float32: one pass.
            tensor = cv2.dnn.blobFromImage(
                padded, scalefactor=2.0 / 255.0, mean=(127.5, 127.5, 127.5), swapRB=True
            )
            prediction = self._session.run(None, {self._input: tensor})[0]
        return np.asarray(prediction[0, 0, :height, :width], np.float32)

    def _read(self, rgb: np.ndarray, boxes: list[TextBox]) -> list[tuple[TextBox, float]]:
        """The boxes labelled with recognised text (confidence stays the detector's), each
        with the recogniser's score."""
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        crops = self._engine.get_crop_img_list(bgr, [box.polygon for box in boxes])
        recognised, _ = self._engine.text_rec(crops)
        return [
            (TextBox(box.polygon, str(text), box.confidence), float(score))
            for box, (text, score) in zip(boxes, recognised, strict=True)
        ]


class _OpenVinoReader:
    """RapidOCR's recogniser session (``TextRecognizer.session``: a batch of crops in, the
    characters' probabilities per column out) run by OpenVINO at float32, in under half
    onnxruntime's time on this project's CPUs. OpenVINO prepares kernels for every input
    shape it has not run yet (0.06-0.1 s, more than a run), and a batch's width follows
    its widest crop: it is padded on the right (with what the recogniser pads narrower
    crops with) to a multiple of READ_WIDTH_STEP, and the columns of the padding are left
    out of what is returned. On 96 bench images the batches took 13 shapes (a width and a
    number of crops) in all. The padding is seen: the recogniser mixes the whole width, so
    a crop's scores move a little with it (as they do with the other crops of its batch),
    by up to 0.14 on the bench's boxes, one text in 93 read differently; with the same
    input shape, OpenVINO's probabilities are onnxruntime's within 1e-5."""

    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        width = batch.shape[3]
        padding = -width % READ_WIDTH_STEP
        if padding:
            batch = np.pad(batch, ((0, 0), (0, 0), (0, 0), (0, padding)))
        columns = self._request.infer({0: np.ascontiguousarray(batch, np.float32)})[0]
        return [columns[:, : _read_columns(width)]]


def _read_columns(width: int) -> int:
    """How many columns the recogniser reads from a batch ``width`` px wide (two stride-2
    stages, each rounding up, then a pooling by 2 that rounds down)."""
    return (width + 3) // 4 // 2


def _openvino(model: Path, precision: str, runtime: str, network: str = "detector") -> Any:
    """The ``network`` (``detector`` or ``recogniser``) compiled by OpenVINO for the CPU.
    Where OpenVINO cannot be loaded or cannot compile it: None under ``auto`` (onnxruntime
    then runs it, and a warning says why), ``ModelUnavailableError`` under ``openvino``."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    try:
        import openvino
        from openvino.preprocess import ColorFormat, PrePostProcessor

        core = openvino.Core()
        if network != "detector":
            return core.compile_model(str(model), "CPU", config)
        # The network's input normalisation (BGR, mean 0.5, std 0.5, NCHW float32) done by
        # OpenVINO: it takes the RGB view as it is, 60 ms less per 1792x1344 view than numpy.
        steps = PrePostProcessor(core.read_model(str(model)))
        source = steps.input().tensor().set_element_type(openvino.Type.u8)
        source.set_layout(openvino.Layout("NHWC")).set_color_format(ColorFormat.RGB)
        steps.input().model().set_layout(openvino.Layout("NCHW"))
        convert = steps.input().preprocess().convert_color(ColorFormat.BGR)
        convert.convert_element_type(openvino.Type.f32).scale(255.0 / 2).mean(1.0)
        return core.compile_model(steps.build(), "CPU", config)
    except Exception as exc:  # not installed, a broken install, a CPU it cannot use
        if runtime == "auto":
            log.warning(
                "ocr_openvino_unavailable", network=network, reason=repr(exc), using="onnxruntime"
            )
            return None
        raise ModelUnavailableError(
            f"ZIMAGE_OCR_RUNTIME=openvino, but OpenVINO cannot run the text {network} ({exc});"
            " pip install openvino, or use auto or onnxruntime"
        ) from exc


def _reads_as_text(box: TextBox, score: float, textured: bool = False) -> bool:
    """Enlarged and sharpened, a plain shape (a product's silhouette, its handle) can look
    like one large glyph, now and then read as one ("D", "C", "d", "福"). A large box is
    text when it is a line's (a silhouette's is squarer), or when it reads clearly as more
    than one character; below SHAPE_MIN_PX also when it reads clearly as one CJK
    ideograph (a handle reads as a Latin letter or, unclearly, as anything), or when it
    lies on grain (``textured``, see ``_on_texture``: large faint text on grain is found
    by the detector where the recogniser reads little). A line's box stays, read or not,
    for the same reason; boxes under GLYPH_MIN_PX stay (single small glyphs are common)."""
    if box.height < GLYPH_MIN_PX or box.is_line:
        return True
    characters = "".join(box.text.split())
    clear = score >= SHAPE_MIN_SCORE
    if len(characters) >= SHAPE_MIN_CHARS and clear:
        return True
    if box.height >= SHAPE_MIN_PX:
        return False
    return textured or (len(characters) == 1 and _script(characters) == "ch" and clear)


def _filters(languages: Collection[str]) -> bool:
    """Whether looking for ``languages`` drops any text (and so needs every box read)."""
    unknown = set(languages) - set(LANGUAGES)
    if unknown or not languages:
        raise ValueError(f"languages must name some of {LANGUAGES}, not {sorted(languages)}")
    return not set(LANGUAGES) <= set(languages)


def _in_languages(text: str, languages: Collection[str]) -> bool:
    """Whether a box reading ``text`` is text in ``languages``: it has letters of one of
    them, or letters of neither kind (digits, symbols, nothing read), which all share."""
    scripts = {_script(char) for char in text} - {None}
    return not scripts or not scripts.isdisjoint(languages)


def _script(char: str) -> str | None:
    name = unicodedata.name(char, "")
    if name.startswith("CJK") and "IDEOGRAPH" in name:
        return "ch"
    if char.isalpha() and "LATIN" in name:
        return "en"
    return None


def _sharpened(
    rgb: np.ndarray,
    sigma: float = SHARPEN_SIGMA,
    base_gain: float = SHARPEN_GAIN,
    edge_gain: float = EDGE_GAIN,
) -> np.ndarray:
    """Unsharp mask whose gain rises where fine edges are dense; colours kept."""
    pixels = rgb.astype(np.float32)
    # In place, no temporaries the size of the image: pixels + gain * (pixels - blurred),
    # in float32 (gain is float64: a level's difference at a pixel now and then), 40 -> 33
    # ms on a 1024x768 image.
    sharpened = cv2.GaussianBlur(pixels, (0, 0), sigma)
    np.subtract(pixels, sharpened, out=sharpened)
    gain = base_gain + edge_gain * _edge_density(rgb)
    np.multiply(sharpened, gain[..., None], out=sharpened)
    np.add(pixels, sharpened, out=sharpened)
    return np.clip(sharpened, 0, 255, out=sharpened).astype(np.uint8)


def _textured_cells(rgb: np.ndarray) -> np.ndarray:
    """Which cells (TEXTURE_CELL_PX square, row by column; bool) of ``rgb`` are textured."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # At a quarter of the size: the spread is smooth over TEXTURE_SPREAD px anyway.
    small = cv2.resize(gray, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    detail = small - cv2.GaussianBlur(small, (0, 0), TEXTURE_DETAIL / 4)
    spread = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), TEXTURE_SPREAD / 4))
    cell = TEXTURE_CELL_PX // 4
    rows, cols = -(-spread.shape[0] // cell), -(-spread.shape[1] // cell)
    textured = np.zeros((rows, cols), bool)
    for row in range(rows):
        for col in range(cols):
            part = spread[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            textured[row, col] = np.percentile(part, TEXTURE_QUANTILE) >= TEXTURE_LEVELS
    return textured


def _textured_area(
    textured: np.ndarray, shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """The rectangle (y0, y1, x0, x1) around the ``textured`` cells of an image of
    ``shape``, or None."""
    if not textured.any():
        return None
    ys, xs = np.nonzero(textured)
    height, width = shape[:2]
    return (
        int(ys.min()) * TEXTURE_CELL_PX,
        min(height, (int(ys.max()) + 1) * TEXTURE_CELL_PX),
        int(xs.min()) * TEXTURE_CELL_PX,
        min(width, (int(xs.max()) + 1) * TEXTURE_CELL_PX),
    )


def _on_texture(textured: np.ndarray, box: TextBox) -> bool:
    """Whether ``box``'s centre lies on grain: in a ``textured`` cell with at least
    TEXTURED_AROUND textured cells around it (a product's handle, or large text, crowds one
    cell with edges that look like grain, seldom more)."""
    x, y = box.polygon.mean(0) // TEXTURE_CELL_PX
    row = max(0, min(int(y), textured.shape[0] - 1))
    col = max(0, min(int(x), textured.shape[1] - 1))
    if not textured[row, col]:
        return False
    around = textured[max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]
    return int(around.sum()) - 1 >= TEXTURED_AROUND


def _edge_density(rgb: np.ndarray) -> np.ndarray:
    """0..1 per pixel: how much finer-than-texture edge energy surrounds it, from 0 at
    the image's 90th percentile to 1 at its 99th."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    fine = np.abs(gray - cv2.GaussianBlur(gray, (0, 0), EDGE_SIGMA))
    energy = cv2.GaussianBlur(fine, (0, 0), EDGE_SPREAD)
    # Percentiles of a subsample: the same figures, a fraction of the cost on large photos.
    step = max(1, round(max(energy.shape) / 1024))
    low, high = np.percentile(energy[::step, ::step], (90, 99))
    return np.clip((energy - low) / max(float(high - low), 1e-3), 0.0, 1.0)


class EasyOcrDetector:
    """EasyOCR (CRAFT detection, recognition for labels); optional, thread-safe."""

    #: the EasyOCR recognisers loaded (one reader serves both request languages)
    RECOGNISERS = ("ch_sim", "en")

    def __init__(self, model_dir: Path | None = None, allow_download: bool = False) -> None:
        try:
            import easyocr
        except ImportError as exc:
            raise ModelUnavailableError(
                "the easyocr OCR backend is not installed: pip install 'zimage-stream[easyocr]'"
                " (or use ZIMAGE_OCR_BACKEND=rapidocr)"
            ) from exc
        import torch

        try:
            self._reader: Any = easyocr.Reader(
                list(self.RECOGNISERS),
                gpu=torch.cuda.is_available(),
                model_storage_directory=str(model_dir) if model_dir else None,
                download_enabled=allow_download,
                verbose=False,
            )
        except FileNotFoundError as exc:
            where = model_dir or "~/.EasyOCR/model"
            raise ModelUnavailableError(
                f"EasyOCR's model files are not in {where} and downloads are off "
                f"(ZIMAGE_OCR_ALLOW_DOWNLOAD=true allows them): {exc}"
            ) from exc
        self._lock = threading.Lock()
        log.info("easyocr_loaded", model_dir=str(model_dir) if model_dir else None)

    def detect(
        self,
        rgb: np.ndarray,
        read: bool = True,
        languages: Collection[str] = LANGUAGES,
        texture_view: bool = True,  # CRAFT has one view: nothing to skip
    ) -> list[TextBox]:
        # Low thresholds: every faint stroke counts, since a missed one stays in the image.
        options = {"text_threshold": 0.5, "low_text": 0.3, "link_threshold": 0.3}
        filtering = _filters(languages)
        with self._lock:
            if read or filtering:
                found = self._reader.readtext(rgb, **options)
                return [
                    _easy_box(box, str(text), float(score))
                    for box, text, score in found
                    if _in_languages(str(text), languages)
                ]
            horizontal, free = self._reader.detect(rgb, **options)
        boxes = [
            _easy_box([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], "", 1.0)
            for x0, x1, y0, y1 in horizontal[0]
        ]
        return boxes + [_easy_box(points, "", 1.0) for points in free[0]]


def _easy_box(points: Any, text: str, score: float) -> TextBox:
    return TextBox(np.asarray(points, np.float32).reshape(4, 2), text, score)
