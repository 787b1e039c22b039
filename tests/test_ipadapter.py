"""IP-Adapter and InstantStyle (stylegrad/addons/ipadapter) on tiny SD1.x and SDXL pipelines with tiny adapter
files written in the published layouts (``image_proj.*``, ``ip_adapter.N.to_k_ip/to_v_ip``; plus's Resampler)
and a tiny CLIP vision encoder saved as a folder: the image equals diffusers' own ``load_ip_adapter`` pipeline,
InstantStyle's scales equal ``set_ip_adapter_scale``'s, it composes with a style and a LoRA, a PNG makes the same
pixels again, refusals are one line, and the user's pipeline is left bit-identical."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny import HIDDEN, PROJ, tiny_clip, tiny_pipeline
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from stylegrad import GenerationRequest, Generator
from stylegrad.addons.ipadapter.blocks import chosen_blocks, scale_config
from stylegrad.addons.ipadapter.files import read_adapter
from stylegrad.addons.ipadapter.run import IPAdapters
from stylegrad.addons.ipadapter.shapes import adapter_shape
from stylegrad.aesthetic.options import StyleOptions
from stylegrad.errors import RequestError, StylegradError
from stylegrad.files.infotext import parse_infotext

ENCODER_WIDTH = 32  # the tiny vision tower's hidden width: what plus adapters read
POOLED = PROJ  # its image_embeds' width: what base adapters read
STEPS = 1  # one denoising step shows every difference these tests look for, at half the time


# -- tiny models in the layouts the published files have ---------------------------------------------------------
def _sd1_unet(seed=0):
    """SD1.x's UNet layout (four blocks, two transformers down and three up, attention in down 0-2 and up 1-3)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 8, 16, 16), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=HIDDEN, norm_num_groups=4,
        attention_head_dim=2).eval()


