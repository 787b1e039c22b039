"""Tuning with rebuilt Adam moments (aesthetic/memory.py): the same numbers as kept moments (the bit-equal tier of
docs/exactness.md), a third of the state, chosen by the memory there is, by ``EngineSettings.memory`` or by its
default, STYLEGRAD_TUNING_MEMORY."""

import warnings

import pytest
import torch
from conftest import kernels_on, needs_kernels
from test_products import isa  # noqa: F401 (each instruction set's kernels, where the CPU has it)
from test_sdxl_tuning import reference as sdxl_reference
from test_sdxl_tuning import xl, xl_style  # noqa: F401 (the SDXL fixture)
from test_tuning import PROMPT, _live_tensor_bytes, ids_of, reference_loop
from tiny import PROJ, tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions
from stylegrad.aesthetic import memory, products, workspace
from stylegrad.aesthetic.contract import REFERENCE_ATOL
from stylegrad.aesthetic.engine import EngineSettings
from stylegrad.aesthetic.sdxl import SDXLAestheticEncoder
from stylegrad.notes import StylegradNote


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))


def _encode(enc, style, steps, mode, monkeypatch):
    monkeypatch.setenv("STYLEGRAD_TUNING_MEMORY", mode)
    enc.clear_cache()
    return enc.encode(PROMPT, style, StyleOptions(steps=steps, lr=3e-3))


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_rebuilt_moments_equal_kept_ones_bit_for_bit(pipe, clip_text, style, steps, isa, monkeypatch):  # noqa: F811
    """On the compiled kernels (each instruction set where it runs) each rebuilt step runs the kept step's
    instructions on the same gradients, in Adam's order: the tuned conditioning is the same to the bit, and
    within the reference loop's tolerance."""
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    kept, _ = _encode(enc, style, steps, "fast", monkeypatch)
    rebuilt, _ = _encode(enc, style, steps, "low", monkeypatch)
    assert torch.equal(kept, rebuilt)
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, steps, 3e-3)
    assert (rebuilt - ref).abs().max() < REFERENCE_ATOL


def test_rebuilt_moments_on_sdxl(xl, monkeypatch):  # noqa: F811
    """Both towers, conditioning and pooled embeddings: equal to kept moments, and to the reference loop."""
    needs_kernels()
    pipe, clip_l = xl
    style = xl_style(pipe, clip_l)
    options = StyleOptions(steps=5, lr=3e-3)
    kept, rebuilt = (SDXLAestheticEncoder(pipe, clip_l, cache_size=0, engine=EngineSettings(memory=mode)).encode(
        PROMPT, style, options) for mode in ("fast", "low"))  # the engine passed down, not the environment
    assert torch.equal(kept.prompt_embeds, rebuilt.prompt_embeds)
    assert torch.equal(kept.pooled_prompt_embeds, rebuilt.pooled_prompt_embeds)
    hidden, pooled = sdxl_reference(pipe, clip_l, style, 5, 3e-3, ("l", "g"))
    assert (rebuilt.prompt_embeds - hidden).abs().max() < REFERENCE_ATOL
    assert (rebuilt.pooled_prompt_embeds - pooled).abs().max() < REFERENCE_ATOL


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_rebuilt_moments_on_torchs_path(pipe, clip_text, style, steps, monkeypatch):
    """Without the kernels (other CPUs, GPUs) the moments are rebuilt with torch's products into scratch tensors and
    the step is torch's fused Adam: the reference loop's numbers."""
    monkeypatch.setattr(products, "_KERNELS", None)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    rebuilt, _ = _encode(enc, style, steps, "low", monkeypatch)
    ref = reference_loop(clip_text, ids_of(pipe, PROMPT), style.vector, steps, 3e-3)
    assert (rebuilt - ref).abs().max() < REFERENCE_ATOL


def _wide_encoder() -> AestheticEncoder:
    """A text tower whose large matrices dominate its tuning state, as real CLIP towers' do (hidden 256)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, projection_dim=PROJ,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with_projection = CLIPTextModelWithProjection(cfg).eval()
    encoder = CLIPTextModel(cfg).eval()
    encoder.load_state_dict(with_projection.text_model.state_dict())
    return AestheticEncoder(encoder, tok, with_projection, cache_size=0)


@pytest.fixture(params=["avx2", "avx512", "torch"])
def path(request, monkeypatch):
    """Each way the moments can be laid out: the kernels on each instruction set the CPU has, and torch's path."""
    if request.param == "torch":
        monkeypatch.setattr(products, "_KERNELS", None)
        yield request.param
        return
    yield from kernels_on(request.param)


# the bytes each kept moment takes per weight, by the path that runs: AVX-512 packs both in 6 (_fewrows.c)
MOMENT_BYTES = {"avx512": 3, "avx2": 4, "torch": 4}


