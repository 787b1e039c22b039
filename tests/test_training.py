"""Training textual inversion and LoRA on tiny models: the loss falls on a small set, a stopped and resumed run
equals an uninterrupted one bit for bit, the files load through stylegrad and diffusers, bad data is one line."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylegrad.training.data import read_training_set
from stylegrad.training.loop import TrainSettings, evaluation_loss, train
from stylegrad.training.models import load_models
from stylegrad.training.recipes import train_lora, train_textual_inversion

WORLD = Path(__file__).resolve().parents[1] / "stylegrad" / "world"
WORLD_EXAMPLES = WORLD / "examples"
FAST = dict(resolution=32, batch_size=2, grad_accum=1, checkpoint_every=2)


def _trained_loss(method_factory, pictures, steps, lr, tmp_path):
    """On the small world's trained model: a random tiny UNet has nothing for a method to steer."""
    models = load_models(str(WORLD / "weights" / "sd"), "cpu")
    data = read_training_set([pictures], 32)
    method = method_factory(models)
    before = evaluation_loss(method, models, data, 32)
    train(method, models, data, TrainSettings(steps=steps, lr=lr, work=tmp_path / "w", **FAST), progress=False)
    return before, evaluation_loss(method, models, data, 32)


def test_textual_inversion_lowers_the_loss(pictures, tmp_path):
    from stylegrad.training.textual_inversion import TextualInversion

    before, after = _trained_loss(lambda m: TextualInversion(m, "zq", "red", 2), pictures, 40, 5e-2, tmp_path)
    assert after < before * 0.97, (before, after)


def test_lora_lowers_the_loss_and_leaves_the_files_untouched(pictures, tmp_path):
    from stylegrad.training.lora import LoRA

    unet_file = WORLD / "weights" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    digest = unet_file.read_bytes()
    before, after = _trained_loss(lambda m: LoRA(m, rank=4, text_encoder=True), pictures, 40, 1e-2, tmp_path)
    assert after < before * 0.97, (before, after)
    assert unet_file.read_bytes() == digest


@pytest.mark.parametrize("kind", ["textual-inversion", "lora"])
def test_stopped_and_resumed_equals_uninterrupted(world, pictures, tmp_path, kind):
    def run(out, stop_after=None):
        kw = dict(model=str(world[1]), device="cpu", progress=False, steps=4, lr=1e-2, **FAST)
        if kind == "lora":
            return train_lora([str(pictures)], out, text_encoder=True, stop_after=stop_after, **kw)
        return train_textual_inversion([str(pictures)], out, "zq", init="red", stop_after=stop_after, **kw)

    whole = run(tmp_path / "a" / "x.safetensors")
    run(tmp_path / "b" / "x.safetensors", stop_after=2)  # the interrupted run, checkpoint at step 2
    resumed = run(tmp_path / "b" / "x.safetensors")
    a, b = (load_file(str([p for p in paths if p.suffix == ".safetensors"][0])) for paths in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "x-training" / "checkpoint-4").is_dir()


def test_embedding_files_load_in_stylegrad_a1111_and_diffusers(world, pictures, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stylegrad import load_embedding

    pt, st = train_textual_inversion([str(pictures)], tmp_path / "zq.pt", "zq", init="red", vectors=2,
                                     model=str(world[1]), device="cpu", progress=False, steps=2, lr=1e-2, **FAST)
    trained = load_file(str(st))["emb_params"]
    assert trained.shape == (2, 32)
    for path in (pt, st):
        emb = load_embedding(path)
        assert torch.equal(emb.parts[""].float(), trained)
    raw = torch.load(pt, weights_only=True)  # A1111's layout, readable without unpickling code
    assert raw["name"] == "zq" and torch.equal(raw["string_to_param"]["*"], trained)
    pipe = StableDiffusionPipeline.from_pretrained(world[1], safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(st), token="<zq>")
    text = pipe.maybe_convert_prompt("<zq>", pipe.tokenizer)  # diffusers' multi-vector words: '<zq> <zq>_1'
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], trained)