def _sdxl_unet(seed=0):
    """SDXL's UNet layout (three blocks, attention in down 1-2 and up 0-1), with its added embeddings."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    cfg = json.loads((Path(__file__).parent / "checkpoint_configs" / "sdxl.json").read_text())["unet"]
    cfg.update(block_out_channels=[8, 16, 16], layers_per_block=2, transformer_layers_per_block=1,
               attention_head_dim=2, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval()


def sd1_pipe():
    pipe = tiny_pipeline(tiny_clip(0))
    pipe.register_modules(unet=_sd1_unet())
    return pipe


def sdxl_pipe():
    from ckpt_layout import family_pipeline

    pipe = family_pipeline("sdxl")
    pipe.register_modules(unet=_sdxl_unet())
    return pipe


def _hidden_sizes(unet) -> list[int]:
    """The hidden width of each cross-attention layer, in processor order (the ip_adapter keys' order)."""
    out = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        channels = unet.config.block_out_channels
        if name.startswith("mid_block"):
            out.append(channels[-1])
        elif name.startswith("up_blocks"):
            out.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        else:
            out.append(channels[int(name[len("down_blocks.")])])
    return out


def write_adapter(path, unet, variant="base", image_width=None, seed=1, pickle=False):
    """An adapter file for ``unet`` in the published layout, random weights (small, so the image still looks)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    context = unet.config.cross_attention_dim
    proj = {}
    if variant == "base":
        d = image_width or POOLED
        proj = {"proj.weight": r(4 * context, d), "proj.bias": r(4 * context), "norm.weight": 1 + r(context),
                "norm.bias": r(context)}
    else:  # plus: the Resampler (4 layers, 64-wide heads), reading the encoder's hidden states
        dim, e, q = 16, image_width or ENCODER_WIDTH, 4
        proj = {"latents": r(1, q, dim), "proj_in.weight": r(dim, e), "proj_in.bias": r(dim),
                "proj_out.weight": r(context, dim), "proj_out.bias": r(context), "norm_out.weight": 1 + r(context),
                "norm_out.bias": r(context)}
        for i in range(4):
            proj.update({f"layers.{i}.0.norm1.weight": 1 + r(dim), f"layers.{i}.0.norm1.bias": r(dim),
                         f"layers.{i}.0.norm2.weight": 1 + r(dim), f"layers.{i}.0.norm2.bias": r(dim),
                         f"layers.{i}.0.to_q.weight": r(64, dim), f"layers.{i}.0.to_kv.weight": r(128, dim),
                         f"layers.{i}.0.to_out.weight": r(dim, 64), f"layers.{i}.1.0.weight": 1 + r(dim),
                         f"layers.{i}.1.0.bias": r(dim), f"layers.{i}.1.1.weight": r(4 * dim, dim),
                         f"layers.{i}.1.3.weight": r(dim, 4 * dim)})
    layers = {}
    for i, hidden in enumerate(_hidden_sizes(unet)):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = r(hidden, context, s=0.5)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = r(hidden, context, s=0.5)
    if pickle:
        torch.save({"image_proj": proj, "ip_adapter": layers}, path)
    else:
        save_file({**{f"image_proj.{k}": v.contiguous() for k, v in proj.items()},
                   **{f"ip_adapter.{k}": v.contiguous() for k, v in layers.items()}}, str(path))
    return path


def tiny_encoder(seed=3) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=ENCODER_WIDTH, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=POOLED,
                           hidden_act="quick_gelu")
    return CLIPVisionModelWithProjection(cfg).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ipadapter folder with adapters for both tiny UNets, an image_encoder beside them, two pictures."""
    root = tmp_path_factory.mktemp("ipadapter")
    tiny_encoder().save_pretrained(root / "image_encoder")
    sd1, xl = _sd1_unet(), _sdxl_unet()
    write_adapter(root / "ip-adapter_sd15.safetensors", sd1)
    write_adapter(root / "ip-adapter-plus_sd15.safetensors", sd1, "plus")
    write_adapter(root / "ip-adapter_sdxl.safetensors", xl)
    write_adapter(root / "ip-adapter-plus_sdxl.safetensors", xl, "plus")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STYLEGRAD_IPADAPTER_DIR", raising=False)


def _request(folder, adapter, **kw):
    return GenerationRequest("a red house", steps=STEPS, seed=3, **{"ip_adapter": str(folder / adapter),
                                                                     "ip_images": (str(folder / "a.png"),), **kw})


def _diffusers(pipe, folder, adapter, image, request=None, scale=None, **kw):
    """diffusers' own IP-Adapter pipeline for the same file and picture (a copy: the reference mutates it), on the
    conditioning stylegrad computes for ``request`` (plain: the pipeline's encode_prompt's numbers)."""
    request = request or GenerationRequest("a red house", steps=STEPS, seed=3)
    pe, ne, pooled = Generator(pipe).embeddings(request, None if request.style is None else _style_of(request))
    ref = copy.deepcopy(pipe)
    ref.register_modules(image_encoder=tiny_encoder())
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=adapter, image_encoder_folder=None)
    if scale is not None:
        ref.set_ip_adapter_scale(scale)
    return ref, ref(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=STEPS, guidance_scale=request.cfg,
                    generator=torch.Generator("cpu").manual_seed(request.seed), ip_adapter_image=image, **pooled,
                    **kw).images[0]


def _style_of(request):
    from stylegrad.files.styles import load_style

    return load_style(request.style)


def _state(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


# -- the image: diffusers' own ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family,adapter", [("sd1", "ip-adapter_sd15.safetensors"),
                                            ("sd1", "ip-adapter-plus_sd15.safetensors"),
                                            ("sdxl", "ip-adapter_sdxl.safetensors"),
                                            ("sdxl", "ip-adapter-plus_sdxl.safetensors")])
