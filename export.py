"""Export a detector to ONNX and run it with onnxruntime: every prompt mode, any picture size.

    python export.py --ckpt runs/grqo/last.pt --out exported/
    python predict.py --onnx exported/ --image photo.jpg --box 40,60,90,120
    python predict.py --onnx exported/ --image photos/ --text "red circle" --batch-size 4

The detector is cut into three graphs so that every prompt mode works from them, and
exemplars on other pictures or saved prototypes are encoded once for every picture:

    detector.onnx        images (B, 3, H, W), mask (B, H, W), the prompt tokens (B, T, d) with
                         their padding, phrase attention (B, T, T) and position ids, each
                         class's tokens (B, K, W) and their padding -> logits (B, Q, K) and
                         boxes (B, Q, 4) cxcywh of the last decoder layer
    text_encoder.onnx    input_ids, phrase attention, position ids (B, T) -> tokens (B, T, d)
    visual_prompts.onnx  images, mask, image_index (E,), boxes (E, 4) -> embeddings (E, d)

Tokenising, the phrase masks and the prompts' layout stay in Python, in the same functions the
eager path calls (BertTextEncoder.caption, one_token_per_class, predict.prompt_set); the
vocabulary travels in DIR beside manifest.json (inputs, outputs, dynamic sizes, opset, the
preprocessing, the token layout and the checkpoint's hash). Batch, height, width (multiples of
32, PAD_MULTIPLE), tokens, classes and exemplars are dynamic: one graph serves every
picture; the number of queries Q is constant, so a picture too small to give Q encoder tokens
is refused (after the run: the graph selects min(Q, tokens)). The `tiny` backbone only, for
now: a Swin backbone (swin_t, Grounding DINO folders, whose export would serve text only) is
refused, see PAD_MULTIPLE. Deformable attention goes into the graphs as its PyTorch
reference (grid_sample); the Triton kernel stays the eager CUDA path. Needs onnx,
onnxscript and onnxruntime (requirements-export.txt).
"""

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bert import WordPieceTokenizer
from checkpoints import load_detector
from data import IMAGENET_MEAN, IMAGENET_STD
from model import (DINOR1, BertTextEncoder, Phrases, PromptTokens, caption_phrases,
                   sine_encoding)

OPSET = 18
# The graphs take heights and widths in multiples of 32, the backbone's total stride, whatever
# the checkpoint pads to (a Grounding DINO folder pads to 1). Even so, a Swin backbone does not
# export yet: torchvision's shifted_window_attention pads each stage to its windows with
# symbolic sizes, and torch.export's shape reasoning through them had not finished after 7
# minutes for a 6-block Swin alone (15 for a small Grounding DINO), where the tiny backbone
# takes about 35 s (docs/EXPERIMENTS.md, "ONNX export").
PAD_MULTIPLE = 32
FORMAT = "dino-r1-onnx/1"
MAX_BATCH, MAX_SIDE, MAX_TOKENS, MAX_EXEMPLARS = 64, 4096, 256, 1024
DETECTOR_INPUTS = ("images", "mask", "tokens", "token_padding", "attention", "position_ids",
                   "class_tokens", "class_token_padding")


