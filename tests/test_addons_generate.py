"""LoRAs and embeddings in a generation: the user's pipeline is left as it was, the PNG records them as A1111
does, and ``--from`` makes the same image again."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stylegrad import GenerationRequest, Generator
from stylegrad.apps.cli import main
from stylegrad.files.infotext import parse_infotext

SIZE = ["--width", "32", "--height", "32", "--steps", "2"]


def write_kohya(path, seed=0):
    """A small kohya LoRA for the tiny model: a UNet cross-attention key and a text-encoder query."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (16, 32),
                             "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v": (16, 16),
                             "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g).half()
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g).half()
        tensors[f"{name}.alpha"] = torch.tensor(2.0).half()
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture()
def folders(tmp_path):
    loras, embeddings = tmp_path / "Lora", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    write_kohya(loras / "inked.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32) * 0.05}, "name": "other-name", "step": 100},
               embeddings / "glossy.pt")
    torch.save({"<x>": torch.randn(1024)}, embeddings / "wide.pt")  # another width: listed, not an error
    return loras, embeddings


def _addnet_hash(path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_lora_and_embedding_leave_the_pipeline_as_it_was(pipe, folders, tmp_path):
    loras, embeddings = folders
    before = {k: v.clone() for k, v in pipe.components["unet"].state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    gen = Generator(pipe, embeddings_dirs=[str(embeddings)], loras_dirs=[str(loras)])
    plain = GenerationRequest("a glossy red house", seed=3, steps=2, width=32, height=32)
    styled = GenerationRequest("a glossy red house <lora:inked:0.8>", seed=3, steps=2, width=32, height=32)
    with pytest.warns(UserWarning, match="wide skipped"):
        (a, _), = gen.images(plain)
    (b, text), = gen.images(styled)
    (c, _), = gen.images(plain)
    assert np.array_equal(np.asarray(a), np.asarray(c))  # the plain pipeline's image, bit for bit
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, te_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert not any(m._forward_hooks for m in list(pipe.unet.modules()) + list(pipe.text_encoder.modules()))
    prompt, _, fields = parse_infotext(text)
    assert prompt == "a glossy red house <lora:inked:0.8>"  # A1111 keeps the tag in the prompt
    assert fields["Lora hashes"] == f"inked: {_addnet_hash(loras / 'inked.safetensors')}"
    ti = hashlib.sha256((embeddings / "glossy.pt").read_bytes()).hexdigest()[:12]
    assert fields["TI hashes"] == f"glossy: {ti}"
    # the embedding's word alone changes the image: without the folder 'glossy' is just letters
    (d, _), = Generator(pipe).images(plain)
    assert not np.array_equal(np.asarray(d), np.asarray(a))


def test_a_missing_lora_is_noted_and_the_image_made(pipe, folders):
    loras, _ = folders
    gen = Generator(pipe, loras_dirs=[str(loras)])
    with pytest.warns(UserWarning, match="'nothere' .* not in the LoRA folders"):
        images = gen.images(GenerationRequest("a cat <lora:nothere:1>", steps=2, width=32, height=32))
    assert len(images) == 1
    with pytest.raises(Exception, match="LoRA not found: ../inked"):
        gen.images(GenerationRequest("a cat", loras=("../inked",), steps=2, width=32, height=32))


def test_cli_lora_embedding_and_from(world, folders, tmp_path, capsys):
    _, sd_dir = world
    loras, embeddings = folders
    extra = tmp_path / "extra.safetensors"
    write_kohya(extra, seed=4)
    assert main(["generate", "a (glossy:1.2) house <lora:inked:0.5>", "--model", str(sd_dir), "--loras", str(loras),
                 "--embeddings", str(embeddings), "--lora", f"{extra}:0.3:0.6", "--seed", "2",
                 "--out", str(tmp_path / "a"), *SIZE]) == 0
    (first,) = capsys.readouterr().out.split()
    fields = parse_infotext(Image.open(first).info["parameters"])[2]
    assert set(dict(x.split(": ") for x in fields["Lora hashes"].split(", "))) == {"extra", "inked"}
    assert main(["generate", "--from", first, "--loras", str(loras), "--embeddings", str(embeddings),
                 "--out", str(tmp_path / "b")]) == 0
    (again,) = capsys.readouterr().out.split()
    with Image.open(first) as x, Image.open(again) as y:
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert main(["generate", "a cat", "--model", str(sd_dir), "--lora", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "c"), *SIZE]) == 1
    assert "LoRA not found" in capsys.readouterr().err


def test_from_an_a1111_png(world, folders, tmp_path, capsys):
    """Prompt, negative, steps, sampler with its schedule, CFG, seed, size, clip skip, LoRAs and embeddings by name
    from the folders; what cannot be honoured is one line each."""
    from PIL.PngImagePlugin import PngInfo

    _, sd_dir = world
    loras, embeddings = folders
    text = ("a glossy house <lora:inked:0.6>, (sunset:1.2)\nNegative prompt: blurry, lowres\n"
            "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 32x40, "
            "Model hash: 0123456789, Model: dreamy_v1, Clip skip: 2, Hires upscale: 2, "
            'TI hashes: "glossy: 000000000000, missingword: 111111111111", '
            f'Lora hashes: "inked: {_addnet_hash(loras / "inked.safetensors")}", Version: v1.10.1')
    meta = PngInfo()
    meta.add_text("parameters", text)
    png = tmp_path / "a1111.png"
    Image.new("RGB", (32, 40)).save(png, pnginfo=meta)
    assert main(["generate", "--from", str(png), "--model", str(sd_dir), "--loras", str(loras),
                 "--embeddings", str(embeddings), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    (made,) = out.out.split()
    err = out.err
    assert "Hires upscale: the hires. fix second pass is not run" in err
    assert "the pixels are not" in err  # A1111's GPU noise
    assert "'missingword' is not in the embeddings folders" in err
    assert "'glossy' differs from the one the image was made with" in err
    assert "LoRA 'inked'" not in err  # found, with the recorded hash
    prompt, negative, f = parse_infotext(Image.open(made).info["parameters"])
    assert (prompt, negative) == ("a glossy house <lora:inked:0.6>, (sunset:1.2)", "blurry, lowres")
    assert (f["Steps"], f["Sampler"], f["CFG scale"], f["Seed"], f["Size"], f["Clip skip"]) == (
        "3", "DPM++ 2M Karras", "6.5", "1234", "32x40", "2")
    assert f["Lora hashes"].startswith("inked: ") and f["TI hashes"].startswith("glossy: ")


def test_style_stylecode_lora_and_embedding_in_one_generation(world, folders, tmp_path, capsys):
    """All four at once: each changes the image, all are recorded, and --from makes the same pixels."""
    from diffusers import UNet2DConditionModel
    from tiny import PROJ, tiny_stylecodes

    from stylegrad import Style, save_style
    from stylegrad.stylecodes.codec import random_code
    from stylegrad.stylecodes.model import save_stylecodes

    clip_dir, sd_dir = world
    loras, embeddings = folders
    style = save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(2))), tmp_path / "s.safetensors")
    ckpt = save_stylecodes(tiny_stylecodes(UNet2DConditionModel.from_pretrained(sd_dir / "unet")),
                           tmp_path / "sc.safetensors")
    base = ["--model", str(sd_dir), "--clip-model", str(clip_dir), "--seed", "4", *SIZE]
    full = ["a glossy (red:1.1) house <lora:inked:0.7>", "--style", str(style), "--style-steps", "2",
            "--stylecode", random_code(3), "--stylecodes-model", str(ckpt), "--loras", str(loras),
            "--embeddings", str(embeddings)]
    assert main(["generate", *full, *base, "--out", str(tmp_path / "all")]) == 0
    (made,) = capsys.readouterr().out.split()
    f = parse_infotext(Image.open(made).info["parameters"])[2]
    assert {"Aesthetic embedding", "Stylecode", "Lora hashes", "TI hashes"} <= set(f)
    assert main(["generate", "--from", made, "--loras", str(loras), "--embeddings", str(embeddings),
                 "--out", str(tmp_path / "again")]) == 0
    (again,) = capsys.readouterr().out.split()
    with Image.open(made) as x, Image.open(again) as y:
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_sdxl_lora_with_sgm_names(tmp_path):
    """A kohya SDXL LoRA (input_blocks names, lora_te1/lora_te2) changes an SDXL generation and leaves the
    pipeline as it was."""
    from ckpt_layout import family_pipeline
    from test_merge import _kohya_for

    pipe = family_pipeline("sdxl")
    lora = _kohya_for(pipe, tmp_path / "xl.safetensors", sgm_names=True)
    before = {k: v.clone() for part in ("unet", "text_encoder", "text_encoder_2")
              for k, v in getattr(pipe, part).state_dict().items()}
    gen = Generator(pipe)
    request = GenerationRequest("a house", steps=2, seed=1, width=32, height=32)
    (plain, _), = gen.images(request)
    (styled, text), = gen.images(GenerationRequest("a house", steps=2, seed=1, width=32, height=32,
                                                   loras=(f"{lora}:1.0",)))
    (again, _), = gen.images(request)
    assert np.array_equal(np.asarray(plain), np.asarray(again)) and not np.array_equal(np.asarray(plain),
                                                                                         np.asarray(styled))
    after = {k: v for part in ("unet", "text_encoder", "text_encoder_2")
             for k, v in getattr(pipe, part).state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in after.items())
    assert "Lora hashes" in parse_infotext(text)[2]


def test_sdxl_textual_inversion_from_a_folder(tmp_path):
    """An SDXL embedding (clip_l + clip_g) from the embeddings folder acts on an SDXL generation and is recorded;
    an SD1.x embedding in the same folder is listed as skipped."""
    from ckpt_layout import family_pipeline

    pipe = family_pipeline("sdxl")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"clip_l": torch.randn(2, 32) * 0.1, "clip_g": torch.randn(2, 32) * 0.1},
              str(folder / "xlword.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, folder / "sd1word.pt")
    request = GenerationRequest("a xlword house", steps=2, seed=1, width=32, height=32)
    with pytest.warns(UserWarning, match="sd1word skipped"):
        (with_word, text), = Generator(pipe, embeddings_dirs=[str(folder)]).images(request)
    (without, _), = Generator(pipe).images(request)
    assert not np.array_equal(np.asarray(with_word), np.asarray(without))
    assert parse_infotext(text)[2]["TI hashes"].startswith("xlword: ")
