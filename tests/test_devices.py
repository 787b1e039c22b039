"""Styles, embedding rows and predictors follow the device and precision of whatever uses them, shown without a GPU.

Two stand-ins for an accelerator, both honest about what they are:

- ``OnDevice``: a CPU tensor that *says* it lives on ``cuda:0`` or ``mps`` and refuses what a tensor there refuses
  where stylegrad could get it wrong: ``.numpy()``, mixing with a CPU tensor of more than one element, float64 on
  MPS. Moving it to the CPU (``.cpu()``, ``.to("cpu")``) gives a plain CPU tensor, and ``.to(other)`` follows
  ``other``. Its arithmetic runs on the CPU: it simulates where a tensor is, not the accelerator's kernels.
- half precision (fp16, bf16) on the CPU: the real kernels, compared with float32 within measured tolerances.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny import HIDDEN, PROJ, tiny_processor
from torch.utils._pytree import tree_flatten, tree_map

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions, load_style, mix_styles, save_style
from stylegrad.aesthetic.embedding import embed_images
from stylegrad.aesthetic.targets import style_target
from stylegrad.evaluation.metrics import aesthetic_score, style_similarity
from stylegrad.evaluation.predictors import load_predictor
from stylegrad.prompts.chunks import gather_rows

HALF = (torch.float16, torch.bfloat16)


class OnDevice(torch.Tensor):
    """A CPU tensor that claims to be on ``fake`` (see the module docstring for what is and is not simulated)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, fake: str = "cuda:0"):
        t = torch.Tensor._make_subclass(cls, data.detach())
        t.fake = torch.device(fake)
        return t

    @property
    def device(self) -> torch.device:
        return self.fake

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {self.fake} device type tensor to numpy. Use Tensor.cpu() first.")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        fake = next(a.fake for a in flat if isinstance(a, OnDevice))
        keep = fake  # where the result is
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.double):
            target, dtype, other = _move(func, args[1:], kwargs)
            if other is not None:
                keep, args, kwargs = getattr(other, "fake", None), (args[0],), {"dtype": other.dtype}
            elif target is not None:
                if target.type != "cpu" and target != fake:
                    raise RuntimeError(f"the simulated {fake} tensor cannot move to {target}")
                keep = None if target.type == "cpu" else fake
                args, kwargs = (args[0],), ({"dtype": dtype} if dtype is not None else {})
            if keep is not None and keep.type == "mps" and (dtype or kwargs.get("dtype")) == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                                "float64. Please use float32 instead.")
        elif any(isinstance(a, torch.Tensor) and not isinstance(a, OnDevice) and a.numel() > 1 for a in flat):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{fake} and cpu!")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            out = tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t, out)
        return out if keep is None else tree_map(lambda t: OnDevice(t, str(keep)) if type(t) is torch.Tensor else t, out)


def _move(func, args, kwargs) -> tuple[torch.device | None, torch.dtype | None, torch.Tensor | None]:
    """(target device, target dtype, a tensor to follow) of a ``.to``/``.cpu``/``.double`` call."""
    if func is torch.Tensor.cpu:
        return torch.device("cpu"), None, None
    if func is torch.Tensor.double:
        return None, torch.float64, None
    device, dtype, other = kwargs.get("device"), kwargs.get("dtype"), None
    for a in args:
        if isinstance(a, torch.Tensor):
            other = a
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device)):
            device = a
    return (torch.device(device) if device is not None else None), dtype, other


def test_the_stand_in_device_refuses_what_a_gpu_refuses():
    """The stand-in is only worth its tests if it fails where a real device would."""
    v = OnDevice(torch.randn(4))
    assert v.device.type == "cuda" and (v * 2).device.type == "cuda"
    with pytest.raises(TypeError, match="numpy"):
        v.numpy()
    with pytest.raises(RuntimeError, match="same device"):
        _ = v + torch.randn(4)
    assert type(v.cpu()) is torch.Tensor and type(v.to("cpu", torch.float64)) is torch.Tensor
    with pytest.raises(TypeError, match="float64"):
        OnDevice(torch.randn(4), "mps").double()


# (1) a Style's vectors live on the CPU in float32 -------------------------------------------------------------

