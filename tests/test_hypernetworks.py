"""Hypernetworks as A1111 users have them: every file layout A1111 and NovelAI wrote is read as A1111 builds it,
generation equals a plain hand-written attention with A1111's formula (SD1 and SDXL, chained, both readings of
activate_output), the front doors (flags, folders, tags, PNGs, the server) take them, and the trainer writes a file
A1111 loads, resumed exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from stylegrad import GenerationRequest, Generator
from stylegrad.addons.hypernetworks.formats import read_hypernetwork
from stylegrad.errors import StylegradError
from stylegrad.files.infotext import parse_infotext

SIZE = dict(steps=2, width=32, height=32)
PIXELS = 2  # levels of 255: the reference attention (einsum, softmax) and SDPA round differently


# -- A1111's construction, written out plainly for the tests --------------------------------------------------
ACTS = {"relu": torch.nn.ReLU, "swish": torch.nn.Hardswish, "leakyrelu": torch.nn.LeakyReLU, "tanh": torch.nn.Tanh,
        "mish": torch.nn.Mish, "elu": torch.nn.ELU, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU}


def a1111_sequential(width, structure=(1, 2, 1), act=None, norm=False, dropouts=None, activate_output=False,
                     g=None, scale=0.3):
    """The Sequential A1111's HypernetworkModule makes, with random values (large enough to see)."""
    dropouts = dropouts or [0] * len(structure)
    mods = []
    for i in range(len(structure) - 1):
        mods.append(torch.nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
        if act not in (None, "linear") and (i < len(structure) - 2 or activate_output):
            mods.append(ACTS[act]())
        if norm:
            mods.append(torch.nn.LayerNorm(int(width * structure[i + 1])))
        if dropouts[i + 1] > 0:
            mods.append(torch.nn.Dropout(dropouts[i + 1]))
    seq = torch.nn.Sequential(*mods).eval()
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return seq


def write_a1111(path, widths, settings: dict, seed=0, dropouts_in_layout=None, novelai=False, scale=0.3):
    """A file as A1111 saves one; returns {width: (keys module, values module)} as A1111 would run them."""
    g = torch.Generator().manual_seed(seed)
    s = dict(settings)
    structure = s.get("layer_structure", [1, 2, 1])
    act = s.get("activation_func")
    activate = s.get("activate_output", True) if "reading" not in s else s.pop("reading")
    dropouts = dropouts_in_layout or s.get("dropout_structure")
    modules, payload = {}, {}
    for w in widths:
        pair = tuple(a1111_sequential(w, structure, act, s.get("is_layer_norm", False), dropouts, activate, g, scale)
                     for _ in range(2))
        modules[w] = pair
        states = tuple({f"linear.{k}": v for k, v in m.state_dict().items()} for m in pair)  # A1111's .linear
        if novelai:
            states = tuple({k.replace("linear.0", "linear1").replace("linear.1", "linear2"): v for k, v in st.items()}
                           for st in states)
        payload[w] = states
    torch.save({**payload, **s}, path)
    return modules


# -- the reference: a hand-written attention with A1111's formula -----------------------------------------------
class ReferenceAttention:
    """q from x; the context (x for self-attention) through each hypernetwork's K and V modules in turn,
    ``c + h(c)·m``; then softmax(q kᵀ · scale) v by hand."""

    def __init__(self, chains):
        self.chains = chains  # [(modules by width, multiplier)]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        x = hidden_states
        c = x if encoder_hidden_states is None else encoder_hidden_states
        ck, cv = c, c
        for modules, mult in self.chains:
            if c.shape[-1] in modules:
                hk, hv = modules[c.shape[-1]]
                ck = ck + hk(ck) * mult
                cv = cv + hv(cv) * mult
        q, k, v = attn.to_q(x), attn.to_k(ck), attn.to_v(cv)
        b, n, _ = q.shape
        h = attn.heads
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * attn.scale, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", w, v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def reference_pipe(pipe, chains):
    ref = copy.deepcopy(pipe)
    ref.unet.set_attn_processor(ReferenceAttention(chains))
    return ref


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def untouched(pipe, before) -> bool:
    state = pipe.unet.state_dict()
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())
    return not hooks and all(torch.equal(before[k], state[k]) for k in before)


