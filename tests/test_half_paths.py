"""Every path in fp16 and bf16 on the CPU against float32 (issue 35): plain and styled generation on SD1.x, SD2.x
and SDXL pipelines, a textual inversion, a served /v1 request, a batch job, ``embed`` and ``score``; and the
``--dtype`` each of them takes, honoured, with what a machine cannot run refused in one line before any model loads.

Half precision here is the CPU's own fp16/bf16 kernels: the same formats a card computes in, other kernels. The
tolerances are measured on the tiny models (tests/tiny.py; 3 denoising steps, 32 px, SDXL 64 px), with room:

- ``IMAGE_TOL``: mean |pixel difference| to the fp32 image, in levels of 255. Measured on every family, plain or
  styled: fp16 0.085 to 0.106 (max 1 level), bf16 0.76 to 0.95 (max 7 levels). A style moves these images by 7.2
  to 11.6 levels, and each test checks that what it compares (the style, the word) moves the fp32 image (or, for
  the word, the conditioning) by more than 3x the bound, so a path that dropped it would fail.
- ``COND_TOL``: max |prompt_embeds difference| over max |fp32 prompt_embeds|. Plain: fp16 8.9e-4 to 1.2e-3, bf16
  6.9e-3 to 9.6e-3. Styled: fp16 1.4e-3 to 1.4e-2, bf16 8.3e-3 to 2.8e-2; tuning runs in float32 either way, but
  from rounded weights, and Adam's first steps move each weight by about lr whatever its gradient's size, so a
  near-zero gradient whose sign the rounding flips moves that weight by up to 2 x lr x steps.
- ``EMBED_TOL``: max |component difference| of a unit style vector: fp16 2e-4, bf16 1.3e-3 (the world's CLIP).
- ``SCORE_TOL``: |score difference| on the 1-10 scale: fp16 2e-3, bf16 4e-2 (CLIP tower and predictor both half).
"""

from __future__ import annotations

import copy
import json
from functools import cache

import numpy as np
import pytest
import torch
from conftest import text_with_projection
from PIL import Image
from test_addons_generate import write_kohya
from tiny import HIDDEN, PROJ, tiny_clip, tiny_pipeline

from stylegrad import GenerationRequest, Generator, Style, StyleOptions, load_style, save_style
from stylegrad.apps.cli import main
from stylegrad.errors import RequestError

HALF = [torch.float16, torch.bfloat16]
IDS = ["fp16", "bf16"]
NAME = {torch.float16: "fp16", torch.bfloat16: "bf16"}
IMAGE_TOL = {torch.float16: 0.3, torch.bfloat16: 2.0}
COND_TOL = {(False, torch.float16): 5e-3, (False, torch.bfloat16): 3e-2,  # (styled, dtype)
            (True, torch.float16): 4e-2, (True, torch.bfloat16): 8e-2}
EMBED_TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
SCORE_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-1}
OPTIONS = StyleOptions(steps=3, lr=3e-3)


def levels(a: Image.Image, b: Image.Image) -> float:
    """Mean |pixel difference| in levels of 255."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


@cache
def family(name: str):
    """(fp32 pipeline, the CLIP whose projection is the style space, a style) of a tiny family. SD2.x: the pipeline's
    encoder is the CLIP's cut by a layer, as SD2 cuts OpenCLIP ViT-H (the tower adds the last layer back)."""
    g = torch.Generator().manual_seed(5)
    if name == "sdxl":
        from ckpt_layout import family_pipeline
        from test_sdxl_tuning import xl_style

        pipe = family_pipeline("sdxl", seed=3)
        clip_l = text_with_projection(tiny_clip(1))
        return pipe, clip_l, xl_style(pipe, clip_l)
    clip = tiny_clip(0)
    return tiny_pipeline(clip, text_layers=1 if name == "sd2" else None), text_with_projection(clip), \
        Style(torch.randn(PROJ, generator=g), name="look")


@cache
def made(name: str, dtype: torch.dtype, styled: bool, word: bool = False) -> tuple[Image.Image, torch.Tensor, str]:
    """(image, prompt_embeds, infotext) of one request on the family's pipeline cast to ``dtype`` (a copy: the
    pipeline handed to stylegrad is its own). ``word``: the prompt's 'glossy' is a textual inversion."""
    import tempfile
    from pathlib import Path

    pipe, clip_model, style = family(name)
    root = Path(tempfile.mkdtemp(prefix="half-"))
    path = save_style(style, root / "look.safetensors")
    embeddings = []
    if word:
        (root / "embeddings").mkdir()
        torch.save({"string_to_param": {"*": torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(8))}},
                   root / "embeddings" / "glossy.pt")
        embeddings = [str(root / "embeddings")]
    size = 64 if name == "sdxl" else 32
    request = GenerationRequest("a glossy red house by the sea", negative="blurry", seed=3, steps=3, width=size,
                                height=size, style=str(path) if styled else None, style_options=OPTIONS)
    gen = Generator(copy.deepcopy(pipe).to(dtype=dtype), "tiny", clip_model, embeddings_dirs=embeddings)
    ((image, text),) = gen.images(request)
    prompt_embeds = gen.embeddings(request, gen.style(request.style))[0]
    return image, prompt_embeds, text


