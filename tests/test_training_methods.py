"""DreamArtist, the learned negative embedding and full fine-tuning on tiny models: the guided losses equal a plain
reference of classifier-free guidance, each trainer writes files that load where users load them, a stopped and
resumed run equals an uninterrupted one, and DreamArtist's pair is used as a pair in generation (recorded in the
PNG, so ``--from`` makes the same image)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from stylegrad.training.recipes import train_dreamartist, train_finetune, train_negative

FAST = dict(resolution=32, batch_size=2, grad_accum=1, checkpoint_every=2)
SIZE = ["--width", "32", "--height", "32", "--steps", "2"]
LOSS_TOLERANCE = 1e-6  # the same float32 operations in another order: rounding only


def _kw(world, **more):
    return {"model": str(world[1]), "device": "cpu", "progress": False, "lr": 5e-2, **FAST, **more}


@pytest.fixture(scope="module")
def pair(world, pictures, tmp_path_factory):
    """A DreamArtist pair trained for two steps on the tiny model, alone in an embeddings folder."""
    folder = tmp_path_factory.mktemp("embeddings")
    paths = train_dreamartist([str(pictures)], folder / "zq.pt", init="red", **_kw(world, steps=2,
                                                                                     work=folder.parent / "da-work"))
    return folder, paths


def _reference_loss(models, mean, std, pos, neg, guidance, seed):
    """Classifier-free guidance written out: the same draws as training, the UNet on both conditionings,
    ``e_neg + s * (e_pos - e_neg)`` against the noise."""
    g = torch.Generator().manual_seed(seed)
    latents = mean + std * torch.randn(mean.shape, generator=g)
    noise = torch.randn(mean.shape, generator=g)
    t = torch.randint(0, models.scheduler.config.num_train_timesteps, (mean.shape[0],), generator=g)
    noisy = models.scheduler.add_noise(latents, noise, t)
    e_pos = models.unet(noisy, t, encoder_hidden_states=pos).sample
    e_neg = models.unet(noisy, t, encoder_hidden_states=neg).sample
    return F.mse_loss(e_neg + guidance * (e_pos - e_neg), noise)


@pytest.mark.parametrize("kind", ["dreamartist", "negative"])
def test_guided_loss_equals_the_cfg_formula(world, pictures, kind):
    from stylegrad.training.data import read_training_set
    from stylegrad.training.dreamartist import DreamArtist
    from stylegrad.training.models import condition, load_models
    from stylegrad.training.negative import LearnedNegative
    from stylegrad.training.step import latent_moments

    models = load_models(str(world[1]), "cpu")
    mean, std = latent_moments(models.vae, read_training_set([pictures], 32).pixels[:2])
    if kind == "dreamartist":
        method = DreamArtist(models, "zq", init="red")
        captions, negatives, guidance = ["zq, a red circle", "a picture in the style of zq"], \
            ["zq-neg, a red circle", "a picture in the style of zq-neg"], 3.0
    else:
        method = LearnedNegative(models, "washed", vectors=2)
        captions, negatives, guidance = ["a red circle", ""], ["washed", "washed"], 7.5
    loss = method.loss(models, captions, mean, std, torch.Generator().manual_seed(5), 32)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in method.trained().values())
    with torch.no_grad():
        words = method.words()
        pos = condition(models, captions, words)["encoder_hidden_states"]
        neg = condition(models, negatives, words)["encoder_hidden_states"]
        ref = float(_reference_loss(models, mean, std, pos, neg, guidance, 5))
        unguided = float(_reference_loss(models, mean, std, pos, neg, 1.0, 5))
    loss = float(loss.detach())
    assert abs(loss - ref) <= LOSS_TOLERANCE * ref, (loss, ref)
    assert abs(unguided - ref) > 1e-4  # the guidance is in the loss, not a no-op


def test_dreamartist_writes_a_pair_the_embeddings_reader_loads(pair):
    from stylegrad import load_embedding
    from stylegrad.addons.embeddings import EmbeddingLibrary

    folder, paths = pair
    assert [p.name for p in paths] == ["zq.pt", "zq.safetensors", "zq-neg.pt", "zq-neg.safetensors"]
    pos, neg = load_embedding(folder / "zq.pt"), load_embedding(folder / "zq-neg.pt")
    assert pos.parts[""].shape == (3, 32) and neg.parts[""].shape == (6, 32)  # the extension's 3 and 6 vectors
    assert torch.equal(load_file(str(folder / "zq-neg.safetensors"))["emb_params"], neg.parts[""])
    raw = torch.load(folder / "zq-neg.pt", weights_only=True)  # A1111's layout
    assert raw["name"] == "zq-neg" and raw["step"] == 2
    assert {"zq", "zq-neg"} <= set(EmbeddingLibrary([str(folder)]).names())


def _image(gen, request):
    (image, text), = gen.images(request)
    return np.asarray(image), text


def test_the_pair_is_used_in_generation_and_recorded(world, pair, tmp_path, capsys):
    from stylegrad import GenerationRequest, Generator
    from stylegrad.apps.cli import main
    from stylegrad.files.infotext import parse_infotext
    from stylegrad.pipelines.loading import load_pipeline

    folder, _ = pair
    pipe = load_pipeline(str(world[1]), "cpu")
    gen = Generator(pipe, embeddings_dirs=[str(folder)])
    request = GenerationRequest("zq, a red circle", seed=1, steps=2, width=32, height=32)
    with pytest.warns(UserWarning, match="zq-neg added to the negative prompt"):
        auto, text = _image(gen, request)
    _, negative, fields = parse_infotext(text)
    assert negative == "zq-neg" and "zq-neg: " in fields["TI hashes"]
    written, _ = _image(gen, GenerationRequest("zq, a red circle", "zq-neg", seed=1, steps=2, width=32, height=32))
    assert np.array_equal(auto, written)  # the same as writing it yourself
    alone, _ = _image(Generator(pipe), GenerationRequest("zq, a red circle", seed=1, steps=2, width=32, height=32,
                                                          embeddings=(str(folder / "zq.pt"),)))
    assert np.array_equal(auto, alone)  # --embedding NAME.pt finds NAME-neg beside it
    _, text = _image(gen, GenerationRequest("zq, a red circle", "blurry", seed=1, steps=2, width=32, height=32))
    assert parse_infotext(text)[1] == "blurry, zq-neg"
    _, text = _image(gen, GenerationRequest("a red circle", seed=1, steps=2, width=32, height=32))
    assert parse_infotext(text)[1] == ""  # no NAME in the prompt, nothing added

    # the CLI: --embedding NAME.pt, and --from makes the same image with the same negative prompt (not doubled)
    assert main(["generate", "zq, a red circle", "--model", str(world[1]), "--embedding", str(folder / "zq.pt"),
                 "--seed", "1", "--out", str(tmp_path / "a"), *SIZE]) == 0
    (first,) = capsys.readouterr().out.split()
    assert main(["generate", "--from", first, "--out", str(tmp_path / "b")]) == 0
    (again,) = capsys.readouterr().out.split()
    with Image.open(first) as x, Image.open(again) as y:
        assert np.array_equal(np.asarray(x), np.asarray(y))
        assert parse_infotext(y.info["parameters"])[1] == parse_infotext(x.info["parameters"])[1] == "zq-neg"


def test_a_learned_negative_in_the_negative_prompt_changes_the_image(world, pictures, tmp_path):
    from stylegrad import GenerationRequest, Generator, load_embedding
    from stylegrad.pipelines.loading import load_pipeline

    folder = tmp_path / "embeddings"
    pt, st = train_negative([str(pictures)], folder / "washed.pt", vectors=2,
                            **_kw(world, steps=2, work=tmp_path / "work"))
    assert (pt.name, st.name) == ("washed.pt", "washed.safetensors")
    assert load_embedding(pt).parts[""].shape == (2, 32)
    gen = Generator(load_pipeline(str(world[1]), "cpu"), embeddings_dirs=[str(folder)])
    plain, _ = _image(gen, GenerationRequest("a red circle", seed=2, steps=2, width=32, height=32))
    negated, text = _image(gen, GenerationRequest("a red circle", "washed", seed=2, steps=2, width=32, height=32))
    assert not np.array_equal(plain, negated)
    assert "washed: " in text


def test_finetune_writes_a_folder_that_loads_as_model(world, pictures, tmp_path, capsys):
    from stylegrad.apps.cli import main
    from stylegrad.pipelines.loading import load_pipeline

    out = tmp_path / "models" / "mine"
    (folder,) = train_finetune([str(pictures)], out, text_encoder=True, word="zq", **_kw(world, steps=2, lr=1e-3))
    assert folder == out and (out / "model_index.json").is_file()
    trained = load_file(str(tmp_path / "models" / "mine-training" / "checkpoint-2" / "trained.safetensors"))
    tuned, base = load_pipeline(str(out), "cpu"), load_pipeline(str(world[1]), "cpu")
    for part in ("unet", "text_encoder"):
        state = getattr(tuned, part).state_dict()
        assert all(torch.equal(state[k[len(part) + 1:]], v) for k, v in trained.items() if k.startswith(part + "."))
    assert not torch.equal(tuned.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(tuned.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)  # frozen
    assert main(["generate", "zq, a red circle", "--model", str(out), "--out", str(tmp_path / "g"), *SIZE]) == 0
    assert capsys.readouterr().out.strip().endswith(".png")
    assert main(["train", "finetune", str(pictures), "--out", str(tmp_path / "x.safetensors"), "--model",
                 str(world[1]), "--steps", "1", "--resolution", "32", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: a fine-tune is written as a diffusers folder") and len(err.splitlines()) == 1


def _outputs(paths: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for p in paths:
        files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
        for f in files:
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("kind", ["dreamartist", "negative", "finetune"])
def test_stopped_and_resumed_equals_uninterrupted(world, pictures, tmp_path, kind):
    def run(where, stop_after=None):
        kw = _kw(world, steps=2, stop_after=stop_after, checkpoint_every=1, lr=1e-3 if kind == "finetune" else 5e-2)
        if kind == "dreamartist":
            return train_dreamartist([str(pictures)], where / "zq.pt", init="red", **kw)
        if kind == "negative":
            return train_negative([str(pictures)], where / "washed.pt", vectors=2, **kw)
        return train_finetune([str(pictures)], where / "mine", text_encoder=True, **kw)

    whole = _outputs(run(tmp_path / "a"))
    run(tmp_path / "b", stop_after=1)  # the interrupted run, checkpoint at step 1
    resumed = _outputs(run(tmp_path / "b"))
    assert whole.keys() == resumed.keys() and whole
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_cli_trains_dreamartist(world, pictures, tmp_path, capsys):
    from stylegrad.apps.cli import main

    assert main(["train", "dreamartist", str(pictures), "--out", str(tmp_path / "da.pt"), "--model", str(world[1]),
                 "--steps", "1", "--resolution", "32", "--device", "cpu", "--vectors", "2"]) == 0
    printed = [Path(p).name for p in capsys.readouterr().out.split()]
    assert printed == ["da.pt", "da.safetensors", "da-neg.pt", "da-neg.safetensors"]


def test_sdxl_pair_and_finetune(tmp_path, pictures):
    """SDXL: DreamArtist's two files carry both towers' vectors and generation pairs them; the fine-tune of the UNet
    and both text encoders loads back as a model."""
    from ckpt_layout import family_pipeline

    from stylegrad import GenerationRequest, Generator, load_embedding
    from stylegrad.files.infotext import parse_infotext
    from stylegrad.pipelines.loading import load_pipeline

    folder = tmp_path / "xl"
    family_pipeline("sdxl", seed=1).save_pretrained(folder)
    kw = {"model": str(folder), "device": "cpu", "progress": False, "steps": 1, "lr": 1e-2, **FAST}
    embeddings = tmp_path / "embeddings"
    train_dreamartist([str(pictures)], embeddings / "zq.pt", init="red", work=tmp_path / "w1", **kw)
    for name in ("zq", "zq-neg"):
        assert set(load_embedding(embeddings / f"{name}.safetensors").parts) == {"clip_l", "clip_g"}
    gen = Generator(load_pipeline(str(folder), "cpu"), embeddings_dirs=[str(embeddings)])
    with pytest.warns(UserWarning, match="zq-neg added"):
        (_, text), = gen.images(GenerationRequest("zq, a red circle", steps=2, width=64, height=64))
    assert parse_infotext(text)[1] == "zq-neg"
    (out,) = train_finetune([str(pictures)], tmp_path / "xl-tuned", text_encoder=True, **kw)
    tuned = load_pipeline(str(out), "cpu")
    trained = load_file(str(tmp_path / "xl-tuned-training" / "checkpoint-1" / "trained.safetensors"))
    state = tuned.text_encoder_2.state_dict()
    assert all(torch.equal(state[k[len("text_encoder_2."):]], v) for k, v in trained.items()
               if k.startswith("text_encoder_2."))
    assert any(k.startswith("text_encoder_2.") for k in trained)


@pytest.mark.parametrize("kind", ["dreamartist", "finetune"])
def test_fp16_training_keeps_the_trained_tensors_float32(world, pictures, tmp_path, kind):
    """fp16 frozen weights under the CPU's autocast (as a GPU runs it): the pair's vectors and the fine-tuned UNet
    are float32 and finite; the fine-tune's frozen VAE stays in fp16."""
    kw = _kw(world, steps=1, dtype="fp16", lr=1e-3 if kind == "finetune" else 5e-2)
    if kind == "dreamartist":
        paths = train_dreamartist([str(pictures)], tmp_path / "zq.pt", init="red", **kw)
        for p in paths[1::2]:
            v = load_file(str(p))["emb_params"]
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
        return
    (out,) = train_finetune([str(pictures)], tmp_path / "mine", **kw)
    unet = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in unet.values())
    assert all(v.dtype == torch.float16 for v in vae.values())