def test_a_style_keeps_its_vectors_on_the_cpu_in_float32():
    """Whatever made the vector (a GPU, half precision), the Style holds it as a plain CPU float32 tensor, and its
    digest is the float32 one's where the values are equal (each half value is exact in float32)."""
    g = torch.Generator().manual_seed(0)
    for dtype in HALF:
        exact = torch.randn(PROJ, generator=g).to(dtype).float()  # values every dtype below holds exactly
        fp32 = Style(exact)
        for made in (exact.to(dtype), OnDevice(exact), OnDevice(exact.to(dtype), "mps")):
            style = Style(made, g=made.clone())
            for v in (style.vector, style.g):
                assert type(v) is torch.Tensor and v.device.type == "cpu" and v.dtype == torch.float32
                assert torch.equal(v, exact)
            assert Style(made).digest == fp32.digest
            assert Style(made).direction.dtype == torch.float32
    mixed = mix_styles([(Style(OnDevice(exact)), 1.0), (Style(exact.to(torch.bfloat16)), 0.5)])
    assert mixed.vector.device.type == "cpu" and mixed.vector.dtype == torch.float32


def test_a_style_on_the_meta_device_is_refused_in_one_line():
    """A meta tensor has a shape and no values: there is nothing to keep, so it is refused when the Style is made,
    not later where its digest or file is needed."""
    with pytest.raises(StylegradError, match="meta device"):
        Style(torch.randn(PROJ, device="meta"))


# (2) embed_images in half precision ---------------------------------------------------------------------------

class _OnFakeDevice(torch.nn.Module):
    """A CLIP image tower whose image embeddings come back on the stand-in device (its parameters stay on the CPU,
    so the pixels do too: only the output's device is simulated)."""

    def __init__(self, model, fake: str):
        super().__init__()
        self.model, self.fake = model, fake

    def forward(self, pixel_values):
        return SimpleNamespace(image_embeds=OnDevice(self.model(pixel_values=pixel_values).image_embeds, self.fake))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        px = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(folder / f"{i}.png")
    return folder


def _vision(clip, dtype):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(clip.config.vision_config).eval()
    model.vision_model.load_state_dict(clip.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return model.to(dtype)


EMBED_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # max |component difference| to float32; measured below


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_embed_images_in_half_precision_and_on_another_device(clip, images, dtype):
    """The CLIP tower in fp16/bf16 on the CPU gives the float32 style within EMBED_TOL (measured on the tiny CLIP:
    fp16 2.2e-4, bf16 1.4e-3 in the largest component of the unit vector), as a CPU float32 vector; and
    with its embeddings on the stand-in MPS device (no float64 there) or CUDA device, the same style."""
    fp32 = embed_images([images], encoder=(_vision(clip, torch.float32), tiny_processor()), progress=False)
    half = embed_images([images], encoder=(_vision(clip, dtype), tiny_processor()), progress=False)
    for fake in ("mps", "cuda:0"):
        moved = embed_images([images], encoder=(_OnFakeDevice(_vision(clip, dtype), fake), tiny_processor()),
                             progress=False, mean="raw")
        assert type(moved.vector) is torch.Tensor and moved.vector.dtype == torch.float32
        torch.testing.assert_close(moved.direction, half.direction, atol=1e-6, rtol=0)  # a float32 sum, not float64
        moved.digest  # noqa: B018 - reads the values on the CPU
    for s in (fp32, half):
        assert type(s.vector) is torch.Tensor and s.vector.device.type == "cpu" and s.vector.dtype == torch.float32
    assert float((half.vector - fp32.vector).abs().max()) < EMBED_TOL[dtype]


# (3) files hold CPU tensors -----------------------------------------------------------------------------------

def test_saving_as_pt_writes_a_cpu_tensor_whatever_device_made_the_style(tmp_path):
    """Simulated: the style's vector comes from the stand-in CUDA device (a CPU tensor that claims ``cuda:0``).
    The .pt file must hold a plain CPU float32 tensor that ``torch.load(weights_only=True)`` reads anywhere;
    a pickled device tensor (or tensor subclass) would not load on a machine without that device."""
    v = torch.randn(PROJ, generator=torch.Generator().manual_seed(2))
    style = Style(OnDevice(v.half()), {"encoder": "x"}, "gpu")
    p = save_style(style, tmp_path / "gpu.pt")
    raw = torch.load(p, map_location=None, weights_only=True)
    assert type(raw) is torch.Tensor and raw.device.type == "cpu" and raw.dtype == torch.float32
    assert raw.shape == (1, PROJ) and torch.equal(raw[0], v.half().float())
    back = load_style(save_style(style, tmp_path / "gpu.safetensors"))
    assert torch.equal(back.vector, v.half().float()) and back.digest == Style(v.half().float()).digest


# (4) an SD1 pipeline in half precision: styles and embedding rows follow the text encoder -------------------

ENCODE_TOL = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}  # max |difference| of prompt_embeds to float32; measured


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_styled_prompt_with_an_embedding_word_in_half_precision(pipe, clip_text, dtype):
    """A styled prompt using a textual-inversion word, on the tiny SD1 pipeline in fp16/bf16 on the CPU: the
    conditioning is in the pipeline's dtype and within ENCODE_TOL of float32's (tuning runs in float32 either way;
    measured on the tiny model, whose states reach 2.7: fp16 7e-3, bf16 2e-2 to 5.3e-2 depending on how the weights
    were rounded). Simulated: the style was made on the MPS stand-in (no float64 there) and the word's rows, in
    fp16, sit there too, as a caller of the Python API may hand them; both follow the text encoder."""
    g = torch.Generator().manual_seed(3)
    style = Style(OnDevice(torch.randn(PROJ, generator=g), "mps"))
    words = {"zq": OnDevice(torch.randn(2, HIDDEN, generator=g).half(), "mps")}
    options = StyleOptions(steps=3, lr=3e-3)
    out = {}
    for dt in (torch.float32, dtype):
        pipe.to(dtype=dt)
        enc = AestheticEncoder.from_pipeline(pipe, clip_text)
        out[dt] = enc.encode("a zq house by the sea", style, options, "blurry", embeddings=words)
    half, fp32 = out[dtype], out[torch.float32]
    assert half.prompt_embeds.dtype == dtype and half.negative_prompt_embeds.dtype == dtype
    assert style.vector.device.type == "cpu" and style.vector.dtype == torch.float32
    diff = float((half.prompt_embeds.float() - fp32.prompt_embeds).abs().max())
    assert diff < ENCODE_TOL[dtype]
    # the word does something, so the comparison covers its rows
    plain = AestheticEncoder.from_pipeline(pipe, clip_text).encode("a zq house by the sea", style, options, "blurry")
    assert float((plain.prompt_embeds.float() - half.prompt_embeds.float()).abs().max()) > 10 * ENCODE_TOL[dtype]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_embedding_rows_follow_the_token_table(dtype):
    """Simulated device: the token table and the prompt's ids on the stand-in CUDA device, the embedding rows on
    the CPU in float32 as read. The gathered rows are on the table's device in its dtype (indexing CPU rows with
    device ids, or mixing the two, is what a GPU refuses)."""
    g = torch.Generator().manual_seed(4)
    table, extra = torch.randn(10, HIDDEN, generator=g).to(dtype), torch.randn(2, HIDDEN, generator=g)
    rows = torch.tensor([0, 10, 3, 11])
    out = gather_rows(OnDevice(table), extra, OnDevice(rows))
    assert out.device.type == "cuda" and out.dtype == dtype
    assert torch.equal(out.cpu(), torch.cat([table[:1], extra[:1].to(dtype), table[3:4], extra[1:].to(dtype)]))