def test_rebuilt_moments_hold_only_the_copy(style, path, monkeypatch):
    """Live tensor bytes during tuning, over the baseline: kept moments hold each large weight's copy and two
    moments (in the layout of the path that runs: 3 bytes a value on AVX-512's kernels, 4 on AVX2's and torch's),
    rebuilt ones the copy plus the gradients' factors; both return to the baseline after."""
    kernels = path != "torch"
    assert products.kernels_isa() == (path if kernels else None)
    assert products.moment_bytes(torch.device("cpu")) == MOMENT_BYTES[path]  # the layout this path keeps
    workspace.WORKSPACE.clear()  # a kept block from another layout would be larger than this one needs
    enc = _wide_encoder()
    matrices = sum(t.numel() * 4 for name, t in enc.tower.base.items() if ".layers." in name and t.dim() == 2)
    extra = {}
    for mode in ("fast", "low"):
        monkeypatch.setenv("STYLEGRAD_TUNING_MEMORY", mode)
        enc.encode("warm up", style, StyleOptions(steps=2))
        baseline, peaks = _live_tensor_bytes(), []

        def sample(step, sim, peaks=peaks):  # at each step: the state the earlier steps left
            peaks.append(_live_tensor_bytes())

        enc.encode(PROMPT, style, StyleOptions(steps=6), callback=sample)
        assert _live_tensor_bytes() == baseline  # every copy, moment and factor freed
        extra[mode] = max(peaks) - baseline
    # torch's path also holds scratch tiles of rows, one per role shared by every matrix: the gradient (both), and
    # the rebuilt moments (three in all); each the largest tile of rows (memory.TILE values at most), here a whole
    # matrix: on a real tower 4 MB each, whatever its shapes
    shapes = {tuple(t.shape) for name, t in enc.tower.base.items() if ".layers." in name and t.dim() == 2}
    scratch = 0 if kernels else max(min(o, memory.TILE // i) * i * 4 for o, i in shapes)
    kept = (4 + 2 * MOMENT_BYTES[path]) / 4 * matrices  # copy and moments: 4 + 3 + 3 or 4 + 4 + 4 bytes a value
    # each block the copies and the moments are carved from (workspace.py) is allocated 2 MB longer, to start on
    # a huge page: address space only, never touched
    pad = workspace.HUGE_PAGE
    assert kept < extra["fast"] - scratch - 2 * pad < kept + 0.3 * matrices
    assert matrices < extra["low"] - 3 * scratch - pad < 1.5 * matrices


def test_auto_and_budgets_keep_the_moments_that_fit(monkeypatch):
    weights = {f"w{i}": torch.empty(1000, 1000) for i in range(4)}  # 4 MB each as float32 copies; kept: 48 MB
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "moment_bytes", lambda device: 4)  # torch's path: float32 moments
    monkeypatch.setattr(memory, "_noted", set())
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 << 30)
    assert set(memory.choose_moments("auto", weights, cpu).values()) == {"kept"}
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)  # unknown: kept, as before there was a choice
    assert set(memory.choose_moments("auto", weights, cpu).values()) == {"kept"}
    monkeypatch.setattr(memory, "free_bytes", lambda device: 48 << 20)  # a 36 MB budget: copies 16, two kept 16
    with pytest.warns(StylegradNote, match="moments for 50% of the weights"):
        choice = memory.choose_moments("auto", weights, cpu)
    assert list(choice.values()) == ["kept", "kept", "rebuilt", "rebuilt"]  # the first layers keep theirs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert memory.choose_moments("auto", weights, cpu) == choice
        assert set(memory.choose_moments("fast", weights, cpu).values()) == {"kept"}  # asked for: no note
        assert set(memory.choose_moments("LOW", weights, cpu).values()) == {"rebuilt"}
        assert set(memory.choose_moments("48MB", weights, cpu).values()) == {"kept"}  # fits: no note
    with pytest.warns(StylegradNote):
        assert list(memory.choose_moments("0.02 GiB", weights, cpu).values()).count("kept") == 0  # 20 MB: copies
    monkeypatch.setattr(memory, "moment_bytes", lambda device: 3)  # the kernels': 3 bytes, a pair 6 MB
    monkeypatch.setattr(memory, "free_bytes", lambda device: 48 << 20)
    with pytest.warns(StylegradNote, match="moments for 75% of the weights"):
        assert list(memory.choose_moments("auto", weights, cpu).values()) == ["kept", "kept", "kept", "rebuilt"]
    assert memory.parse_setting("6GB") == 6 << 30 and memory.parse_setting("800m") == 800 << 20
    for bad in ("tiny", "0GB", "-1GB", "6 parsecs"):
        with pytest.raises(StylegradError, match="must be auto, fast, low or a size"):
            memory.choose_moments(bad, weights, cpu)


def test_a_budget_splits_the_weights_and_keeps_the_numbers(pipe, clip_text, style, monkeypatch):
    """Under a budget between the two, some weights keep their moments and the others rebuild theirs: the
    conditioning is still bit for bit that of kept moments."""
    needs_kernels()
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    matrices = sum(4 * t.numel() for name, t in enc.tower.base.items() if ".layers." in name and t.dim() == 2)
    chosen = []
    real = memory.choose_moments
    monkeypatch.setattr("stylegrad.aesthetic.eos_forward.choose_moments",
                        lambda *a: chosen.append(real(*a)) or chosen[-1])
    kept, _ = _encode(enc, style, 4, "fast", monkeypatch)
    with pytest.warns(StylegradNote):
        split, _ = _encode(enc, style, 4, f"{2 * matrices}B", monkeypatch)
    enc.clear_cache()
    enc.engine = EngineSettings(memory=2 * matrices)  # the same budget, passed down instead
    monkeypatch.setattr(memory, "_noted", set())
    with pytest.warns(StylegradNote):
        passed, _ = enc.encode(PROMPT, style, StyleOptions(steps=4, lr=3e-3))
    assert torch.equal(passed, split)
    modes = list(chosen[-1].values())
    assert modes.count("kept") and modes.count("rebuilt")
    assert torch.equal(kept, split)


def test_free_memory_is_read_on_linux():
    free = memory.free_bytes(torch.device("cpu"))
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < free < 1 << 50