def test_image_equals_diffusers_ip_adapter_pipeline(folder, family, adapter):
    pipe = sd1_pipe() if family == "sd1" else sdxl_pipe()
    procs, before = dict(pipe.unet.attn_processors), _state(pipe)
    (ours, text), = Generator(pipe).images(_request(folder, adapter))
    _, theirs = _diffusers(pipe, folder, adapter, Image.open(folder / "a.png"))
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    # the user's UNet: the very processor objects, no projection, the config and every tensor as before
    assert all(pipe.unet.attn_processors[n] is p for n, p in procs.items())
    assert pipe.unet.encoder_hid_proj is None and "encoder_hid_proj" not in pipe.unet._modules
    assert pipe.unet.config.encoder_hid_dim_type is None
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()) and len(before) == len(
        pipe.unet.state_dict())
    fields = parse_infotext(text)[2]
    assert fields["IP-Adapter"] == adapter.rsplit(".", 1)[0] and len(fields["IP-Adapter hash"]) == 10


# -- InstantStyle ----------------------------------------------------------------------------------------------
# the dicts the InstantStyle authors and diffusers document (README, set_ip_adapter_scale; SD1.5: infer_style_sd15.py)
DOCUMENTED = {
    ("sdxl", "style"): {"up": {"block_0": [0.0, 1.0, 0.0]}},
    ("sdxl", "style layout"): {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    ("sd1", "style"): {"up": {"block_1": 1.0}},
    ("sd1", "style layout"): {"down": {"block_2": 1.0}, "mid": 1.0, "up": {"block_1": 1.0}},
}


def _scaled(config, s):
    if isinstance(config, dict):
        return {k: _scaled(v, s) for k, v in config.items()}
    return [v * s for v in config] if isinstance(config, list) else config * s


@pytest.mark.parametrize("family,choice", list(DOCUMENTED))
def test_instantstyle_scales_equal_diffusers(folder, family, choice):
    pipe = sd1_pipe() if family == "sd1" else sdxl_pipe()
    adapter = "ip-adapter_sd15.safetensors" if family == "sd1" else "ip-adapter_sdxl.safetensors"
    blocks = "layout" if "layout" in choice else None
    request = _request(folder, adapter, ip_scale=0.6, ip_style=True, ip_blocks=blocks)
    call = IPAdapters().for_request(request, pipe.unet, family)
    with call.applied(pipe.unet):
        ours = {n: list(p.scale) for n, p in pipe.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    ref = copy.deepcopy(pipe)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=adapter, image_encoder_folder=None)
    ref.set_ip_adapter_scale(_scaled(DOCUMENTED[family, choice], 0.6))
    theirs = {n: list(p.scale) for n, p in ref.unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    assert ours == theirs and any(s == [0.6] for s in ours.values()) and any(s == [0.0] for s in ours.values())


def test_block_specs():
    """A spec's per-transformer list and a transformer index read as diffusers' dict; bad specs are one line."""
    blocks = chosen_blocks("sdxl", False, "up.block_1:1,0,0.5 down.block_1.0")
    assert scale_config(blocks, 2.0, {"down": 2, "up": 3}) == {"up": {"block_1": [2.0, 0.0, 1.0]},
                                                               "down": {"block_1": [2.0, 0.0]}}
    assert chosen_blocks("sdxl", False, None) is None
    for bad in ("up.block_x", "sideways"):
        with pytest.raises(RequestError, match="ip_blocks"):
            GenerationRequest("x", ip_adapter="a.safetensors", ip_images=("a.png",), ip_blocks=bad)
    with pytest.raises(StylegradError, match="3 transformers here"):
        scale_config(chosen_blocks("sdxl", False, "up.block_0:1,0"), 1.0, {"down": 2, "up": 3})


# -- files -----------------------------------------------------------------------------------------------------
def _published(layers, context, proj):
    shapes = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, hidden in enumerate(layers):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = (hidden, context)
    return shapes


SD15_LAYERS = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 6 + [640] * 6 + [320] * 6 + [1280] * 2  # 32 minus attn1
SD15 = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]  # the 16 cross-attentions


@pytest.mark.parametrize("name,shapes,want", [
    ("ip-adapter_sd15.bin", _published(SD15, 768, {"proj.weight": (3072, 1024), "norm.weight": (768,)}),
     ("base", "sd1", "vit-h", 4, False)),
    ("ip-adapter_sd15_light.bin", _published(SD15, 768, {"proj.weight": (3072, 1024), "norm.weight": (768,)}),
     ("light", "sd1", "vit-h", 4, False)),
    ("ip-adapter_sdxl.bin", _published([640] * 20 + [1280] * 50, 2048, {"proj.weight": (8192, 1280)}),
     ("base", "sdxl", "bigG", 4, False)),
    ("ip-adapter-plus_sdxl_vit-h.bin", _published([640] * 20 + [1280] * 50, 2048, {
        "latents": (1, 16, 1280), "proj_in.weight": (1280, 1280), "proj_out.weight": (2048, 1280)}),
     ("plus", "sdxl", "vit-h", 16, True)),
    ("ip-adapter-full-face_sd15.bin", _published(SD15, 768, {"proj.0.weight": (1280, 1280),
                                                            "proj.3.weight": (768,)}),
     ("full", "sd1", "vit-h", 257, True)),
])
def test_published_layouts_are_told_from_shapes(name, shapes, want):
    s = adapter_shape(shapes, name)
    assert (s.variant, s.family, s.encoder, s.tokens, s.hidden_states) == want and s.layers == len(
        [k for k in shapes if "to_k_ip" in k])


def test_pickle_reads_as_the_safetensors_does_and_info_names_it(folder, tmp_path):
    from stylegrad.files.recognize import inspect_file

    unet = _sd1_unet()
    a = read_adapter(write_adapter(tmp_path / "ip-adapter-plus_sd15.safetensors", unet, "plus"))
    b = read_adapter(write_adapter(tmp_path / "ip-adapter-plus_sd15.bin", unet, "plus", pickle=True))
    assert a.shape == b.shape and all(torch.equal(a.image_proj[k], b.image_proj[k]) for k in a.image_proj)
    assert all(torch.equal(a.ip_adapter[k], b.ip_adapter[k]) for k in a.ip_adapter)
    info = inspect_file(folder / "ip-adapter_sdxl.safetensors")
    assert (info.kind, info.format) == ("ip-adapter", "base") and "IP-Adapter base" in info.detail


# -- refusals, one line each ------------------------------------------------------------------------------------
def _faceid(path):
    save_file({"image_proj.perceiver_resampler.proj_in.weight": torch.zeros(4, 4),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 32)}, str(path))
    return path


