"""Aesthetic gradients on SDXL: both towers, exact against encode_prompt at 0 steps and against the method
(aesthetic/method.py) at T steps within the contract (docs/exactness.md), the pipeline untouched, memory back to
baseline."""

import copy

import pytest
import torch
from ckpt_layout import family_pipeline
from test_tuning import _live_tensor_bytes
from transformers import CLIPTextModelWithProjection

from stylegrad import Style, StyleOptions
from stylegrad.aesthetic.contract import REFERENCE_ATOL
from stylegrad.aesthetic.method import tune_text_encoder
from stylegrad.aesthetic.sdxl import TOWERS, SDXLAestheticEncoder

PROMPT = "a red house by the sea"


@pytest.fixture(scope="module")
def xl():
    pipe = family_pipeline("sdxl", seed=3)
    te1 = pipe.text_encoder
    clip_l = CLIPTextModelWithProjection(te1.config).eval()  # CLIP-L with its projection: te1's weights
    clip_l.text_model.load_state_dict(te1.state_dict())
    torch.manual_seed(4)
    torch.nn.init.normal_(clip_l.text_projection.weight, std=0.2)
    return pipe, clip_l


def xl_style(pipe, clip_l, seed=5) -> Style:
    g = torch.Generator().manual_seed(seed)
    return Style(torch.randn(clip_l.config.projection_dim, generator=g), name="xl",
                 g=torch.randn(pipe.text_encoder_2.config.projection_dim, generator=g))


def reference(pipe, clip_l, style, steps, lr, towers, text=PROMPT, clip_skip=None, embeddings=None):
    """The method on each tuned tower (0 steps on the others), towards its style part: SDXL reads the penultimate
    layer as it is from both (``clip_skip`` earlier), and bigG's text embedding as the pooled one. ``embeddings``:
    {tower: {word: vectors}}, the towers' token tables extended with them and ``text`` read through them."""
    from stylegrad.prompts.chunks import Vocabulary

    hidden, pooled = [], None
    for which, model, tok, target in (("l", clip_l, pipe.tokenizer, style.vector),
                                      ("g", pipe.text_encoder_2, pipe.tokenizer_2, style.g)):
        if embeddings:
            ids = Vocabulary(tok, embeddings[which]).chunks(text).ids
            model = _extended(model, torch.cat(list(embeddings[which].values())))
        else:
            ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        tuned = tune_text_encoder(model, ids, target, steps=steps if which in towers else 0, lr=lr,
                                  layer=-2 - (clip_skip or 0), final_norm=False)
        hidden.append(tuned.hidden)
        pooled = tuned.text_embedding if which == "g" else pooled
    return torch.cat(hidden, dim=-1), pooled


def test_zero_steps_equal_encode_prompt(xl):
    pipe, clip_l = xl
    enc = SDXLAestheticEncoder(pipe, clip_l)
    for negative, clip_skip in (("", None), ("blurry", None), ("", 1)):
        e = enc.encode(PROMPT, xl_style(pipe, clip_l), StyleOptions(steps=0), negative, clip_skip)
        pe, ne, pp, npp = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True, negative_prompt=negative or None,
                                             clip_skip=clip_skip)
        for ours, theirs in zip((e.prompt_embeds, e.negative_prompt_embeds, e.pooled_prompt_embeds,
                                 e.negative_pooled_prompt_embeds), (pe, ne, pp, npp)):
            assert torch.equal(ours, theirs)
    # clip skip applies to the negative prompt too, as in A1111 (diffusers skips it there)
    e = enc.encode(PROMPT, None, negative_prompt="blurry", clip_skip=1)
    assert torch.equal(e.negative_prompt_embeds, pipe.encode_prompt("blurry", device="cpu", clip_skip=1)[0])


@pytest.mark.parametrize("towers,clip_skip", [("both", None), ("l", None), ("g", None), ("both", 1)])
def test_matches_the_reference_loop(xl, towers, clip_skip):
    pipe, clip_l = xl
    style = xl_style(pipe, clip_l)
    enc = SDXLAestheticEncoder(pipe, clip_l)
    e = enc.encode(PROMPT, style, StyleOptions(steps=6, lr=3e-3, towers=towers), clip_skip=clip_skip)
    hidden, pooled = reference(pipe, clip_l, style, 6, 3e-3, TOWERS[towers], clip_skip=clip_skip)
    assert (e.prompt_embeds - hidden).abs().max() < REFERENCE_ATOL
    assert (e.pooled_prompt_embeds - pooled).abs().max() < REFERENCE_ATOL
    plain = enc.encode(PROMPT, None)
    moved_l = (e.prompt_embeds[..., :32] - plain.prompt_embeds[..., :32]).abs().max()
    moved_g = (e.pooled_prompt_embeds - plain.pooled_prompt_embeds).abs().max()
    assert (moved_l > 1e-3) == ("l" in TOWERS[towers]) and (moved_g > 1e-3) == ("g" in TOWERS[towers])
    assert torch.equal(e.negative_prompt_embeds, torch.zeros_like(e.prompt_embeds))  # empty negative: zeros


