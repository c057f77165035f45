"""A local page: draw boxes on a picture, see what the detector finds.

    python demo.py --ckpt runs/grqo/last.pt                 # then open the address it prints
    python demo.py --ckpt runs/grqo/last.pt --port 8080 --image photos/

Upload a picture or pick one (the embedded `val` pictures when --image gives none), drag boxes
on it, each with a name, optionally add exemplar pictures with their own boxes and names
typed as text, and press Detect. The page shows the detections drawn on the picture
(predict.py's drawing), a score slider that filters them without running the model again,
their list, and a button that downloads detections.json (predict.py's format).

The server is Python's own http.server on 127.0.0.1: one page (demo.html), nothing fetched
from anywhere else, nothing to install beyond requirements.txt. One model in memory and one
detection at a time (a lock): a second request waits, and the page shows that it is busy.
Bad input (not a picture, too many pixels, a box of no size or outside the picture, a name
missing or given twice, an exemplar picture without a box, no prompt, boxes for a Grounding
DINO folder) is answered with a message on the page; the server keeps running.
"""

import argparse
import base64
import binascii
import io
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from checkpoints import UNTRAINED_VISUAL_PROMPTS, resolve_device
from data import DataError, read_rgb_image, resolve_data_root
from evaluate import coco_results, draw_detections
from predict import (Exemplar, Prediction, Prompts, list_pictures, load_model, predict,
                     prompts_from_text)

PAGE = Path(__file__).resolve().with_name("demo.html")
OFFERED_PICTURES = 12          # of the embedded val split, when --image gives none
MAX_REQUEST_BYTES = 64 << 20


class BadRequest(ValueError):
    """What the page shows: one line, the server goes on."""


def decode_picture(data_url: str, what: str) -> Image.Image:
    """A picture sent by the page (a data: URL) as upright 8-bit RGB (read_rgb_image: EXIF
    rotation applied, greyscale, palette and CMYK converted, the pixel limit). BadRequest
    naming `what` for anything that is not such a picture."""
    try:
        payload = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (IndexError, binascii.Error) as error:
        raise BadRequest(f"{what} did not arrive as a picture") from error
    with tempfile.NamedTemporaryFile(suffix=".upload") as file:
        file.write(payload)
        file.flush()
        try:
            return read_rgb_image(Path(file.name), upright=True)
        except DataError as error:
            raise BadRequest(str(error).replace(f"image file {file.name}", what)
                             .replace(file.name, what)) from error


def named_boxes(entries: list, picture: Image.Image, where: str) -> list[Exemplar]:
    """The page's boxes [{"box": [x0, y0, x1, y1], "name": ...}] as exemplars on `picture`
    (image None: the picture searched). BadRequest for a missing name or a bad box."""
    exemplars = []
    for number, entry in enumerate(entries, 1):
        name = str(entry.get("name", "")).strip()
        if not name:
            raise BadRequest(f"box {number} on {where} has no name")
        try:
            x0, y0, x1, y1 = (float(value) for value in entry["box"])
        except (KeyError, TypeError, ValueError) as error:
            raise BadRequest(f"box {number} on {where} is not four numbers") from error
        if x1 < x0 or y1 < y0:
            raise BadRequest(f"box {number} on {where} runs backwards ({x0:g},{y0:g} to "
                             f"{x1:g},{y1:g}): give its top-left corner first")
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise BadRequest(f"box {number} on {where} has no size")
        if x0 < 0 or y0 < 0 or x1 > picture.width or y1 > picture.height:
            raise BadRequest(f"box {number} on {where} leaves the picture "
                             f"({picture.width}x{picture.height})")
        exemplars.append(Exemplar((x0, y0, x1, y1), name))
    return exemplars


