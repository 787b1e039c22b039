"""LoRA and LyCORIS files: every shared file maps onto SD1.5's modules, each format written by the library that
writes it equals that library's own forward pass and the format's formula, and the user's pipeline is left as
it was."""

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_clip, tiny_pipeline

from stylegrad import StylegradError
from stylegrad.addons.lora.formats import read_lora
from stylegrad.addons.lora.network import LoraNetwork

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# The hooks add the change to the module's output, the library adds it its own way: float32 rounding apart.
FORWARD_ATOL = 2e-5
COMPONENTS = {"catundchat_pytorch_lora_weights.safetensors": {"unet"}, "catundchat_pytorch_lora_weights.bin": {"unet"},
              "adapter_model.safetensors": {"te"}, "lora_disney.safetensors": {"unet", "te"},
              "analog_svd_rank4.safetensors": {"unet", "te"}}
COMMUNITY_LORAS = ["catundchat_pytorch_lora_weights.safetensors", "catundchat_pytorch_lora_weights.bin",
                   "adapter_model.safetensors", "lora_disney.safetensors", "analog_svd_rank4.safetensors"]


def sd15_on_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stylegrad.checkpoints.loading import CONFIGS

    cfg = json.loads((CONFIGS / "sd1.json").read_text())
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(cfg["unet"]),
                "te": CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))}


@pytest.mark.parametrize("name", COMMUNITY_LORAS)
def test_every_shared_lora_maps_onto_sd15_modules(shared, name):
    """Every group of the file names a real Linear/Conv module of SD1.5 with a fitting shape (checked on meta
    tensors: no weights needed)."""
    lora = read_lora(shared / "community" / "lora" / name)
    net = LoraNetwork(sd15_on_meta(), [(lora, 1.0, 1.0)])
    assert len(net.patches) == len(lora.groups) and not lora.unread
    for p in net.patches:
        p.adapter.check(p.module.weight.shape)  # shapes fit
    components = {p.component for p in net.patches}
    assert components == COMPONENTS[name]
    if name == "lora_disney.safetensors":
        assert set(lora.embeddings) == {"<s1>", "<s2>"} and lora.embeddings["<s1>"].shape == (768,)
        # lora_diffusion numbers attn1, ff, attn2 per block: the 5th layer of the first block is its GEGLU
        ff = next(p for p in net.patches if p.path == "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")
        assert ff.adapter.t["up"].shape[0] == 2560 and lora.groups[("unet", "#4")]["up"] is ff.adapter.t["up"]


def test_unmappable_files_are_one_line(shared):
    with pytest.raises(StylegradError, match="unnamed tensors.*cannot be mapped"):
        read_lora(shared / "community" / "lora" / "lora_pop.pt")
    sdxl_keys = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}
    path = shared.parent / "nope"  # never written: only the in-memory check below
    del path
    from stylegrad.addons.lora.formats import LoraFile

    lora = LoraFile("x.safetensors", "kohya", {("te2", "text_model_encoder_layers_0_self_attn_q_proj"): {
        "down": sdxl_keys[next(iter(sdxl_keys))], "up": torch.zeros(1280, 4)}})
    with pytest.raises(StylegradError, match=r"matches no module.*te2:text_model_encoder_layers_0"):
        LoraNetwork(sd15_on_meta(), [(lora, 1.0, 1.0)])


@pytest.fixture()
def pipe():
    return tiny_pipeline(tiny_clip(0))


