"""The one encoder: SD1.x/SD2.x are its one-tower case and SDXL its two-tower case, with one result type that
unpacks as the tuple the SD1.x encoder returned and gives what any pipeline call takes."""

import numpy as np
import pytest
import torch
from test_sdxl_tuning import PROMPT, xl, xl_style  # noqa: F401 (the SDXL fixture)
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions
from stylegrad.aesthetic.encoder import EncodedPrompt
from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5)))


def test_sd1_result_unpacks_as_the_tuple_and_drives_the_pipeline(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    e = enc.encode(PROMPT, style, StyleOptions(steps=2, lr=1e-2), negative_prompt="blurry")
    assert isinstance(e, EncodedPrompt) and e.pooled_prompt_embeds is None
    pe, ne = e
    assert pe is e.prompt_embeds and ne is e.negative_prompt_embeds and e[0] is pe and e[1] is ne
    assert set(e.pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds"}
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=1, width=32, height=32, output_type="np")
    by_kwargs = pipe(**e.pipeline_kwargs(), generator=torch.Generator().manual_seed(0), **run).images
    by_tuple = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0),
                    **run).images
    assert np.array_equal(by_kwargs, by_tuple)


def test_from_pipeline_gives_the_two_tower_encoder_for_sdxl(xl):  # noqa: F811
    """``AestheticEncoder.from_pipeline`` on an SDXL pipeline is the same encoder ``SDXLAestheticEncoder`` is: both
    towers, the four tensors, the same bits."""
    pipe, clip_l = xl
    style = xl_style(pipe, clip_l)
    enc = AestheticEncoder.from_pipeline(pipe, clip_l)
    assert isinstance(enc, AestheticEncoder) and list(enc.towers) == ["l", "g"]
    e = enc.encode(PROMPT, style, StyleOptions(steps=2, lr=3e-3), negative_prompt="ugly")
    old = SDXLAestheticEncoder(pipe, clip_l).encode(PROMPT, style, StyleOptions(steps=2, lr=3e-3), "ugly")
    assert set(e.pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                        "negative_pooled_prompt_embeds"}
    for key, value in e.pipeline_kwargs().items():
        assert torch.equal(value, old.pipeline_kwargs()[key]), key
    assert e.kwargs() == e.pipeline_kwargs()  # SDXLEmbeddings' name still works
    assert set(enc.last_similarities) == {"l", "g"} and len(enc.last_similarities["g"][0]) == 3
    with pytest.raises(StylegradError, match="text_tower"):
        enc.tower  # noqa: B018 (two towers: name one)
    assert enc.text_tower("g").width == pipe.text_encoder_2.config.projection_dim


def test_sdxl_prompts_in_a_batch_equal_each_alone(xl):  # noqa: F811
    """A list of prompts works for every family: each row is that prompt encoded alone (the empty negative's zeros
    included), the shorter prompt padded with the empty prompt's chunk as A1111 pads."""
    pipe, clip_l = xl
    enc = AestheticEncoder.from_pipeline(pipe, clip_l)
    long = "a house, " * 40  # more chunks than one
    both = enc.encode([PROMPT, long], None, negative_prompt=["", "blurry"])
    alone = [enc.encode(PROMPT, None), enc.encode(long, None, negative_prompt="blurry")]
    width = alone[1].prompt_embeds.shape[1]
    assert width > 77 and both.prompt_embeds.shape[:2] == (2, width)
    assert torch.equal(both.prompt_embeds[1], alone[1].prompt_embeds[0])
    assert torch.equal(both.prompt_embeds[0, :77], alone[0].prompt_embeds[0])
    assert torch.equal(both.negative_prompt_embeds[0], torch.zeros_like(both.negative_prompt_embeds[0]))
    assert torch.equal(both.pooled_prompt_embeds[0], alone[0].pooled_prompt_embeds[0])
    assert torch.equal(both.negative_pooled_prompt_embeds[1], alone[1].negative_pooled_prompt_embeds[0])


def test_embedding_words_per_tower(xl, pipe, clip_text):  # noqa: F811
    """One tower takes ``{word: vectors}`` (or ``{'': {...}}``); two towers need them per tower."""
    vectors = torch.randn(1, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(2))
    sd1 = AestheticEncoder.from_pipeline(pipe, clip_text)
    flat = sd1.encode("a zq house", None, embeddings={"zq": vectors})
    nested = sd1.encode("a zq house", None, embeddings={"": {"zq": vectors}})
    assert torch.equal(flat.prompt_embeds, nested.prompt_embeds) and sd1.last_embeddings == ["zq"]
    two = AestheticEncoder.from_pipeline(xl[0], xl[1])
    with pytest.raises(StylegradError, match="per tower"):
        two.encode("a zq house", None, embeddings={"zq": vectors})
