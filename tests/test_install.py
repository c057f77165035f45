"""The project beside the packages it is installed with: no import name of the project hides
one of theirs, and one process holds this detector and transformers' Grounding DINO, imported
in either order (a notebook that compares the two does both)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def project_import_names() -> set[str]:
    """What `import NAME` finds in the repository: its top-level .py files and its folders of
    Python files (packages, and namespace packages such as tests/)."""
    modules = {path.stem for path in ROOT.glob("*.py")}
    folders = {path.name for path in ROOT.iterdir()
               if path.is_dir() and not path.name.startswith(".") and any(path.glob("*.py"))}
    return modules | folders


def test_no_import_name_of_the_project_is_an_installed_distributions():
    """transformers 5.25 imports Hugging Face's `kernels` with its model classes; a project
    package of that name, first on sys.path, broke it. Any such clash fails here."""
    names = project_import_names()
    assert {"model", "grqo", "deform_attn", "tests"} <= names       # the scan sees the project
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in sorted(names) if name in installed}
    assert not clashes, f"project import names that installed distributions also use: {clashes}"


PROJECT = """
import torch
import model
detector = model.build_model("tiny", kernel="torch").eval()
with torch.no_grad():
    output = detector(torch.rand(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool),
                      ["red circle", "blue star"])
assert output.logits.shape[-1] == 2 and output.logits.isfinite().all()
"""

TRANSFORMERS = """
import torch
import transformers
from transformers import GroundingDinoForObjectDetection
swin = transformers.SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2],
                               out_features=["stage2", "stage3", "stage4"])
bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, vocab_size=2100)
config = transformers.GroundingDinoConfig(
    backbone_config=swin, text_config=bert, d_model=64, encoder_layers=1, decoder_layers=2,
    encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
    decoder_attention_heads=4, num_queries=10)
oracle = GroundingDinoForObjectDetection(config).eval()
with torch.no_grad():
    output = oracle(pixel_values=torch.rand(1, 3, 64, 96),
                    input_ids=torch.tensor([[101, 2000, 1012, 102]]))
assert output.logits[..., :4].isfinite().all() and output.pred_boxes.isfinite().all()
"""


@pytest.mark.parametrize("order", [("project", "transformers"), ("transformers", "project")])
def test_one_process_holds_this_detector_and_transformers_grounding_dino(order):
    """A fresh interpreter with the repository first on sys.path (as pytest, a notebook in
    the repository or `python predict.py` has it) builds both detectors and runs a forward of
    each, in either order."""
    pytest.importorskip("transformers")
    programs = dict(project=PROJECT, transformers=TRANSFORMERS)
    program = "\n".join(programs[name] for name in order)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
