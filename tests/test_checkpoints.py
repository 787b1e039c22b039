"""Single-file checkpoints: SD1.x, SD2.x (v-prediction) and SDXL in the original layout, loaded offline through
``--model FILE``; family detection and one-line refusals; the models folder; SDXL generation."""

import hashlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from ckpt_layout import family_pipeline, original_state, write_checkpoint
from PIL import Image
from safetensors.torch import save_file
from tiny import PROJ, tiny_clip, tiny_pipeline, tiny_processor, tiny_tokenizer

from stylegrad import GenerationRequest, Generator, Style, read_generation_info, save_style
from stylegrad.apps.cli import main
from stylegrad.checkpoints.families import classify
from stylegrad.checkpoints.loading import family_config, load_checkpoint, predicts_v
from stylegrad.pipelines.loading import load_pipeline
from stylegrad.stylecodes.codec import random_code

SIZE = ["--width", "32", "--height", "32", "--steps", "2"]


pytestmark = pytest.mark.usefixtures("tiny_checkpoint_configs")


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline(tiny_clip(0), 0)


@pytest.fixture(scope="module")
def sdxl():
    return family_pipeline("sdxl", seed=1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    tiny_clip(0).save_pretrained(d)
    tiny_processor().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _plain(pipe, prompt="a red house", negative=None, seed=3, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, negative_prompt=negative, num_inference_steps=2, width=32, height=32, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]
    return np.asarray(image)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


# -- loading each family ----------------------------------------------------------------------------------------------


def test_sd1_file_with_zero_style_steps_equals_diffusers(sd1, clip_dir, tmp_path, capsys):
    ckpt = write_checkpoint(sd1, tmp_path / "dreamshaper_8.safetensors")
    style = save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5))), tmp_path / "s.safetensors")
    code = main(["generate", "a red house", "--model", str(ckpt), "--style", str(style), "--style-steps", "0",
                 "--clip-model", str(clip_dir), "--seed", "3", "--out", str(tmp_path / "out"), *SIZE])
    assert code == 0, capsys.readouterr().err
    png = capsys.readouterr().out.split()[0]
    assert np.array_equal(_pixels(png), _plain(sd1, negative=""))
    info = read_generation_info(png)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info.parameters["Model hash"] == digest[:10] and info.parameters["Model"] == "dreamshaper_8"


def test_sd2_v_prediction_file_equals_diffusers(tmp_path, capsys):
    pipe = family_pipeline("sd2", seed=2, prediction="v_prediction")
    ckpt = write_checkpoint(pipe, tmp_path / "v2-1_768.safetensors", extra={"v_pred": torch.tensor([])})
    loaded = load_checkpoint(ckpt)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert not loaded.scheduler.config.rescale_betas_zero_snr
    ztsnr = write_checkpoint(pipe, tmp_path / "zsnr.safetensors", extra={"v_pred": torch.tensor([]),
                                                                         "ztsnr": torch.tensor([])})
    assert load_checkpoint(ztsnr).scheduler.config.rescale_betas_zero_snr  # ComfyUI's key for zero terminal SNR
    assert loaded.unet.config.sample_size == pipe.unet.config.sample_size  # the 768 model's default size
    # the file holds one text layer more than the model uses (SD2's 24th): it is left out, not loaded
    assert loaded.text_encoder.config.num_hidden_layers == 1
    code = main(["generate", "a red house", "--model", str(ckpt), "--seed", "3", "--out", str(tmp_path / "o"), *SIZE])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(capsys.readouterr().out.split()[0]), _plain(pipe, negative=""))


