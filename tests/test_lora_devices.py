"""LoRA/LyCORIS tensors follow the module they act on, at the moment it acts: its device (shown without a GPU by
running the hooks on the ``meta`` device, where a tensor left on the CPU raises a device mismatch as it would on
CUDA) and its dtype (fp16 and bf16 on the CPU against float32); their moved copies are made once per place and
gone with the hooks."""

import copy

import pytest
import torch
from test_loras import CASES, _inputs
from tiny import tiny_clip, tiny_pipeline
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stylegrad.addons.lora.formats import LoraFile, read_lora
from stylegrad.addons.lora.network import LoraNetwork

# The UNet output with a LoRA applied, the whole UNet (weights, inputs, LoRA) in half precision against float32:
# measured max |diff| / max |fp32 output| on the tiny UNet over the kinds below was 1.5e-3 to 4.3e-3 in fp16
# (DoRA the largest) and 1.1e-2 to 3.7e-2 in bf16 (DoRA); the bounds leave about 2x room. The LoRA's own effect
# (max |with - without| / max |without|, float32) is 0.11 (LoHa at multiplier 10) to 1.2 (DoRA, full).
HALF_RTOL = {torch.float16: 1e-2, torch.bfloat16: 7e-2}
# LoHa's change from this file is small (0.012 at 1): run at 10 so that bf16's rounding does not hide it
MULTIPLIER = {"loha": 10.0}
# The text encoder (two layers, six modules changed, one of each kind) with the LoRA beside it: measured 1.3e-3
# (fp16) and 9.9e-3 (bf16) against float32, relative to the output's largest value; the LoRA's effect is 0.63.
TEXT_RTOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
# The tensors merged for tuning from a half-precision encoder against those of the float32 one, at most 3.7e-4
# (fp16) and 3.0e-3 (bf16) per tensor: the half weights' own rounding (W is read in fp16/bf16, dW is formed in
# float32 from the file).
MERGED_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
UNET_KINDS = ["kohya-lora", "kohya-conv", "locon-tucker", "loha", "lokr", "full", "ia3", "dora"]


