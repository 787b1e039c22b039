"""The consistent mode (StyleOptions.target_gain, .target_similarity): each prompt tuned until its cosine to the
style reaches a goal, ``steps`` a cap. The engine stops where the method (aesthetic/method.py) stops, with its
numbers within the contract (docs/exactness.md), per prompt and per SDXL tower; the option reaches the cache key,
the CLI, the PNG and ``--from``; on the small world it evens out the style across prompts."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_sdxl_tuning import xl, xl_style  # noqa: F401  (xl: the module's SDXL fixture)
from test_tuning import ids_of, reference_loop
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions
from stylegrad.aesthetic.contract import REFERENCE_ATOL
from stylegrad.aesthetic.method import goal, tune_text_encoder
from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder
from stylegrad.aesthetic.targets import style_target
from stylegrad.aesthetic.tuning import personalize

PROMPT = "a red house by the sea"
CAP, LR = 30, 3e-3


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))


def trajectory(enc: AestheticEncoder, prompt: str, style: Style, **options) -> list[float]:
    """The cosine before each of CAP steps, then after the last: where a goal will stop the prompt."""
    enc.encode(prompt, style, StyleOptions(steps=CAP, lr=LR, **options))
    return enc.last_similarities[-1]


def between(sims: list[float], k: int) -> float:
    """A goal halfway between the cosines after k - 1 and after k steps: reached first after k steps, away from
    the rounding that separates the engine from the method."""
    return (sims[k - 1] + sims[k]) / 2


@pytest.mark.parametrize("mode,k", [("gain", 6), ("gain", 1), ("similarity", 9)])
def test_stops_where_the_method_stops_with_its_numbers_sd1(pipe, clip_text, style, mode, k):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    sims = trajectory(enc, PROMPT, style)
    assert all(b > a for a, b in zip(sims, sims[1:]))  # rising: each goal below sims[-1] is reached once
    c = between(sims, k)
    options = dict(target_gain=(c - sims[0]) / (1 - sims[0])) if mode == "gain" else dict(target_similarity=c)
    ids = ids_of(pipe, PROMPT)
    ref = tune_text_encoder(clip_text, ids, style.vector, steps=CAP, lr=LR,
                            layer=clip_text.config.num_hidden_layers, **options)
    ours = personalize(enc.tower, ids, style_target(style.vector), steps=CAP,
                       adam=StyleOptions(lr=LR).adam(torch.device("cpu")), **options)
    assert ref.steps == ours.steps == k
    assert (ours.hidden - ref.hidden).abs().max() < REFERENCE_ATOL
    assert (ours.text_embedding - ref.text_embedding).abs().max() < REFERENCE_ATOL
    assert ours.similarities[-1] >= c > ours.similarities[-3]  # the state kept is the first at the goal
    # through the encoder: the options reach the engine
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR, **options))
    assert (pe - ref.hidden).abs().max() < REFERENCE_ATOL
    full = reference_loop(clip_text, ids, style.vector, CAP, LR)
    assert (pe - full).abs().max() > 100 * REFERENCE_ATOL  # it did stop early


def test_a_goal_never_reached_takes_every_step_and_a_goal_reached_at_once_none(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    ids = ids_of(pipe, PROMPT)
    fixed = reference_loop(clip_text, ids, style.vector, 5, LR)
    capped, _ = enc.encode(PROMPT, style, StyleOptions(steps=5, lr=LR, target_gain=1.0))
    assert (capped - fixed).abs().max() < REFERENCE_ATOL and len(enc.last_similarities[0]) == 6
    start = enc.last_similarities[0][0]
    ref = tune_text_encoder(clip_text, ids, style.vector, steps=5, lr=LR, layer=clip_text.config.num_hidden_layers,
                            target_similarity=start - 0.1)
    at_once, _ = enc.encode(PROMPT, style, StyleOptions(steps=5, lr=LR, target_similarity=start - 0.1))
    assert ref.steps == 0 and (at_once - enc.plain([PROMPT])).abs().max() < REFERENCE_ATOL


def test_each_prompt_stops_on_its_own(pipe, clip_text, style):
    """A batch of prompts: each stops at its own goal, as if encoded alone (the goal is relative to each prompt's
    own start), and at the same fraction of its own way where a fixed step count leaves them apart."""
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    prompts = [PROMPT, "a small boat", "stripes and dots on a wall"]
    paths = [trajectory(enc, p, style) for p in prompts]
    starts = [s[0] for s in paths]
    gain = (between(paths[0], 4) - starts[0]) / (1 - starts[0])  # the first prompt stops after 4 steps
    options = StyleOptions(steps=CAP, lr=LR, target_gain=gain)
    steps = []
    for p, s0 in zip(prompts, starts):
        ids = ids_of(pipe, p)
        ref = tune_text_encoder(clip_text, ids, style.vector, steps=CAP, lr=LR,
                                layer=clip_text.config.num_hidden_layers, target_gain=gain)
        ours = personalize(enc.tower, ids, style_target(style.vector), steps=CAP, adam=options.adam(pipe.device),
                           target_gain=gain)
        assert ours.steps == ref.steps < CAP and ours.similarities[-1] >= goal(s0, target_gain=gain)
        steps.append(ours.steps)
    assert len(set(steps)) > 1  # the prompts needed different numbers of steps
    batch, _ = enc.encode(prompts, style, options)
    assert enc.last_steps == steps and [len(s) - 2 for s in enc.last_similarities] == steps  # one cosine more
    for i, p in enumerate(prompts):
        alone, _ = enc.encode(p, style, options)
        assert torch.equal(batch[i : i + 1], alone)


def test_sdxl_towers_stop_on_their_own_as_the_method(xl):  # noqa: F811
    pipe, clip_l = xl
    style = xl_style(pipe, clip_l)
    enc = SDXLAestheticEncoder(pipe, clip_l)
    enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR))
    free = enc.last_similarities
    gain = min((between(free[t][0], 4) - free[t][0][0]) / (1 - free[t][0][0]) for t in ("l", "g"))
    e = enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR, target_gain=gain))
    hidden, pooled, taken = [], None, {}
    for which, model, tok, target in (("l", clip_l, pipe.tokenizer, style.vector),
                                      ("g", pipe.text_encoder_2, pipe.tokenizer_2, style.g)):
        ids = tok([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        tuned = tune_text_encoder(model, ids, target, steps=CAP, lr=LR, layer=-2, final_norm=False, target_gain=gain)
        hidden.append(tuned.hidden)
        pooled = tuned.text_embedding if which == "g" else pooled
        taken[which] = tuned.steps
    assert 0 < min(taken.values()) and max(taken.values()) < CAP
    assert enc.last_steps == {"l": [taken["l"]], "g": [taken["g"]]}
    assert (e.prompt_embeds - torch.cat(hidden, dim=-1)).abs().max() < REFERENCE_ATOL
    assert (e.pooled_prompt_embeds - pooled).abs().max() < REFERENCE_ATOL


def test_the_option_is_in_the_cache_key(pipe, clip_text, style, monkeypatch):
    import stylegrad.aesthetic.encoder as encoder_module

    calls = []
    real = encoder_module.personalize
    monkeypatch.setattr(encoder_module, "personalize", lambda *a, **k: calls.append(k["target_gain"]) or real(*a, **k))
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    sims = trajectory(enc, PROMPT, style)
    near, far = ((between(sims, k) - sims[0]) / (1 - sims[0]) for k in (1, 4))  # reached after 1 and 4 steps
    a, _ = enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR, target_gain=near))
    again, _ = enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR, target_gain=near))
    b, _ = enc.encode(PROMPT, style, StyleOptions(steps=CAP, lr=LR, target_gain=far))
    assert calls == [None, near, far] and torch.equal(a, again) and not torch.equal(a, b)


@pytest.mark.parametrize("bad,message", [
    (dict(target_gain=0.0), r"target_gain=0\.0 must be in \(0, 1\]"),
    (dict(target_gain=1.5), "target_gain=1.5 must be in"),
    (dict(target_gain=float("nan")), "target_gain=nan must be in"),
    (dict(target_gain=0.3, target_similarity=0.5), "target_similarity=0.5 must be unset with target_gain"),
])
def test_bad_goals_are_one_line(bad, message):
    with pytest.raises(StylegradError, match=message):
        StyleOptions(**bad)


def test_requests_check_the_option_by_name():
    from stylegrad.errors import RequestError
    from stylegrad.pipelines.request import build

    assert build({"prompt": "a", "style_options": {"target_gain": 0.3}}).style_options.target_gain == 0.3
    with pytest.raises(RequestError) as err:
        build({"prompt": "a", "style_options": {"target_gain": float("inf")}})
    assert err.value.field == "style_options.target_gain"


def test_png_records_it_and_from_replays_it(world, tmp_path, capsys, style):
    """``--style-target-gain`` on the command line, in the PNG, and back through ``--from``: the same pixels."""
    from stylegrad import save_style
    from stylegrad.apps.cli import main
    from stylegrad.files.infotext import parse_infotext
    from stylegrad.pipelines.replay import request_from_png

    clip_dir, sd_dir = world
    style_path = save_style(style, tmp_path / "look.safetensors")
    assert main(["generate", "a red house", "--style", str(style_path), "--style-steps", "12", "--style-lr", "3e-3",
                 "--style-target-gain", "0.25", "--seed", "5", "--model", str(sd_dir), "--clip-model", str(clip_dir),
                 "--out", str(tmp_path / "a"), "--width", "32", "--height", "32", "--steps", "2"]) == 0
    (first,) = capsys.readouterr().out.split()
    fields = parse_infotext(Image.open(first).info["parameters"])[2]
    assert fields["Aesthetic target gain"] == "0.25" and "Aesthetic target similarity" not in fields
    assert request_from_png(first).style_options == StyleOptions(steps=12, lr=3e-3, target_gain=0.25)
    assert main(["generate", "--from", first, "--out", str(tmp_path / "b")]) == 0
    (again,) = capsys.readouterr().out.split()
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(first).info["parameters"] == Image.open(again).info["parameters"]


def test_every_door_has_the_option():
    """The CLI's flags and Cog's inputs come from StyleOptions' fields; the server's JSON and ComfyUI's node name
    it too."""
    import argparse
    import inspect

    from stylegrad.apps.cli.args import add_style_options, style_options
    from stylegrad.apps.cog import inputs
    from stylegrad.apps.comfyui.nodes import AestheticCLIPTextEncode
    from stylegrad.apps.serve.native import StyleFields

    p = argparse.ArgumentParser()
    add_style_options(p)
    assert style_options(p.parse_args(["--style-target-gain", "0.3"])).target_gain == 0.3
    assert inputs.STYLE_INPUTS["aesthetic_target_gain"] == "target_gain"
    assert StyleFields(target_gain=0.3).target_gain == 0.3
    for name in ("target_similarity", "target_gain"):
        assert name in AestheticCLIPTextEncode.INPUT_TYPES()["optional"]
        assert name in inspect.signature(AestheticCLIPTextEncode.encode).parameters


def test_on_the_small_world_the_text_similarity_is_even_across_prompts():
    """The world's 8 prompts (text tower only, no pictures): at the same mean cosine to the style, the consistent
    mode's spread across prompts is a fraction of a fixed step count's, whose prompts start far apart and stay so."""
    import statistics

    from transformers import CLIPTextModel, CLIPTokenizer

    from stylegrad import embed_images
    from stylegrad.aesthetic.options import CONSISTENT_DEFAULTS
    from stylegrad.world.demo import EXAMPLES, WEIGHTS
    from stylegrad.world.measure import DEMO_LR, PROMPTS

    sd = WEIGHTS / "sd"
    enc = AestheticEncoder(CLIPTextModel.from_pretrained(sd / "text_encoder"),
                           CLIPTokenizer.from_pretrained(sd / "tokenizer"), str(WEIGHTS / "clip"))
    style = embed_images([str(EXAMPLES)], str(WEIGHTS / "clip"), progress=False)
    consistent = StyleOptions(lr=DEMO_LR, **CONSISTENT_DEFAULTS)
    enc.encode(list(PROMPTS), style, consistent)
    final = [s[-1] for s in enc.last_similarities]
    cap = consistent.steps
    enc.encode(list(PROMPTS), style, StyleOptions(steps=cap, lr=DEMO_LR))
    paths = enc.last_similarities  # the cosine after 0, 1, ..., cap fixed steps
    means = [statistics.fmean(p[k] for p in paths) for k in range(cap + 1)]
    k = min(range(cap + 1), key=lambda k: abs(means[k] - statistics.fmean(final)))  # the same mean strength
    assert abs(means[k] - statistics.fmean(final)) < 0.05
    fixed_spread = statistics.pstdev(p[k] for p in paths)
    assert statistics.pstdev(final) < 0.5 * fixed_spread