def _vit_h_adapter(path):
    """A base adapter reading 1024-wide image embeddings (OpenCLIP ViT-H/14's), alone in its folder."""
    return write_adapter(path, _sd1_unet(), image_width=1024)


@pytest.mark.parametrize("case", ["wrong family", "encoder missing offline", "not an adapter", "faceid",
                                  "plus from a style", "style of another space"])
def test_refusals_are_one_line(folder, tmp_path, case):
    from stylegrad.files.styles import Style, save_style

    style = save_style(Style(torch.randn(PROJ)), tmp_path / "s.safetensors")
    made = {
        "wrong family": (sd1_pipe, folder / "ip-adapter_sdxl.safetensors", {}, "is for"),
        "encoder missing offline": (sd1_pipe, _vit_h_adapter(tmp_path / "ip-adapter_sd15.safetensors"), {},
                                    "not downloaded \\(offline\\)"),
        "not an adapter": (sd1_pipe, style, {}, "is not an IP-Adapter file"),
        "faceid": (sd1_pipe, _faceid(tmp_path / "ip-adapter-faceid_sd15.safetensors"), {}, "FaceID"),
        "plus from a style": (sd1_pipe, folder / "ip-adapter-plus_sd15.safetensors",
                              {"ip_images": (), "style": str(style)}, "patch states"),
        "style of another space": (sd1_pipe, _vit_h_adapter(tmp_path / "ip-adapter_sd15.safetensors"),
                                   {"ip_images": (), "style": str(style)}, "not in this IP-Adapter's image space"),
    }
    make, adapter, extra, message = made[case]
    pipe = make()
    request = GenerationRequest("a house", steps=1, **{"ip_adapter": str(adapter),
                                                        "ip_images": (str(folder / "a.png"),), **extra})
    with pytest.raises(StylegradError, match=message) as e:
        Generator(pipe).images(request)
    assert "\n" not in str(e.value)
    if case == "encoder missing offline":
        assert str(tmp_path) in str(e.value) and "--ip-image-encoder" in str(e.value)