# -- reading --------------------------------------------------------------------------------------------------
LAYOUTS = {
    "a1111 default": {"layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
                      "activate_output": False},
    "relu, output activated": {"layer_structure": [1, 2, 1], "activation_func": "relu", "activate_output": True},
    "swish with layer norm": {"layer_structure": [1, 1.5, 1], "activation_func": "swish", "is_layer_norm": True,
                              "activate_output": False},
    "old dropout flags": {"layer_structure": [1, 2, 2, 1], "activation_func": "leakyrelu", "use_dropout": True,
                          "last_layer_dropout": True, "activate_output": False},
    "dropout structure": {"layer_structure": [1, 2, 2, 1], "activation_func": "tanh", "use_dropout": True,
                          "dropout_structure": [0, 0.1, 0.2, 0], "is_layer_norm": True},
    "activation None": {"layer_structure": [1, 2, 1], "activation_func": None},
    "torch class name": {"layer_structure": [1, 2, 1], "activation_func": "mish", "activate_output": True},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_reads_as_a1111_builds_it(tmp_path, name):
    settings = dict(LAYOUTS[name], name=name, step=120, sd_checkpoint="abcdef1234", sd_checkpoint_name="tiny")
    layout_dropouts = None
    if name == "old dropout flags":
        layout_dropouts = [0, 0.3, 0.3, 0]  # A1111: 0.3 after hidden layers, the last one with last_layer_dropout
    ref = write_a1111(tmp_path / "h.pt", [16, 32], settings, dropouts_in_layout=layout_dropouts)
    f = read_hypernetwork(tmp_path / "h.pt")
    assert f.widths == [16, 32] and f.settings.step == 120 and f.name == "h"
    x = torch.randn(2, 5, 32)
    from stylegrad.addons.hypernetworks.network import residual

    for i in (0, 1):
        torch.testing.assert_close(residual(f.modules[32][i], x, 0.6), x + ref[32][i](x) * 0.6)


def test_novelai_originals_read_as_1_2_1_without_activation(tmp_path):
    ref = write_a1111(tmp_path / "nai.pt", [16, 32], {}, novelai=True)
    f = read_hypernetwork(tmp_path / "nai.pt")
    assert f.novelai and f.settings.layer_structure == (1, 2, 1) and f.settings.activation == "linear"
    x = torch.randn(1, 3, 16)
    from stylegrad.addons.hypernetworks.network import residual

    torch.testing.assert_close(residual(f.modules[16][1], x, 1.0), x + ref[16][1](x))


def test_activate_output_a1111_reads_on_and_comfyui_off_when_the_file_is_silent(tmp_path):
    settings = {"layer_structure": [1, 2, 1], "activation_func": "relu"}  # an early A1111 file: no activate_output
    on = write_a1111(tmp_path / "h.pt", [16], {**settings, "reading": True}, seed=1)
    off = write_a1111(tmp_path / "same.pt", [16], {**settings, "reading": False}, seed=1)  # same values
    x = torch.randn(1, 4, 16)
    from stylegrad.addons.hypernetworks.network import residual

    a1111 = residual(read_hypernetwork(tmp_path / "h.pt").modules[16][0], x, 1.0)
    comfy = residual(read_hypernetwork(tmp_path / "h.pt", "comfyui").modules[16][0], x, 1.0)
    torch.testing.assert_close(a1111, x + on[16][0](x))
    torch.testing.assert_close(comfy, x + off[16][0](x))
    assert not torch.allclose(a1111, comfy)
    stated = write_a1111(tmp_path / "stated.pt", [16], {**settings, "activate_output": True}, seed=1)
    torch.testing.assert_close(residual(read_hypernetwork(tmp_path / "stated.pt", "comfyui").modules[16][0], x, 1.0),
                               x + stated[16][0](x))  # a file that says it is read as it says


@pytest.mark.parametrize("case,payload,message", [
    ("not a dict", [1, 2], "not a hypernetwork file"),
    ("no widths", {"name": "x"}, "no context width keys"),
    ("not a pair", {16: ({},)}, "not a pair of modules"),
    ("wrong layout", {16: ({"linear.0.weight": torch.zeros(32, 16), "linear.0.bias": torch.zeros(32),
                            "linear.2.weight": torch.zeros(16, 32), "linear.2.bias": torch.zeros(16)},) * 2},
     "do not fit its settings"),
    ("not A1111's keys", {16: ({"0.weight": torch.zeros(32, 16)},) * 2}, "A1111's are linear.N"),
    ("bad structure", {16: ({}, {}), "layer_structure": [2, 1]}, "layer_structure must start and end with 1"),
    ("unknown activation", {16: ({}, {}), "activation_func": "wobble"}, "activation_func 'wobble'"),
])
def test_bad_files_are_one_line(tmp_path, case, payload, message):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(StylegradError, match=message) as e:
        read_hypernetwork(tmp_path / "bad.pt")
    assert "\n" not in str(e.value) and "bad.pt" in str(e.value)


def test_code_in_the_pickle_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("boom",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({16: Evil()}))
    with pytest.raises(StylegradError, match="evil.pt"):
        read_hypernetwork(tmp_path / "evil.pt")


# -- generation equals the reference ---------------------------------------------------------------------------
def _two_files(folder, widths):
    """Two hypernetworks for the model's widths: one with activation, layer norm and no activate_output key (an
    early A1111 file: A1111 activates the output), one NovelAI original."""
    folder.mkdir(exist_ok=True)
    first = write_a1111(folder / "inked.pt", widths, {"layer_structure": [1, 2, 1], "activation_func": "swish",
                                                     "is_layer_norm": True, "reading": True}, seed=1)
    second = write_a1111(folder / "nai.pt", widths, {}, seed=2, novelai=True)
    return first, second


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_generation_equals_a_hand_written_attention_with_a1111s_formula(pipe, tmp_path, family):
    if family == "sdxl":
        from ckpt_layout import family_pipeline

        pipe = family_pipeline("sdxl", seed=1)
    widths = sorted({m.to_k.in_features for m in pipe.unet.modules() if hasattr(m, "to_k")})
    first, second = _two_files(tmp_path / "hn", widths)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    gen = Generator(pipe, hypernetworks_dirs=[str(tmp_path / "hn")])
    prompt = "a red house"
    request = GenerationRequest(f"{prompt} <hypernet:inked:0.7>", seed=3, hypernetworks=(str(tmp_path / "hn" /
                                                                                       "nai.pt:-0.4"),), **SIZE)
    (ours, text), = gen.images(request)
    assert untouched(pipe, before)
    ref = reference_pipe(pipe, [(second, -0.4), (first, 0.7)])  # the flag's first, then the prompt's tags
    (expected, _), = Generator(ref).images(GenerationRequest(prompt, seed=3, **SIZE))
    (plain, _), = Generator(pipe).images(GenerationRequest(prompt, seed=3, **SIZE))
    assert np.abs(pixels(ours) - pixels(expected)).max() <= PIXELS
    assert np.abs(pixels(ours) - pixels(plain)).mean() > 4 * PIXELS  # the hypernetworks act
    f = parse_infotext(text)[2]
    assert f["Hypernet hashes"].startswith("nai: ") and ", inked: " in f["Hypernet hashes"]
    from stylegrad.files.hashes import sha256_file

    assert f"inked: {sha256_file(tmp_path / 'hn' / 'inked.pt')[:10]}" in f["Hypernet hashes"]


def test_comfyui_reading_of_a_silent_file(pipe, tmp_path):
    folder = tmp_path / "hn"
    folder.mkdir()
    off = write_a1111(folder / "h.pt", [16, 32], {"activation_func": "relu", "reading": False}, seed=4)
    request = GenerationRequest("a red house <hypernet:h>", seed=1, hypernetwork_reading="comfyui", **SIZE)
    (ours, text), = Generator(pipe, hypernetworks_dirs=[str(folder)]).images(request)
    (expected, _), = Generator(reference_pipe(pipe, [(off, 1.0)])).images(GenerationRequest("a red house", seed=1,
                                                                                              **SIZE))
    assert np.abs(pixels(ours) - pixels(expected)).max() <= PIXELS
    assert parse_infotext(text)[2]["Hypernet reading"] == "comfyui"
    (a1111, _), = Generator(pipe, hypernetworks_dirs=[str(folder)]).images(
        GenerationRequest("a red house <hypernet:h>", seed=1, **SIZE))
    assert np.abs(pixels(a1111) - pixels(ours)).max() > PIXELS


def test_composed_with_a_style_a_lora_and_an_embedding(clip, tmp_path):
    """The hypernetwork acts on the keys' and values' input, the LoRA on their output, the embedding and the style on
    the text: all in one generation, and equal to the reference attention running the same LoRA, embedding and
    style."""
    from test_addons_generate import write_kohya
    from tiny import PROJ, tiny_pipeline

    from stylegrad import Style, save_style

    pipe = tiny_pipeline(clip)
    (loras := tmp_path / "Lora").mkdir()
    (embeddings := tmp_path / "embeddings").mkdir()
    write_kohya(loras / "lines.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32) * 0.05}, "name": "glossy"}, embeddings / "glossy.pt")
    (hn := tmp_path / "hn").mkdir()
    ref_modules = write_a1111(hn / "h.pt", [16, 32], {"activation_func": "relu", "activate_output": False}, seed=5)
    style = save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(2))), tmp_path / "s.safetensors")
    from stylegrad.aesthetic.options import StyleOptions

    options = StyleOptions(steps=2)
    dirs = dict(embeddings_dirs=[str(embeddings)], loras_dirs=[str(loras)])
    common = dict(seed=2, style=str(style), style_options=options, **SIZE)
    prompt = "a glossy red house <lora:lines:0.8>"
    gen = Generator(pipe, clip_model=clip, hypernetworks_dirs=[str(hn)], **dirs)
    (ours, text), = gen.images(GenerationRequest(prompt + " <hypernet:h:0.9>", **common))
    ref = Generator(reference_pipe(pipe, [(ref_modules, 0.9)]), clip_model=clip, **dirs)
    (expected, _), = ref.images(GenerationRequest(prompt, **common))
    (without, _), = gen.images(GenerationRequest(prompt, **common))
    assert np.abs(pixels(ours) - pixels(expected)).max() <= PIXELS
    assert np.abs(pixels(ours) - pixels(without)).mean() > 4 * PIXELS
    f = parse_infotext(text)[2]
    assert {"Aesthetic embedding", "Lora hashes", "TI hashes", "Hypernet hashes"} <= set(f)


