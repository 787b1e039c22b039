"""The small world's groundwork: reproducible data, the character tokenizer, and the effect measurement
running through the real stylegrad path (on the tiny in-code models until trained weights ship)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StyleOptions
from stylegrad.world.data import COLORS, SHAPES, class_captions, dataset, render
from stylegrad.world.measure import measure_effect, split_caption
from stylegrad.world.tokenizer import char_tokenizer


def test_dataset_is_reproducible_and_captions_match_scenes():
    a, b, c = dataset(16, 5), dataset(16, 5), dataset(16, 6)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, c))
    for image, caption, scene in a:
        assert split_caption(caption) == (scene.color, scene.shape)
        assert np.array_equal(np.asarray(image), np.asarray(render(scene)))
    assert len(class_captions()) == len(COLORS) * len(SHAPES)


def test_styles_look_different():
    (im, _, scene), = dataset(1, 3)
    looks = {}
    for style in ("plain", "striped", "dotted", "outlined", "blurry"):
        looks[style] = np.asarray(render(type(scene)(scene.shape, scene.color, style, 0, 16.0, 16.0, 10.0)), float)
    for a in looks:
        for b in looks:
            if a < b:
                assert np.abs(looks[a] - looks[b]).mean() > 1.0, (a, b)


def test_char_tokenizer_keeps_captions_within_77_tokens():
    tok = char_tokenizer()
    ids = tok(["a yellow triangle, outlined"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids.count(tok.eos_token_id) > 1 and tok.eos_token_id == max(tok.get_vocab().values())


def test_measure_effect_runs_the_real_path(pipe, clip_text, world):
    from stylegrad.evaluation.metrics import ClipEmbedder

    clip_dir, _ = world
    embedder = ClipEmbedder(str(clip_dir))
    encoder = AestheticEncoder.from_pipeline(pipe, clip_text)
    pipe.set_progress_bar_config(disable=True)
    from stylegrad.pipelines.request import GenerationRequest

    direction = torch.randn(PROJ, generator=torch.Generator().manual_seed(4))
    rows = measure_effect(pipe, encoder, embedder, Style(direction), prompts=("a red circle",),
                          seeds=range(2), steps=(0, 2), options=StyleOptions(lr=1e-2),
                          settings=GenerationRequest("", steps=2, width=32, height=32))
    assert [r.steps for r in rows] == [0, 2] and all(len(r.images) == 2 for r in rows)
    captions = class_captions()
    text = F.normalize(embedder.texts(captions), dim=-1)
    for r in rows:  # each number is what the images show, recomputed here from the images themselves
        assert r.wanted == [("red", "circle")] * 2 and r.images[0].size == (32, 32)
        feats = F.normalize(embedder.images(r.images), dim=-1)
        seen = [split_caption(captions[i]) for i in (feats @ text.T).argmax(1).tolist()]
        assert r.recognized == seen
        assert r.shape_accuracy == sum(s[1] == "circle" for s in seen) / 2
        assert r.color_accuracy == sum(s[0] == "red" for s in seen) / 2
        assert r.style_similarity == pytest.approx(float((feats @ F.normalize(direction, dim=0)).mean()), abs=1e-5)
    assert not np.array_equal(np.asarray(rows[0].images[0]), np.asarray(rows[1].images[0]))  # the style acted


def test_training_script_runs_end_to_end_and_repeats(tmp_path, monkeypatch):
    """The retraining recipe in miniature (a few steps of each part, in its two processes, the UNet taking every
    thread after its first step): it writes a CLIP folder and a diffusers pipeline that stylegrad loads, logs each
    part's time, leaves no temporary folders, and the same seed gives the same weights."""
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from stylegrad.world import train
    from stylegrad.world.train import main

    monkeypatch.setattr(train, "WIDEN_AT_UNET_STEP", 1)

    steps = ["--images", "96", "--clip-steps", "2", "--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "2"]
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), *steps])
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert {"clip_s", "vae_s", "unet_s", "decoder_s", "total_s"} <= set(log)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["clip", "sd", "train_log.json"]
    CLIPModel.from_pretrained(tmp_path / "a" / "clip")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a" / "sd")
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels
    for part in ("unet", "vae"):
        name = "diffusion_pytorch_model.safetensors"
        a, b = (load_file(tmp_path / r / "sd" / part / name) for r in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
