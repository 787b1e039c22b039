"""One notion of a Stable Diffusion family (``stylegrad.families``): what a checkpoint file, a loaded pipeline and a
training run call a model agree, and the facts each family carries are the ones the rest of stylegrad reads."""

import json

import pytest
from ckpt_layout import family_pipeline, write_checkpoint

from stylegrad.checkpoints.families import classify
from stylegrad.checkpoints.tensors import TensorFile
from stylegrad.errors import StylegradError
from stylegrad.families import Family, pipeline_family

pytestmark = pytest.mark.usefixtures("tiny_checkpoint_configs")


def test_a_family_is_its_short_name():
    """Comparisons, dict keys, JSON and metadata keep reading 'sd1', 'sdxl', so the enum replaces the strings."""
    assert Family.SDXL == "sdxl" and {"sd1": 1}[Family.SD1] == 1 and json.dumps(Family.SD2) == '"sd2"'
    assert Family.named("SDXL") is Family.SDXL
    with pytest.raises(StylegradError, match="unknown model family 'sd3'"):
        Family.named("sd3")


def test_style_widths_and_conditioning_widths():
    assert [f.text_widths for f in Family] == [(768,), (1024,), (768, 1280), (1280,)]
    assert Family.of_context_width(2048) is Family.SDXL and Family.of_context_width(320) is None
    assert Family.SDXL.clip_models[0] == Family.SD1.clip_models[0]  # SDXL's first tower is SD1's CLIP-L
    assert not Family.SDXL_REFINER.generates and all(f.generates for f in (Family.SD1, Family.SD2, Family.SDXL))


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_a_file_and_its_pipeline_name_the_same_family(name, tmp_path):
    """classify() on the single file and pipeline_family() on the pipeline built from it give one Family."""
    from stylegrad.checkpoints.loading import load_checkpoint

    path = write_checkpoint(family_pipeline(name), tmp_path / "m.safetensors")
    with TensorFile(path) as tf:
        kind = classify({k: tf.shape(k) for k in tf.keys()})
    assert kind.family == name
    assert pipeline_family(load_checkpoint(path)) is Family(name)
