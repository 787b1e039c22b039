"""ComfyUI nodes against faithful stand-ins of the comfy modules they touch (comfy_standin.py): node contracts,
conditioning equal to AestheticEncoder's (SD1.x, SDXL), the user's CLIP and MODEL never changed, inference mode,
ComfyUI's caching, the folders, Stylecode's MODEL patch."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from comfy_standin import Executor, encode, install_folder_paths, run_node, sd1_clip, sdxl_clip

from stylegrad import AestheticEncoder, Style, StyleOptions, save_style

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red house by the sea"


@pytest.fixture()
def comfy(tmp_path, monkeypatch):
    """ComfyUI's folder_paths over a fresh base folder, and the node pack imported as ComfyUI imports it."""
    fp = install_folder_paths(str(tmp_path / "ComfyUI"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    for name in [m for m in sys.modules if m.startswith("stylegrad.apps.comfyui")]:
        monkeypatch.delitem(sys.modules, name)
    nodes = load_as_custom_node(ROOT / "stylegrad" / "apps" / "comfyui")
    return fp, nodes


def load_as_custom_node(folder: Path):
    """ComfyUI's loader: the folder's __init__.py as a module named by its path, NODE_CLASS_MAPPINGS read from it."""
    spec = importlib.util.spec_from_file_location(str(folder), folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from stylegrad.apps.comfyui import nodes

    assert module.NODE_CLASS_MAPPINGS == nodes.NODE_CLASS_MAPPINGS
    return nodes


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 pipeline, its CLIP (projection) saved as a folder, and a style in its space."""
    from diffusers import StableDiffusionPipeline
    from tiny import save_world

    clip_dir, sd_dir = save_world(tmp_path_factory.mktemp("world"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    style = Style(torch.randn(24, generator=torch.Generator().manual_seed(1)), name="mine")
    return pipe, clip_dir, style


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _encode_node(nodes, clip, style, **kw):
    args = dict(clip=clip, text=PROMPT, style=style, steps=3, lr=1e-2, weight=1.0, towers="both")
    return run_node(nodes.AestheticCLIPTextEncode, **{**args, **kw})


def test_node_contract_types_and_tooltips(comfy):
    fp, nodes = comfy
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert cls.CATEGORY == "stylegrad" and hasattr(cls, cls.FUNCTION) and cls.DESCRIPTION
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        for group in spec.values():
            for name, (_kind, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    enc = nodes.AestheticCLIPTextEncode
    required = enc.INPUT_TYPES()["required"]
    assert [required[k][0] for k in ("clip", "text", "style", "steps", "lr", "weight")] == \
        ["CLIP", "STRING", "STYLE", "INT", "FLOAT", "FLOAT"]
    assert enc.RETURN_TYPES == ("CONDITIONING", "CLIP")
    assert nodes.LoadStyle.RETURN_TYPES == nodes.StyleFromImages.RETURN_TYPES == ("STYLE",)
    assert nodes.Stylecode.RETURN_TYPES == ("MODEL", "STRING")
    assert fp.get_folder_paths("styles")[:2] == [str(Path(fp.models_dir) / "styles"),
                                                 str(Path(fp.models_dir) / "aesthetic_embeddings")]


def test_sd1_conditioning_equals_aesthetic_encoder(comfy, sd1):
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    assert torch.is_inference(clip.cond_stage_model.clip_l.transformer.text_projection.weight)  # as ComfyUI's
    before = _state(clip.cond_stage_model)
    plain = encode(clip, PROMPT)

    enc = AestheticEncoder(pipe.text_encoder, pipe.tokenizer, clip_model=str(clip_dir))
    for weight, slerp in ((1.0, False), (0.6, False), (0.6, True)):
        (cond, styled_clip) = _encode_node(nodes, clip, style, weight=weight, slerp=slerp, clip_model=str(clip_dir))
        pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, weight=weight, slerp=slerp))
        assert len(cond) == 1 and cond[0][0].shape == pe.shape
        torch.testing.assert_close(cond[0][0], pe, atol=2e-5, rtol=1e-4)
        assert (cond[0][0] - plain[0][0]).abs().max() > 1e-2  # the style moved it
    # the user's CLIP: same tensors, no patches, the same conditioning as before
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert clip.patcher.patches == {}
    assert torch.equal(encode(clip, PROMPT)[0][0], plain[0][0])
    # the styled CLIP re-encodes the prompt as the tuned encoder does (weight 1)
    pe1, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2))
    again = encode(styled_clip, PROMPT)
    torch.testing.assert_close(again[0][0], pe1, atol=2e-5, rtol=1e-4)


def test_sd1_regularized_and_clip_skip_and_text_options_match(comfy, sd1):
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    clip.clip_layer(-2)  # CLIPSetLastLayer -2: A1111's clip skip 2, diffusers' clip_skip=1
    enc = AestheticEncoder(pipe.text_encoder, pipe.tokenizer, clip_model=str(clip_dir))
    cond, _ = _encode_node(nodes, clip, style, regularization=0.5, style_text="ink", text_angle=0.3,
                           clip_model=str(clip_dir))
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, regularization=0.5, text="ink",
                                                    text_angle=0.3), clip_skip=1)
    torch.testing.assert_close(cond[0][0], pe, atol=2e-5, rtol=1e-4)


def test_sdxl_conditioning_and_pooled_equal_the_sdxl_encoder(comfy, tmp_path):
    from test_sdxl_tuning import xl_style
    from transformers import CLIPTextModelWithProjection

    from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder

    _, nodes = comfy
    from ckpt_layout import family_pipeline

    pipe = family_pipeline("sdxl", seed=3)
    te1 = pipe.text_encoder
    clip_l = CLIPTextModelWithProjection(te1.config).eval()
    clip_l.text_model.load_state_dict(te1.state_dict())
    torch.manual_seed(4)
    torch.nn.init.normal_(clip_l.text_projection.weight, std=0.2)
    clip_l.save_pretrained(tmp_path / "clip_l")
    style = xl_style(pipe, clip_l)
    clip = sdxl_clip(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pad_g=pipe.tokenizer_2.pad_token_id)
    before = _state(clip.cond_stage_model)
    enc = SDXLAestheticEncoder(pipe, clip_model=str(tmp_path / "clip_l"))
    for towers, weight in (("both", 1.0), ("g", 1.0), ("l", 0.5)):
        cond, _ = _encode_node(nodes, clip, style, towers=towers, weight=weight, clip_model=str(tmp_path / "clip_l"))
        e = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, towers=towers, weight=weight))
        torch.testing.assert_close(cond[0][0], e.prompt_embeds, atol=3e-5, rtol=1e-4)
        torch.testing.assert_close(cond[0][1]["pooled_output"], e.pooled_prompt_embeds, atol=3e-5, rtol=1e-4)
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and clip.patcher.patches == {}


def test_weighted_prompts_and_embeddings_stay_comfyuis(comfy, sd1):
    """ComfyUI encodes the prompt itself: its weighting and embedding vectors act on the tuned weights."""
    _, nodes = comfy
    pipe, clip_dir, style = sd1
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(7))
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer, embeddings={"ink": vectors})
    text = "a (red house:1.3) by embedding:ink the sea"
    cond, styled = _encode_node(nodes, clip, style, text=text, clip_model=str(clip_dir))
    again = encode(styled, text)
    assert torch.equal(cond[0][0], again[0][0])
    plain = encode(clip, text)
    assert cond[0][0].shape == plain[0][0].shape and (cond[0][0] - plain[0][0]).abs().max() > 1e-2


def test_a_requeued_graph_does_not_tune_again(comfy, sd1, monkeypatch):
    fp, nodes = comfy
    pipe, clip_dir, style = sd1
    folder = Path(fp.models_dir) / "styles"
    save_style(style, folder / "mine.safetensors")
    calls = []
    real = nodes.tuned_patches
    monkeypatch.setattr(nodes, "tuned_patches", lambda *a, **k: calls.append(1) or real(*a, **k))
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    run = Executor()

    def graph():
        (loaded,) = run(nodes.LoadStyle, style_name="mine.safetensors")
        return run(nodes.AestheticCLIPTextEncode, clip=clip, text=PROMPT, style=loaded, steps=2, lr=1e-2,
                   weight=1.0, towers="both", clip_model=str(clip_dir))

    first = graph()
    assert graph() is first and len(calls) == 1  # same inputs, same file: cached, not re-tuned
    save_style(Style(style.vector.flip(0), name="mine"), folder / "mine.safetensors")  # the file is edited
    second = graph()
    assert len(calls) == 2 and not torch.equal(second[0][0][0], first[0][0][0])


def test_load_style_reads_a1111_and_stylegrad_files_from_the_folders(comfy, shared, tmp_path):
    fp, nodes = comfy
    styles = Path(fp.models_dir) / "styles"
    aesthetic = Path(fp.models_dir) / "aesthetic_embeddings"
    aesthetic.mkdir(parents=True)
    published = sorted((shared / "aesthetic_embeddings").glob("*.pt"))[0]
    (aesthetic / published.name).write_bytes(published.read_bytes())
    save_style(Style(torch.ones(768), name="s", g=torch.ones(1280)), styles / "xl" / "two.safetensors")
    listed = nodes.LoadStyle.INPUT_TYPES()["required"]["style_name"][0]
    assert published.name in listed and str(Path("xl") / "two.safetensors") in listed
    (a,) = run_node(nodes.LoadStyle, style_name=published.name)
    (b,) = run_node(nodes.LoadStyle, style_name=str(Path("xl") / "two.safetensors"))
    assert a.width == 768 and not a.is_sdxl and b.is_sdxl and b.g.shape == (1280,)
    with pytest.raises(FileNotFoundError):
        run_node(nodes.LoadStyle, style_name="missing.pt")


def test_style_from_images_equals_embed_images_of_the_files(comfy, sd1, shared):
    import numpy as np
    from PIL import Image

    from stylegrad import embed_images

    fp, nodes = comfy
    _, clip_dir, _ = sd1
    files = sorted(p for p in (shared / "images").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:3]
    size = Image.open(files[0]).size
    pictures = [Image.open(f).convert("RGB").resize(size) for f in files]
    batch = torch.from_numpy(np.stack([np.asarray(p).astype(np.float32) / 255.0 for p in pictures]))  # LoadImage's
    (style,) = run_node(nodes.StyleFromImages, images=batch, family="sd1", name="mine", save=True,
                        clip_model=str(clip_dir))
    folder = Path(fp.models_dir) / "styles"
    for i, p in enumerate(pictures):
        p.save(folder.parent / f"in{i}.png")
    expected = embed_images([folder.parent / f"in{i}.png" for i in range(len(pictures))], str(clip_dir),
                            progress=False)
    torch.testing.assert_close(style.vector, expected.vector, atol=1e-6, rtol=1e-5)
    assert (folder / "mine.safetensors").is_file()
    run_node(nodes.StyleFromImages, images=batch, family="sd1", name="mine", save=True, clip_model=str(clip_dir))
    assert (folder / "mine-2.safetensors").is_file()  # never over an existing file


def test_stylecode_patches_a_clone_of_the_model(comfy, tmp_path, tiny_checkpoint_configs):
    from ckpt_layout import _config, unet_key
    from comfy_standin import ModelPatcher
    from diffusers import UNet2DConditionModel
    from tiny import tiny_stylecodes

    from stylegrad.stylecodes.codec import random_code
    from stylegrad.stylecodes.model import save_stylecodes
    from stylegrad.stylecodes.unet import StylecodeUNet

    fp, nodes = comfy
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("sd1")["unet"]).eval()
    control = tiny_stylecodes(unet)
    save_stylecodes(control, Path(fp.models_dir) / "stylecodes" / "tiny.safetensors")

    class DiffusionModel(torch.nn.Module):
        """ComfyUI's UNet stand-in: the original layout's tensor names; computes as the diffusers UNet it mirrors."""

        def __init__(self):
            super().__init__()
            self.names = {}
            for k, v in unet.state_dict().items():
                name = unet_key(k, unet.config).replace(".", "__")
                self.register_parameter(name, torch.nn.Parameter(v.clone(), requires_grad=False))

        def state_dict(self, *a, **k):
            return {n.replace("__", "."): p for n, p in self.named_parameters()}

        def forward(self, x, timesteps=None, context=None, **kw):
            return unet(x, timesteps, context).sample

    base = type("BaseModel", (), {})()
    base.diffusion_model = DiffusionModel()
    model = ModelPatcher(base)
    code = random_code(3)
    styled, out_code = run_node(nodes.Stylecode, model=model, code=code, strength=0.8, checkpoint="tiny.safetensors")
    assert out_code == code and model.object_patches == {} and styled is not model
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        with styled.patched():
            got = base.diffusion_model(x, t, ctx)
        plain = base.diffusion_model(x, t, ctx)
    from stylegrad.stylecodes.facade import Stylecodes

    latent = Stylecodes(control.sref_autoencoder, control).latent_of(code)
    with torch.no_grad():
        want = StylecodeUNet(unet, control, latent, 0.8)(x, t, ctx).sample
        base_out = unet(x, t, ctx).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - base_out).abs().max() > 1e-4 and torch.equal(plain, base_out)
    with pytest.raises(Exception, match="stylecode"):
        run_node(nodes.Stylecode, model=model, code=" ", strength=1.0, checkpoint="tiny.safetensors")


def test_pyproject_lists_the_pack_for_the_comfy_registry():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert data["project"]["urls"]["Repository"]

def test_the_repository_root_loads_as_a_custom_node(comfy):
    """Registry and git-clone installs put the whole repository in custom_nodes/: its __init__.py is the pack."""
    _, nodes = comfy
    spec = importlib.util.spec_from_file_location(str(ROOT), ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS.keys() == nodes.NODE_CLASS_MAPPINGS.keys()


def test_tuning_state_is_freed_after_each_run(comfy, sd1):
    from test_tuning import _live_tensor_bytes

    _, nodes = comfy
    pipe, clip_dir, style = sd1
    clip = sd1_clip(pipe.text_encoder, pipe.tokenizer)
    _encode_node(nodes, clip, style, clip_model=str(clip_dir))  # first run: lazily made buffers, caches
    baseline = _live_tensor_bytes()
    for i in range(3):
        out = _encode_node(nodes, clip, style, text=f"prompt {i}", clip_model=str(clip_dir))
        del out
        assert _live_tensor_bytes() == baseline, f"run {i} left tensors behind"


def test_stylecode_from_an_image_is_the_code_stylegrad_makes(comfy, tmp_path, tiny_checkpoint_configs, shared):
    import numpy as np
    from ckpt_layout import _config
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from tiny import tiny_siglip, tiny_stylecodes

    from stylegrad.stylecodes.facade import Stylecodes
    from stylegrad.stylecodes.model import save_stylecodes

    fp, nodes = comfy
    unet = UNet2DConditionModel.from_config(_config("sd1")["unet"]).eval()
    control = tiny_stylecodes(unet)
    save_stylecodes(control, Path(fp.models_dir) / "stylecodes" / "tiny.safetensors")
    siglip, processor = tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    picture = Image.open(next((shared / "images").rglob("*.jpg"))).convert("RGB")
    batch = torch.from_numpy(np.asarray(picture).astype(np.float32)[None] / 255.0)
    base = torch.nn.Module()
    base.diffusion_model = unet
    from comfy_standin import ModelPatcher

    _, code = run_node(nodes.Stylecode, model=ModelPatcher(base), code="", strength=1.0, image=batch,
                       checkpoint="tiny.safetensors", siglip=str(tmp_path / "siglip"))
    assert code == Stylecodes(control.sref_autoencoder, control, siglip, processor).code_for(picture)


def test_the_node_tunes_through_the_one_encoder(comfy, sd1, monkeypatch):
    """The node's towers are ``AestheticEncoder``'s (``towers_for``) and each is tuned by ``AestheticEncoder.tune``,
    the entry point every other front door's prompts take: no copy of the method lives in the pack."""
    import stylegrad.aesthetic.encoder as encoder_module

    _, nodes = comfy
    pipe, clip_dir, style = sd1
    calls = []
    real = encoder_module.AestheticEncoder.tune
    monkeypatch.setattr(encoder_module.AestheticEncoder, "tune",
                        lambda self, name, *a, **k: calls.append((name, len(self.towers), k.get("keep_weights")))
                        or real(self, name, *a, **k))
    _encode_node(nodes, sd1_clip(pipe.text_encoder, pipe.tokenizer), style, clip_model=str(clip_dir))
    assert calls == [("l", 1, True)]  # SD1.x: one tower, its tuned tensors kept for ComfyUI's patches
    calls.clear()
    _encode_node(nodes, sd1_clip(pipe.text_encoder, pipe.tokenizer), style, steps=0)
    assert calls == []  # 0 steps: nothing tuned, ComfyUI's own conditioning
