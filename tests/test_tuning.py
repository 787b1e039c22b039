"""The engine against the method: exact to the paper's loop (aesthetic/method.py) within the contract
(docs/exactness.md), leaves the pipeline untouched, frees its memory, caches."""

import gc

import pytest
import torch
from conftest import needs_kernels, text_with_projection
from tiny import PROJ, tiny_clip, tiny_pipeline

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions
from stylegrad.aesthetic.contract import REFERENCE_ATOL
from stylegrad.aesthetic.method import tune_text_encoder
from stylegrad.aesthetic.targets import blend, style_target
from stylegrad.aesthetic.vectors import normalize

PROMPT = "a red house by the sea"


def reference_loop(clip_text, input_ids, style, steps, lr, clip_skip=None, layers=None, regularization=0.0):
    """The method (``tune_text_encoder``) with SD1.x/SD2.x's conditioning layer: the last of the pipeline's
    ``layers`` (default all of the CLIP's), ``clip_skip`` earlier, final-normed."""
    layer = (layers or clip_text.config.num_hidden_layers) - (clip_skip or 0)
    return tune_text_encoder(clip_text, input_ids, style, steps=steps, lr=lr, layer=layer,
                             regularization=regularization).hidden


def ids_of(pipe, text):
    return pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("clip_skip,steps", [(None, 8), (1, 8), (None, 1), (None, 2)])
def test_matches_reference_loop_sd1(pipe, clip_text, style, clip_skip, steps):
    """Also one and two steps: the first and last Adam steps of a weight take other paths (no moments read or
    kept; products.fused_adam_linear)."""
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=steps, lr=3e-3), clip_skip=clip_skip)
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, steps, 3e-3, clip_skip)
    assert (pe - ref).abs().max() < REFERENCE_ATOL
    assert (pe - enc.plain([PROMPT], clip_skip)).abs().max() > 100 * REFERENCE_ATOL  # the style did act


def test_public_torch_paths_match_too(pipe, clip_text, style, monkeypatch):
    """Where stylegrad's compiled kernels were not built (other CPUs, GPUs), the engine runs on torch's public
    calls only (F.linear, torch.optim's adam): the same method, to the reference's precision."""
    import stylegrad.aesthetic.products as products

    monkeypatch.setattr(products, "_KERNELS", None)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=8, lr=3e-3))
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 8, 3e-3)
    assert (pe - ref).abs().max() < REFERENCE_ATOL


def test_pending_steps_fall_back_where_the_kernels_stop(pipe, clip_text, style, monkeypatch):
    """A deferred Adam step whose next product has more rows than the kernels take (here the full pass, with
    the limit lowered below 77) is taken on torch's Adam first: the same result."""
    import stylegrad.aesthetic.products as products

    needs_kernels()
    monkeypatch.setattr(products, "_KERNEL_ROWS", 16)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=3e-3))
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 3, 3e-3)
    assert (pe - ref).abs().max() < REFERENCE_ATOL


@pytest.mark.parametrize("kernels", [True, False])
def test_matrices_are_copied_at_their_first_update(pipe, clip_text, style, kernels, monkeypatch):
    """The large weights are read in place until their first Adam step, which tunes a copy; the pipeline's
    weights never move. With the compiled kernels the step waits for the next forward product, without them it
    is taken in the backward pass: either way it is taken once, before the next product reads the weight."""
    import stylegrad.aesthetic.products as products
    from stylegrad.aesthetic.adam import AdamSettings
    from stylegrad.aesthetic.eos_forward import TunedWeights, is_matrix

    if kernels:
        needs_kernels()
    else:
        monkeypatch.setattr(products, "_KERNELS", None)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    original = dict(enc.tower.base)
    params = {n: t if is_matrix(n) else t.clone().requires_grad_(True) for n, t in original.items()}
    forward = TunedWeights(enc.tower, params, AdamSettings.for_device(pipe.device, 1e-3))
    names = [f"encoder.layers.0.mlp.{m}.weight" for m in ("fc1", "fc2")]
    assert all(forward.matrices[n].deferred == kernels for n in names)

    ids = ids_of(pipe, PROMPT)[0, :8]
    state = forward.eos_state(ids)
    assert all(params[n] is original[n] for n in names)  # no copy before an update
    before = {n: original[n].clone() for n in names}
    (state @ enc.tower.projection.T @ style.vector).sum().backward()
    assert all((params[n] is original[n]) == kernels for n in names)  # deferred: not yet
    forward.eos_state(ids)  # the next forward reads every weight after its step

    for n in names:
        assert params[n].data_ptr() != original[n].data_ptr()  # a copy was tuned
        assert torch.equal(original[n], before[n])  # the pipeline's weight was not
        assert not torch.equal(params[n], before[n])  # the copy took its Adam step
        assert (params[n] - before[n]).abs().max() <= 1e-3 * 1.01  # one step moves a weight at most lr
        assert forward.matrices[n].pending is None and int(forward.matrices[n].step) == 1  # once


