"""Generation metadata in PNGs: what each tool writes is read back, and stylegrad's own text round-trips."""

import hashlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager

from stylegrad import read_generation_info
from stylegrad.apps.cli import main
from stylegrad.files.hashes import short_hash
from stylegrad.files.infotext import format_infotext, parse_infotext

PNGS = [  # (file, tool, a parameter that must be read, its value)
    ("automatic1111_cropped.png", "automatic1111", "Seed", "235284042"),
    ("text_after_idat.png", "automatic1111", "Sampler", "UniPC"),  # the chunk after the image data
    ("img2img_cropped.png", "comfyui", "model", "v1-5-pruned-emaonly.ckpt"),
    ("lora.png", "comfyui", "sampler_name", "euler"),
    ("novelai1_cropped.png", "novelai", "sampler", "k_euler_ancestral"),
]


@pytest.mark.parametrize("name,tool,key,value", PNGS, ids=[p[0] for p in PNGS])
def test_each_tools_metadata_is_read(shared, name, tool, key, value):
    path = shared / "community" / "png" / name
    info = read_generation_info(path)
    theirs = ParserManager().parse(path)  # a well-kept reader, as a second opinion on prompt and negative
    assert info.tool == tool and str(info.parameters[key]) == value
    assert info.prompt == theirs.samplers[0].prompts[0].value.strip()
    assert info.negative == theirs.samplers[0].negative_prompts[0].value.strip()


def test_comfyui_loras_and_embeddings(shared, tmp_path):
    info = read_generation_info(shared / "community" / "png" / "lora.png")
    assert info.loras == [{"name": "epiNoiseoffset_v2.safetensors", "strength_model": 1.0, "strength_clip": 1.0}]
    graph = ('{"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat, embedding:EasyNegative", "clip": ["4", 1]}},'
             ' "2": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 9, "positive": ["1", 0],'
             ' "negative": ["1", 0]}}}')
    meta = PngInfo()
    meta.add_text("prompt", graph)
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png", pnginfo=meta)
    info = read_generation_info(tmp_path / "c.png")
    assert info.embeddings == ["EasyNegative"] and info.parameters == {"seed": 3, "steps": 9}


def test_kohya_sd_scripts_metadata(tmp_path):
    meta = PngInfo()
    for k, v in {"prompt": "a castle", "negative-prompt": "blurry", "seed": "7", "sampler": "euler_a",
                 "steps": "28", "scale": "7.5"}.items():
        meta.add_text(k, v)
    Image.new("RGB", (4, 4)).save(tmp_path / "k.png", pnginfo=meta)
    info = read_generation_info(tmp_path / "k.png")
    assert (info.tool, info.prompt, info.negative) == ("kohya", "a castle", "blurry")
    assert info.parameters == {"seed": "7", "sampler": "euler_a", "steps": "28", "scale": "7.5"}


def test_no_metadata_is_none_and_info_says_so(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_generation_info(tmp_path / "plain.png") is None
    assert main(["info", str(tmp_path / "plain.png")]) == 0
    assert "kind:    image (png)" in capsys.readouterr().out


def test_infotext_round_trip_quotes_what_needs_it():
    fields = {"Steps": 20, "Stylecode": "Abc::2 Def::1", "Aesthetic text": 'a "quoted", text', "Seed": 3}
    text = format_infotext("a cat,\nin two lines", "ugly: very", fields)
    prompt, negative, back = parse_infotext(text)
    assert (prompt, negative) == ("a cat,\nin two lines", "ugly: very")
    assert back == {k: str(v) for k, v in fields.items()}


def test_model_hash_is_a1111s_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEGRAD_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    assert short_hash(model) == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert (tmp_path / "cache" / "hashes.json").is_file()
    import stylegrad.files.hashes as hashes

    monkeypatch.setattr(hashes.hashlib, "sha256", lambda: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert short_hash(model) == hashlib.new("sha256", model.read_bytes()).hexdigest()[:10]  # from the cache