def _inputs(pipe):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]),
            torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g))


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _peft_kohya(pipe, tmp_path, **config):
    """A kohya file as diffusers' converter writes it from a peft adapter, and the adapted UNet."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(init_lora_weights=False, **config))
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    path = tmp_path / "kohya.safetensors"
    kohya = convert_state_dict_to_kohya(sd)
    for k in kohya:  # the converter writes alpha = rank; kohya's trainer writes the alpha it trained with
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(float(config["lora_alpha"]))
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    return path, unet


def _lycoris(pipe, tmp_path, algo, **kw):
    """A LyCORIS file in kohya naming, and the UNet with LyCORIS's own modules applied."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = copy.deepcopy(pipe.unet)
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D"]})
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo=algo, **kw)
    net.apply_to()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    sd = {k.replace("lycoris_", "lora_unet_", 1): v.detach().contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"{algo}.safetensors"
    save_file(sd, str(path))
    return path, unet


CASES = {
    "kohya-lora": lambda pipe, tmp: _peft_kohya(pipe, tmp, r=4, lora_alpha=2,
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]),
    "kohya-conv": lambda pipe, tmp: _peft_kohya(pipe, tmp, r=4, lora_alpha=8, target_modules=["conv1", "conv2"]),
    "locon": lambda pipe, tmp: _lycoris(pipe, tmp, "locon"),
    "locon-tucker": lambda pipe, tmp: _lycoris(pipe, tmp, "locon", use_tucker=True),
    "loha": lambda pipe, tmp: _lycoris(pipe, tmp, "loha"),
    "loha-tucker": lambda pipe, tmp: _lycoris(pipe, tmp, "loha", use_tucker=True),
    "lokr": lambda pipe, tmp: _lycoris(pipe, tmp, "lokr", factor=4),
    "lokr-tucker": lambda pipe, tmp: _lycoris(pipe, tmp, "lokr", factor=2, decompose_both=True, use_tucker=True),
    "dora": lambda pipe, tmp: _lycoris(pipe, tmp, "lora", dora_wd=True),
    "full": lambda pipe, tmp: _lycoris(pipe, tmp, "full"),
    "ia3": lambda pipe, tmp: _lycoris(pipe, tmp, "ia3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_formats_equal_the_writing_library(pipe, tmp_path, case):
    """The writing library's own forward pass with its adapter is the reference; ours runs beside the weights
    of the untouched UNet, and the UNet is bit-identical afterwards."""
    path, adapted = CASES[case](pipe, tmp_path)
    inputs = _inputs(pipe)
    expected = _unet_out(adapted, inputs)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _unet_out(pipe.unet, inputs)
    net = LoraNetwork.for_pipeline(pipe, [(str(path), 1.0, 1.0)])
    assert net.patches
    with net.applied(("unet",)):
        got = _unet_out(pipe.unet, inputs)
    assert (got - expected).abs().max() < FORWARD_ATOL
    assert (got - plain).abs().max() > 100 * FORWARD_ATOL  # the LoRA does act
    assert torch.equal(_unet_out(pipe.unet, inputs), plain)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert not any(m._forward_hooks for m in pipe.unet.modules())


def _formula(t: dict, w: torch.Tensor) -> torch.Tensor:
    """Each format's documented formula, written out plainly (A1111's networks and LyCORIS' docs)."""
    def mm(a, b):
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)

    if "lora_down.weight" in t:
        rank = t["lora_down.weight"].shape[0]
        d = mm(t["lora_up.weight"], t["lora_down.weight"]) * (float(t["alpha"]) / rank)
    elif "hada_w1_a" in t:
        d = mm(t["hada_w1_a"], t["hada_w1_b"]) * mm(t["hada_w2_a"], t["hada_w2_b"]) * (
            float(t["alpha"]) / t["hada_w1_b"].shape[0])
    elif "lokr_w1" in t:
        w2 = t["lokr_w2"] if "lokr_w2" in t else mm(t["lokr_w2_a"], t["lokr_w2_b"])
        scale = float(t["alpha"]) / t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else 1.0
        w1 = t["lokr_w1"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2) * scale
    elif "diff" in t:
        d = t["diff"]
    else:
        d = w * t["weight"].reshape(-1, *[1] * (w.dim() - 1))
    return w + d.reshape(w.shape)


@pytest.mark.parametrize("case", ["kohya-lora", "kohya-conv", "loha", "lokr", "full", "ia3"])
def test_merged_weights_equal_the_formula(pipe, tmp_path, case):
    """``merge_into`` (baking) gives W + the formula's dW for every module the file names."""
    from safetensors import safe_open

    path, _ = CASES[case](pipe, tmp_path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unet = copy.deepcopy(pipe.unet)
    net = LoraNetwork({"unet": unet}, [(read_lora(path), 1.0, 1.0)])
    originals = {p.path: p.module.weight.detach().clone() for p in net.patches}
    net.merge_into()
    kohya = {p.path: p for p in net.patches}
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == len(net.patches)
    for p in kohya.values():
        prefix = next(n for n in names if n.endswith(p.path.replace(".", "_")))
        t = {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
        expected = _formula(t, originals[p.path])
        assert torch.allclose(p.module.weight, expected, atol=1e-6), p.path


def test_multipliers_and_several_loras(pipe, tmp_path):
    """Two files at once add their changes; each multiplier scales its file's change; the hooks compute what the
    merged weights compute."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = CASES["kohya-lora"](pipe, tmp_path / "a")
    b, _ = CASES["loha"](pipe, tmp_path / "b")
    inputs = _inputs(pipe)
    plain = _unet_out(pipe.unet, inputs)
    specs = [(str(a), 1.0, 0.7), (str(b), 1.0, -0.4)]
    with LoraNetwork.for_pipeline(pipe, specs).applied():
        both = _unet_out(pipe.unet, inputs)
    merged = copy.deepcopy(pipe.unet)
    net = LoraNetwork({"unet": merged}, [(read_lora(f), te, u) for f, te, u in specs])
    before = {p.path: p.module.weight.detach().clone() for p in net.patches}
    net.merge_into()
    assert (both - _unet_out(merged, inputs)).abs().max() < FORWARD_ATOL
    half = LoraNetwork({"unet": copy.deepcopy(pipe.unet)}, [(read_lora(a), 1.0, 0.35)])
    half.merge_into()
    for p in half.patches:
        full = next(q for q in net.patches if q.path == p.path and q.lora == "kohya")
        d_half = p.module.weight - before[p.path]
        assert torch.allclose(d_half, 0.35 / 0.7 * full.adapter.full_delta(before[p.path], 0.7), atol=1e-6)
    with LoraNetwork.for_pipeline(pipe, [(str(a), 1.0, 0.0)]).applied():
        assert torch.equal(_unet_out(pipe.unet, inputs), plain)  # UNet multiplier 0: not touched at all