def test_matches_reference_loop_sd2_layout(style):
    """SD2: the pipeline's encoder has one layer fewer than the CLIP text tower the loss needs (and, as
    OpenCLIP ViT-H, uses exact GELU rather than CLIP-L's quick GELU)."""
    clip = tiny_clip(1, layers=3, hidden_act="gelu")
    pipe = tiny_pipeline(clip, text_layers=2)
    clip_text = text_with_projection(clip)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    assert enc.tower.cond_layers == 2 and enc.tower.total_layers == 3
    z0, _ = enc.encode(PROMPT, style, StyleOptions(steps=0))
    assert torch.equal(z0, pipe.encode_prompt(PROMPT, "cpu", 1, False)[0])  # UNet gets what the pipeline gives
    pe, _ = enc.encode(PROMPT, style, StyleOptions(steps=6, lr=3e-3))
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 6, 3e-3, layers=2)
    assert (pe - ref).abs().max() < REFERENCE_ATOL


def test_zero_steps_is_plain_diffusers_encoding(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    pe, ne = enc.encode(PROMPT, style, StyleOptions(steps=0), negative_prompt="blurry")
    ref_pe, ref_ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
    assert torch.equal(pe, ref_pe) and torch.equal(ne, ref_ne)
    pe_none, _ = enc.encode(PROMPT, None)
    assert torch.equal(pe_none, ref_pe)


def test_similarity_rises_with_steps(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    finals = []
    for steps in (0, 2, 5, 10):
        enc.encode(PROMPT, style, StyleOptions(steps=steps, lr=1e-3))
        finals.append(enc.last_similarities[0][-1] if steps else None)
    sims = enc.last_similarities[0]
    assert len(sims) == 11 and all(b > a for a, b in zip(sims, sims[1:]))
    assert finals[1] < finals[2] < finals[3]


def test_pipeline_is_bit_identical_after_many_calls(pipe, clip_text, style):
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    flags = [p.requires_grad for p in pipe.text_encoder.parameters()]
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    variants = [StyleOptions(steps=3, lr=1e-2), StyleOptions(steps=2, weight=0.5, slerp=True),
                StyleOptions(steps=2, text="stripes", text_negative=True), StyleOptions(steps=2, regularization=1.0),
                StyleOptions(steps=2, personalize_negative=True), StyleOptions(steps=4, target_similarity=0.5)]
    for i in range(12):
        enc.encode(f"{PROMPT} {i}", style, variants[i % len(variants)], negative_prompt="ugly")
    after = pipe.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in pipe.text_encoder.parameters())  # no gradient was left on the user's model
    assert [p.requires_grad for p in pipe.text_encoder.parameters()] == flags
    assert all(p.device.type == "cpu" for p in pipe.text_encoder.parameters())


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_memory_returns_to_baseline_over_50_prompts(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    enc.encode("warm up", style, StyleOptions(steps=1))
    enc.clear_cache()
    baseline = _live_tensor_bytes()
    for i in range(50):
        enc.encode(f"prompt number {i}", style, StyleOptions(steps=2))
        enc.clear_cache()
        assert _live_tensor_bytes() == baseline, f"prompt {i} left tensors behind"


def test_does_not_copy_the_model(style):
    """The reference copies the whole CLIP (here dominated by a 49,408-row token table); we tune only the rows
    the prompt uses, so the live extra memory during tuning is far below one copy of the text model."""
    clip = tiny_clip(2, vocab_size=49408)
    pipe = tiny_pipeline(clip)
    enc = AestheticEncoder.from_pipeline(pipe, text_with_projection(clip), cache_size=0)
    text_bytes = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
    baseline = _live_tensor_bytes()
    peaks = []
    enc.encode(PROMPT, style, StyleOptions(steps=3), callback=lambda step, sim: peaks.append(_live_tensor_bytes()))
    extra = max(peaks) - baseline
    assert 0 < extra < 0.25 * text_bytes


def test_cache_personalizes_once(pipe, clip_text, style, monkeypatch):
    import stylegrad.aesthetic.encoder as encoder_module

    calls = []
    real = encoder_module.personalize
    monkeypatch.setattr(encoder_module, "personalize", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    first = enc.encode(PROMPT, style, StyleOptions(steps=2))
    for _ in range(3):
        again = enc.encode(PROMPT, style, StyleOptions(steps=2))
    assert len(calls) == 1 and torch.equal(first[0], again[0])
    enc.encode(PROMPT, style, StyleOptions(steps=3))  # another option -> another entry
    enc.encode(PROMPT, style, StyleOptions(steps=2), negative_prompt="x")  # another negative
    enc.encode(PROMPT, Style(-style.vector), StyleOptions(steps=2))  # another style
    assert len(calls) == 4
    enc.encode([PROMPT, PROMPT], style, StyleOptions(steps=2))  # a batch of the same prompt
    assert len(calls) == 4


def test_weight_and_slerp_blend(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    z0 = enc.plain([PROMPT])
    z1, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2))
    half, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, weight=0.5))
    assert torch.allclose(half, 0.5 * z0 + 0.5 * z1, atol=1e-6)
    zero, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, weight=0.0))
    assert torch.equal(zero, z0)
    s, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, weight=0.5, slerp=True))
    # per-token slerp written out: sin((1-t)w)/sin(w) z0 + sin(tw)/sin(w) z1, w the angle between the tokens
    omega = torch.acos(torch.cosine_similarity(z0, z1, dim=-1).clamp(-1, 1))[..., None]  # (1, 77, 1)
    expected = (torch.sin(0.5 * omega) * z0 + torch.sin(0.5 * omega) * z1) / torch.sin(omega)
    assert torch.allclose(s, expected, atol=1e-5)
    # slerp runs per token along the feature axis: on unit vectors each token lands at half its own angle ...
    a, b = normalize(z0), normalize(z1)
    cos = lambda x, y: torch.cosine_similarity(x, y, dim=-1)  # noqa: E731
    total = torch.acos(cos(a, b).clamp(-1, 1))  # (1, 77): one angle per token
    assert torch.allclose(torch.acos(cos(a, blend(a, b, 0.5, True)).clamp(-1, 1)), total / 2, atol=1e-3)
    # ... and a token's result depends on that token only (the A1111 extension mixes along the token axis)
    b2 = b.clone()
    b2[0, 5] = -b2[0, 5]
    changed = (blend(a, b2, 0.5, True) - blend(a, b, 0.5, True)).abs().amax(-1)[0]
    assert changed[5] > 0 and changed[torch.arange(77) != 5].max() == 0
    assert torch.allclose(blend(z0, z1, 1.0, True), z1)