def test_sd2_prediction_from_a1111_yaml_and_from_the_probe(tmp_path):
    pipe = family_pipeline("sd2", seed=2)
    ckpt = write_checkpoint(pipe, tmp_path / "sd2.safetensors")
    ckpt.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_checkpoint(ckpt).scheduler.config.prediction_type == "v_prediction"
    ckpt.with_suffix(".yaml").unlink()
    # no hint at all: A1111's probe decides; a UNet whose output sits far below its input is a v-model
    unet = pipe.unet
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        unet.conv_out.bias.fill_(-2.0)
    assert predicts_v(unet)
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.4)
    assert not predicts_v(unet)
    rigged = write_checkpoint(pipe, tmp_path / "rigged.safetensors")
    assert load_checkpoint(rigged).scheduler.config.prediction_type == "epsilon"


def test_sdxl_file_generates_like_diffusers(sdxl, tmp_path, capsys):
    ckpt = write_checkpoint(sdxl, tmp_path / "ponyDiffusionV6XL.safetensors")
    loaded = load_pipeline(str(ckpt))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    code = main(["generate", "a red house", "--negative", "blurry", "--model", str(ckpt), "--seed", "3",
                 "--out", str(tmp_path / "o"), *SIZE])
    assert code == 0, capsys.readouterr().err
    png = capsys.readouterr().out.split()[0]
    assert np.array_equal(_pixels(png), _plain(sdxl, negative="blurry"))
    info = read_generation_info(png)
    assert info.parameters["Model"] == "ponyDiffusionV6XL" and info.parameters["Size"] == "32x32"
    assert info.parameters["Sampler"] == "Euler"  # SDXL's own scheduler


def test_sdxl_default_size_conditioning_and_img2img(sdxl, tmp_path):
    generator = Generator(sdxl, "tiny-xl")
    sdxl.set_progress_bar_config(disable=True)
    (image, text), = generator.images(GenerationRequest("a cat", steps=1, seed=1))
    size = sdxl.unet.config.sample_size * sdxl.vae_scale_factor
    assert image.size == (size, size)  # the model's own size (1024 for real SDXL), original/target size alike
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    request = GenerationRequest("a cat", steps=2, seed=1, init_image=str(init), strength=0.5)
    (styled, text), = generator.images(request)
    from diffusers import StableDiffusionXLImg2ImgPipeline

    plain = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)(
        "a cat", image=Image.open(init).convert("RGB"), strength=0.5, num_inference_steps=2, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(styled), np.asarray(plain))
    assert "Denoising strength: 0.5" in text


def test_sdxl_styles_from_a_single_file_and_stylecodes_refused(sdxl, clip_dir, tmp_path, capsys):
    """An SDXL checkpoint takes a two-part style (CLIP-L through --clip-model, bigG's own projection), txt2img and
    img2img, with --from giving the same pixels; an SD1.x style tunes CLIP-L alone; stylecodes stay SD1.5-only."""
    ckpt = write_checkpoint(sdxl, tmp_path / "xl.safetensors")
    g = torch.Generator().manual_seed(8)
    style = save_style(Style(torch.randn(PROJ, generator=g), g=torch.randn(16, generator=g)),
                       tmp_path / "xl-style.safetensors")
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (30, 90, 200)).save(init)
    base = ["--model", str(ckpt), "--clip-model", str(clip_dir), "--style", str(style), "--style-steps", "2",
            "--style-lr", "3e-3", *SIZE]
    assert main(["generate", "a cat", *base, "--out", str(tmp_path / "a")]) == 0
    (made,) = capsys.readouterr().out.split()
    assert main(["generate", "a cat", *base, "--style-steps", "0", "--out", str(tmp_path / "p")]) == 0
    (plain,) = capsys.readouterr().out.split()
    assert not np.array_equal(_pixels(made), _pixels(plain))
    assert np.array_equal(_pixels(plain), _plain(sdxl, "a cat", seed=0))  # 0 steps: diffusers' own image
    text = Image.open(made).info["parameters"]
    assert "Aesthetic towers: both" in text and "Aesthetic steps: 2" in text
    assert main(["generate", "--from", made, "--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(_pixels(capsys.readouterr().out.split()[0]), _pixels(made))
    assert main(["generate", "a cat", *base, "--init-image", str(init), "--strength", "0.6",
                 "--out", str(tmp_path / "i")]) == 0
    capsys.readouterr()
    sd1_style = save_style(Style(torch.randn(PROJ)), tmp_path / "s.safetensors")
    assert main(["generate", "a cat", *base[:4], "--style", str(sd1_style), *SIZE, "--out", str(tmp_path / "c")]) == 0
    assert "only SDXL's CLIP-L text tower is tuned" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(ckpt), "--stylecode", random_code(1), *SIZE]) == 1
    assert "SD1.5-only" in _one_line_error(capsys)


