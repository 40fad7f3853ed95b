"""The worked example in docs/examples runs end to end (at smoke size) and learns."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own_model.py"


@pytest.fixture
def one_thread():
    """A few dozen steps of a tiny CNN: on a busy 2-core machine one thread is much faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # trains the example end to end
def test_own_model_example(shared_data, tmp_path, capsys, one_thread):
    spec = importlib.util.spec_from_file_location("own_model", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    saved = tmp_path / "own.safetensors"
    result = example.main(["--data-root", str(shared_data), "--steps", "40", "--samples", "5",
                           "--test-size", "500", "--save", str(saved)])
    out = capsys.readouterr().out
    assert "5 sampled models: lowest" in out and f"saved to {saved}" in out
    assert result["num_samples"] == 5 and result["num_inputs"] == 500
    assert 0.3 < result["sampled"]["lowest"] <= result["sampled"]["highest"]  # chance is 0.1
    assert result["ensemble"]["accuracy"] > 0.3 and saved.is_file()
