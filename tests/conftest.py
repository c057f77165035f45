"""Shared fixtures: a small shapes dataset on disk for the training tests."""

import pytest

from shapes import generate_shapes


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """8 train images (4 steps per epoch at batch 2), a support split with every class,
    and 4 val images."""
    folder = tmp_path_factory.mktemp("shapes")
    generate_shapes(folder, seed=5, image_size=128, train_images=8, support_images=24,
                    dev_images=2, val_images=4)
    return folder


def run_args(shapes, out, *extra):
    """Command-line arguments of a small run on the `shapes` fixture: 2 epochs of 4 steps,
    no final evaluation (an option repeated in `extra` overrides these)."""
    return ["--data", str(shapes), "--out", str(out), "--batch-size", "2", "--epochs", "2",
            "--no-eval", "--seed", "3", *extra]