# -- training --------------------------------------------------------------------------------------------------
FAST = dict(resolution=32, batch_size=2, grad_accum=1, checkpoint_every=2)


def test_trained_file_is_a1111s_reads_back_applies_and_resumes_exactly(world, pictures, tmp_path):
    from stylegrad.addons.hypernetworks.network import Applied, HypernetworkStack
    from stylegrad.files.hashes import short_hash
    from stylegrad.files.pickles import load_pickle
    from stylegrad.training.hypernetwork import train_hypernetwork

    def run(out, stop_after=None):
        return train_hypernetwork([str(pictures)], out, model=str(world[1]), device="cpu", progress=False, steps=4,
                                  lr=1e-3, activation="relu", layer_norm=True, layer_structure=(1, 2, 2, 1),
                                  dropout_structure=(0, 0.2, 0.1, 0), stop_after=stop_after, **FAST)

    whole = run(tmp_path / "a" / "ink.pt")
    assert [p.name for p in whole] == ["ink.pt", "ink.pt.optim"]
    run(tmp_path / "b" / "ink.pt", stop_after=2)
    resumed = run(tmp_path / "b" / "ink.pt")
    a, b = (load_pickle(paths[0]) for paths in (whole, resumed))
    widths = [k for k in a if isinstance(k, int)]
    assert widths and all(torch.equal(a[w][i][k], b[w][i][k]) for w in widths for i in (0, 1) for k in a[w][i])
    assert a["step"] == 4 and a["name"] == "ink" and a["layer_structure"] == [1.0, 2.0, 2.0, 1.0]
    assert a["dropout_structure"] == [0.0, 0.2, 0.1, 0.0] and a["use_dropout"] and a["last_layer_dropout"]
    assert a["activation_func"] == "relu" and a["is_layer_norm"] and a["activate_output"] is False
    optim = load_pickle(whole[1])
    assert optim["hash"] == short_hash(whole[0]) and optim["optimizer_name"] == "AdamW"
    assert len(optim["optimizer_state_dict"]["state"]) == sum(len(a[w][i]) for w in widths for i in (0, 1))

    f = read_hypernetwork(whole[0])
    assert f.widths == sorted(widths) and f.settings.step == 4
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(world[1] / "unet").eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
        with HypernetworkStack(unet, [Applied(f, 1.0)]).applied():
            ours = unet(x, t, ctx).sample
        unet.set_attn_processor(ReferenceAttention([(f.modules, 1.0)]))
        expected = unet(x, t, ctx).sample
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-7