def close(name: str, dtype: torch.dtype, styled: bool, word: bool = False) -> None:
    image, cond, text = made(name, dtype, styled, word)
    image32, cond32, _ = made(name, torch.float32, styled, word)
    assert cond.dtype is dtype and f"Dtype: {NAME[dtype]}" in text
    assert levels(image, image32) < IMAGE_TOL[dtype]
    assert float((cond.float() - cond32).abs().max() / cond32.abs().max()) < COND_TOL[styled, dtype]


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_plain_generation(name, dtype):
    close(name, dtype, styled=False)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_styled_generation(name, dtype):
    """Tuned in float32 from the half weights, handed back in the pipeline's dtype (SDXL: both towers, pooled)."""
    assert levels(made(name, torch.float32, True)[0], made(name, torch.float32, False)[0]) > 3 * IMAGE_TOL[dtype]
    close(name, dtype, styled=True)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_styled_generation_with_a_textual_inversion(dtype):
    """The word's rows (read in float32) follow the half token table, into the styled prompt's tuning. The word
    moves the conditioning far more than the bound (by 1.4x its largest value; the tiny UNet's image, 1.8 levels)."""
    with_word, without = made("sd1", torch.float32, True, True)[1], made("sd1", torch.float32, True)[1]
    assert float((with_word - without).abs().max() / without.abs().max()) > 3 * COND_TOL[True, dtype]
    close("sd1", dtype, styled=True, word=True)


# the world's model (tests/tiny.py save_world): what the CLI, the server and batches load by name ---------------

@pytest.fixture(scope="module")
def shared_files(tmp_path_factory):
    """(styles folder, LoRA folder, pictures folder) beside the world's model."""
    root = tmp_path_factory.mktemp("half-files")
    styles, loras, pictures = root / "styles", root / "Lora", root / "pictures"
    for d in (styles, loras, pictures):
        d.mkdir()
    g = torch.Generator().manual_seed(3)
    save_style(Style(torch.randn(PROJ, generator=g), name="stripes"), styles / "stripes.safetensors")
    write_kohya(loras / "inked.safetensors")
    for i in range(3):
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(pictures / f"{i}.png")
    return styles, loras, pictures


def _served(world, files, dtype) -> tuple[Image.Image, str]:
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient

    from stylegrad.apps.serve.app import create_app
    from stylegrad.apps.serve.service import Service
    from stylegrad.apps.serve.settings import ServeSettings

    clip_dir, sd_dir = world
    styles, loras, _ = files
    generator = Generator.load(str(sd_dir), "cpu", str(clip_dir), loras_dirs=[str(loras)], dtype=dtype)
    settings = ServeSettings(styles_dirs=(str(styles),), loras_dirs=(str(loras),), ui=False)
    with TestClient(create_app(Service(generator, settings, clip_model=str(clip_dir)))) as client:
        r = client.post("/v1/generate", json={"prompt": "a red triangle <lora:inked:0.8>", "seed": 3, "steps": 3,
                                              "width": 32, "height": 32, "style": "stripes",
                                              "style_options": {"steps": 3, "lr": 3e-3}})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    return image, image.info["parameters"]


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_a_served_request(world, shared_files, dtype):
    """/v1/generate with a style and a LoRA on a server whose model loaded in half precision."""
    (half, text), (fp32, _) = _served(world, shared_files, dtype), _served(world, shared_files, torch.float32)
    assert f"Dtype: {NAME[dtype]}" in text and "Lora hashes" in text
    assert levels(half, fp32) < IMAGE_TOL[dtype]