def test_text_direction_targets():
    s, t = torch.randn(PROJ), torch.randn(PROJ)
    assert torch.allclose(style_target(s), normalize(s))
    assert torch.allclose(style_target(s, t, angle=0.0), normalize(s), atol=1e-6)
    assert torch.allclose(style_target(s, t, angle=1.0), normalize(t), atol=1e-5)
    neg = style_target(s, t, angle=1.0, negative=True)
    assert torch.allclose(neg, normalize(normalize(s) - normalize(t)), atol=1e-5)
    mid = style_target(s, 7.0 * t, angle=0.5)  # scale of the text embedding does not matter
    assert torch.allclose(mid, normalize(normalize(s) + normalize(t)), atol=1e-5)


def test_text_option_moves_the_target(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    a, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2))
    b, _ = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, text="stripes", text_angle=0.5))
    assert (a - b).abs().max() > 1e-4


def test_regularizer_keeps_states_closer(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    z0 = enc.plain([PROMPT])
    free, _ = enc.encode(PROMPT, style, StyleOptions(steps=8, lr=1e-2))
    held, _ = enc.encode(PROMPT, style, StyleOptions(steps=8, lr=1e-2, regularization=50.0))
    assert (held - z0).norm() < 0.8 * (free - z0).norm()


def test_target_similarity_stops_early(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    enc.encode(PROMPT, style, StyleOptions(steps=30, lr=1e-3))
    sims = enc.last_similarities[0]
    goal = (sims[0] + sims[-1]) / 2
    enc.encode(PROMPT, style, StyleOptions(steps=30, lr=1e-3, target_similarity=goal))
    stopped = enc.last_similarities[0]
    assert len(stopped) < len(sims) and stopped[-1] >= goal and all(s < goal for s in stopped[:-2])


def test_personalize_negative_option(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    _, plain_neg = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2), negative_prompt="ugly")
    _, tuned_neg = enc.encode(PROMPT, style, StyleOptions(steps=3, lr=1e-2, personalize_negative=True),
                              negative_prompt="ugly")
    assert torch.equal(plain_neg, enc.plain(["ugly"]))
    assert (tuned_neg - plain_neg).abs().max() > 1e-4


def test_width_mismatch_and_bad_options(pipe, clip_text):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    with pytest.raises(StylegradError, match=r"768-wide .*24-wide"):
        enc.encode(PROMPT, Style(torch.randn(768)), StyleOptions())
    for bad in (dict(steps=-1), dict(lr=0.0), dict(text_angle=2.0), dict(weight=2.0, slerp=True),
                dict(target_similarity=1.5), dict(regularization=-1.0)):
        with pytest.raises(StylegradError, match="style option"):
            StyleOptions(**bad)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_regularized_path_matches_the_reference_loop(pipe, clip_text, style, clip_skip):
    """The penalty holds the 77 conditioning states the UNet reads (a mean, so lambda is independent of the
    prompt's length): the same optimization as the plain loop with the penalty, at the unregularized tolerance."""
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    options = StyleOptions(steps=6, lr=3e-3, regularization=50.0)
    pe, _ = enc.encode(PROMPT, style, options, clip_skip=clip_skip)
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 6, 3e-3, clip_skip, regularization=50.0)
    free = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 6, 3e-3, clip_skip)
    assert (pe - ref).abs().max() < REFERENCE_ATOL
    assert (ref - free).abs().max() > 100 * REFERENCE_ATOL  # the penalty acted
    z0 = enc.plain([PROMPT], clip_skip)
    assert (ref - z0).pow(2).mean() < (free - z0).pow(2).mean()  # ... and held the states closer


