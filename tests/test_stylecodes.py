"""Stylecodes model and generation: the published layout loads strictly, s = 0 is the base UNet exactly, the
control stream is deterministic and honours seeds, images make stable codes, and the CLI runs end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_siglip, tiny_stylecodes

from stylegrad import StylegradError
from stylegrad.stylecodes.codec import decode, encode, random_code
from stylegrad.stylecodes.facade import Stylecodes
from stylegrad.stylecodes.model import (
    StylecodesModel,
    load_autoencoder,
    load_stylecodes,
    read_checkpoint,
    save_stylecodes,
)
from stylegrad.stylecodes.unet import controlled_forward


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_size_layout_equals_the_published_manifest(shared):
    """Built for the SD1.5 UNet on the meta device (nothing allocated, nothing downloaded): the same 517 keys,
    shapes and order as the published checkpoint."""
    from diffusers import UNet2DConditionModel

    manifest = json.loads((shared / "stylecodes" / "reference_state_dict.json").read_text())
    cfg = {k: v for k, v in manifest["build"]["base_unet"].items() if k not in ("class", "param_count")}
    with torch.device("meta"):
        model = StylecodesModel(UNet2DConditionModel(**cfg))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, s) for k, s, _ in manifest["tensors"]]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    collab = manifest["collab_layers"]["layers"]
    for name, shape in collab.items():
        layer = model.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (shape["in_features"], shape["out_features"])


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_checkpoint_round_trip_in_both_containers(tmp_path, pipe, suffix):
    model = tiny_stylecodes(pipe.unet)
    path = save_stylecodes(model, tmp_path / f"sc{suffix}")
    if suffix == ".safetensors":  # the published loader ignores other groups; so do we
        from safetensors.torch import load_file, save_file

        flat = load_file(str(path))
        flat["image_proj.dummy"] = torch.zeros(3)
        save_file(flat, str(path))
    else:
        assert set(torch.load(path, weights_only=True)) == {"controlnet"}
    loaded = load_stylecodes(str(path), pipe.unet)
    assert not loaded.training and not loaded.sref_autoencoder.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    auto = load_autoencoder(str(path))
    assert torch.equal(auto.latent_init, model.sref_autoencoder.latent_init)


def _write(tmp_path, state, name="bad.bin"):
    path = tmp_path / name
    torch.save({"controlnet": state}, path)
    return str(path)


def test_strict_loading_names_what_is_wrong(tmp_path, pipe):
    state = tiny_stylecodes(pipe.unet).state_dict()
    missing = dict(state)
    missing.pop("middle_block_out.bias")
    with pytest.raises(StylegradError, match=r"1 missing: middle_block_out\.bias"):
        load_stylecodes(_write(tmp_path, missing), pipe.unet)
    extra = dict(state, **{"control_model.conv_in.weight": torch.zeros(1)})
    with pytest.raises(StylegradError, match=r"1 unexpected: control_model\.conv_in\.weight"):
        load_stylecodes(_write(tmp_path, extra), pipe.unet)
    shaped = dict(state, **{"middle_block_out.bias": torch.zeros(7)})
    with pytest.raises(StylegradError, match=r"wrong shape: middle_block_out\.bias \(7,\)"):
        load_stylecodes(_write(tmp_path, shaped), pipe.unet)
    torch.save({"state_dict": state}, tmp_path / "other.bin")
    with pytest.raises(StylegradError, match="no 'controlnet' dict"):
        read_checkpoint(tmp_path / "other.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(StylegradError, match="not a readable safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")


def _unet_inputs(pipe, batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, 32, generator=g)


def test_collab_identity_reproduces_the_base_unet(pipe):
    """With identity collabs and zero biases, the sub-block loop must compute exactly the base UNet: this pins
    down our base path (skips, upsamplers, attention) and leaves the collab layers as the only change."""
    model = tiny_stylecodes(pipe.unet, trained_look=False)
    for layer in [model.middle_block_out, *model.control_model.up_zero_convs_out]:
        torch.nn.init.zeros_(layer.bias)
    x, ctx = _unet_inputs(pipe)
    with torch.no_grad():
        style_map = model.sref_autoencoder.decode(torch.rand(1, 20), 8, 8)
        ours = controlled_forward(pipe.unet, model, x, 500, ctx, style_map, torch.ones(2, 1, 1, 1))
        base = pipe.unet(x, 500, ctx).sample
    assert torch.equal(ours, base)


def _styled_images(pipe, sc, code, strength=1.0, seed=0, guide=False):
    styled = sc.pipeline(pipe, code, strength, guide)
    styled.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(seed)
    return styled("a red circle", num_inference_steps=3, generator=g, output_type="np").images


def test_strength_zero_is_the_base_output_and_the_pipeline_is_unchanged(pipe):
    pipe.set_progress_bar_config(disable=True)
    before = _state(pipe.unet)
    model = tiny_stylecodes(pipe.unet)
    sc = Stylecodes(model.sref_autoencoder, model)
    g = torch.Generator("cpu").manual_seed(0)
    plain = pipe("a red circle", num_inference_steps=3, generator=g, output_type="np").images
    code = random_code(3)
    assert np.array_equal(_styled_images(pipe, sc, code, strength=0.0), plain)
    styled = _styled_images(pipe, sc, code, strength=1.0)
    assert np.abs(styled - plain).max() > 1e-3  # the style acts
    assert np.array_equal(_styled_images(pipe, sc, code), styled)  # eval mode: repeatable
    assert not np.array_equal(_styled_images(pipe, sc, code, seed=1), styled)  # seeds honoured
    assert not np.array_equal(_styled_images(pipe, sc, random_code(4)), styled)  # the code matters
    half = _styled_images(pipe, sc, code, strength=0.5)
    assert 0 < np.abs(half - plain).mean() < np.abs(styled - plain).mean()
    assert not np.array_equal(_styled_images(pipe, sc, code, guide=True), styled)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_guidance_option_leaves_the_unconditional_half_alone(pipe):
    model = tiny_stylecodes(pipe.unet)
    sc = Stylecodes(model.sref_autoencoder, model)
    x, ctx = _unet_inputs(pipe)
    with torch.no_grad():
        base = pipe.unet(x, 500, ctx).sample
        both = sc.pipeline(pipe, random_code(1)).unet(x, 500, ctx).sample
        cond_only = sc.pipeline(pipe, random_code(1), guide_style=True).unet(x, 500, ctx).sample
    assert torch.equal(cond_only[:1], base[:1]) and torch.equal(cond_only[1:], both[1:])
    assert not torch.allclose(both[:1], base[:1])


def test_blended_codes_decode_their_weighted_mean(pipe):
    model = tiny_stylecodes(pipe.unet)
    sc = Stylecodes(model.sref_autoencoder, model)
    a, b = random_code(1), random_code(2)
    mixed = sc.latent_of(f"{a}::3 {b}::1")
    assert torch.allclose(mixed, (3 * sc.latent_of(a) + sc.latent_of(b)) / 4)
    with pytest.raises(StylegradError, match="version"):
        Stylecodes(model.sref_autoencoder, model, version=2).latent_of(a)


def test_image_to_code_is_stable(pipe, shared):
    siglip, processor = tiny_siglip()
    model = tiny_stylecodes(pipe.unet)
    sc = Stylecodes(model.sref_autoencoder, model, siglip, processor)
    paths = sorted((shared / "images").rglob("*.jpg"))[:3] or sorted((shared / "images").rglob("*.png"))[:3]
    codes = []
    for path in paths:
        with Image.open(path) as im:
            code = sc.code_for(im)
            assert code == sc.code_for(im)
        assert len(code) == 21 and decode(code).version == 1
        assert encode(decode(code).levels) == code  # decode then encode: the same code
        codes.append(code)
    assert len(set(codes)) == len(codes)
    with Image.open(paths[0]) as im:
        ref = sc.code_for(im, format="reference")
    assert len(ref) == 27 and decode(ref).levels == decode(codes[0]).levels


def test_cli_encode_and_generate_with_a_code(tmp_path, world, shared, capsys):
    """code encode -> generate --stylecode (with an aesthetic style too) -> PNG records the code; --style-image."""
    from types import SimpleNamespace

    from stylegrad.apps.cli import main

    def _cli(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    from diffusers import UNet2DConditionModel
    from sd_parsers import ParserManager
    from tiny import PROJ

    from stylegrad import Style, save_style

    clip_dir, sd_dir = world
    style = save_style(Style(torch.randn(PROJ)), tmp_path / "look.safetensors") or tmp_path / "look.safetensors"
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    ckpt = save_stylecodes(tiny_stylecodes(unet), tmp_path / "sc.safetensors")
    siglip, processor = tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    image = sorted((shared / "images").rglob("*.jpg"))[0]
    r = _cli("code", "encode", str(image), "--stylecodes-model", str(ckpt), "--siglip-model", str(tmp_path / "siglip"))
    assert r.returncode == 0, r.stderr
    code = r.stdout.strip()
    assert len(code) == 21 and decode(code).version == 1
    other = random_code(9)
    r = _cli("generate", "a red circle", "--model", str(sd_dir), "--clip-model", str(clip_dir), "--steps", "2",
             "--out", str(tmp_path / "out"), "--style", str(style), "--style-steps", "2",
             "--stylecode", f"{code}::2 {other}::1", "--stylecodes-model", str(ckpt), "--stylecode-strength", "0.7")
    assert r.returncode == 0, r.stderr
    png = r.stdout.strip().splitlines()[-1]
    params = ParserManager().parse(png)
    text = Image.open(png).info["parameters"]
    assert f'Stylecode: "{code}::2 {other}::1"' in text and "Stylecode strength: 0.7" in text
    assert "Aesthetic steps: 2" in text and params is not None  # both methods in one generation
    r = _cli("generate", "a red circle", "--model", str(sd_dir), "--clip-model", str(clip_dir), "--steps", "2",
             "--out", str(tmp_path / "out"), "--stylecode-image", str(image), "--stylecodes-model", str(ckpt),
             "--siglip-model", str(tmp_path / "siglip"))
    assert r.returncode == 0, r.stderr
    made = r.stdout.strip().splitlines()[-1]
    assert f"Stylecode: {code}," in Image.open(made).info["parameters"]
    r = _cli("generate", "--from", png, "--model", str(sd_dir), "--out", str(tmp_path / "again"))  # code and style
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(r.stdout.strip())), np.asarray(Image.open(png)))
    r = _cli("generate", "x", "--model", str(sd_dir), "--stylecode", "not-a-code")
    assert r.returncode == 1 and r.stderr.strip().startswith("Error:") and "Traceback" not in r.stderr
    r = _cli("code", "encode", str(image), "--stylecodes-model", str(tmp_path / "missing.bin"))
    assert r.returncode == 1 and "no Stylecodes checkpoint" in r.stderr


@pytest.fixture()
def triples(tmp_path, world):
    """A tiny training set: four (style image, prompt, target) rows, a SigLIP folder, and the tiny SD folder."""
    from stylegrad.world.data import dataset

    siglip, processor = tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, (image, caption, _) in enumerate(dataset(4, 11)):
        image.save(data / f"{i}.png")
        rows.append({"style_image": f"{i}.png", "prompt": caption, "target_image": f"{i}.png"})
    (data / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, tmp_path / "siglip", world[1]


def _config(triples, out, **kw):
    from stylegrad.stylecodes.training import TrainConfig

    data, siglip, sd = triples
    base = dict(data=str(data), out=str(out), model=str(sd), siglip=str(siglip), batch_size=4, lr=1e-3,
                resolution=32, autoencoder_width=32, checkpoint_every=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_on_a_small_set(triples, tmp_path):
    from stylegrad.stylecodes.training import Trainer

    trainer = Trainer(_config(triples, tmp_path / "run", grad_accum=2, gradient_checkpointing=True, lr=5e-3))
    frozen = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    before = trainer.eval_loss()
    for k in range(20):
        trainer.step(k)
    assert trainer.eval_loss() < 0.97 * before  # the same fixed batch and noise: a real change, not luck
    assert all(torch.equal(v, trainer.unet.state_dict()[k]) for k, v in frozen.items())  # SD stays frozen


def test_resumed_training_continues_exactly(triples, tmp_path):
    from stylegrad.stylecodes.training import train

    whole = train(_config(triples, tmp_path / "a", steps=4))
    assert train(_config(triples, tmp_path / "b", steps=4), stop_after=2) == tmp_path / "b" / "stylecodes.safetensors"
    assert not (tmp_path / "b" / "stylecodes.safetensors").exists() and (tmp_path / "b" / "checkpoint-2").is_dir()
    resumed = train(_config(triples, tmp_path / "b", steps=4))
    a, b = read_checkpoint(whole), read_checkpoint(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from stylegrad.apps.cli import main  # the same run through the command line, two steps only

    data, siglip, sd = triples
    assert main(["train", "stylecodes", str(data), "--out", str(tmp_path / "c"), "--model", str(sd),
                 "--siglip-model", str(siglip), "--steps", "2", "--batch-size", "4", "--lr", "1e-3",
                 "--resolution", "32", "--autoencoder-width", "32", "--checkpoint-every", "2", "--device", "cpu"]) == 0
    c = read_checkpoint(tmp_path / "c" / "stylecodes.safetensors")
    b2 = read_checkpoint(tmp_path / "b" / "checkpoint-2" / "stylecodes.safetensors")
    assert all(torch.equal(b2[k], c[k]) for k in c)  # CLI defaults match the library's
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the last two steps did something


def test_training_data_errors_are_one_line(tmp_path, triples):
    from stylegrad.stylecodes.training import read_index

    with pytest.raises(StylegradError, match="no index.csv or index.jsonl"):
        read_index(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.csv").write_text("style_image,prompt,target_image\nmissing.png,a cat,missing.png\n")
    with pytest.raises(StylegradError, match="row 1: style_image missing.png not found"):
        read_index(bad)
    (bad / "index.csv").write_text("style_image,prompt\na.png,a cat\n")
    with pytest.raises(StylegradError, match="row 1: missing target_image"):
        read_index(bad)
    (bad / "index.csv").unlink()
    (bad / "index.jsonl").write_text('{"style_image": "a.png", "prompt": "x", "target_image": "a.png"}\n{oops\n')
    with pytest.raises(StylegradError, match="index.jsonl line 2 is not JSON"):
        read_index(bad)
    (bad / "index.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(StylegradError, match="is not UTF-8 text"):
        read_index(bad)


def test_any_image_size_gets_its_own_style_map(pipe):
    model = tiny_stylecodes(pipe.unet)
    styled = Stylecodes(model.sref_autoencoder, model).pipeline(pipe, random_code(5))
    styled.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=2, height=48, width=32, output_type="np")
    a = styled("a red circle", generator=torch.Generator("cpu").manual_seed(0), **args).images
    b = pipe("a red circle", generator=torch.Generator("cpu").manual_seed(0), **args).images
    assert a.shape == b.shape == (1, 48, 32, 3) and not np.array_equal(a, b)
    assert {key[:2] for key in styled.unet.maps.maps} == {(12, 8)}


def test_the_wrapper_forwards_only_what_pipelines_read(pipe):
    """StylecodeUNet answers what diffusers' pipelines read on ``pipe.unet`` from the base UNet; anything else, a
    method that would change the user's UNet included, is an AttributeError rather than the base's."""
    from stylegrad.stylecodes.unet import StylecodeUNet

    model = tiny_stylecodes(pipe.unet)
    wrapped = StylecodeUNet(pipe.unet, model, torch.zeros(20))
    assert wrapped.config is pipe.unet.config and wrapped.dtype == pipe.unet.dtype
    assert wrapped.device == pipe.unet.device and wrapped.encoder_hid_proj is pipe.unet.encoder_hid_proj
    assert wrapped.base is pipe.unet and wrapped.control is model  # its own submodules
    for name in ("set_attn_processor", "fuse_qkv_projections", "no_such_attribute"):
        with pytest.raises(AttributeError, match=name):
            getattr(wrapped, name)
    assert not hasattr(wrapped, "_hf_hook")  # none on the base: diffusers' offload checks read False


def test_training_in_half_precision_keeps_sd_half_and_the_model_float32(triples, tmp_path):
    """``--dtype bf16``: the frozen UNet, VAE and text encoder in bf16 (half the memory), the Stylecodes model and
    its optimizer in float32, the loss within bf16's reach of the float32 run's on the same batch."""
    from stylegrad.stylecodes.training import Trainer

    half = Trainer(_config(triples, tmp_path / "bf16", dtype="bf16"))
    full = Trainer(_config(triples, tmp_path / "fp32"))
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}
    losses = [(half.step(k), full.step(k)) for k in range(2)]
    for h, f in losses:
        assert abs(h - f) <= 0.05 * abs(f), losses
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}


def test_training_precision_is_refused_in_one_line_before_anything_loads(tmp_path):
    from stylegrad.errors import RequestError
    from stylegrad.stylecodes.training import TrainConfig, Trainer

    cfg = TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path / "out"), model="nowhere", siglip="nowhere",
                      device="cpu", dtype="fp16", mixed_precision="no")
    with pytest.raises(RequestError, match="half weights train only under autocast"):
        Trainer(cfg)
