"""The device and precision policy (stylegrad.devices, issue 35): auto picks CUDA, then MPS, then the CPU; fp16 is
auto on CUDA and MPS, fp32 on the CPU; what a machine cannot run is one line before any model loads; the model
is loaded in the dtype asked for, and the PNG records device and dtype so ``--from`` makes the same pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from stylegrad.apps.cli import main
from stylegrad.devices import resolve_device, resolve_dtype
from stylegrad.errors import RequestError
from stylegrad.pipelines.loading import load_pipeline

SIZE = ["--width", "32", "--height", "32", "--steps", "2"]


def test_auto_takes_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")  # a Mac: not the CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")


def test_auto_dtype_is_what_each_device_runs_best():
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16
    assert resolve_dtype(None, torch.device("mps")) is torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(RequestError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_unsupported_devices_are_one_line_before_any_model_loads(capsys, world):
    with pytest.raises(RequestError, match="unsupported device 'xpu'"):
        resolve_device("xpu")
    _, sd_dir = world
    assert main(["generate", "x", "--model", str(sd_dir), "--device", "xpu"]) == 1
    assert capsys.readouterr().err.strip() == ("Error: unsupported --device 'xpu': stylegrad runs on cpu, cuda, "
                                               "cuda:1, mps or auto")
    assert main(["generate", "x", "--model", str(sd_dir), "--dtype", "fp64"]) == 2  # argparse's choices


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_folder_loads_in_the_dtype_asked_for(world, dtype):
    _, sd_dir = world
    pipe = load_pipeline(str(sd_dir), "cpu", dtype=dtype)
    assert {p.dtype for c in (pipe.unet, pipe.vae, pipe.text_encoder) for p in c.parameters()} == {dtype}


def test_the_png_records_device_and_dtype_and_from_uses_them(world, tmp_path, capsys):
    """bf16 and fp32 give different pixels here, so --from must load the model in the dtype the image records."""
    _, sd_dir = world
    paths = {}
    for dtype in ("bf16", "fp16", "fp32"):
        assert main(["generate", "a red house", "--seed", "3", "--model", str(sd_dir), "--dtype", dtype,
                     "--out", str(tmp_path / dtype), *SIZE]) == 0
        (paths[dtype],) = capsys.readouterr().out.split()
    text = Image.open(paths["bf16"]).info["parameters"]
    assert "Device: cpu" in text and "Dtype: bf16" in text
    bf16, fp16, fp32 = (np.asarray(Image.open(paths[d]), dtype=np.int16) for d in ("bf16", "fp16", "fp32"))
    assert not np.array_equal(bf16, fp32)
    # the same image within rounding: measured on this tiny model (2 steps, 32 px), mean |difference| to fp32
    # 0.98 levels of 255 for bf16 (max 8), 0.12 for fp16 (max 1)
    assert np.abs(bf16 - fp32).mean() < 3 and np.abs(fp16 - fp32).mean() < 1
    assert main(["generate", "--from", paths["bf16"], "--out", str(tmp_path / "again")]) == 0
    (again,) = capsys.readouterr().out.split()
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(paths["bf16"])))


@pytest.mark.usefixtures("tiny_checkpoint_configs")
def test_the_sd2_prediction_probe_runs_where_the_model_will(tmp_path, monkeypatch):
    """A1111's v-prediction probe (one UNet call) runs on the device the model is loaded for, in its dtype: on
    a GPU it takes milliseconds, on the CPU in fp16 it took 12 s. The meta device stands in for the GPU here."""
    from ckpt_layout import family_pipeline, write_checkpoint

    from stylegrad.checkpoints import loading

    seen = []
    monkeypatch.setattr(loading, "predicts_v", lambda unet: seen.append((unet.device.type, unet.dtype)) or False)
    path = write_checkpoint(family_pipeline("sd2"), tmp_path / "sd2.safetensors")
    pipe = loading.load_checkpoint(path, "meta", dtype=torch.float16)
    assert seen == [("meta", torch.float16)] and pipe.unet.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdxl_tuning_keeps_bigg_projection_in_float32(dtype):
    """A half-precision SDXL pipeline: tuning runs in float32, bigG's projection (the loss's space and the pooled
    embedding) is read as float32, and what comes back is in the pipeline's dtype, close to the fp32 pipeline's."""
    import copy

    from ckpt_layout import family_pipeline
    from test_sdxl_tuning import xl_style
    from transformers import CLIPTextModelWithProjection

    from stylegrad import AestheticEncoder, StyleOptions

    pipe = family_pipeline("sdxl", seed=3)
    clip_l = CLIPTextModelWithProjection(pipe.text_encoder.config).eval()  # CLIP-L with a projection
    clip_l.text_model.load_state_dict(pipe.text_encoder.state_dict())
    torch.nn.init.normal_(clip_l.text_projection.weight, std=0.2, generator=torch.Generator().manual_seed(4))
    style = xl_style(pipe, clip_l)
    half = copy.deepcopy(pipe).to(dtype)
    results = {}
    for name, p in (("fp32", pipe), ("half", half)):
        enc = AestheticEncoder.from_pipeline(p, clip_l.to(p.text_encoder.dtype), cache_size=0)
        e = enc.encode("a red house", style, StyleOptions(steps=3, lr=3e-3))
        plain = enc.encode("a red house", None)
        results[name] = (e, plain)
        if name == "half":
            assert enc.text_tower("g").projection.dtype is torch.float32
            assert e.prompt_embeds.dtype is dtype and e.pooled_prompt_embeds.dtype is dtype
    (e32, p32), (eh, ph) = results["fp32"], results["half"]
    delta32 = e32.pooled_prompt_embeds - p32.pooled_prompt_embeds
    delta_half = eh.pooled_prompt_embeds.float() - ph.pooled_prompt_embeds.float()
    # the pooled delta against fp32's, relative norm, measured on these tiny towers: 0.61% (bf16), 0.07% (fp16);
    # here a half projection measured about the same (0.58%, 0.09%): the dtype check above is what guards it
    error = ((delta_half - delta32).norm() / delta32.norm()).item()
    assert error < (0.05 if dtype is torch.bfloat16 else 0.01)


def test_the_text_tower_follows_the_pipeline_after_it_was_cast(pipe, clip_text):
    """After ``pipe.to(torch.bfloat16)`` an encoder made before tunes from the bf16 weights the pipeline now runs
    (not from stale float32 tensors, nor from its cache of the same prompt in fp32): the same result as an encoder
    made after the cast."""
    from stylegrad import AestheticEncoder, Style, StyleOptions

    style = Style(torch.randn(clip_text.config.projection_dim, generator=torch.Generator().manual_seed(2)))
    early = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    early.encode("a red house", style, StyleOptions(steps=2, lr=3e-3))  # builds its tower on the fp32 weights
    pipe.to(torch.bfloat16)
    got = early.encode("a red house", style, StyleOptions(steps=2, lr=3e-3))
    want = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0).encode("a red house", style,
                                                                                StyleOptions(steps=2, lr=3e-3))
    assert got.prompt_embeds.dtype is torch.bfloat16 and torch.equal(got.prompt_embeds, want.prompt_embeds)
