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
    ("a1111-ti", "textual-inversion", "textual-inversion embedding (a1111) with 4 vector"),
    ("diffusers-ti", "textual-inversion", "textual-inversion embedding (diffusers)"),
    ("lora", "lora", "LoRA"),
    ("checkpoint", "checkpoint", "Stable Diffusion checkpoint"),
    ("pickle", "other", "stylegrad loads plain tensors only"),
    ("truncated", "other", "truncated or corrupt"),
    ("nan", "style", "NaN or infinite"),
    ("zero", "style", "all zeros"),
    ("many", "other", "5 vectors"),
    ("text", "other", "a text file"),
    ("empty", "other", "empty"),
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


def test_mix_is_a_normalized_weighted_mean(shared):
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


COMMUNITY = [  # (file under community/, kind, format, family, width, vectors)
    ("textual_inversion/bad_prompt_version2.pt", "textual-inversion", "a1111", "sd1", 768, 8),
    ("textual_inversion/eastonhill_embeddings.pt", "textual-inversion", "a1111", "sd1", 768, 1),
    ("textual_inversion/Birch-san_embeddings.pt", "textual-inversion", "a1111", "sd1", 768, 1),
    ("textual_inversion/test_embedding.safetensors", "textual-inversion", "kohya", "sd1", 768, 5),
    ("textual_inversion/fastai_learned_embeds.bin", "textual-inversion", "diffusers", "sd1", 768, 1),
    ("textual_inversion/lora_kiriko2.ti.pt", "textual-inversion", "diffusers", "sd1", 768, 1),
    ("lora/catundchat_pytorch_lora_weights.safetensors", "lora", "diffusers-attn-procs", "sd1", None, None),
    ("lora/catundchat_pytorch_lora_weights.bin", "lora", "diffusers-attn-procs", "sd1", None, None),
    ("lora/adapter_model.safetensors", "lora", "peft", "sd1", None, None),
    ("lora/lora_disney.safetensors", "lora", "lora-diffusion", "sd1", None, None),
    ("lora/analog_svd_rank4.safetensors", "lora", "lora-diffusion", "sd1", None, None),
    ("lora/lora_pop.pt", "lora", "lora-diffusion-list", None, None, None),
    ("lora/adapter_config.json", "other", "json", None, None, None),
    ("png/automatic1111_cropped.png", "image", "png", None, None, None),
    ("aesthetic/ainightbirds.pt", "style", "a1111", "sd1", 768, None),
]


@pytest.mark.parametrize("name,kind,fmt,family,width,vectors", COMMUNITY, ids=[c[0] for c in COMMUNITY])
def test_the_files_people_share_are_named(shared, name, kind, fmt, family, width, vectors):
    info = inspect_file(shared / "community" / name)
    assert (info.kind, info.format, info.family, info.width, info.vectors) == (kind, fmt, family, width, vectors)
    if kind == "textual-inversion":
        assert info.trigger == Path(name).stem and info.shape[-1] == 768 and info.dtype == "float32"
    if kind != "style":  # refused, saying what the file is
        with pytest.raises(StylegradError) as err:
            load_style(shared / "community" / name)
        said = {"textual-inversion": "textual-inversion", "lora": "lora", "other": "JSON", "image": "PNG image"}[kind]
        assert said.lower() in str(err.value).lower() and info.detail in str(err.value)


def test_a1111_embedding_fields(shared):
    info = inspect_file(shared / "community" / "textual_inversion" / "bad_prompt_version2.pt")
    assert (info.name, info.step, info.trigger) == ("bad_prompt_version2", 12000, "bad_prompt_version2")