@pytest.mark.parametrize("dtype", IDS)
def test_a_batch_job(world, shared_files, tmp_path, dtype):
    """A jobs file (a styled line and a plain one) run in half precision; a rerun into the folder in another dtype
    is refused, since its images would not be the ones the folder holds."""
    from stylegrad.jobs.batch import run_batch
    from stylegrad.jobs.work import WorkerSpec

    clip_dir, sd_dir = world
    styles, _, _ = shared_files
    base = {"steps": 3, "width": 32, "height": 32, "seed": 4}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(x) for x in (
        {"prompt": "a red house", "style": str(styles / "stripes.safetensors"), "style_steps": 3, **base},
        {"prompt": "a blue boat", **base})) + "\n")
    out = {}
    for d in ("fp32", dtype):
        summary, bad = run_batch(jobs, str(tmp_path / d), WorkerSpec(str(sd_dir), "cpu", str(clip_dir), dtype=d),
                                 progress=False, threads=1)
        assert summary.done == 2 and not bad and not summary.failed
        out[d] = sorted((tmp_path / d / "images").glob("*.png"))
    for half, fp32 in zip(out[dtype], out["fp32"]):
        with Image.open(half) as a, Image.open(fp32) as b:
            assert f"Dtype: {dtype}" in a.info["parameters"] and levels(a, b) < IMAGE_TOL[torch.float16 if dtype ==
                                                                                            "fp16" else torch.bfloat16]
    with pytest.raises(RequestError, match="device cpu, dtype fp32"):
        run_batch(jobs, str(tmp_path / "fp32"), WorkerSpec(str(sd_dir), "cpu", str(clip_dir), dtype=dtype),
                  progress=False)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_embed(world, shared_files, tmp_path, capsys, dtype):
    """``embed --dtype``: the CLIP image tower in half precision; the style file holds float32, within EMBED_TOL of
    the fp32 one's (and not the same bits: the dtype was honoured)."""
    clip_dir, _ = world
    _, _, pictures = shared_files
    for d in ("fp32", NAME[dtype]):
        assert main(["embed", str(pictures), "-o", str(tmp_path / f"{d}.safetensors"), "--clip-model",
                     str(clip_dir), "--device", "cpu", "--dtype", d]) == 0
    capsys.readouterr()
    half, fp32 = (load_style(tmp_path / f"{d}.safetensors").vector for d in (NAME[dtype], "fp32"))
    assert half.dtype is torch.float32 and not torch.equal(half, fp32)
    assert float((half - fp32).abs().max()) < EMBED_TOL[dtype]


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_score(world, shared_files, tiny_predictor, capsys, dtype):
    """``score --dtype``: images through the half CLIP image tower and the half predictor, a style file through the
    predictor, every score within SCORE_TOL of fp32's."""
    clip_dir, _ = world
    styles, _, pictures = shared_files
    files = [str(pictures / "0.png"), str(pictures / "1.png"), str(styles / "stripes.safetensors")]
    scores = {}
    for d in ("fp32", NAME[dtype]):
        assert main(["score", *files, "--predictor", str(tiny_predictor), "--clip-model", str(clip_dir), "--dtype",
                     d, "--json"]) == 0
        scores[d] = [row["score"] for row in json.loads(capsys.readouterr().out)]
    assert scores["fp32"] != scores[NAME[dtype]]
    assert max(abs(a - b) for a, b in zip(scores["fp32"], scores[NAME[dtype]])) < SCORE_TOL[dtype]


def test_evaluate_in_half_precision(world, tiny_predictor, tmp_path, capsys):
    """``evaluate --dtype bf16``: the model generates in bf16 (its PNGs say so) and the scores come out."""
    clip_dir, sd_dir = world
    style = save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)), name="mine"),
                       tmp_path / "mine.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n")
    assert main(["evaluate", "--prompts", str(prompts), "--style", str(style), "--style-steps", "0,2", "--seeds", "1",
                 "--model", str(sd_dir), "--clip-model", str(clip_dir), "--predictor", str(tiny_predictor),
                 "--steps", "2", "--width", "32", "--height", "32", "--dtype", "bf16", "--out",
                 str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    made = [Image.open(p).info.get("parameters") for p in sorted((tmp_path / "eval").glob("**/*.png"))]
    made = [text for text in made if text]  # the generated images (not the grids and plots)
    assert len(made) == 2 and all("Dtype: bf16" in text for text in made)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]
    assert set(summary["mine"]) == {"0", "2"}


COMMANDS = {
    "embed": lambda files: ["embed", str(files[2]), "-o", str(files[2] / "x.safetensors")],
    "score": lambda files: ["score", str(files[2] / "0.png")],
    "evaluate": lambda files: ["evaluate", "--style", str(files[0] / "stripes.safetensors"), "--out",
                               str(files[2] / "eval")],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_what_this_machine_cannot_run_is_one_line_before_any_model_loads(command, shared_files, monkeypatch,
                                                                         capsys):
    """A GPU without bf16 (simulated: CUDA reported, a T4), and a device that is not here at all."""
    import stylegrad.files.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(stylegrad.files.hub, "from_pretrained", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    args = COMMANDS[command](shared_files)
    assert main([*args, "--device", "cuda", "--dtype", "bf16"]) == 1
    assert capsys.readouterr().err.strip() == "Error: --dtype bf16: this GPU (Tesla T4) has no bf16; use fp16 or fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*args, "--device", "cuda:1", "--dtype", "fp16"]) == 1
    assert capsys.readouterr().err.strip() == "Error: --device 'cuda:1' requested but CUDA is not available here"