# -- front doors -----------------------------------------------------------------------------------------------
CLI_SIZE = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "5"]


def test_cli_flag_folder_tag_png_and_from(world, tmp_path, capsys, monkeypatch):
    from stylegrad.apps.cli import main

    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    write_a1111(folder / "inked.pt", [16, 32], {"activation_func": "relu"}, seed=6)
    write_a1111(tmp_path / "loose.pt", [16, 32], {}, seed=7)
    base = ["--model", str(world[1]), *CLI_SIZE]
    assert main(["generate", "a red house <hypernet:inked:0.8>", "--hypernetwork", f"{tmp_path / 'loose.pt'}:0.5",
                 "--hypernetworks", str(folder), *base, "--out", str(tmp_path / "a")]) == 0
    (made,) = capsys.readouterr().out.split()
    f = parse_infotext(Image.open(made).info["parameters"])[2]
    assert f["Hypernet hashes"].startswith("loose: ") and "inked: " in f["Hypernet hashes"]
    assert f["Hypernet files"].endswith("loose.pt:0.5")
    monkeypatch.setenv("STYLEGRAD_HYPERNETWORKS_DIR", str(folder))  # the folder by the environment this time
    assert main(["generate", "--from", made, "--out", str(tmp_path / "b")]) == 0
    (again,) = capsys.readouterr().out.split()
    assert np.array_equal(pixels(Image.open(made)), pixels(Image.open(again)))
    assert main(["generate", "a red house", *base, "--out", str(tmp_path / "c")]) == 0
    (plain,) = capsys.readouterr().out.split()
    assert not np.array_equal(pixels(Image.open(made)), pixels(Image.open(plain)))
    assert main(["generate", "a red house", "--hypernetwork", "nowhere:0.5", *base, "--out", str(tmp_path)]) == 1
    assert "hypernetwork not found: nowhere" in capsys.readouterr().err
    assert main(["generate", "a red house", "--hypernetwork", "inked:50", *base, "--out", str(tmp_path)]) == 1
    assert "multiplier must be a number in -10..10" in capsys.readouterr().err