def _written_formats(tmp: Path) -> list[tuple[Path, str, str, str | None]]:
    """Formats with no small shared file, written with their documented key names."""
    out = []
    r = 4

    def save(name, tensors, meta=None):
        p = tmp / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta)
        return p

    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    out.append((save("kohya.safetensors", {f"{te}.lora_down.weight": torch.randn(r, 768),
                                           f"{te}.lora_up.weight": torch.randn(768, r), f"{te}.alpha": torch.tensor(4.0)}),
                "lora", "kohya", "sd1"))
    unet = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    out.append((save("sdxl_kohya.safetensors", {f"{unet}.lora_down.weight": torch.randn(r, 2048),
                                                f"{unet}.lora_up.weight": torch.randn(640, r),
                                                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                torch.randn(r, 1280)}), "lora", "kohya", "sdxl"))
    out.append((save("loha.safetensors", {f"{te}.hada_w1_a": torch.randn(768, r), f"{te}.hada_w1_b": torch.randn(r, 768),
                                          f"{te}.hada_w2_a": torch.randn(768, r), f"{te}.hada_w2_b": torch.randn(r, 768)}),
                "lora", "lycoris-loha", "sd1"))
    out.append((save("lokr.safetensors", {f"{te}.lokr_w1": torch.randn(8, 8), f"{te}.lokr_w2": torch.randn(96, 96)}),
                "lora", "lycoris-lokr", None))
    out.append((save("locon.safetensors", {f"{te}.lora_down.weight": torch.randn(r, 768),
                                           f"{te}.lora_up.weight": torch.randn(768, r)},
                     {"ss_network_module": "lycoris.kohya"}), "lora", "lycoris-locon", "sd1"))
    out.append((save("sdxl_emb.safetensors", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}),
                "textual-inversion", "sdxl", "sdxl"))
    out.append((save("sd15.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
                                          "cond_stage_model.transformer.text_model.final_layer_norm.weight":
                                          torch.ones(768)}), "checkpoint", "original", "sd1"))
    out.append((save("sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
                                          "conditioner.embedders.1.model.ln_final.weight": torch.ones(1280)}),
                "checkpoint", "original", "sdxl"))
    return out


def test_formats_written_by_other_tools_are_named(tmp_path):
    for path, kind, fmt, family in _written_formats(tmp_path):
        info = inspect_file(path)
        assert (info.kind, info.format, info.family) == (kind, fmt, family), path.name
        assert info.dtype == "float32" and not info.usable
    sdxl = inspect_file(tmp_path / "sdxl_emb.safetensors")
    assert sdxl.widths == [768, 1280] and sdxl.vectors == 2


def test_info_json_and_text_for_refused_files(shared, tmp_path, capsys):
    from stylegrad.apps.cli import main

    ti = shared / "community" / "textual_inversion" / "test_embedding.safetensors"
    long_meta = tmp_path / "kohya_lora.safetensors"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": torch.randn(4, 768), f"{te}.lora_up.weight": torch.randn(768, 4)},
              str(long_meta), metadata={"ss_tag_frequency": "x" * 15000})
    png = shared / "community" / "png" / "automatic1111_cropped.png"
    assert main(["info", str(ti), str(long_meta), str(png), str(tmp_path / "missing.pt"), "--json"]) == 1
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [r["kind"] for r in rows] == ["textual-inversion", "lora", "image"]
    assert rows[0]["shape"] == [5, 768] and rows[0]["dtype"] == "float32" and rows[0]["width"] == 768
    assert rows[0]["trigger"] == "test_embedding" and rows[0]["format"] == "kohya"
    assert rows[2]["generation"]["tool"] == "automatic1111" and rows[2]["generation"]["prompt"]
    assert "no such file" in out.err and len(out.err.strip().splitlines()) == 1
    assert main(["info", str(long_meta)]) == 0
    text = capsys.readouterr().out
    assert "(15000 characters)" in text and len(text) < 2000


@pytest.mark.parametrize("command", ["info", "load", "mix", "score", "generate"])
def test_kohya_embedding_is_one_clear_line_everywhere(shared, tmp_path, capsys, command):
    """The file that crashed every command ('Boolean value of Tensor...') is named in each of them."""
    from stylegrad.apps.cli import main

    ti = str(shared / "community" / "textual_inversion" / "test_embedding.safetensors")
    if command == "load":
        with pytest.raises(StylegradError, match="textual-inversion embedding"):
            load_style(ti)
        return
    args = {"info": ["info", ti], "mix": ["mix", ti, "-o", str(tmp_path / "m.safetensors")],
            "score": ["score", ti, "--predictor", str(shared / "aesthetic_predictors" /
                                                    "sac_public_2022_06_29_vit_l_14_linear.pth")],
            "generate": ["generate", "x", "--style", ti]}[command]
    code = main(args)
    err = capsys.readouterr().err.strip()
    if command == "info":
        assert code == 0
    else:
        assert code == 1 and err.startswith("Error:") and "textual-inversion" in err and len(err.splitlines()) == 1