@pytest.mark.parametrize("width,expected", [(768, "openai/clip-vit-large-patch14"),
                                            (1024, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
                                            (512, "unsupported text encoder of width 512")])
def test_family_detected_from_the_encoder_without_clip_model(width, expected, style):
    """No --clip-model: the family's CLIP comes from the encoder's width (offline here, so it is named as missing),
    and only when a style is used; an unknown width is one clear error."""
    from tiny import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylegrad.aesthetic.tower import detect_family

    tok = tiny_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=8, num_attention_heads=8,
                         num_hidden_layers=1, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    encoder = CLIPTextModel(cfg).eval()
    enc = AestheticEncoder(encoder, tok)
    assert enc.encode(PROMPT, None)[0].shape == (1, 77, width)  # a plain prompt needs no CLIP
    with pytest.raises(StylegradError) as err:
        enc.encode(PROMPT, Style(torch.randn(width)), StyleOptions(steps=1))
    assert expected in str(err.value) and "\n" not in str(err.value)
    if width != 512:
        assert detect_family(encoder).clip_model == expected


def test_engine_settings_choose_the_path_and_keep_the_numbers(pipe, clip_text, style, monkeypatch):
    """The engine is chosen by one object passed down (``engine=``), its default read from the environment:
    kernels off gives torch's path itself (the same bits as a build without kernels), within the contract."""
    import stylegrad.aesthetic.products as products
    from stylegrad.aesthetic.engine import EngineSettings

    needs_kernels()
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, 4, 3e-3)
    options = StyleOptions(steps=4, lr=3e-3)
    off, _ = AestheticEncoder.from_pipeline(pipe, clip_text, engine=EngineSettings(kernels=False)).encode(
        PROMPT, style, options)
    on, _ = AestheticEncoder.from_pipeline(pipe, clip_text, engine=EngineSettings(kernels=True)).encode(
        PROMPT, style, options)
    monkeypatch.setenv("STYLEGRAD_KERNELS", "0")  # the default engine now says: off
    assert EngineSettings.from_environment() == EngineSettings(kernels=False)
    by_env, _ = AestheticEncoder.from_pipeline(pipe, clip_text).encode(PROMPT, style, options)
    monkeypatch.delenv("STYLEGRAD_KERNELS")
    monkeypatch.setattr(products, "_KERNELS", None)  # as an install without them
    unbuilt, _ = AestheticEncoder.from_pipeline(pipe, clip_text).encode(PROMPT, style, options)
    assert torch.equal(off, unbuilt) and torch.equal(by_env, unbuilt)
    assert (on - ref).abs().max() < REFERENCE_ATOL and (off - ref).abs().max() < REFERENCE_ATOL


def test_engine_settings_read_and_refuse():
    from stylegrad.aesthetic.engine import EngineSettings

    env = {"STYLEGRAD_TUNING_MEMORY": "6GB", "STYLEGRAD_REUSE_MEMORY": "0"}
    assert EngineSettings.from_environment(env) == EngineSettings(memory=6 << 30, kernels=True, reuse_memory=False)
    assert EngineSettings.from_environment({}) == EngineSettings("auto", True, True)
    assert EngineSettings(memory="LOW").memory == "low"
    with pytest.raises(StylegradError, match="must be auto, fast, low or a size"):
        EngineSettings(memory="tiny")