def require_onnx() -> None:
    """SystemExit in one line when the export's packages are missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as error:
            raise SystemExit(f"{name} is not installed: pip install -r "
                             f"requirements-export.txt ({error})") from error


# ----------------------------------------------------------------------------- the graphs

class DetectorGraph(nn.Module):
    """DINOR1 from ready-made prompt tokens to the last layer's logits and boxes: the
    PromptTokens that `forward` takes, as tensors. Every class names its tokens (a visual
    prompt: its one token), so one graph serves visual prompts and captions alike."""

    def __init__(self, model: DINOR1):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor, tokens: Tensor, token_padding: Tensor,
                attention: Tensor, position_ids: Tensor, class_tokens: Tensor,
                class_token_padding: Tensor) -> tuple[Tensor, Tensor]:
        phrases = Phrases(token_padding, attention, position_ids,
                          sine_encoding(position_ids[..., None].float(), tokens.shape[-1]))
        # classes (None) is read by training's denoising queries only.
        prompts = PromptTokens(tokens, phrases, None, class_token_padding.all(-1), class_tokens,
                               class_token_padding)
        output = self.model(images, mask, prompts)
        return output.logits[-1], output.boxes[-1]


class TextGraph(nn.Module):
    """BERT and the projection to d of BertTextEncoder.encode_ids, given the phrases."""

    def __init__(self, encoder: BertTextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention: Tensor, position_ids: Tensor) -> Tensor:
        return self.encoder.out(self.encoder.bert(input_ids, attention.long(), position_ids))


class VisualPromptGraph(nn.Module):
    """DINOR1.encode_exemplars with the exemplars laid out in E slots per image (an upper
    bound the graph knows, instead of a count read from image_index)."""

    def __init__(self, model: DINOR1):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor, image_index: Tensor,
                boxes: Tensor) -> Tensor:
        features = self.model.backbone(images, mask)
        return self.model.prompt_encoder(features, image_index, boxes, boxes.shape[0])


def example_inputs(model: DINOR1, side: int) -> dict[str, dict[str, Tensor]]:
    """Inputs to trace each graph with: batch 2, a square picture of `side`, 5 tokens in 3
    classes of up to 2 tokens, 3 exemplars (no size 0 or 1, which the exporter would fix)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, side, side, generator=generator)
    mask = torch.zeros(2, side, side, dtype=torch.bool)
    tokens, dim = 5, model.config.hidden_dim
    class_tokens = torch.tensor([[0, 1], [2, 2], [3, 3]]).expand(2, -1, -1).contiguous()
    detector = dict(images=images, mask=mask,
                    tokens=torch.randn(2, tokens, dim, generator=generator),
                    token_padding=torch.zeros(2, tokens, dtype=torch.bool),
                    attention=torch.ones(2, tokens, tokens, dtype=torch.bool),
                    position_ids=torch.zeros(2, tokens, dtype=torch.long),
                    class_tokens=class_tokens,
                    class_token_padding=(class_tokens == class_tokens[..., :1]) & torch.tensor(
                        [False, True]))
    text = dict(input_ids=torch.tensor([[1, 5, 6, 7, 2]] * 2),
                attention=torch.ones(2, tokens, tokens, dtype=torch.bool),
                position_ids=torch.zeros(2, tokens, dtype=torch.long))
    visual = dict(images=images, mask=mask, image_index=torch.tensor([0, 0, 1]),
                  boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2],
                                      [0.5, 0.5, 0.4, 0.4]]))
    return {"detector": detector, "text_encoder": text, "visual_prompts": visual}