def test_variants_of_one_model_load_the_same_weights(sd1, tmp_path):
    """fp16, .ckpt (wrapped in state_dict, with Lightning's callback state), EMA copies, no baked VAE + --vae,
    and A1111's NAME.vae.safetensors beside the file."""
    ref = load_checkpoint(write_checkpoint(sd1, tmp_path / "full.safetensors"))
    half = load_checkpoint(write_checkpoint(sd1, tmp_path / "half.safetensors", dtype=torch.float16))
    for name, t in ref.unet.state_dict().items():
        assert torch.equal(half.unet.state_dict()[name], t.half().float())
    # an old .ckpt: wrapped weights, a PyTorch Lightning callback pickled beside them
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:2]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        state = original_state(sd1)
        ema = {"model_ema." + k[len("model.diffusion_model."):].replace(".", ""): v + 1.0 for k, v in state.items()
               if k.startswith("model.diffusion_model.")}
        cb = ModelCheckpoint()
        cb.best_model_score = torch.tensor(0.5)
        torch.save({"state_dict": {**state, **ema}, "callbacks": {"ModelCheckpoint": cb}, "global_step": 470000},
                   tmp_path / "old.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    old = load_checkpoint(tmp_path / "old.ckpt")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, part).state_dict(), getattr(old, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part  # the non-EMA weights, as A1111 loads them
    # no VAE in the file: one line, then --vae, then the VAE beside it
    novae = write_checkpoint(sd1, tmp_path / "novae.safetensors", vae=False)
    with pytest.raises(Exception, match="no VAE baked in"):
        load_checkpoint(novae)
    vae_state = {k[len("first_stage_model."):]: v for k, v in original_state(sd1).items()
                 if k.startswith("first_stage_model.")}
    save_file(vae_state, str(tmp_path / "vae-ft-mse.safetensors"))
    given = load_checkpoint(novae, vae=str(tmp_path / "vae-ft-mse.safetensors"))
    assert all(torch.equal(given.vae.state_dict()[k], v) for k, v in ref.vae.state_dict().items())
    save_file({k: v * 0 for k, v in vae_state.items()}, str(tmp_path / "full.vae.safetensors"))
    beside = load_checkpoint(tmp_path / "full.safetensors")
    assert all(float(v.abs().sum()) == 0 for v in beside.vae.state_dict().values())


def test_loaded_pipeline_is_not_touched_by_generation(sd1, tmp_path):
    pipe = load_checkpoint(write_checkpoint(sd1, tmp_path / "m.safetensors"))
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.set_progress_bar_config(disable=True)
    Generator(pipe, "m").images(GenerationRequest("a cat", steps=1, width=32, height=32))
    assert all(torch.equal(before[k], v) for k, v in pipe.text_encoder.state_dict().items())


# -- detection and refusals -----------------------------------------------------------------------------------------


def _shapes(pipe):
    return {k: tuple(v.shape) for k, v in original_state(pipe).items()}


def test_family_detection_from_keys_and_shapes(sd1, sdxl):
    assert classify(_shapes(sd1)).family == "sd1"
    assert classify(_shapes(family_pipeline("sd2"))).family == "sd2"
    kind = classify(_shapes(sdxl))
    assert (kind.family, kind.variant, kind.refusal) == ("sdxl", "base", None)
    inpaint = _shapes(sd1)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = (8, 9, 3, 3)
    assert classify(inpaint).variant == "inpainting" and "inpainting" in classify(inpaint).refusal
    ip2p = dict(inpaint, **{"model.diffusion_model.input_blocks.0.0.weight": (8, 8, 3, 3)})
    assert classify(ip2p).variant == "instruct-pix2pix"
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in _shapes(sdxl).items()
               if not k.startswith("conditioner.embedders.0.")}
    assert classify(refiner).family == "sdxl-refiner" and "refiner" in classify(refiner).refusal