class Demo:
    """The model, the offered pictures, and the last answers (for redrawing at a threshold)."""

    def __init__(self, checkpoint: str, pictures: list[Path], device: str = "auto"):
        self.checkpoint, self.pictures = checkpoint, pictures
        self.visual = not Path(checkpoint).is_dir()      # a Grounding DINO folder: text only
        self.model = load_model(checkpoint, resolve_device(device))
        self.lock = threading.Lock()
        self.answers: dict[int, tuple[Image.Image, Prediction]] = {}

    def picture(self, spec: dict, what: str) -> Image.Image:
        """{"offered": i} or {"data": a data: URL} -> the picture."""
        if "offered" in spec:
            try:
                return read_rgb_image(self.pictures[int(spec["offered"])])
            except (IndexError, ValueError) as error:
                raise BadRequest(f"no offered picture {spec['offered']!r}") from error
        return decode_picture(spec.get("data", ""), what)

    def prompts(self, request: dict, picture: Image.Image) -> Prompts:
        """The request's boxes, exemplar pictures and text names as predict's Prompts."""
        exemplars = named_boxes(request.get("boxes", []), picture, "the picture")
        for number, other in enumerate(request.get("exemplars", []), 1):
            where = f"exemplar picture {number}"
            image = self.picture(other.get("image", {}), where)
            if not other.get("boxes"):
                raise BadRequest(f"{where} has no box: draw one on it, or remove it")
            exemplars += [Exemplar(e.box, e.name, image)
                          for e in named_boxes(other["boxes"], image, where)]
        text = [str(name).strip() for name in request.get("text", [])]
        if "" in text:
            raise BadRequest("a text name is empty")
        repeated = sorted({name for name in text if text.count(name) > 1}
                          | {name for name in text if name in {e.name for e in exemplars}})
        if repeated:
            raise BadRequest(f"the name {repeated[0]!r} is given twice: boxes that share a "
                             f"name are one prompt, a text name must be new")
        if exemplars and not self.visual:
            raise BadRequest(UNTRAINED_VISUAL_PROMPTS.format(path=self.checkpoint))
        if not exemplars and not text:
            raise BadRequest("no prompt: draw a box, add an exemplar picture or type a name")
        return Prompts(exemplars) + prompts_from_text(text) if text else Prompts(exemplars)

    def detect(self, request: dict) -> dict:
        """Detections (threshold 0, the page filters) with an id to redraw them by."""
        picture = self.picture(request.get("image", {}), "the picture")
        prompts = self.prompts(request, picture)
        with self.lock:                            # one detection at a time; others wait
            started = time.perf_counter()
            try:
                found = predict(self.model, picture, prompts, threshold=0.0,
                                top_k=int(request.get("top_k", 100)))
            except (ValueError, DataError) as error:
                raise BadRequest(str(error)) from error
            seconds = time.perf_counter() - started
            answer = len(self.answers)
            self.answers[answer] = (picture, found)
        return {"id": answer, "seconds": seconds, "names": found.names,
                "width": picture.width, "height": picture.height,
                "detections": coco_results(found.detections, {"file_name": "picture"}, "name",
                                           found.names)}

    def draw(self, answer: int, threshold: float) -> bytes:
        """The picture of an answer with its detections at or above `threshold`, as PNG."""
        try:
            picture, found = self.answers[answer]
        except KeyError as error:
            raise BadRequest(f"no detections numbered {answer}") from error
        keep = found.scores >= threshold
        kept = Prediction(found.boxes[keep], found.scores[keep], found.labels[keep], found.names)
        buffer = io.BytesIO()
        draw_detections(picture, kept.detections, kept.names).save(buffer, format="PNG")
        return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), /pictures (the offered ones), /picture/I (one, PNG);
    POST /detect and /draw (JSON in, JSON or PNG out; a 400 with {"error"} for bad input)."""

    demo: Demo

    def do_GET(self):
        if self.path == "/":
            self.reply(200, "text/html; charset=utf-8", PAGE.read_bytes())
        elif self.path == "/pictures":
            names = [path.name for path in self.demo.pictures]
            self.reply_json(200, {"pictures": names, "visual": self.demo.visual})
        elif self.path.startswith("/picture/"):
            try:
                path = self.demo.pictures[int(self.path.rsplit("/", 1)[1])]
                buffer = io.BytesIO()
                read_rgb_image(path).save(buffer, format="PNG")
            except (IndexError, ValueError, DataError):
                self.reply_json(404, {"error": f"no picture {self.path}"})
                return
            self.reply(200, "image/png", buffer.getvalue())
        else:
            self.reply_json(404, {"error": f"nothing at {self.path}"})

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", 0))
            if length > MAX_REQUEST_BYTES:
                raise BadRequest(f"the request is {length:,} bytes, more than "
                                 f"{MAX_REQUEST_BYTES:,}")
            request = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/detect":
                self.reply_json(200, self.demo.detect(request))
            elif self.path == "/draw":
                png = self.demo.draw(int(request.get("id", -1)),
                                     float(request.get("threshold", 0.0)))
                self.reply(200, "image/png", png)
            else:
                self.reply_json(404, {"error": f"nothing at {self.path}"})
        except (BadRequest, json.JSONDecodeError, TypeError, ValueError) as error:
            self.reply_json(400, {"error": str(error)})

    def reply_json(self, status: int, value: dict) -> None:
        self.reply(status, "application/json", json.dumps(value).encode())

    def reply(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):      # quiet: the page shows what happens
        pass


def serve(demo: Demo, port: int = 8000) -> ThreadingHTTPServer:
    """A server for `demo` on 127.0.0.1:port (0: a free port), not yet serving."""
    handler = type("DemoHandler", (Handler,), {"demo": demo})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def offered_pictures(paths: list[str]) -> list[Path]:
    """--image's pictures, or the first val pictures of the embedded data."""
    if paths:
        return list_pictures(paths)
    root = resolve_data_root("shapes")
    return sorted((root / "val").glob("*.png"))[:OFFERED_PICTURES]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by training, or a "
                        "Grounding DINO folder (text prompts only)")
    parser.add_argument("--port", type=int, default=8000, help="on 127.0.0.1 (0: any free)")
    parser.add_argument("--image", action="append", default=[],
                        help="pictures or folders to offer (default: the embedded val split)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        raise SystemExit(f"{args.ckpt} not found: give a checkpoint (runs/NAME/last.pt) or a "
                         f"Grounding DINO folder")
    demo = Demo(args.ckpt, offered_pictures(args.image), args.device)
    try:
        server = serve(demo, args.port)
    except OSError as error:
        raise SystemExit(f"cannot listen on 127.0.0.1:{args.port}: {error.strerror}") from error
    print(f"the demo of {args.ckpt}: http://127.0.0.1:{server.server_address[1]}/ "
          f"(Ctrl+C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