def test_lora_file_is_kohya_and_loads_in_stylegrad_and_diffusers(world, pictures, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stylegrad import LoraNetwork

    (path,) = train_lora([str(pictures)], tmp_path / "mine.safetensors", rank=2, alpha=1, text_encoder=True,
                         model=str(world[1]), device="cpu", progress=False, steps=3, lr=5e-2, **FAST)
    tensors = load_file(str(path))
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert all(float(v) == 1.0 for k, v in tensors.items() if k.endswith(".alpha"))
    pipe = StableDiffusionPipeline.from_pretrained(world[1], safety_checker=None, requires_safety_checker=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = pipe.text_encoder(pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        plain = pipe.unet(x, t, ctx).sample
        net = LoraNetwork.for_pipeline(pipe, [(str(path), 1.0, 1.0)])
        with net.applied():
            ours = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(x, t, ctx).sample
    assert (ours - plain).abs().max() > 1e-6
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_sdxl_trainers_write_both_towers(tmp_path, pictures):
    from ckpt_layout import family_pipeline

    from stylegrad import load_embedding

    folder = tmp_path / "xl"
    family_pipeline("sdxl", seed=1).save_pretrained(folder)
    kw = dict(model=str(folder), device="cpu", progress=False, steps=2, lr=1e-2, **FAST)
    pt, st = train_textual_inversion([str(pictures)], tmp_path / "xl.safetensors", "zq", init="red", **kw)
    tensors = load_file(str(st))
    assert set(tensors) == {"clip_l", "clip_g"}
    emb = load_embedding(st)
    assert set(emb.parts) == {"clip_l", "clip_g"}
    (lora,) = train_lora([str(pictures)], tmp_path / "xl-lora.safetensors", text_encoder=True, **kw)
    keys = load_file(str(lora)).keys()
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL: kohya's original block names
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_bad_data_is_one_line(world, tmp_path, capsys):
    from stylegrad.apps.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["train", "lora", "--out", str(tmp_path / "x.safetensors"), "--model", str(world[1]), "--steps", "1",
            "--resolution", "32", "--device", "cpu"]
    assert main([*args[:2], str(empty), *args[2:]]) == 1
    assert capsys.readouterr().err.strip().startswith("Error: no pictures found")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (40, 24), "red").save(bad / "a.png")
    Image.new("RGB", (32, 32), "blue").save(bad / "b.png")
    (bad / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    assert main([*args[:2], str(bad), *args[2:]]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: cannot read the caption") and "a.txt" in err and len(err.splitlines()) == 1
    (bad / "a.txt").write_text("a red thing")
    data = read_training_set([bad], 32)  # mixed sizes: resized and cropped, with a note
    assert data.pixels.shape == (2, 3, 32, 32) and data.captions == ["a red thing", None]


def test_sd2_trainers_run_and_load(tmp_path, pictures):
    from ckpt_layout import family_pipeline

    from stylegrad import load_embedding

    folder = tmp_path / "sd2"
    family_pipeline("sd2", seed=1).save_pretrained(folder)
    kw = dict(model=str(folder), device="cpu", progress=False, steps=2, lr=1e-2, **FAST)
    pt, st = train_textual_inversion([str(pictures)], tmp_path / "v2.pt", "zq", init="red", **kw)
    width = load_file(str(st))["emb_params"].shape[1]
    assert load_embedding(pt).parts[""].shape == (1, width)
    (lora,) = train_lora([str(pictures)], tmp_path / "v2-lora.safetensors", **kw)
    assert any(k.startswith("lora_unet_") for k in load_file(str(lora)))


def test_samples_every_n_steps_show_the_trained_word(pictures, tmp_path):
    from stylegrad import read_generation_info

    train_textual_inversion([str(pictures)], tmp_path / "zq.pt", "zq", init="red", model=str(WORLD / "weights" / "sd"),
                            device="cpu", progress=False, steps=2, lr=1e-2, sample_every=1, sample_steps=2, **FAST)
    samples = sorted((tmp_path / "zq-training" / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-000001.png", "step-000002.png"]
    assert "zq" in read_generation_info(samples[0]).prompt



def test_training_into_the_embeddings_folder_leaves_only_the_embedding_there(world, pictures, tmp_path):
    """``--out embeddings/zq.pt``: the run's checkpoints (zq-training/checkpoint-N) sit in the embeddings folder
    but are not embeddings; the folder offers the trained word alone, with nothing skipped."""
    from stylegrad.addons.embeddings import EmbeddingLibrary

    folder = tmp_path / "embeddings"
    train_textual_inversion([str(pictures)], folder / "zq.pt", "zq", init="red", model=str(world[1]), device="cpu",
                            progress=False, steps=2, lr=1e-2, **FAST)
    assert list((folder / "zq-training").glob("checkpoint-*"))
    library = EmbeddingLibrary([str(folder)])
    assert library.names() == ["zq"] and library.get("zq") is not None and not library.skipped
