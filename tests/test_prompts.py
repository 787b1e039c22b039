"""A1111's prompt syntax and chunks, textual-inversion files, and how they compose with tuning and LoRAs."""

import copy

import pytest
import torch
from conftest import text_with_projection
from test_tuning import REFERENCE_ATOL, reference_loop
from tiny import PROJ, tiny_clip, tiny_pipeline

from stylegrad import AestheticEncoder, Style, StyleOptions
from stylegrad.addons.embeddings import EmbeddingLibrary, load_embedding
from stylegrad.addons.lora.formats import LoraFile
from stylegrad.addons.lora.network import LoraNetwork
from stylegrad.prompts.chunks import CHUNK, Vocabulary, apply_weights
from stylegrad.prompts.syntax import NetworkTag, extract_tags, parse_attention

# A1111's parse_prompt_attention on its own documented examples, and more
A1111_PROMPTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[faded]", [("faded", 1 / 1.1)]),
    ("(masterpiece:1.2), best quality", [("masterpiece", 1.2), (", best quality", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("time: 5 (o'clock:0.8)", [("time: 5 ", 1.0), ("o'clock", 0.8)]),
    ("", [("", 1.0)]),
    # not a number after the colon: text inside a plain (x) bracket, never an error (A1111's float() raises)
    ("(a:.)", [("a:.", 1.1)]),
    ("(a:1.2.3) b", [("a:1.2.3", 1.1), (" b", 1.0)]),
    ("(a:.5)", [("a", 0.5)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_PROMPTS)
def test_a1111_emphasis(prompt, expected):
    got = parse_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_lora_tags_are_removed_with_their_multipliers():
    text, tags = extract_tags("a cat <lora:foo:0.5>, <lora:bar:0.3:0.9> <lora:baz:te=0.2:unet=0.7> <hypernet:h:1> "
                              "<other:x>")
    assert tags == [NetworkTag("foo", 0.5, 0.5), NetworkTag("bar", 0.3, 0.9), NetworkTag("baz", 0.2, 0.7)]
    assert "<lora" not in text and "<hypernet" not in text and "<other:x>" in text  # hypernetworks: ours now


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(tiny_clip(0))


def test_chunks_follow_a1111(pipe):
    tok = pipe.tokenizer
    vocab = Vocabulary(tok, {"zq": torch.randn(3, 32)})
    # a short prompt: exactly diffusers' ids
    short = vocab.chunks("a red house")
    assert torch.equal(short.ids, tok(["a red house"], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids)
    # 75 tokens to a chunk; BREAK starts the next one
    assert vocab.chunks("x" * 80).ids.shape == (2, 77)
    broken = vocab.chunks("ab BREAK cd")
    assert broken.ids.shape == (2, 77) and broken.ids[1, 1].item() == tok.convert_tokens_to_ids("c")
    # a chunk that fills up moves the tokens after its last comma (within 20) to the next chunk
    text = "y" * 70 + "," + "z" * 10
    c = vocab.chunks(text)
    assert c.ids.shape == (2, 77) and (c.ids[0, 1:72] != tok.pad_token_id).all() and c.ids[0, 73] == tok.eos_token_id
    assert (c.ids[1, 1:10] == tok.convert_tokens_to_ids("z")).all() and c.ids[1, 10] == tok.convert_tokens_to_ids("z</w>")
    # an embedding's vectors do not split across chunks; its ids index rows past the vocabulary
    e = vocab.chunks("w" * 74 + "zq")
    assert e.embeddings == ["zq"] and e.ids.shape == (2, 77)
    assert e.ids[1, 1:4].tolist() == [len(tok), len(tok) + 1, len(tok) + 2] and e.extra.shape == (3, 32)
    # weights per token
    w = vocab.chunks("a (b:1.5)")
    assert w.weights[0, 1].item() == 1.0 and w.weights[0, 2].item() == 1.5 and w.weights[0, 3].item() == 1.0


def test_weighting_restores_the_mean():
    z = torch.randn(2, 77, 8)
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.4
    out = apply_weights(z, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(out[1], z[1]) and not torch.allclose(out[0, 3], z[0, 3])
    assert apply_weights(z, torch.ones(2, 77)) is z


def test_shared_textual_inversions_load(shared):
    expected = {"bad_prompt_version2.pt": (8, 768), "eastonhill_embeddings.pt": (1, 768),
                "Birch-san_embeddings.pt": (1, 768), "test_embedding.safetensors": (5, 768),
                "fastai_learned_embeds.bin": (1, 768), "lora_kiriko2.ti.pt": (1, 768)}
    folder = shared / "community" / "textual_inversion"
    for name, shape in expected.items():
        e = load_embedding(folder / name)
        assert e.parts[""].shape == shape and e.name == (folder / name).stem  # A1111: the file stem
        assert torch.isfinite(e.parts[""]).all() and e.parts[""].abs().sum() > 0
    assert load_embedding(folder / "fastai_learned_embeds.bin", "birb").name == "birb"
    lib = EmbeddingLibrary([str(folder)])
    assert set(lib.names()) == {p.rsplit(".", 1)[0] for p in expected}
    assert set(lib.for_encoder(768)) == set(lib.names()) and lib.for_encoder(1024) == {}
    assert "does not fit" in lib.skipped["bad_prompt_version2"]


def test_sdxl_embeddings_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    torch.save({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xlp.pt")
    for f in ("xl.safetensors", "xlp.pt"):
        e = load_embedding(tmp_path / f)
        assert e.parts["clip_l"].shape == (2, 768) and e.parts["clip_g"].shape == (2, 1280)
        assert e.for_width(768) is None  # A1111 does not use an SDXL embedding on SD1.x


def _te_lora(pipe) -> LoraNetwork:
    enc = pipe.text_encoder
    g = torch.Generator().manual_seed(7)
    groups = {("te", f"text_model_encoder_layers_{i}_{m}"): {"down": torch.randn(2, 32, generator=g) * 0.3,
                                                             "up": torch.randn(32 if m != "mlp_fc1" else 37, 2,
                                                                               generator=g) * 0.3}
              for i in range(enc.config.num_hidden_layers) for m in ("self_attn_q_proj", "self_attn_v_proj")}
    return LoraNetwork({"te": enc}, [(LoraFile("te.safetensors", "kohya", groups), 0.8, 1.0)])


def test_tuning_composes_with_a_text_encoder_lora_and_embeddings(pipe):
    """The tuned encoder is the one the user runs: the LoRA merged in, the embedding's rows added and tuned like
    any other token's. Against the plain reference loop on a LoRA-merged copy whose token table has the rows."""
    clip = tiny_clip(0)
    clip_text = text_with_projection(clip)
    style = Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)) * 0.02
    net = _te_lora(pipe)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    prompt = "a zq house"
    pe, _ = enc.encode(prompt, style, StyleOptions(steps=5, lr=3e-3), embeddings={"zq": vectors}, loras=net)
    assert enc.last_embeddings == ["zq"]

    ref_model = copy.deepcopy(clip_text)
    merged = net.text_params("te")
    v = len(pipe.tokenizer)
    with torch.no_grad():
        for name, t in merged.items():
            ref_model.text_model.get_parameter(name).copy_(t)
        table = ref_model.text_model.embeddings.token_embedding
        bigger = torch.nn.Embedding(v + 2, 32)
        bigger.weight.copy_(torch.cat([table.weight, vectors]))
        ref_model.text_model.embeddings.token_embedding = bigger
    ids = Vocabulary(pipe.tokenizer, {"zq": vectors}).chunks(prompt).ids
    ref = reference_loop(ref_model, ids, style.vector, 5, 3e-3)
    assert (pe - ref).abs().max() < REFERENCE_ATOL
    plain_pe, _ = enc.encode(prompt, None, embeddings={"zq": vectors}, loras=net)
    assert (pe - plain_pe).abs().max() > 1e-3
    with torch.no_grad():  # unstyled, the LoRA runs beside the encoder's weights: the merged model's states
        assert (plain_pe - ref_model.text_model(input_ids=ids).last_hidden_state).abs().max() < REFERENCE_ATOL
        no_ti, _ = enc.encode("a house", None, loras=net)
        assert (no_ti - ref_model.text_model(input_ids=Vocabulary(pipe.tokenizer).chunks("a house").ids)
                .last_hidden_state).abs().max() < REFERENCE_ATOL
    assert all(torch.equal(t, before[k]) for k, t in pipe.text_encoder.state_dict().items())


def test_long_prompts_tune_the_first_chunk_and_encode_all(pipe):
    """Chunk 1 is tuned as the A1111 extension does (BOS, its 75 tokens, EOS); every chunk is then encoded by the
    tuned encoder, and emphasis weights apply to the tuned states."""
    clip_text = text_with_projection(tiny_clip(0))
    style = Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))
    enc = AestheticEncoder.from_pipeline(pipe, clip_text)
    prompt = "stripes " * 12 + "(dots:1.3)"
    pe, ne = enc.encode(prompt, style, StyleOptions(steps=3, lr=3e-3))
    assert pe.shape == (1, 154, 32) and ne.shape == pe.shape  # the empty negative padded to the same length
    chunks = Vocabulary(pipe.tokenizer).chunks(prompt)

    def reference_all(ids):
        model = copy.deepcopy(clip_text)
        model.requires_grad_(True)
        opt = torch.optim.Adam(model.text_model.parameters(), lr=3e-3)
        s = style.direction[None]
        for _ in range(3):
            e = model.text_projection(model.text_model(input_ids=ids[:1]).pooler_output)
            loss = -(torch.nn.functional.normalize(e, dim=-1) @ s.T).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return model.text_model(input_ids=ids).last_hidden_state

    states = reference_all(chunks.ids)
    plain_pe, _ = enc.encode(prompt, style, StyleOptions(steps=3, lr=3e-3), weighting=False)
    assert (plain_pe.reshape(2, 77, 32) - reference_all(Vocabulary(pipe.tokenizer).chunks(prompt, False).ids)
            ).abs().max() < REFERENCE_ATOL
    # A1111's mean restore divides by a chunk's mean, near 0 for layer-normed states: it scales rounding up, so
    # the weighted states are compared relative to their size
    ref = apply_weights(states, chunks.weights).reshape(1, -1, 32)
    assert (pe - ref).abs().max() < 1e-3 * ref.abs().max()
    assert CHUNK == 75