class OneDevice(TorchDispatchMode):
    """CUDA's rule on any device: every op but a copy takes its tensors from one device (0-dim CPU tensors, which
    CUDA accepts as scalars, apart). Some meta kernels (``mm``, ``addmm``) do not check it themselves."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in (torch.ops.aten.copy_, torch.ops.aten._to_copy):
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
            if len(devices) > 1:
                raise RuntimeError(f"Expected all tensors to be on the same device: {func} got {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.fixture()
def pipe():
    return tiny_pipeline(tiny_clip(0))


def _te_lora(enc) -> LoraFile:
    """A text-encoder file with one module of each kind that has a text-encoder form: low rank, full with a bias
    change, IA3, DoRA (its magnitude per input column), LoHa, LoKr."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    h = enc.config.hidden_size
    groups = {
        ("te", "text_model_encoder_layers_0_self_attn_q_proj"): {"down": r(2, h), "up": r(h, 2),
                                                                  "alpha": torch.tensor(1.0)},
        ("te", "text_model_encoder_layers_0_self_attn_k_proj"): {"diff": r(h, h) * 0.1, "diff_b": r(h)},
        ("te", "text_model_encoder_layers_0_self_attn_v_proj"): {"weight": r(h)},
        ("te", "text_model_encoder_layers_0_self_attn_out_proj"): {"down": r(2, h), "up": r(h, 2),
                                                                    "dora_scale": r(1, h).abs() + 1},
        ("te", "text_model_encoder_layers_1_self_attn_q_proj"): {"hada_w1_a": r(h, 2), "hada_w1_b": r(2, h),
                                                                  "hada_w2_a": r(h, 2), "hada_w2_b": r(2, h)},
        ("te", "text_model_encoder_layers_1_self_attn_k_proj"): {"lokr_w1": r(4, 4), "lokr_w2": r(h // 4, h // 4)},
    }
    return LoraFile("te.safetensors", "kohya", groups)


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    """case -> a file of that kind for the tiny UNet (``pipe``'s: the same seeds), written once for the module."""
    made: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in made:
            path, _ = CASES[case](tiny_pipeline(tiny_clip(0)), tmp_path_factory.mktemp(case))
            made[case] = str(path)
        return made[case]
    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", UNET_KINDS)
def test_unet_hooks_run_where_the_unet_is(pipe, unet_file, case, dtype):
    """With the UNet on ``meta``, every kind's hook computes there: nothing of the LoRA stays on the CPU."""
    path = unet_file(case)
    pipe.unet.to(device="meta", dtype=dtype)
    net = LoraNetwork.for_pipeline(pipe, [(path, 1.0, 1.0)])
    assert net.patches
    sample, t, states = (x.to("meta", dtype) if x.is_floating_point() else x.to("meta") for x in _inputs(pipe))
    with torch.no_grad(), net.applied(("unet",)), OneDevice():
        out = pipe.unet(sample, t, states).sample
        again = pipe.unet(sample, t, states).sample
    assert out.device.type == "meta" and out.dtype == dtype and out.shape == again.shape == sample.shape


def test_text_encoder_hooks_merge_and_tuning_tensors_follow_the_encoder(pipe):
    """On ``meta``: the text encoder's hooks (low rank, full with bias, IA3, DoRA, LoHa, LoKr), the tensors merged
    for tuning (float32 on the weight's device) and baking into the modules."""
    enc = pipe.text_encoder.to(device="meta", dtype=torch.float16)
    net = LoraNetwork({"te": enc}, [(_te_lora(enc), 0.8, 1.0)])
    assert len(net.patches) == 6
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with torch.no_grad(), net.applied(("te",)), OneDevice():
        out = enc(ids)[0]
    assert out.device.type == "meta" and out.dtype == torch.float16
    with OneDevice():
        merged = net.text_params("te")
    assert len(merged) == 7  # six weights and one bias
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in merged.values())
    with OneDevice():
        net.merge_into()
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in enc.parameters())


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32(pipe, unet_file, dtype):
    """A pipeline in fp16/bf16 with LoRAs gives its float32 results: the UNet with a LoRA of each kind beside it
    within ``HALF_RTOL`` (relative to the output's largest value; the LoRA does act at that precision), the text
    encoder's hooks within ``TEXT_RTOL``, and the tensors handed to tuning (W + dW) in float32 on the weight's
    device within ``MERGED_RTOL`` of the float32 encoder's."""
    for case in UNET_KINDS:
        path = unet_file(case)
        inputs = _inputs(pipe)
        half = copy.deepcopy(pipe.unet).to(dtype)
        half_inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        with torch.no_grad():
            plain = pipe.unet(*inputs).sample
            m = MULTIPLIER.get(case, 1.0)
            with LoraNetwork.for_pipeline(pipe, [(path, 1.0, m)]).applied(("unet",)):
                ref = pipe.unet(*inputs).sample
            net = LoraNetwork({"unet": half}, [(read_lora(path), 1.0, m)])
            with net.applied(("unet",)):
                got = half(*half_inputs).sample
        assert got.dtype == dtype
        assert _rel(got, ref) < HALF_RTOL[dtype], case
        assert _rel(ref, plain) > HALF_RTOL[dtype], case  # a LoRA left out would fail the bound above

    enc = pipe.text_encoder
    lora = _te_lora(enc)
    half = copy.deepcopy(enc).to(dtype)
    ids = torch.tensor([[0, 5, 9, 13, 2, 1, 1, 1]])
    nets = [LoraNetwork({"te": e}, [(lora, 0.8, 1.0)]) for e in (enc, half)]
    with torch.no_grad():
        plain = enc(ids)[0]
        outs = []
        for e, net in zip((enc, half), nets):
            with net.applied(("te",)):
                outs.append(e(ids)[0])
    assert _rel(outs[1], outs[0]) < TEXT_RTOL[dtype] < _rel(outs[0], plain)
    ref, got = (net.text_params("te") for net in nets)
    assert got.keys() == ref.keys()
    for k, v in got.items():
        assert v.dtype == torch.float32 and v.device == half.get_parameter(k).device, k
        assert _rel(v, ref[k]) < MERGED_RTOL[dtype], k


def test_copies_are_made_once_per_place_and_gone_with_the_hooks(pipe, unet_file):
    """Each step reuses the copies of the first (no new copy per denoising step); after the block no hook, no
    copy and no attribute is left on the user's modules, and their parameters are bit-identical."""
    low_rank, full = unet_file("kohya-lora"), unet_file("ia3")
    unet = pipe.unet.to(torch.bfloat16)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    attrs = {name: set(vars(m)) for name, m in unet.named_modules()}
    net = LoraNetwork.for_pipeline(pipe, [(low_rank, 1.0, 1.0), (full, 1.0, 0.5)])
    inputs = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in _inputs(pipe)]
    lora = next(p.adapter for p in net.patches if p.lora == "kohya")
    with torch.no_grad(), net.applied(("unet",)):
        first = unet(*inputs).sample
        placed = {k: dict(v) for k, v in lora._placed.items()}
        assert list(placed) == [(torch.device("cpu"), torch.bfloat16)]
        second = unet(*inputs).sample
        assert all(lora._placed[k][n] is t for k, v in placed.items() for n, t in v.items())
    assert torch.equal(first, second)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert not any(p.adapter._placed for p in net.patches)
    assert {name: set(vars(m)) for name, m in unet.named_modules()} == attrs
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