@pytest.mark.parametrize("what, make, words", [
    ("inpainting", "inpainting", "inpainting"),
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, "a LoRA (kohya)"),
    ("embedding", {"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
    ("flux", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, "a Flux model"),
    ("sd3", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)},
     "Stable Diffusion 3"),
    ("vae", {"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2), "decoder.up.0.block.0.conv1.weight":
             torch.zeros(2, 2)}, "a VAE, not a whole model"),
])
def test_wrong_kind_of_file_is_one_line(sd1, tmp_path, capsys, what, make, words):
    path = tmp_path / f"{what}.safetensors"
    if make == "inpainting":
        state = original_state(sd1)
        w = state["model.diffusion_model.input_blocks.0.0.weight"]
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)
        save_file(state, str(path))
    else:
        save_file(make, str(path))
    assert main(["generate", "a cat", "--model", str(path), *SIZE]) == 1
    line = _one_line_error(capsys)
    assert words in line and path.name in line


def test_pickle_asking_for_code_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.ckpt")
    assert main(["generate", "a cat", "--model", str(tmp_path / "evil.ckpt"), *SIZE]) == 1
    line = _one_line_error(capsys)
    assert "asks for Python code" in line and "pwned" not in capsys.readouterr().out


def test_shipped_configs_are_the_real_architectures(monkeypatch):
    """Parameter counts of the published models (SD1.5 UNet 859.5 M, SDXL UNet 2.567 B, ...), on the meta device."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    monkeypatch.delenv("STYLEGRAD_CHECKPOINT_CONFIGS")
    expected = {"sd1": (859_520_964, [123_060_480]), "sd2": (865_910_724, [340_387_840]),
                "sdxl": (2_567_463_684, [123_060_480, 694_659_840])}
    for family, (unet_params, text_params) in expected.items():
        cfg = family_config(family)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg["unet"])
            vae = AutoencoderKL.from_config(cfg["vae"])
            counts = []
            for part in ("text_encoder", "text_encoder_2"):
                if part in cfg:
                    c = {k: v for k, v in cfg[part].items() if k not in ("class", "prefix", "layout")}
                    model = getattr(transformers, cfg[part]["class"])(transformers.CLIPTextConfig(**c))
                    counts.append(sum(p.numel() for p in model.parameters()))
        assert sum(p.numel() for p in unet.parameters()) == unet_params, family
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863
        assert counts == text_params, family
    assert family_config("sd2", "v_prediction")["unet"]["sample_size"] == 96  # 768 px


def test_real_clip_tokenizer_from_the_open_clip_merges(monkeypatch, tmp_path):
    import importlib.util
    import os

    if importlib.util.find_spec("open_clip") is None:
        if os.environ.get("STYLEGRAD_REQUIRE_SHARED") == "1":
            pytest.fail("CI installs open_clip_torch (--no-deps) for its BPE merges file")
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    from stylegrad.checkpoints import tokenizers

    monkeypatch.setenv("STYLEGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(tokenizers, "_from_hub_cache", lambda: None)
    tokenizers._base_tokenizer.cache_clear()
    try:
        tok = tokenizers.clip_tokenizer()
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
        assert len(tok) == 49408 and tok.pad_token_id == 49407
        assert tokenizers.clip_tokenizer("!").pad_token_id == 0  # the OpenCLIP towers pad with '!'
        assert (tmp_path / "clip-tokenizer" / "vocab.json").is_file()  # built once, then read from the cache
    finally:
        tokenizers._base_tokenizer.cache_clear()


# -- the models folder ----------------------------------------------------------------------------------------------


def test_models_folder_picks_by_name_and_lists(sd1, sdxl, tmp_path, capsys, monkeypatch):
    models = tmp_path / "Stable-diffusion"
    (models / "xl").mkdir(parents=True)
    a = write_checkpoint(sd1, models / "dreamshaper_8.safetensors")
    write_checkpoint(sdxl, models / "xl" / "juggernautXL.safetensors")
    save_file({"emb_params": torch.zeros(2, 32)}, str(models / "oops-embedding.safetensors"))
    code = main(["generate", "a cat", "--model", "dreamshaper_8", "--models-dir", str(models), "--seed", "3",
                 "--out", str(tmp_path / "o"), *SIZE])
    assert code == 0, capsys.readouterr().err
    png = capsys.readouterr().out.split()[0]
    assert np.array_equal(_pixels(png), _plain(sd1, prompt="a cat", negative=""))
    monkeypatch.setenv("STYLEGRAD_MODELS_DIR", str(models))
    assert main(["models", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["dreamshaper_8"]["family"] == "sd1" and listed["juggernautXL"]["family"] == "sdxl"
    assert listed["dreamshaper_8"]["hash"] == hashlib.sha256(a.read_bytes()).hexdigest()[:10]
    assert listed["dreamshaper_8"]["size_mb"] == round(a.stat().st_size / 2**20, 1)
    assert not listed["oops-embedding"]["usable"]
    assert main(["models"]) == 0
    assert "SDXL" in capsys.readouterr().out
    (models / "dreamshaper_8.ckpt").write_bytes(b"")  # same stem twice: the safetensors one is picked
    assert main(["generate", "a cat", "--model", "dreamshaper_8", "--out", str(tmp_path / "o2"), *SIZE]) == 0


def test_embed_sdxl_style_info_and_mix(shared, clip_dir, tmp_path, capsys):
    """embed --family sdxl writes both image means (clip_l, clip_g) in one file; info, mix and load read it."""
    from tiny import tiny_clip, tiny_processor, tiny_tokenizer

    from stylegrad import load_style

    g_dir = tmp_path / "clip_g"
    tiny_clip(7).save_pretrained(g_dir)
    tiny_processor().save_pretrained(g_dir)
    tiny_tokenizer().save_pretrained(g_dir)
    images = shared / "images" / "aivazovsky"
    for out in ("a.safetensors", "b.safetensors"):
        assert main(["embed", str(images), "-o", str(tmp_path / out), "--family", "sdxl", "--clip-model",
                     str(clip_dir), "--clip-model-g", str(g_dir)]) == 0
    assert "widths 24 + 24" in capsys.readouterr().out
    style = load_style(tmp_path / "a.safetensors")
    assert style.is_sdxl and style.metadata["encoder_g"] == str(g_dir) and abs(style.g.norm() - 1) < 1e-5
    assert not torch.allclose(style.vector, style.g)  # two different image towers
    assert main(["info", str(tmp_path / "a.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)[0]
    assert info["kind"] == "style" and info["widths"] == [24, 24] and info["family"] == "sdxl"
    assert main(["mix", f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:0.5", "-o",
                 str(tmp_path / "m.safetensors")]) == 0
    assert load_style(tmp_path / "m.safetensors").is_sdxl
    assert main(["embed", str(images), "-o", str(tmp_path / "x.pt"), "--family", "sdxl", "--clip-model",
                 str(clip_dir), "--clip-model-g", str(g_dir)]) == 1
    assert "save it as .safetensors" in _one_line_error(capsys)
