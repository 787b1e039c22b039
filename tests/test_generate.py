"""Generation through diffusers pipelines, and the CLI end to end on tiny models saved as folders."""

import numpy as np
import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager
from tiny import PROJ

from stylegrad import AestheticEncoder, GenerationRequest, Generator, Style, StyleOptions, load_style, save_style
from stylegrad.apps.cli import main
from stylegrad.pipelines.generation import run_pipeline
from stylegrad.pipelines.grids import grid_cell, label_grid

SIZE = ["--width", "32", "--height", "32", "--steps", "2"]


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5)))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _generated(capsys) -> list[str]:
    return capsys.readouterr().out.split()


def test_zero_steps_image_equals_plain_diffusers(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, ne = enc.encode("a red house", style, StyleOptions(steps=0), "blurry")
    request = GenerationRequest("a red house", "blurry", steps=2, width=32, height=32, seed=7)
    ours = run_pipeline(pipe, pe, ne, request)
    plain = pipe("a red house", negative_prompt="blurry", num_inference_steps=2, width=32, height=32,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(plain))


def test_clip_skip_matches_diffusers(pipe, clip_text, style):
    """--clip-skip means diffusers' clip_skip: the final layer norm of the states K layers before the last
    (applied to the negative prompt too, as A1111 does)."""
    pipe.set_progress_bar_config(disable=True)
    (image, text), = Generator(pipe, "tiny", clip_text).images(
        GenerationRequest("a red house", steps=2, width=32, height=32, seed=3, clip_skip=1))
    ids = pipe.tokenizer(["a red house", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        z = pipe.text_encoder.final_layer_norm(pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2])
    plain = pipe(prompt_embeds=z[:1], negative_prompt_embeds=z[1:], num_inference_steps=2, width=32, height=32,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    no_skip = pipe("a red house", num_inference_steps=2, width=32, height=32,
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(plain))
    assert not np.array_equal(np.asarray(plain), np.asarray(no_skip))
    assert "Clip skip: 2" in text  # A1111 counts the last layer as 1


def test_plain_and_stylecode_requests_load_no_clip(pipe, monkeypatch):
    """Nothing reads the family's CLIP without an active style: offline it would fail, online it would download."""
    import stylegrad.aesthetic.tower as tower

    def refuse(*a, **k):
        raise AssertionError("the CLIP model was loaded")

    monkeypatch.setattr(tower, "clip_parts", refuse)
    pipe.set_progress_bar_config(disable=True)
    gen = Generator(pipe, "tiny", "openai/clip-vit-large-patch14")
    gen.images(GenerationRequest("a red house", steps=1, width=32, height=32))
    gen.images(GenerationRequest("a red house", steps=1, width=32, height=32, style_options=StyleOptions(steps=0)))


def test_projection_is_read_alone_from_the_safetensors_file(world, clip, monkeypatch):
    """SD1.x needs only CLIP's 'text_projection.weight': no model is built to get it."""
    import transformers

    from stylegrad.aesthetic.tower import clip_parts

    clip_dir, _ = world
    monkeypatch.setattr(transformers.CLIPTextModelWithProjection, "from_pretrained",
                        classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built"))))
    parts = clip_parts(str(clip_dir), clip.config.text_config.num_hidden_layers)
    assert torch.equal(parts.projection, clip.text_projection.weight) and parts.layers == {}
    more = clip_parts(str(clip_dir), 1)  # an SD2-like encoder one layer short: that layer comes from the CLIP
    assert sorted({k.split(".")[2] for k in more.layers}) == ["1"]
    assert torch.equal(more.layers["encoder.layers.1.mlp.fc1.weight"], clip.text_model.encoder.layers[1].mlp.fc1.weight)


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
    paths = _generated(capsys)
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    info = ParserManager().parse(paths[1])
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.prompts[0].value == "a harbour at night" and sampler.negative_prompts[0].value == "blurry"
    assert sampler.parameters["seed"] == "43" and sampler.parameters["steps"] == "2"
    assert info.metadata["Aesthetic steps"] == "3" and info.metadata["Aesthetic embedding"] == "aivazovsky"
    assert info.metadata["Aesthetic LR"] == "0.0001" and info.metadata["Aesthetic weight"] == "1.0"
    assert _pixels(paths[0]).shape == (32, 32, 3)


def test_embed_and_the_evaluation_clip_agree(world, shared, tmp_path):
    """The style of one image is that image's embedding as the evaluation's CLIP computes it."""
    from stylegrad import embed_images
    from stylegrad.evaluation.metrics import ClipEmbedder

    clip_dir, _ = world
    image = sorted((shared / "images" / "aivazovsky").iterdir())[0]
    style = embed_images([image], str(clip_dir), mean="raw", progress=False)
    with Image.open(image) as im:
        expected = ClipEmbedder(str(clip_dir)).images([im])[0]
    assert torch.allclose(style.vector, expected, atol=1e-5)


def test_cli_compare_grid_and_img2img(world, tmp_path, capsys, shared):
    clip_dir, sd_dir = world
    emb = tmp_path / "s.safetensors"
    assert main(["embed", str(shared / "images" / "simulacra" / "great"), "-o", str(emb),
                 "--clip-model", str(clip_dir)]) == 0
    capsys.readouterr()
    common = ["--model", str(sd_dir), "--clip-model", str(clip_dir), *SIZE]
    assert main(["generate", "a cat", "--style", str(emb), "--compare", "--compare-steps", "2,4", "--n", "2",
                 "--out", str(tmp_path / "o"), *common]) == 0
    grid = Image.open(capsys.readouterr().out.strip()).convert("RGB")
    for seed in (0, 1):  # each cell is the image generate makes with that seed and steps
        for column, steps in enumerate((0, 2, 4)):
            out = tmp_path / f"g{seed}{steps}"
            assert main(["generate", "a cat", "--style", str(emb), "--style-steps", str(steps), "--seed",
                         str(seed), "--out", str(out), *common]) == 0
            (path,) = _generated(capsys)
            assert np.array_equal(np.asarray(grid_cell(grid, (32, 32), 3, seed, column)), _pixels(path))
    init = shared / "images" / "aivazovsky" / "genoese-towers-in-the-black-sea-ivan-aivazovsky.jpg"
    assert main(["generate", "a cat", "--style", str(emb), "--init-image", str(init), "--strength", "0.5",
                 "--out", str(tmp_path / "o"), *common]) == 0
    info = ParserManager().parse(capsys.readouterr().out.strip())
    assert info.metadata["Denoising strength"] == "0.5"


@pytest.mark.parametrize("extra", [
    ["--clip-skip", "1", "--negative", "blurry"],
    ["--style-regularization", "10", "--style-lr", "1e-2"],
    ["--init-image", "INIT", "--strength", "0.6", "--sampler", "Euler a"],
    ["--style-weight", "0.5", "--style-slerp", "--style-text", "stripes, bold", "--style-personalize-negative",
     "--negative", "ugly", "--sampler", "dpmpp_2m", "--cfg", "5"],
])
def test_generate_from_png_gives_the_same_pixels(world, tmp_path, capsys, shared, style, extra):
    clip_dir, sd_dir = world
    style_path = save_style(style, tmp_path / "look.safetensors")
    init = str(sorted((shared / "images" / "aivazovsky").iterdir())[0])
    extra = [init if x == "INIT" else x for x in extra]
    assert main(["generate", "a red house", "--style", str(style_path), "--style-steps", "2", "--seed", "5",
                 "--model", str(sd_dir), "--clip-model", str(clip_dir), "--out", str(tmp_path / "a"), *SIZE,
                 *extra]) == 0
    (first,) = _generated(capsys)
    assert main(["generate", "--from", first, "--out", str(tmp_path / "b")]) == 0
    (again,) = _generated(capsys)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert Image.open(first).info["parameters"] == Image.open(again).info["parameters"]
    # the style file is checked: another file under the same path is refused
    save_style(Style(-style.vector), style_path)
    assert main(["generate", "--from", first, "--out", str(tmp_path / "c")]) == 1
    assert "is not the one" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_plms_runs_the_steps_asked_for(pipe, steps):
    """A1111's and the paper's PLMS (LDM's sampler): no Runge-Kutta warm-up (with it, diffusers' PNDM fails below 4
    steps and runs 13 UNet passes for 4); at most one pass more than the steps, for the first step's pseudo improved
    Euler as in LDM."""
    passes = []
    image, _ = Generator(pipe).images(GenerationRequest("a cat", steps=steps, width=32, height=32, sampler="PLMS"),
                                      progress=lambda stage, done, total: passes.append(total))[0]
    assert len(set(passes)) == 1 and steps <= passes[0] <= steps + 1
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_samplers_by_short_and_a1111_names(pipe):
    import importlib.util

    from diffusers import EulerAncestralDiscreteScheduler

    from stylegrad.errors import StylegradError
    from stylegrad.pipelines.loading import SAMPLERS, sampler_id, with_sampler

    for short, (cls, a1111, _) in SAMPLERS.items():
        assert sampler_id(short) == sampler_id(a1111) == sampler_id(a1111.upper()) == short
        if short.startswith("lms") and importlib.util.find_spec("scipy") is None:
            with pytest.raises(StylegradError, match=f"sampler {short} needs scipy"):
                with_sampler(pipe, a1111)
            continue
        assert type(with_sampler(pipe, a1111).scheduler).__name__ == cls
    scheduler = pipe.scheduler
    assert isinstance(with_sampler(pipe, "Euler a").scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler is scheduler  # the user's pipeline keeps its own
    with pytest.raises(StylegradError, match="unknown sampler 'k_dpm_9'"):
        sampler_id("k_dpm_9")


def test_cli_embed_skips_unreadable_files_and_recurses(world, tmp_path, capsys, shared):
    clip_dir, _ = world
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for src in (shared / "images" / "aivazovsky").iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    nested = sorted((shared / "images" / "simulacra" / "good").iterdir())[0]
    (folder / "sub" / nested.name).write_bytes(nested.read_bytes())
    (folder / "broken.png").write_bytes(b"not really a png")
    (folder / "captions.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "s.pt"
    assert main(["embed", str(folder), "-o", str(out), "--clip-model", str(clip_dir)]) == 0
    err = capsys.readouterr().err
    assert "Note: skipped 1 file(s)" in err and "broken.png" in err
    raw = torch.load(out, weights_only=True)
    assert raw.shape == (1, PROJ)  # --format from the .pt suffix
    deep = tmp_path / "deep.safetensors"
    assert main(["embed", str(folder), "-o", str(deep), "--clip-model", str(clip_dir), "--recursive"]) == 0
    assert load_style(deep).metadata["num_images"] == "4" and load_style(out).direction.shape == (PROJ,)
    assert not torch.allclose(load_style(deep).direction, load_style(out).direction)

    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"garbage")
    assert main(["embed", str(empty), "-o", str(tmp_path / "e.safetensors"), "--clip-model", str(clip_dir)]) == 1
    assert "Error: none of the 1 files is a readable image" in capsys.readouterr().err


def test_notes_are_printed_even_with_warnings_ignored(world, tmp_path):
    import os
    import subprocess
    import sys

    clip_dir, _ = world
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "stylegrad", "embed", str(folder), "-o", str(tmp_path / "s.pt"),
                           "--clip-model", str(clip_dir)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and "Note: skipped 1 file(s)" in proc.stderr


def test_embed_raw_mean_points_the_same_way(world, tmp_path, shared):
    from stylegrad.aesthetic.embedding import embed_images, load_image_encoder

    clip_dir, _ = world
    encoder = load_image_encoder(str(clip_dir), "cpu")
    imgs = shared / "images" / "simulacra" / "good"
    unit = embed_images([imgs], str(clip_dir), encoder=encoder, batch_size=3, progress=False)
    raw = embed_images([imgs], str(clip_dir), encoder=encoder, mean="raw", batch_size=3, progress=False)
    assert torch.equal(unit.vector, raw.direction) and torch.equal(unit.direction, raw.direction)
    assert raw.norm != pytest.approx(1.0) and unit.digest == raw.digest
    model, processor = encoder
    with torch.no_grad():
        ims = [Image.open(p).convert("RGB") for p in sorted(imgs.iterdir())]
        feats = model(pixel_values=processor(images=ims, return_tensors="pt")["pixel_values"]).image_embeds
    assert torch.allclose(raw.vector, feats.mean(0), atol=1e-5)  # streaming sum == plain mean


def test_raw_and_unit_styles_give_identical_embeddings_and_share_a_cache_entry(pipe, clip_text, style, monkeypatch):
    import stylegrad.aesthetic.encoder as encoder_module

    calls = []
    real = encoder_module.personalize
    monkeypatch.setattr(encoder_module, "personalize", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    raw = Style(style.vector * 17.3)  # what `embed --mean raw` writes, and ...
    unit = Style(raw.direction)  # ... what `embed` writes for the same images
    a = enc.encode("a red house", unit, StyleOptions(steps=2))
    b = enc.encode("a red house", raw, StyleOptions(steps=2))
    assert len(calls) == 1 and all(torch.equal(x, y) for x, y in zip(a, b))
    enc.clear_cache()
    c = enc.encode("a red house", raw, StyleOptions(steps=2))
    assert len(calls) == 2 and all(torch.equal(x, y) for x, y in zip(a, c))


def test_the_cache_keeps_the_most_recent_entries(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=3)
    for i in range(5):
        enc.encode(f"prompt {i}", style, StyleOptions(steps=1))
    enc.encode("prompt 2", style, StyleOptions(steps=1))  # used again: now the newest
    enc.encode("prompt 5", style, StyleOptions(steps=1))
    assert [k[0] for k in enc._cache] == ["prompt 4", "prompt 2", "prompt 5"]


def test_mix_takes_paths_with_colons(tmp_path, capsys):
    a = save_style(Style(torch.tensor([1.0, 0, 0])), tmp_path / "a:1.safetensors")
    b = save_style(Style(torch.tensor([0, 1.0, 0])), tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["mix", str(a), f"{b}:3", "-o", str(out)]) == 0
    expected = torch.tensor([1.0, 3.0, 0]) / (10 ** 0.5)
    assert torch.allclose(load_style(out).vector, expected, atol=1e-6)


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
    from PIL import ImageFont

    cells = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    label = "yellow triangle, seed 0"
    grid = label_grid([cells], ["no style", "10 steps"], [label])
    width = ImageFont.load_default().getlength(label)
    assert grid.width >= 4 + width + 2 * 32
    red = np.all(np.asarray(grid) == (255, 0, 0), axis=-1)
    assert not red[:, : int(4 + width)].any()  # no image pasted over the label
    for j, cell in enumerate(cells):
        assert np.array_equal(np.asarray(grid_cell(grid, (32, 32), 2, 0, j)), np.asarray(cell))


def test_tuning_memory_flag_gives_the_same_pixels(world, tmp_path, capsys, style, monkeypatch):
    """--tuning-memory low rebuilds Adam's moments instead of keeping them (a third of the memory): the image is the
    same to the pixel, and the flag reaches the tuning through $STYLEGRAD_TUNING_MEMORY."""
    from stylegrad.aesthetic import memory

    clip_dir, sd_dir = world
    style_path = save_style(style, tmp_path / "look.safetensors")
    chosen = []
    real = memory.choose_moments
    monkeypatch.setattr("stylegrad.aesthetic.eos_forward.choose_moments",
                        lambda *a: chosen.append(real(*a)) or chosen[-1])
    monkeypatch.setenv("STYLEGRAD_TUNING_MEMORY", "auto")  # restored after the test: the CLI sets it
    pixels = {}
    for mode in ("fast", "low"):
        assert main(["generate", "a red house", "--style", str(style_path), "--style-steps", "3", "--seed", "5",
                     "--model", str(sd_dir), "--clip-model", str(clip_dir), "--out", str(tmp_path / mode), *SIZE,
                     "--tuning-memory", mode]) == 0
        (path,) = _generated(capsys)
        pixels[mode] = _pixels(path)
    assert [set(c.values()) for c in chosen] == [{"kept"}, {"rebuilt"}]
    assert np.array_equal(pixels["fast"], pixels["low"])
    assert main(["generate", "x", "--tuning-memory", "tiny"]) == 2  # argparse's one-line error


def _pipeline_snapshot(pipe):
    """Everything of a pipeline a generation could change: its attributes (by identity; the progress-bar settings
    by value), each component's parameters and buffers (bits), hooks and attention processors."""
    attrs = {k: (id(v), dict(v) if k == "_progress_bar_config" else None) for k, v in vars(pipe).items()}
    modules = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            modules[name] = (type(component), {k: v.clone() for k, v in component.state_dict().items()},
                             [(n, len(m._forward_hooks), len(m._forward_pre_hooks), type(m).__name__)
                              for n, m in component.named_modules()],
                             {k: type(p) for k, p in getattr(component, "attn_processors", {}).items()})
    return attrs, id(pipe.scheduler), dict(pipe.scheduler.config), modules


def _same_snapshot(a, b) -> None:
    attrs_a, sched_a, config_a, modules_a = a
    attrs_b, sched_b, config_b, modules_b = b
    assert attrs_a == attrs_b and sched_a == sched_b and config_a == config_b
    for name, (cls, state, hooks, processors) in modules_a.items():
        cls_b, state_b, hooks_b, processors_b = modules_b[name]
        assert cls is cls_b and hooks == hooks_b and processors == processors_b, name
        assert all(torch.equal(v, state_b[k]) for k, v in state.items()), name


def test_generation_never_changes_the_users_pipeline(pipe, clip_text, style, tmp_path):
    """Plain, styled, another sampler, a stylecode, img2img, a batch and a progress callback: the pipeline handed in
    keeps every attribute (its progress-bar settings included), its scheduler object, modules, hooks, processors and
    the bits of every parameter; and stylegrad shows no bar of diffusers' own."""
    from tiny import tiny_stylecodes

    from stylegrad.stylecodes.codec import random_code
    from stylegrad.stylecodes.model import save_stylecodes

    pipe.set_progress_bar_config(desc="the user's own", leave=True)
    settings = pipe._progress_bar_config
    before = _pipeline_snapshot(pipe)
    style_file = save_style(style, tmp_path / "look.safetensors") or tmp_path / "look.safetensors"
    codes = save_stylecodes(tiny_stylecodes(pipe.unet), tmp_path / "sc.safetensors")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    gen = Generator(pipe, "tiny", clip_text)
    small = dict(steps=2, width=32, height=32)
    seen = []
    gen.generate(GenerationRequest("a red house", **small), tmp_path / "out")
    gen.generate(GenerationRequest("a red house", style=str(style_file), style_options=StyleOptions(steps=2),
                                   sampler="euler", **small), tmp_path / "out")
    gen.generate(GenerationRequest("a red house", stylecode=random_code(3), stylecodes_model=str(codes), **small),
                 tmp_path / "out")
    gen.images(GenerationRequest("a red house", init_image=str(tmp_path / "init.png"), strength=0.5, **small),
               progress=lambda *a: seen.append(a))
    gen.images_batch([GenerationRequest("a red house", seed=s, **small) for s in (1, 2)], progress=lambda *a: None)
    gen.compare(GenerationRequest("a red house", style=str(style_file), **small), [1], tmp_path / "out")
    _same_snapshot(before, _pipeline_snapshot(pipe))
    assert pipe._progress_bar_config is settings and settings == {"desc": "the user's own", "leave": True}
    assert ("denoising", 1, 1) in seen  # img2img at strength 0.5: one of two steps, reported to the callback
    ours = gen.runner.pipeline(GenerationRequest("a red house", **small))[0]
    assert ours is not pipe and ours._progress_bar_config == {"disable": True}  # its own settings: diffusers' bar off
