"""Generation through diffusers pipelines, and the CLI end to end on tiny models saved as folders."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StyleOptions, load_style
from stylegrad.apps.cli import main
from stylegrad.pipelines.generation import Settings, run_pipeline

SIZE = ["--width", "32", "--height", "32", "--steps", "2"]


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5)))


def test_zero_steps_image_equals_plain_diffusers(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, ne = enc.encode("a red house", style, StyleOptions(steps=0), "blurry")
    ours = run_pipeline(pipe, pe, ne, Settings("a red house", "blurry", steps=2, width=32, height=32, seed=7))
    plain = pipe("a red house", negative_prompt="blurry", num_inference_steps=2, width=32, height=32,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(plain))


def test_txt2img_and_img2img_take_the_embeddings(pipe, clip_text, style):
    from diffusers import StableDiffusionImg2ImgPipeline

    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, ne = enc.encode("a red house", style, StyleOptions(steps=5, lr=5e-2))
    kw = dict(num_inference_steps=2, output_type="np")
    base = pipe(prompt_embeds=enc.plain(["a red house"]), negative_prompt_embeds=ne, width=32, height=32,
                generator=torch.Generator().manual_seed(0), **kw).images
    styled = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, width=32, height=32,
                  generator=torch.Generator().manual_seed(0), **kw).images
    assert styled.shape == (1, 32, 32, 3) and np.abs(styled - base).max() > 1e-3
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    out = img2img(image=init, strength=0.5, prompt_embeds=pe, negative_prompt_embeds=ne,
                  generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_cli_embed_then_generate_with_metadata(shared, world, tmp_path, capsys):
    clip_dir, sd_dir = world
    style_path = tmp_path / "aivazovsky.safetensors"
    assert main(["embed", str(shared / "images" / "aivazovsky"), "-o", str(style_path),
                 "--clip-model", str(clip_dir), "--batch-size", "2"]) == 0
    style = load_style(style_path)
    assert style.width == PROJ and style.metadata["num_images"] == "3"
    assert style.metadata["encoder"] == str(clip_dir) and abs(style.norm - 1) < 1e-5

    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["generate", "a harbour at night", "--style", str(style_path), "--style-steps", "3",
                 "--negative", "blurry", "--model", str(sd_dir), "--clip-model", str(clip_dir), "--seed", "42",
                 "--n", "2", "--out", str(out), *SIZE]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    info = ParserManager().parse(paths[1])
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.prompts[0].value == "a harbour at night" and sampler.negative_prompts[0].value == "blurry"
    assert sampler.parameters["seed"] == "43" and sampler.parameters["steps"] == "2"
    assert info.metadata["Aesthetic steps"] == "3" and info.metadata["Aesthetic embedding"] == "aivazovsky"
    assert info.metadata["Aesthetic LR"] == "0.0001" and info.metadata["Aesthetic weight"] == "1.0"
    with Image.open(paths[0]) as im:
        assert im.size == (32, 32)


def test_cli_compare_grid_and_img2img(world, tmp_path, capsys, shared):
    clip_dir, sd_dir = world
    emb = tmp_path / "s.safetensors"
    assert main(["embed", str(shared / "images" / "simulacra" / "great"), "-o", str(emb),
                 "--clip-model", str(clip_dir)]) == 0
    capsys.readouterr()
    common = ["--style", str(emb), "--model", str(sd_dir), "--clip-model", str(clip_dir), "--out",
              str(tmp_path / "o"), *SIZE]
    assert main(["generate", "a cat", "--compare", "--compare-steps", "2,4", "--n", "2", *common]) == 0
    grid = capsys.readouterr().out.strip()
    with Image.open(grid) as im:
        assert im.size == (90 + 3 * 32, 24 + 2 * 32)  # columns: no style, 2 steps, 4 steps; rows: 2 seeds
    init = shared / "images" / "aivazovsky" / "genoese-towers-in-the-black-sea-ivan-aivazovsky.jpg"
    assert main(["generate", "a cat", "--init-image", str(init), "--strength", "0.5", *common]) == 0
    path = capsys.readouterr().out.strip()
    info = ParserManager().parse(path)
    assert info.metadata["Denoising strength"] == "0.5"


def test_cli_embed_skips_unreadable_files(world, tmp_path, capsys, shared):
    clip_dir, _ = world
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in (shared / "images" / "aivazovsky").iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"not really a png")
    (folder / "captions.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "s.pt"
    assert main(["embed", str(folder), "-o", str(out), "--clip-model", str(clip_dir)]) == 0
    err = capsys.readouterr().err
    assert "Warning: skipped 1 file(s)" in err and "broken.png" in err
    raw = torch.load(out, weights_only=True)
    assert raw.shape == (1, PROJ)  # --format from the .pt suffix

    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"garbage")
    assert main(["embed", str(empty), "-o", str(tmp_path / "e.safetensors"), "--clip-model", str(clip_dir)]) == 1
    assert "Error: none of the 1 files is a readable image" in capsys.readouterr().err


def test_embed_raw_mean_points_the_same_way(world, tmp_path, shared):
    from stylegrad.aesthetic.embedding import embed_images, load_image_encoder

    clip_dir, _ = world
    encoder = load_image_encoder(str(clip_dir), "cpu")
    imgs = shared / "images" / "simulacra" / "good"
    unit = embed_images([imgs], str(clip_dir), encoder=encoder, progress=False)
    raw = embed_images([imgs], str(clip_dir), encoder=encoder, mean="raw", batch_size=3, progress=False)
    assert torch.allclose(unit.vector, raw.direction, atol=1e-6) and raw.norm != pytest.approx(1.0)
    model, processor = encoder
    with torch.no_grad():
        ims = [Image.open(p).convert("RGB") for p in sorted(imgs.iterdir())]
        feats = model(pixel_values=processor(images=ims, return_tensors="pt")["pixel_values"]).image_embeds
    assert torch.allclose(raw.vector, feats.mean(0), atol=1e-5)  # streaming sum == plain mean


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--model", "nobody/no-such-model"], "Error: model 'nobody/no-such-model' is not available offline"),
    (["generate", "x", "--model", "./missing/folder"], "Error: model folder not found: ./missing/folder"),
    (["generate", "x", "--style", "nope.safetensors"], "Error: no such file: nope.safetensors"),
    (["generate", "x", "--width", "30"], "Error: --width must be a positive multiple of 8"),
    (["generate", "x", "--compare"], "Error: --compare needs --style"),
    (["generate", "x", "--style-steps", "-2"], "Error: style option steps=-2"),
    (["embed", "missing_dir", "-o", "x.safetensors"], "Error: no such file or folder: missing_dir"),
])
def test_cli_user_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_console_script_has_help_and_no_traceback(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "stylegrad", "generate", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--style-steps" in help_text and "Adam steps" in help_text
    proc = subprocess.run([sys.executable, "-m", "stylegrad", "generate", "x", "--model", "nobody/none"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "not available offline" in proc.stderr


def test_embed_streams_with_a_bounded_number_of_batches(world, tmp_path, monkeypatch):
    """Bounded memory for big folders: decoding runs at most two batches ahead of the model (three batches of
    pixels exist at once however many images), and only a running sum of features is kept."""
    import stylegrad.aesthetic.embedding as images

    clip_dir, _ = world
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    decoded, in_flight = [], []
    real_decode = images._decode

    def counting_decode(paths, processor):
        out = real_decode(paths, processor)
        decoded.append(len(paths))
        return out

    monkeypatch.setattr(images, "_decode", counting_decode)
    model, processor = images.load_image_encoder(str(clip_dir), "cpu")
    consumed = []
    model.register_forward_pre_hook(lambda m, a, k: in_flight.append(len(decoded) - len(consumed)) or
                                    consumed.append(1), with_kwargs=True)
    style = images.embed_images([folder], str(clip_dir), encoder=(model, processor), batch_size=4, progress=False)
    assert style.metadata["num_images"] == "40" and len(consumed) == 10
    assert max(in_flight) <= 3  # the batch in the model and at most two decoded ahead


def test_grid_row_labels_are_not_cut_off():
    """The label column grows with the longest row label, so "yellow triangle, seed 0" is readable."""
    import numpy as np
    from PIL import Image, ImageFont

    from stylegrad.pipelines.generation import label_grid

    cell = Image.new("RGB", (32, 32), "red")
    label = "yellow triangle, seed 0"
    grid = label_grid([[cell, cell]], ["no style", "10 steps"], [label])
    width = ImageFont.load_default().getlength(label)
    assert grid.width >= 4 + width + 2 * 32
    red = np.all(np.asarray(grid) == (255, 0, 0), axis=-1)
    assert not red[:, : int(4 + width)].any()  # no image pasted over the label