def test_request_refusals():
    with pytest.raises(RequestError, match="ip_images needs ip_adapter"):
        GenerationRequest("x", ip_images=("a.png",))
    with pytest.raises(RequestError, match="reference pictures"):
        GenerationRequest("x", ip_adapter="a.safetensors")
    with pytest.raises(RequestError, match="ip_scale"):
        GenerationRequest("x", ip_adapter="a.safetensors", ip_images=("a.png",), ip_scale=float("nan"))


# -- composition, replay ----------------------------------------------------------------------------------------
def test_composes_with_a_style_and_a_lora(folder, tmp_path, clip_text):
    """IP-Adapter, an aesthetic style (tuned prompt_embeds) and a LoRA in one generation: it differs from each
    without the others, and equals diffusers' IP-Adapter pipeline run by hand on the style's conditioning with the
    LoRA's hooks on."""
    from test_merge import _kohya_for

    from stylegrad.files.styles import Style, load_style, save_style

    pipe = sd1_pipe()
    style = save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5))), tmp_path / "s.safetensors")
    lora = _kohya_for(pipe, tmp_path / "l.safetensors", sgm_names=False)
    gen = Generator(pipe, clip_model=clip_text)
    request = _request(folder, "ip-adapter_sd15.safetensors", style=str(style), style_options=StyleOptions(steps=2),
                       loras=(f"{lora}:0.3",))
    (ours, text), = gen.images(request)
    without = {"ip": dict(ip_adapter=None, ip_images=()), "style": dict(style=None), "lora": dict(loras=())}
    for changes in without.values():
        (other, _), = gen.images(replace(request, **changes))
        assert not np.array_equal(np.asarray(ours), np.asarray(other))
    addons = gen.request_addons(request)
    pe, ne, _ = gen.embeddings(request, load_style(str(style)), addons=addons)
    pipe.register_modules(image_encoder=tiny_encoder())  # the reference now: diffusers' own loader on the pipeline
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter_sd15.safetensors",
                         image_encoder_folder=None)
    with addons.loras.applied(("unet",)):
        theirs = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=STEPS,
                      generator=torch.Generator("cpu").manual_seed(3), ip_adapter_image=Image.open(folder / "a.png"),
                      ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    fields = parse_infotext(text)[2]
    assert {"IP-Adapter", "Aesthetic embedding", "Lora hashes"} <= set(fields)