def test_old_a1111_infotext_lines_mean_the_tag(world, tmp_path, capsys):
    from stylegrad.apps.cli import main
    from stylegrad.pipelines.request import request_from_infotext

    old = "a red house\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 32x32, Hypernet: inked, " \
          "Hypernet strength: 0.6"
    assert request_from_infotext(old).prompt == "a red house<hypernet:inked:0.6>"
    full = old.rsplit(", Hypernet strength", 1)[0]  # strength 1 was not written
    assert request_from_infotext(full).prompt == "a red house<hypernet:inked:1>"
    folder = tmp_path / "hn"
    folder.mkdir()
    write_a1111(folder / "inked.pt", [16, 32], {}, seed=6)
    from stylegrad.files.pnginfo import save_png

    png = save_png(Image.new("RGB", (32, 32)), tmp_path / "old.png", old)
    assert main(["generate", "--from", str(png), "--model", str(world[1]), "--hypernetworks", str(folder),
                 "--out", str(tmp_path / "o")]) == 0
    (made,) = capsys.readouterr().out.split()
    f = parse_infotext(Image.open(made).info["parameters"])[2]
    assert f["Hypernet hashes"].startswith("inked: ")


def test_info_describes_a_hypernetwork(tmp_path):
    from stylegrad import inspect_file

    write_a1111(tmp_path / "x.pt", [320, 768], {"layer_structure": [1, 2, 1], "activation_func": "swish",
                                                "is_layer_norm": True, "activate_output": False, "step": 300,
                                                "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "v1-5"}, scale=0.01)
    info = inspect_file(tmp_path / "x.pt")
    assert (info.kind, info.format, info.step) == ("hypernetwork", "a1111", 300)
    for part in ("layers [1, 2, 1]", "activation swish", "layer norm", "context widths 320, 768", "v1-5 [abcdef0123]"):
        assert part in info.detail
    write_a1111(tmp_path / "nai.pt", [768], {}, novelai=True, scale=0.01)
    assert inspect_file(tmp_path / "nai.pt").format == "novelai"


def test_server_lists_the_folder_and_takes_tags_and_the_field(world, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from stylegrad.apps.serve.app import create_app
    from stylegrad.apps.serve.service import Service
    from stylegrad.apps.serve.settings import ServeSettings

    folder = tmp_path / "hypernetworks"
    (folder / "sub").mkdir(parents=True)
    write_a1111(folder / "sub" / "inked.pt", [16, 32], {}, seed=6)
    torch.save({}, folder / "None.pt")  # A1111 never lists a None.pt
    settings = ServeSettings(hypernetworks_dirs=(str(folder),), ui=False)
    gen = Generator.load(str(world[1]), "cpu", hypernetworks_dirs=[str(folder)])
    with TestClient(create_app(Service(gen, settings))) as c:
        assert c.get("/sdapi/v1/hypernetworks").json() == [{"name": "inked",
                                                            "path": str(folder / "sub" / "inked.pt")}]
        body = {"prompt": "a red house", "seed": 5, "steps": 2, "width": 32, "height": 32}
        plain = c.post("/sdapi/v1/txt2img", json=body).json()
        tagged = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red house <hypernet:inked:0.8>"})
        assert tagged.status_code == 200, tagged.text
        import json

        fields = parse_infotext(json.loads(tagged.json()["info"])["infotexts"][0])[2]
        assert fields["Hypernet hashes"].startswith("inked: ")
        assert plain["images"] != tagged.json()["images"]
        field = c.post("/v1/generate", json={**body, "hypernetworks": ["inked:0.8"]})
        assert field.status_code == 200, field.text
        native_tag = c.post("/v1/generate", json={**body, "prompt": "a red house <hypernet:inked:0.8>"}).json()

        def decoded(answer):
            import base64
            import io

            return pixels(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))

        assert np.array_equal(decoded(field.json()), decoded(native_tag))
        missing = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red house <hypernet:nope:1>"})
        assert missing.status_code == 422 and "nope" in missing.text
        outside = c.post("/v1/generate", json={**body, "hypernetworks": [str(tmp_path / "elsewhere.pt")]})
        assert outside.status_code == 422


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_files_tensors_follow_the_unets_dtype(pipe, tmp_path, dtype):
    """A float32 file on a half UNet: the modules act in the UNet's dtype (moved when they act, not kept), and
    the UNet is left as it was."""
    from stylegrad.addons.hypernetworks.network import Applied, HypernetworkStack

    write_a1111(tmp_path / "h.pt", [16, 32], {"activation_func": "relu"}, seed=3)
    f = read_hypernetwork(tmp_path / "h.pt")
    unet = pipe.unet.to(dtype)
    seen = []
    unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.register_forward_hook(
        lambda m, args, out: seen.append(args[0].dtype))
    x, t, ctx = torch.randn(1, 4, 8, 8, dtype=dtype), torch.tensor([10]), torch.randn(1, 77, 32, dtype=dtype)
    with torch.no_grad(), HypernetworkStack(unet, [Applied(f, 1.0)]).applied():
        out = unet(x, t, ctx).sample
    assert out.dtype == dtype and seen == [dtype] and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for m in f.modules[32] for p in m.parameters())  # the file's stay as read



def test_the_files_tensors_go_where_the_unet_is(pipe, tmp_path):
    """With the UNet on ``meta`` (CUDA's one-device rule checked by test_lora_devices' OneDevice), the modules run
    there: nothing of the file stays on the CPU, and the file's own tensors are not moved."""
    from test_lora_devices import OneDevice

    from stylegrad.addons.hypernetworks.network import Applied, HypernetworkStack

    write_a1111(tmp_path / "h.pt", [16, 32], {"activation_func": "swish", "is_layer_norm": True}, seed=3)
    f = read_hypernetwork(tmp_path / "h.pt")
    unet = pipe.unet.to(device="meta", dtype=torch.float16)
    x, t, ctx = (torch.randn(1, 4, 8, 8, device="meta", dtype=torch.float16), torch.tensor([10], device="meta"),
                 torch.randn(1, 77, 32, device="meta", dtype=torch.float16))
    with torch.no_grad(), HypernetworkStack(unet, [Applied(f, 1.0)]).applied(), OneDevice():
        out = unet(x, t, ctx).sample
    assert out.device.type == "meta" and out.dtype == torch.float16
    assert all(p.device.type == "cpu" for m in f.modules[16] for p in m.parameters())


def test_cli_trains_a_hypernetwork(world, pictures, tmp_path, capsys):
    from stylegrad.apps.cli import main

    out = tmp_path / "models" / "ink.pt"
    assert main(["train", "hypernetwork", str(pictures), "--out", str(out), "--model", str(world[1]), "--steps", "1",
                 "--lr", "1e-3", "--resolution", "32", "--activation", "swish", "--layer-structure", "1,1.5,1",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out) + ".optim"]
    f = read_hypernetwork(out)
    assert f.settings.layer_structure == (1, 1.5, 1) and f.settings.activation == "swish" and f.settings.step == 1
    assert f.settings.sd_checkpoint_name == "sd"
