"""bench/methods.py's rows on tiny settings (one prompt, one seed, 3 denoising steps, 2 training steps, the world's
IP-Adapter and Stylecodes trained for 2 steps): every row function runs and returns real measurements of real
pictures, and the page lists every row and every missing one."""

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("methods_bench", ROOT / "bench" / "methods.py")
methods = importlib.util.module_from_spec(spec)
sys.modules["methods_bench"] = methods  # dataclasses look their module up there
spec.loader.exec_module(methods)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import torch

    from stylegrad.world import ipadapter, stylecodes

    tmp = tmp_path_factory.mktemp("methods")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the bench runs (two threads thrash on a shared machine)
    mp = pytest.MonkeyPatch()
    mp.setenv("STYLEGRAD_CACHE", str(tmp / "cache"))
    b = methods.Bench("striped", methods.EXAMPLES, tmp / "work", {k: 2 for k in methods.FULL_STEPS},
                      prompts=methods.PROMPTS[:1], seeds=(0,), denoise=replace(methods.DENOISE, steps=3),
                      ipadapter=ipadapter.Settings(steps=2, batch_size=4, images=16),
                      stylecodes=stylecodes.Settings(steps=2, batch_size=2, images=16), cache=tmp / "adapters")
    methods.setup(b)
    yield b
    mp.undo()
    torch.set_num_threads(threads)


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("label,row", methods.ROWS, ids=[label for label, _ in methods.ROWS])
def test_row_measures_real_pictures(bench, label, row):
    results = row(bench)
    assert results
    for r in results:
        assert r.style == "striped" and r.group in methods.GROUPS
        assert len(r.images) == len(bench.prompts) * len(bench.seeds) and r.images[0].size == (32, 32)
        assert len(r.per_prompt) == len(bench.prompts)
        for value in (r.style_similarity, r.style_spread, r.gain_spread, r.prompt_kept, r.kept_spread,
                      r.extra_s_per_image):
            assert math.isfinite(value)
        assert -1 <= r.style_similarity <= 1 and 0 <= r.prompt_kept <= 1
        # the similarity is the pictures' own: recomputed from them, it agrees
        from stylegrad.evaluation.metrics import style_similarity

        again = style_similarity(bench.embedder.images(r.images), bench.style.direction).mean().item()
        assert again == pytest.approx(r.style_similarity, abs=1e-5)
        if r.group == "none":
            continue
        assert r.file_bytes > 0 and r.train_s > 0 and r.recipe
        # the method changed the pictures: nothing is the baseline's passed off as a row
        assert any((_pixels(a) != _pixels(b)).any() for a, b in zip(r.images, bench.base.images)), r.method


def test_page_lists_rows_and_missing(bench, tmp_path):
    from stylegrad import StyleOptions

    rows = methods.row_baseline(bench) + [methods._aesthetic(bench, "aesthetic gradients, 2 steps",
                                                              StyleOptions(steps=2, lr=methods.DEMO_LR), "lr")]
    missing = [("hypernetwork", "striped", "ImportError: not ready")]
    methods.write_docs(rows, missing, tmp_path, 1.0, True, ["striped"])
    page = (tmp_path / "methods.md").read_text()
    for r in rows:
        assert f"| {r.method} |" in page
    assert "## Missing rows" in page and "hypernetwork (striped): ImportError: not ready" in page
    assert (tmp_path / "methods" / "plot.png").is_file() and (tmp_path / "methods" / "grid.png").is_file()


def test_ip_adapter_file_is_diffusers_own(tmp_path):
    """The trained adapter in the published layout: diffusers' load_ip_adapter reads it, and its UNet with the
    image embeddings computes what the training processors compute; the training processors leave no trace."""
    import torch
    from diffusers import UNet2DConditionModel

    from stylegrad.training.ipadapter import IPAdapter, context, cross_attentions, installed

    unet = UNet2DConditionModel.from_pretrained(methods.WEIGHTS / "sd" / "unet").eval()
    torch.manual_seed(0)
    adapter = IPAdapter(unet, 64)
    with torch.no_grad():  # away from the text K/V it starts from, so a wrong pairing would show
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    names = cross_attentions(unet)
    assert [k for _, k in names] == list(range(1, 2 * len(names), 2))
    path = adapter.save(tmp_path / "ip.safetensors")
    before = dict(unet.attn_processors)
    sample, t = torch.randn(2, 8, 8, 8), torch.tensor([500, 20])
    text, embeds = torch.randn(2, 77, 64), torch.randn(2, 64)
    with torch.no_grad(), installed(unet, adapter, scale=0.7):
        ours = unet(sample, t, encoder_hidden_states=context(adapter, text, embeds)).sample
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state = {"image_proj": {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)  # what pipe.load_ip_adapter calls
    for proc in unet.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [0.7]
    with torch.no_grad():
        theirs = unet(sample, t, encoder_hidden_states=text,
                      added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _row(method, group, style_similarity, prompt_kept, spread, gain_spread=0.05, style="striped"):
    return methods.Result(method, style, group, file_bytes=1000, train_s=1.0, style_similarity=style_similarity,
                          style_spread=spread, gain_spread=gain_spread, prompt_kept=prompt_kept, kept_spread=0.1)


def test_verdict_answers_from_the_numbers():
    """The page's answer to "inconsistent results" follows the rows: yes only where a consistent row is on the
    frontier with a spread no larger than the trained methods'; every method gets its line."""
    base = _row("no style", "none", 0.0, 0.9, 0.2)
    trained = _row("LoRA rank 4", "trained", 0.2, 0.8, 0.2, gain_spread=0.1)
    good = _row("consistent AG, target 0.5", "ag", 0.3, 0.5, 0.1, gain_spread=0.2)
    text = "\n".join(methods.verdict([base, trained, good]))
    assert "answer \"inconsistent results\"?** Yes" in text and "it does not" in text  # gain spread 0.2 > 0.1
    assert "- **LoRA rank 4**" in text and "- **consistent AG**" in text and "CLIP inversion" in text
    worse = _row("consistent AG, target 0.5", "ag", 0.1, 0.5, 0.3)  # beaten by the LoRA on both measures
    text = "\n".join(methods.verdict([base, trained, worse]))
    assert "answer \"inconsistent results\"?** No" in text and "Never on the frontier" in text