def test_cli_png_records_the_adapter_and_from_makes_the_same_pixels(folder, world, tmp_path, capsys):
    """``generate --ip-adapter NAME --ip-image A B --ip-style --ip-blocks layout`` (the name from --ip-adapters),
    then ``generate --from`` that PNG: the same request and the same pixels."""
    from diffusers import StableDiffusionPipeline

    from stylegrad.apps.cli import main
    from stylegrad.pipelines.replay import request_from_png

    _, sd_dir = world
    adapters = tmp_path / "ipadapter"
    adapters.mkdir()
    write_adapter(adapters / "ip-adapter_tiny.safetensors", StableDiffusionPipeline.from_pretrained(sd_dir).unet)
    common = ["--width", "32", "--height", "32", "--steps", "2", "--model", str(sd_dir), "--ip-image-encoder",
              str(folder / "image_encoder")]
    main(["generate", "a red house", *common, "--ip-adapter", "ip-adapter_tiny", "--ip-adapters", str(adapters),
          "--ip-image", str(folder / "a.png"), str(folder / "b.png"), "--ip-scale", "0.7", "--ip-blocks",
          "up.block_0", "--out", str(tmp_path / "one")])
    first = capsys.readouterr().out.split()[-1]
    fields = parse_infotext(Image.open(first).info["parameters"])[2]
    assert fields["IP-Adapter"] == "ip-adapter_tiny" and fields["IP-Adapter scale"] == "0.7"
    assert len(fields["IP-Adapter image hashes"].split()) == 2 and fields["IP-Adapter blocks"] == "up.block_0"
    request = request_from_png(first)
    assert (request.ip_images, request.ip_scale, request.ip_blocks) == (
        (str(folder / "a.png"), str(folder / "b.png")), 0.7, "up.block_0")
    main(["generate", "--from", first, "--out", str(tmp_path / "two")])
    again = capsys.readouterr().out.split()[-1]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_a_style_serves_as_the_picture_where_its_space_is_the_adapters(folder, tmp_path):
    """A base adapter reading the tiny CLIP's image_embeds takes a style made in that space: the image is
    diffusers' with the style's vector as ``ip_adapter_image_embeds``."""
    from stylegrad.files.styles import Style, save_style

    pipe = sd1_pipe()
    vector = torch.randn(POOLED, generator=torch.Generator().manual_seed(8))
    style = save_style(Style(vector, {"method": "raw"}), tmp_path / "raw.safetensors")
    request = _request(folder, "ip-adapter_sd15.safetensors", ip_images=(), style=str(style),
                       style_options=StyleOptions(steps=0))  # the style as the picture only, no tuning
    (ours, text), = Generator(pipe).images(request)
    embeds = torch.stack([torch.zeros(1, POOLED), vector[None]])  # (negative, positive), one picture slot each
    plain = GenerationRequest("a red house", steps=STEPS, seed=3)
    ref = copy.deepcopy(pipe)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter_sd15.safetensors", image_encoder_folder=None)
    pe, ne, _ = Generator(pipe).embeddings(plain, None)
    theirs = ref(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=STEPS,
                 generator=torch.Generator("cpu").manual_seed(3), ip_adapter_image_embeds=[embeds]).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert parse_infotext(text)[2]["IP-Adapter source"] == "style"


def test_pictures_are_encoded_once(folder, tmp_path):
    """The same pictures under the same encoder are a cache hit: in memory, then on disk for a new process (whose
    encoder is then never loaded)."""
    unet = _sd1_unet()
    request = _request(folder, "ip-adapter-plus_sd15.safetensors", ip_images=(str(folder / "a.png"),
                                                                               str(folder / "b.png")))
    first = IPAdapters()
    a = first.for_request(request, unet, "sd1")
    embedder = next(iter(first._embedders.values()))
    assert embedder.encoded == 3  # two pictures and the all-zero one (plus's negative)
    first.for_request(request, unet, "sd1")
    assert embedder.encoded == 3
    fresh = IPAdapters()
    b = fresh.for_request(request, unet, "sd1")
    again = next(iter(fresh._embedders.values()))
    assert again.encoded == 0 and again._encoder is None
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.negative, b.negative)
    one = first.for_request(replace(request, ip_images=(str(folder / "a.png"),)), unet, "sd1")
    two = first.for_request(replace(request, ip_images=(str(folder / "b.png"),)), unet, "sd1")
    assert torch.allclose(a.embeds, (one.embeds + two.embeds) / 2)  # several pictures: their mean


