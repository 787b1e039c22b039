"""Stylecodes codec: compatible with the reference implementation's codes, stable, strict about bad codes."""

import json

import numpy as np
import pytest

from stylegrad import StylegradError
from stylegrad.apps.cli import main
from stylegrad.stylecodes.codec import (
    ALPHABET,
    DIM,
    Code,
    blend,
    decode,
    dequantize,
    encode,
    parse_weighted,
    quantize,
    random_code,
)


@pytest.fixture(scope="module")
def vectors(shared):
    return json.loads((shared / "stylecodes" / "code_vectors.json").read_text())


def test_reference_codes_decode_to_their_levels_and_latents(vectors):
    for v in vectors["vectors"]:
        code = decode(v["code"])
        assert code.format == "reference" and list(code.levels) == v["q"], v["name"]
        assert encode(code.levels, format="reference") == v["code"]
        # the decoder is the reference's, to float32 precision
        assert np.allclose(np.float32(code.latent), np.float32(v["decoded_latent_float32"]), atol=0, rtol=0)


def test_quantizer_matches_reference_on_its_inputs(vectors):
    for v in vectors["vectors"]:
        assert list(quantize(v["latent_used_float32"])) == v["q"], v["name"]
    for lat in vectors["latents"]:
        z32 = np.float32([float(x) for x in lat["z"]])
        ref = lat["float32"]["q"]
        ours = quantize(z32)
        t = (z32.astype(np.float64) + 1) * 31.5
        near_edge = np.abs(t - np.round(t)) < 2e-4  # only there may we differ (we avoid the float32 drop)
        assert all(o == r or e for o, r, e in zip(ours, ref, near_edge)), lat["name"]


def test_decode_then_encode_is_stable_where_the_reference_drifts(vectors):
    drifting = [q for q, _ in vectors["float32_decode_then_encode_drift"]["float32"]]
    assert len(drifting) == 15  # the reference loses a level for these
    for q in range(64):
        z = np.float32(dequantize([q] * DIM))  # as a float32 pipeline would hold it
        assert quantize(z) == (q,) * DIM


def test_our_format_round_trips_and_is_prompt_safe():
    levels = tuple(range(44, 64))
    code = encode(levels)
    assert len(code) == 21 and code.endswith("1") and all(c in ALPHABET for c in code[:20])
    assert decode(code) == Code(levels, 1, "stylegrad")
    assert decode(encode(decode("LC0uLzAxMjM0NTY3ODk6Ozw9Pj8").levels)).levels == levels  # reference -> ours
    r = random_code(seed=3)
    assert r == random_code(seed=3) != random_code(seed=4) and decode(r).format == "stylegrad"


@pytest.mark.parametrize("code,message", [
    ("ABCDEFGHIJKLMNOPQRST2", "made for model version 2"),
    ("ABCDEFGHIJKLMNOPQRS*1", "outside A-Z a-z 0-9 - _"),
    ("ABCDEFGHIJ", "has 10 characters; expected 21"),
    ("QEBAQEBAQEBAQEBAQEBAQEBAQEA", "level above 63"),  # bytes of value 64 in the reference format
    ("LC0uLzAxMjM0NTY3ODk6Ozw9Pj*", "has 27 characters"),
])
def test_bad_codes_are_clear_errors(code, message):
    with pytest.raises(StylegradError, match=message):
        decode(code)


def test_weighted_blend():
    a, b = encode([0] * DIM), encode([63] * DIM)
    parts = parse_weighted(f"{a}::3 {b}")
    assert [w for _, w in parts] == [3.0, 1.0]
    assert blend(parts) == pytest.approx([0.75 * -1.0 + 0.25 * 1.0] * DIM)
    with pytest.raises(StylegradError, match="not a number"):
        parse_weighted(f"{a}::x")
    with pytest.raises(StylegradError, match="more than 0"):
        parse_weighted(f"{a}::0")


def test_cli_decode_and_random(capsys):
    assert main(["code", "decode", "LC0uLzAxMjM0NTY3ODk6Ozw9Pj8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"format": "reference", "version": 1, "levels": list(range(44, 64))}
    assert main(["code", "random", "--seed", "5"]) == 0
    code = capsys.readouterr().out.strip()
    assert code == random_code(seed=5)
    assert main(["code", "random", "--seed", "5", "--format", "reference"]) == 0
    assert decode(capsys.readouterr().out.strip()).levels == decode(code).levels
    assert main(["code", "decode", "nope"]) == 1
    assert capsys.readouterr().err.startswith("Error: stylecode 'nope' has 4 characters")