def test_an_sd1_style_tunes_clip_l_alone(xl):
    pipe, clip_l = xl
    enc = SDXLAestheticEncoder(pipe, clip_l)
    sd1 = Style(xl_style(pipe, clip_l).vector)
    with pytest.warns(UserWarning, match="no bigG part"):
        e = enc.encode(PROMPT, sd1, StyleOptions(steps=4, lr=3e-3))
    hidden, pooled = reference(pipe, clip_l, xl_style(pipe, clip_l), 4, 3e-3, ("l",))
    assert (e.prompt_embeds - hidden).abs().max() < REFERENCE_ATOL and torch.equal(e.pooled_prompt_embeds, pooled)


def test_pipeline_untouched_and_memory_back_to_baseline(xl):
    pipe, clip_l = xl
    before = {k: v.clone() for m in (pipe.text_encoder, pipe.text_encoder_2) for k, v in m.state_dict().items()}
    enc = SDXLAestheticEncoder(pipe, clip_l, cache_size=0)
    style = xl_style(pipe, clip_l)
    enc.encode("warm up", style, StyleOptions(steps=1))
    enc.clear_cache()
    baseline = _live_tensor_bytes()
    for i in range(50):
        enc.encode(f"prompt number {i}", style, StyleOptions(steps=2), negative_prompt="ugly" if i % 2 else "")
        enc.clear_cache()
        assert _live_tensor_bytes() == baseline, f"prompt {i} left tensors behind"
    after = {k: v for m in (pipe.text_encoder, pipe.text_encoder_2) for k, v in m.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in after.items())


def test_options_and_negative(xl):
    pipe, clip_l = xl
    enc = SDXLAestheticEncoder(pipe, clip_l)
    style = xl_style(pipe, clip_l)
    full = enc.encode(PROMPT, style, StyleOptions(steps=4, lr=3e-3), "ugly")
    half = enc.encode(PROMPT, style, StyleOptions(steps=4, lr=3e-3, weight=0.5), "ugly")
    plain = enc.encode(PROMPT, None, negative_prompt="ugly")
    assert torch.allclose(half.prompt_embeds, 0.5 * (full.prompt_embeds + plain.prompt_embeds), atol=1e-5)
    assert torch.allclose(half.pooled_prompt_embeds, 0.5 * (full.pooled_prompt_embeds + plain.pooled_prompt_embeds),
                          atol=1e-5)
    assert torch.equal(full.negative_prompt_embeds, plain.negative_prompt_embeds)  # negative not tuned by default
    tuned_neg = enc.encode(PROMPT, style, StyleOptions(steps=4, lr=3e-3, personalize_negative=True), "ugly")
    assert not torch.allclose(tuned_neg.negative_prompt_embeds, plain.negative_prompt_embeds, atol=1e-4)
    reg = enc.encode(PROMPT, style, StyleOptions(steps=4, lr=3e-3, regularization=100.0))
    assert (reg.prompt_embeds - plain.prompt_embeds).abs().mean() < (full.prompt_embeds - plain.prompt_embeds).abs().mean()


def _extended(model, vectors):
    """A copy of a tower whose token table has the embedding's rows appended (the reference for embedding words)."""
    model = copy.deepcopy(model)
    text = getattr(model, "text_model", model)
    table = text.embeddings.token_embedding
    bigger = torch.nn.Embedding(table.num_embeddings + vectors.shape[0], table.embedding_dim)
    with torch.no_grad():
        bigger.weight.copy_(torch.cat([table.weight, vectors]))
    text.embeddings.token_embedding = bigger
    return model


def test_embeddings_and_emphasis_on_sdxl(xl):
    """An SDXL textual inversion gives each tower its own rows; emphasis weights each tower's states (A1111's mean
    restore) and the pooled embedding comes from the first chunk; tuning reads the embedding rows too."""
    from stylegrad.prompts.chunks import Vocabulary, apply_weights

    pipe, clip_l = xl
    g = torch.Generator().manual_seed(9)
    words = {"l": {"zq": torch.randn(2, 32, generator=g) * 0.05},
             "g": {"zq": torch.randn(2, 32, generator=g) * 0.05}}
    enc = SDXLAestheticEncoder(pipe, clip_l)
    prompt = "a zq (house:1.3)"
    e = enc.encode(prompt, None, embeddings=words)
    assert enc.last_embeddings == ["zq"]
    hidden, pooled = [], None
    for which, model, tok in (("l", pipe.text_encoder, pipe.tokenizer), ("g", pipe.text_encoder_2, pipe.tokenizer_2)):
        chunks = Vocabulary(tok, words[which]).chunks(prompt)
        with torch.no_grad():
            out = _extended(model, words[which]["zq"])(input_ids=chunks.ids, output_hidden_states=True)
        hidden.append(apply_weights(out.hidden_states[-2], chunks.weights))
        pooled = out.text_embeds if which == "g" else pooled
    ref = torch.cat(hidden, dim=-1)
    assert (e.prompt_embeds - ref).abs().max() < 1e-3 * ref.abs().max()  # the mean restore scales rounding
    assert (e.pooled_prompt_embeds - pooled).abs().max() < REFERENCE_ATOL
    style = xl_style(pipe, clip_l)
    tuned = enc.encode("a zq house", style, StyleOptions(steps=4, lr=3e-3), embeddings=words)
    hidden, pooled = reference(pipe, clip_l, style, 4, 3e-3, ("l", "g"), text="a zq house", embeddings=words)
    assert (tuned.prompt_embeds - hidden).abs().max() < REFERENCE_ATOL
    assert (tuned.pooled_prompt_embeds - pooled).abs().max() < REFERENCE_ATOL