# -- precision and devices --------------------------------------------------------------------------------------
# The UNet output with the adapter (plus), everything (UNet, encoder, adapter) in half precision against float32,
# relative to the output's largest value: measured 2.4e-3 (fp16) and 2.4e-2 (bf16) on the tiny SD1 UNet (base:
# 1.9e-3, 1.4e-2); the bounds leave about 2x room. The adapter's own effect (with - without, float32) is 0.88.
HALF_RTOL = {torch.float16: 5e-3, torch.bfloat16: 5e-2}


def _unet_inputs(unet, dtype):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.tensor([500]),
            torch.randn(2, 7, unet.config.cross_attention_dim, generator=g).to(dtype))


def _with_adapter(unet, call, inputs):
    with torch.no_grad(), call.applied(unet):
        kw = call.pipeline_kwargs(unet, guidance=True)
        return unet(*inputs, added_cond_kwargs={"image_embeds": kw["ip_adapter_image_embeds"]}).sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_the_unet(folder, dtype):
    unet = _sd1_unet()
    request = _request(folder, "ip-adapter-plus_sd15.safetensors")
    full = _with_adapter(unet, IPAdapters().for_request(request, unet, "sd1"), _unet_inputs(unet, torch.float32))
    with torch.no_grad():
        plain = unet(*_unet_inputs(unet, torch.float32)).sample
    half_unet = copy.deepcopy(unet).to(dtype)
    call = IPAdapters().for_request(request, half_unet, "sd1")
    assert call.embeds.dtype == dtype  # the encoder ran in the UNet's dtype, as diffusers' loader puts it
    half = _with_adapter(half_unet, call, _unet_inputs(unet, dtype))
    assert half.dtype == dtype
    scale = full.abs().max()
    assert (half.float() - full).abs().max() / scale < HALF_RTOL[dtype] < (full - plain).abs().max() / scale
    assert all(p.dtype == dtype for p in half_unet.parameters())  # the user's UNet: as it was, its own dtype


def test_adapter_weights_follow_the_unet_device(folder):
    """On the meta device (where a tensor left on the CPU fails as it would on CUDA) the processors, projection
    and embeddings act where the UNet is; the UNet is as before afterwards."""
    from test_lora_devices import OneDevice

    unet = _sd1_unet()
    call = IPAdapters().for_request(_request(folder, "ip-adapter-plus_sd15.safetensors"), unet, "sd1")
    meta = copy.deepcopy(unet).to("meta")
    before = dict(meta.attn_processors)
    inputs = [t.to("meta") for t in _unet_inputs(unet, torch.float32)]
    with torch.no_grad(), call.applied(meta), OneDevice():
        kw = call.pipeline_kwargs(meta, guidance=True)
        out = meta(*inputs, added_cond_kwargs={"image_embeds": kw["ip_adapter_image_embeds"]}).sample
    assert out.device.type == "meta" and out.shape == inputs[0].shape
    assert all(meta.attn_processors[n] is p for n, p in before.items()) and meta.encoder_hid_proj is None


def test_encoder_found_in_a_clip_vision_folder_by_its_widths(tmp_path):
    """ComfyUI's layout: models/ipadapter beside models/clip_vision holding single-file encoders; the one whose
    widths the adapter reads is taken (read from headers), loaded from its shapes alone."""
    from stylegrad.addons.ipadapter.encoder import find_encoder, load_encoder

    models = tmp_path / "models"
    (models / "ipadapter").mkdir(parents=True)
    (models / "clip_vision").mkdir()
    adapter = read_adapter(write_adapter(models / "ipadapter" / "ip-adapter-plus_sd15.safetensors", _sd1_unet(),
                                         "plus"))
    wrong = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=8, num_attention_heads=2,
                                                           num_hidden_layers=1, image_size=32, patch_size=8,
                                                           projection_dim=8))
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(models / "clip_vision" / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny_encoder().state_dict().items()},
              str(models / "clip_vision" / "b.safetensors"))
    folders = IPAdapters([str(models / "ipadapter")]).library.clip_vision_folders(adapter.path)
    where = find_encoder(adapter.shape, None, folders)
    assert where == str(models / "clip_vision" / "b.safetensors")
    model, processor = load_encoder(where, folders, torch.device("cpu"), torch.float32)
    assert model.config.hidden_size == ENCODER_WIDTH and model.config.projection_dim == POOLED
    assert find_encoder(adapter.shape, str(models / "clip_vision"), []) == where  # --ip-image-encoder FOLDER