def test_style_target_follows_the_model_in_float32():
    """Where a style meets a model: the target is on the model's device (meta here: shape and device only) in
    float32, tuning's precision, whatever the text embedding's precision."""
    style = torch.randn(PROJ)
    target = style_target(style, device="meta")
    assert target.device.type == "meta" and target.dtype == torch.float32
    rotated = style_target(style, torch.randn(PROJ, device="meta", dtype=torch.float16), angle=0.2)
    assert rotated.device.type == "meta" and rotated.dtype == torch.float32


# (5) predictors in half precision -----------------------------------------------------------------------------

SCORE_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-1}  # |score difference| to float32 on a 1-10 scale; measured


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_scoring_a_style_with_a_half_precision_predictor(tiny_predictor, dtype):
    """A predictor moved to fp16/bf16 scores a CPU float32 style within SCORE_TOL of float32 (measured over three
    styles: fp16 up to 2.3e-3, bf16 up to 4.5e-2); the style is moved to the predictor's device and dtype when
    scored. On the meta device (a stand-in for a card) the score comes out there: the style followed the predictor.
    ``style_similarity`` follows the image embeddings' (stand-in CUDA) device likewise."""
    style = Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5)))
    fp32 = float(aesthetic_score(load_predictor(str(tiny_predictor)), style.vector[None])[0])
    pred = load_predictor(str(tiny_predictor)).to(dtype=dtype)
    assert pred.dtype == dtype
    score = aesthetic_score(pred, style.vector[None])
    assert score.dtype == torch.float32 and abs(float(score[0]) - fp32) < SCORE_TOL[dtype]
    assert pred.to(device="meta")(style.vector[None]).device.type == "meta"
    assert style_similarity(OnDevice(torch.randn(3, PROJ)), style.direction).device.type == "cuda"