def dynamic_shapes(model: DINOR1) -> dict[str, dict[str, dict]]:
    """Each graph's dynamic axes (torch.export.Dim), by input name. Heights and widths are
    multiples of the preset's padding (collate pads to them)."""
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=MAX_BATCH)
    multiple = model.config.pad_multiple
    height = Dim("height", min=1, max=MAX_SIDE // multiple)
    width = Dim("width", min=1, max=MAX_SIDE // multiple)
    if multiple > 1:
        height, width = multiple * height, multiple * width
    tokens = Dim("tokens", min=1, max=MAX_TOKENS)
    classes = Dim("classes", min=1, max=MAX_TOKENS)
    class_width = Dim("class_width", min=1, max=MAX_TOKENS)
    exemplars = Dim("exemplars", min=1, max=MAX_EXEMPLARS)
    picture = {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}
    per_token = {0: batch, 1: tokens}
    return {
        "detector": {**picture, "tokens": per_token, "token_padding": per_token,
                     "attention": {0: batch, 1: tokens, 2: tokens}, "position_ids": per_token,
                     "class_tokens": {0: batch, 1: classes, 2: class_width},
                     "class_token_padding": {0: batch, 1: classes, 2: class_width}},
        "text_encoder": {"input_ids": per_token, "attention": {0: batch, 1: tokens, 2: tokens},
                         "position_ids": per_token},
        "visual_prompts": {**picture, "image_index": {0: exemplars}, "boxes": {0: exemplars}},
    }


OUTPUTS = {"detector": ["logits", "boxes"], "text_encoder": ["tokens"],
           "visual_prompts": ["embeddings"]}


def export_graph(module: nn.Module, inputs: dict[str, Tensor], shapes: dict, path: Path,
                 outputs: list[str]) -> None:
    """torch.export with these dynamic shapes, then ONNX at OPSET; onnx.checker on the file."""
    import onnx
    program = torch.export.export(module, tuple(inputs.values()),
                                  dynamic_shapes=tuple(shapes[name] for name in inputs))
    onnx_program = torch.onnx.export(program, tuple(inputs.values()), dynamo=True,
                                     opset_version=OPSET, input_names=list(inputs),
                                     output_names=outputs, optimize=False, verbose=False)
    onnx_program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


def file_hash(path: Path) -> str:
    """sha256 of a checkpoint file, or of a folder's weight files."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".json"))
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_settings(tokenizer: WordPieceTokenizer) -> dict:
    """WordPieceTokenizer's keywords that rebuild `tokenizer` from vocab.txt."""
    return dict(byte_fallback=tokenizer.byte_fallback, lowercase=tokenizer.lowercase,
                strip_accents=tokenizer.strip_accents,
                chinese_characters=tokenizer.chinese_characters,
                max_word_chars=tokenizer.max_word_chars)


def export(checkpoint: str | Path, out: str | Path, trace_side: int | None = None) -> dict:
    """Write DIR: the graphs (visual_prompts.onnx only where the visual prompt encoder was
    trained), vocab.txt and manifest.json. Returns the manifest."""
    require_onnx()
    checkpoint, out = Path(checkpoint), Path(out)
    model = load_detector(checkpoint)[0].eval().float()
    if model.config.backbone != "tiny":
        raise SystemExit(f"{checkpoint} has a {model.config.backbone} backbone: export.py "
                         f"exports the tiny backbone only for now (a Swin's export with free "
                         f"sizes does not finish, see export.PAD_MULTIPLE)")
    model.config = replace(model.config, pad_multiple=max(PAD_MULTIPLE, model.config.pad_multiple))
    for module in model.modules():          # the graphs use the PyTorch reference
        if hasattr(module, "kernel"):
            module.kernel = "torch"
    visual = not checkpoint.is_dir()        # a Grounding DINO folder: text only
    multiple = model.config.pad_multiple
    side = trace_side or -(-model.config.image_size // multiple) * multiple
    inputs, shapes = example_inputs(model, side), dynamic_shapes(model)
    modules = {"detector": DetectorGraph(model), "text_encoder": TextGraph(model.text_encoder)}
    if visual:
        modules["visual_prompts"] = VisualPromptGraph(model)
    out.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name, module in modules.items():
        started = time.perf_counter()
        with torch.no_grad():
            export_graph(module, inputs[name], shapes[name], out / f"{name}.onnx", OUTPUTS[name])
        print(f"{name}.onnx: {time.perf_counter() - started:.0f} s")
        graphs[name] = {"file": f"{name}.onnx", "inputs": describe(inputs[name], shapes[name]),
                        "outputs": OUTPUTS[name]}
    tokenizer = model.text_encoder.tokenizer
    tokens_by_id = sorted(tokenizer.ids, key=tokenizer.ids.get)
    (out / "vocab.txt").write_text("\n".join(tokens_by_id) + "\n", encoding="utf-8")
    config = model.config
    manifest = {
        "format": FORMAT, "opset": OPSET, "graphs": graphs, "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_hash(checkpoint), "visual_prompts": visual,
        "hidden_dim": config.hidden_dim, "num_queries": config.num_queries,
        "max_text_tokens": MAX_TOKENS, "tokenizer": tokenizer_settings(tokenizer),
        "preprocessing": {"short_side": config.image_size, "max_side": config.max_size,
                          "pad_multiple": config.pad_multiple, "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD, "padding": "bottom and right, mask True"},
        "token_layout": "class k reads the tokens class_tokens[b, k, :] not marked in "
                        "class_token_padding; a visual prompt is one token (its own index)",
        "config": {field: getattr(config, field) for field in config.__dataclass_fields__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def describe(inputs: dict[str, Tensor], shapes: dict) -> dict:
    """Each input's dtype and shape, a dynamic axis named by its Dim."""
    described = {}
    for name, tensor in inputs.items():
        axes = shapes.get(name, {})
        described[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                           "shape": [axes[axis].__name__ if axis in axes else size
                                     for axis, size in enumerate(tensor.shape)]}
    return described


# ----------------------------------------------------------------------------- onnxruntime

class GraphOutput(NamedTuple):
    """What predict and evaluate read of DetectorOutput: the last layer only."""
    logits: Tensor   # (1, B, Q, K)
    boxes: Tensor    # (1, B, Q, 4)


class OnnxTextEncoder(BertTextEncoder):
    """BertTextEncoder's captions (tokenising, phrases, each class's tokens: the eager
    code) with BERT run by onnxruntime."""

    def __init__(self, tokenizer: WordPieceTokenizer, session, dim: int):
        nn.Module.__init__(self)
        self.tokenizer, self.session, self.dim = tokenizer, session, dim
        self.register_buffer("delimiters", self.delimiter_ids(tokenizer), persistent=False)

    def encode_ids(self, input_ids: Tensor, padding: Tensor | None = None
                   ) -> tuple[Tensor, Phrases]:
        """BertTextEncoder.encode_ids, BERT and the projection run by text_encoder.onnx."""
        if padding is None:
            padding = torch.zeros_like(input_ids, dtype=torch.bool)
        phrases = caption_phrases(input_ids, padding, self.delimiters, self.dim)
        tokens, = self.session.run(None, {"input_ids": input_ids.numpy(),
                                          "attention": phrases.attention.numpy(),
                                          "position_ids": phrases.position_ids.numpy()})
        return torch.from_numpy(tokens), phrases


class OnnxDetector:
    """An exported DIR run by onnxruntime, in the places predict.py and evaluate.detect call
    a DINOR1: `config`, `eval()`, calling it with PromptTokens, `encode_exemplars`,
    `text_encoder`. CPU tensors in and out."""

    device = torch.device("cpu")

    def __init__(self, folder: str | Path, providers: list[str] | None = None,
                 threads: int | None = None):
        """providers: onnxruntime's (default: CUDA when installed, then CPU); threads: its
        CPU threads (default: onnxruntime's choice, one per core)."""
        require_onnx()
        import onnxruntime
        from model import DetectorConfig
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise SystemExit(f"{manifest_path} is missing: export with python export.py "
                             f"--ckpt CKPT --out {folder}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SystemExit(f"{manifest_path} is not an export of this project "
                             f"(format {self.manifest.get('format')!r}, expected {FORMAT!r})")
        self.config = DetectorConfig(**self.manifest["config"])
        self.visual_prompts = self.manifest["visual_prompts"]
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                  if p in onnxruntime.get_available_providers()]
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for name, graph in self.manifest["graphs"].items():
            path = self.folder / graph["file"]
            if not path.is_file():
                raise SystemExit(f"{path} is missing, named in {manifest_path}")
            session = onnxruntime.InferenceSession(str(path), options, providers=providers)
            names = [node.name for node in session.get_inputs()]
            if names != list(graph["inputs"]):
                raise SystemExit(f"{path} takes {names}, but {manifest_path} says "
                                 f"{list(graph['inputs'])}: export again")
            self.sessions[name] = session
        tokenizer = WordPieceTokenizer.from_file(self.folder / "vocab.txt",
                                                 **self.manifest["tokenizer"])
        self.text_encoder = OnnxTextEncoder(tokenizer, self.sessions["text_encoder"],
                                            self.config.hidden_dim)

    def eval(self) -> "OnnxDetector":
        return self

    def check_picture(self, images: Tensor) -> None:
        """ValueError in one line for a padded size the graphs cannot take."""
        height, width = images.shape[-2:]
        multiple = self.config.pad_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"a padded picture of {height}x{width} is not a multiple of "
                             f"{multiple}, which the graphs take (data.collate pads to it)")
        if max(height, width) > MAX_SIDE or images.shape[0] > MAX_BATCH:
            raise ValueError(f"{images.shape[0]} pictures of {height}x{width}: the graphs take "
                             f"at most {MAX_BATCH} of at most {MAX_SIDE} pixels a side")

    def __call__(self, images: Tensor, mask: Tensor, prompts: PromptTokens) -> GraphOutput:
        self.check_picture(images)
        batch, length = prompts.phrases.padding.shape
        if length > MAX_TOKENS:
            raise ValueError(f"{length} prompt tokens, more than the {MAX_TOKENS} the graphs "
                             f"take")
        class_tokens, class_padding = prompts.class_tokens, prompts.class_token_padding
        if class_tokens is None:                     # one token per class (visual prompts)
            class_tokens = torch.arange(length).expand(batch, -1)[..., None]
            class_padding = prompts.class_mask[..., None]
        feed = dict(images=images, mask=mask, tokens=prompts.tokens,
                    token_padding=prompts.phrases.padding, attention=prompts.phrases.attention,
                    position_ids=prompts.phrases.position_ids, class_tokens=class_tokens,
                    class_token_padding=class_padding)
        logits, boxes = self.sessions["detector"].run(None, {
            name: value.detach().float().contiguous().numpy() if value.is_floating_point()
            else value.contiguous().numpy() for name, value in feed.items()})
        if logits.shape[1] < self.config.num_queries:
            raise ValueError(f"a picture of {images.shape[-2]}x{images.shape[-1]} gives "
                             f"{logits.shape[1]} encoder tokens, fewer than the "
                             f"{self.config.num_queries} queries the graphs select: give a "
                             f"larger picture")
        return GraphOutput(torch.from_numpy(logits)[None], torch.from_numpy(boxes)[None])

    def encode_exemplars(self, images: Tensor, mask: Tensor, image_index: Tensor,
                         boxes: Tensor) -> Tensor:
        if not self.visual_prompts:
            raise ValueError(f"{self.folder} was exported from a Grounding DINO folder, whose "
                             f"visual prompt encoder is untrained: prompt it with text")
        self.check_picture(images)
        embeddings, = self.sessions["visual_prompts"].run(None, {
            "images": images.float().numpy(), "mask": mask.numpy(),
            "image_index": image_index.numpy(), "boxes": boxes.float().numpy()})
        return torch.from_numpy(embeddings)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by training, or a "
                        "Grounding DINO folder (text prompts only)")
    parser.add_argument("--out", required=True, help="the folder to write the graphs to")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        raise SystemExit(f"{args.ckpt} not found: give a checkpoint (runs/NAME/last.pt) or a "
                         f"Grounding DINO folder")
    manifest = export(args.ckpt, args.out)
    print(f"wrote {', '.join(graph['file'] for graph in manifest['graphs'].values())}, "
          f"vocab.txt and manifest.json to {args.out}")
    return manifest


if __name__ == "__main__":
    main()
