"""Style files: the published embeddings load; everything else is refused with a reason; writing round-trips."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stylegrad import Style, StylegradError, inspect_file, load_style, mix_styles, save_style
from stylegrad.apps.cli import main

PUBLISHED = ["aivazovsky", "cloudcore", "fantasy", "flower_plant", "gloomcore", "glowwave", "laion_7plus",
             "sac_8plus", "watercolor"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_embeddings_load_on_cpu(shared, name):
    path = shared / "aesthetic_embeddings" / f"{name}.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True).float().reshape(-1)
    style = load_style(path)
    assert style.width == 768
    assert style.vector.dtype == torch.float32 and style.vector.device.type == "cpu"
    assert torch.allclose(style.vector, raw)  # stored as read, whatever its dtype, shape and device
    assert abs(float(style.direction.norm()) - 1.0) < 1e-5
    style.check_width(768)
    with pytest.raises(StylegradError, match=r"768-wide .* 1024-wide"):
        style.check_width(1024)


class Boom:
    """Unpickling this would run code (create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _write_bad(kind: str, tmp: Path) -> Path:
    vec = torch.randn(768)
    if kind == "a1111-ti":
        p = tmp / "ti.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(4, 768)},
                    "name": "ti", "step": 100}, p)
    elif kind == "diffusers-ti":
        p = tmp / "learned_embeds.bin"
        torch.save({"<cat-toy>": vec}, p)
    elif kind == "lora":
        p = tmp / "lora.safetensors"
        save_file({"lora_unet_down.lora_down.weight": torch.randn(4, 320),
                   "lora_unet_down.lora_up.weight": torch.randn(320, 4)}, str(p))
    elif kind == "checkpoint":
        p = tmp / "model.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.x": torch.randn(3)}}, p)
    elif kind == "pickle":
        p = tmp / "evil.pt"
        with open(p, "wb") as f:
            pickle.dump(Boom(tmp / "marker"), f)
    elif kind == "truncated":
        p = tmp / "cut.pt"
        torch.save(vec, p)
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "nan":
        p = tmp / "nan.pt"
        torch.save(torch.full((1, 768), float("nan")), p)
    elif kind == "zero":
        p = tmp / "zero.safetensors"
        save_file({"v": torch.zeros(768)}, str(p))
    elif kind == "many":
        p = tmp / "many.pt"
        torch.save(torch.randn(5, 768), p)
    elif kind == "text":
        p = tmp / "notes.pt"
        p.write_text("hello, not a tensor")
    elif kind == "empty":
        p = tmp / "empty.safetensors"
        p.write_bytes(b"")
    elif kind == "list":
        p = tmp / "list.pt"
        torch.save([1, 2, 3], p)
    return p


BAD = [  # (case, expected kind, expected words in the message)
    ("a1111-ti", "textual-inversion", "textual-inversion embedding with 4 vector"),
    ("diffusers-ti", "textual-inversion", "textual-inversion embedding for the token '<cat-toy>'"),
    ("lora", "lora", "a LoRA"),
    ("checkpoint", "checkpoint", "Stable Diffusion checkpoint"),
    ("pickle", "other", "does not unpickle arbitrary objects"),
    ("truncated", "corrupt", "truncated or corrupt"),
    ("nan", "style", "NaN or infinite"),
    ("zero", "style", "all zeros"),
    ("many", "tensor", "5 vectors, not one style"),
    ("text", "corrupt", "truncated or corrupt"),
    ("empty", "corrupt", "empty"),
    ("list", "other", "holds a list"),
]


@pytest.mark.parametrize("case,kind,message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_refused_with_a_reason(tmp_path, case, kind, message):
    path = _write_bad(case, tmp_path)
    info = inspect_file(path)
    assert info.kind == kind and not info.usable
    with pytest.raises(StylegradError) as err:
        load_style(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()  # nothing was executed


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(StylegradError, match="no such file"):
        load_style(tmp_path / "nope.pt")
    with pytest.raises(StylegradError, match="is a folder"):
        load_style(tmp_path)


def test_safetensors_round_trip_keeps_metadata(tmp_path):
    style = Style(torch.randn(768), {"encoder": "openai/clip-vit-large-patch14", "num_images": "3"}, "mine")
    path = save_style(style, tmp_path / "mine.safetensors")
    back = load_style(path)
    assert torch.equal(back.vector, style.vector)
    assert back.name == "mine" and back.metadata["encoder"] == "openai/clip-vit-large-patch14"
    assert back.metadata["width"] == "768" and back.metadata["num_images"] == "3"
    assert "stylegrad_version" in back.metadata and back.digest == style.digest
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pt_format_is_a_bare_fp32_tensor_the_reference_code_loads(tmp_path):
    style = Style(torch.randn(1024))
    path = save_style(style, tmp_path / "x.pt", format="pt")
    raw = torch.load(path, weights_only=True)  # what the reference repo and the A1111 extension do
    assert isinstance(raw, torch.Tensor) and raw.shape == (1, 1024) and raw.dtype == torch.float32
    assert torch.equal(raw[0], style.vector)


def test_mix_is_a_normalised_weighted_mean(shared):
    a = load_style(shared / "aesthetic_embeddings" / "aivazovsky.pt")
    b = load_style(shared / "aesthetic_embeddings" / "laion_7plus.pt")  # norm 0.54 vs 15: scale must not matter
    mixed = mix_styles([(a, 0.7), (b, 0.3)])
    expected = 0.7 * a.vector / a.vector.norm() + 0.3 * b.vector / b.vector.norm()
    assert torch.allclose(mixed.vector, expected / expected.norm(), atol=1e-6)
    half = mix_styles([(a, 1.0), (b, 1.0)], use_slerp=True)
    assert torch.allclose(half.vector, mix_styles([(a, 1.0), (b, 1.0)]).vector, atol=1e-5)  # midpoint
    end = mix_styles([(a, 0.0), (b, 1.0)], use_slerp=True)
    assert torch.allclose(end.vector, b.direction, atol=1e-5)
    with pytest.raises(StylegradError, match="different widths"):
        mix_styles([(a, 1.0), (Style(torch.randn(1024)), 1.0)])
    with pytest.raises(StylegradError, match="exactly two"):
        mix_styles([(a, 1.0), (b, 1.0), (a, 1.0)], use_slerp=True)


def test_cli_mix_and_info(shared, tmp_path, capsys):
    emb = shared / "aesthetic_embeddings"
    out = tmp_path / "mix.safetensors"
    assert main(["mix", f"{emb / 'watercolor.pt'}:0.7", f"{emb / 'fantasy.pt'}:0.3", "-o", str(out)]) == 0
    assert load_style(out).width == 768
    lora = _write_bad("lora", tmp_path)
    capsys.readouterr()
    assert main(["info", str(out), str(emb / "sac_8plus.pt"), str(lora), "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["kind"] for i in infos] == ["style", "style", "lora"]
    assert infos[0]["metadata"]["format"] == "stylegrad.style" and abs(infos[0]["norm"] - 1) < 1e-5
    assert infos[1]["dtype"] == "float32" and infos[1]["shape"] == [768] and abs(infos[1]["norm"] - 3.26) < 0.01
    assert main(["info", str(emb / "watercolor.pt")]) == 0
    text = capsys.readouterr().out
    assert "float16" in text and "(1, 768)" in text and "768-wide" in text


def test_cli_refuses_bad_style_with_one_line(tmp_path, capsys):
    bad = _write_bad("a1111-ti", tmp_path)
    assert main(["mix", str(bad), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "textual-inversion" in err and len(err.splitlines()) == 1