def test_a_stylecode_unet_carries_the_adapter_on_its_base_blocks(folder, tmp_path):
    """With identity collabs the Stylecodes path computes the base UNet exactly (test_stylecodes); with an adapter
    installed it still does, image tokens included: the base blocks get the adapter's context, the control
    stream the text alone."""
    from tiny import tiny_stylecodes

    from stylegrad.stylecodes.unet import controlled_forward

    pipe = tiny_pipeline(tiny_clip(0))
    adapter = write_adapter(tmp_path / "ip-adapter_tiny.safetensors", pipe.unet)
    model = tiny_stylecodes(pipe.unet, trained_look=False)
    for layer in [model.middle_block_out, *model.control_model.up_zero_convs_out]:
        torch.nn.init.zeros_(layer.bias)
    request = GenerationRequest("x", ip_adapter=str(adapter), ip_images=(str(folder / "a.png"),),
                                ip_image_encoder=str(folder / "image_encoder"))
    call = IPAdapters().for_request(request, pipe.unet, "sd1")
    _, _, ctx = _unet_inputs(pipe.unet, torch.float32)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # the tiny layout's mid block: 8x8
    with torch.no_grad():
        style_map = model.sref_autoencoder.decode(torch.rand(1, 20), 8, 8)
        plain = controlled_forward(pipe.unet, model, x, 500, ctx, style_map, torch.ones(2, 1, 1, 1))
        with call.applied(pipe.unet):
            kw = {"image_embeds": call.pipeline_kwargs(pipe.unet, guidance=True)["ip_adapter_image_embeds"]}
            ours = controlled_forward(pipe.unet, model, x, 500, ctx, style_map, torch.ones(2, 1, 1, 1),
                                      added_cond_kwargs=kw)
            base = pipe.unet(x, 500, ctx, added_cond_kwargs=kw).sample
    assert torch.equal(ours, base) and not torch.equal(ours, plain)


def test_replay_finds_the_adapter_by_name_and_notes_what_differs(folder, tmp_path):
    from stylegrad.addons.ipadapter.replay import replay_ip_adapter

    adapters = tmp_path / "ipadapter"
    adapters.mkdir()
    moved = write_adapter(adapters / "ip-adapter_sd15.safetensors", _sd1_unet(), seed=5)  # another file, same name
    request = _request(folder, "ip-adapter_sd15.safetensors", ip_adapter=str(tmp_path / "gone" / moved.name))
    fields = {"IP-Adapter": "ip-adapter_sd15", "IP-Adapter hash": read_adapter(folder / moved.name).short_hash}
    found, notes = replay_ip_adapter(request, fields, [str(adapters)])
    assert found.ip_adapter == str(moved) and any("read from" in n for n in notes) and any("differs" in n for n in notes)
    (tmp_path / "empty").mkdir()
    gone, notes = replay_ip_adapter(request, fields, [str(tmp_path / "empty")])
    assert gone.ip_adapter is None and gone.ip_images == () and "generating without the IP-Adapter" in notes[-1]
    missing = replace(request, ip_adapter=str(folder / moved.name), ip_images=(str(tmp_path / "nope.png"),))
    assert replay_ip_adapter(missing, fields)[0].ip_adapter is None
