"""Model CPU offload (diffusers' ``enable_model_cpu_offload``): accelerate's hooks keep every component's weights on
the CPU and move a component to the execution device for its forward. Styles, LoRAs and embeddings work there: the
text tower reads the encoder where its hook runs it (``pipe._execution_device``), tunes there in float32, hands back
the pipeline's dtype, and keeps nothing of it afterwards; the user's pipeline keeps the very hooks it had.

Without a GPU the execution device is ``cpu:0`` (a device that tensors report as ``cpu``: the values are the same
as without offload, to the bit, which is what the first tests check), and ``meta`` where only placement is asked.
"""

import numpy as np
import pytest
import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from conftest import text_with_projection
from test_addons_generate import write_kohya
from tiny import HIDDEN, PROJ, tiny_clip, tiny_pipeline, tiny_tokenizer

from stylegrad import AestheticEncoder, GenerationRequest, Generator, Style, StylegradError, StyleOptions, save_style
from stylegrad.aesthetic.tower import readable_parameters, tower_for
from stylegrad.devices import execution_device


@pytest.fixture(scope="module")
def addons(tmp_path_factory):
    """(LoRA folder, embeddings folder, style file) for the tiny SD1 pipeline."""
    root = tmp_path_factory.mktemp("offload")
    (loras := root / "Lora").mkdir()
    (embeddings := root / "embeddings").mkdir()
    write_kohya(loras / "inked.safetensors")
    g = torch.Generator().manual_seed(1)
    torch.save({"string_to_param": {"*": torch.randn(2, HIDDEN, generator=g) * 0.05}}, embeddings / "glossy.pt")
    style = save_style(Style(torch.randn(PROJ, generator=g)), root / "look.safetensors")
    return loras, embeddings, style


def _state(pipe) -> dict:
    """What must be as it was after stylegrad used the pipeline: every tensor (value and device), the offload
    hooks (the same objects), and no torch hooks on any module."""
    tensors = {f"{n}.{k}": (v.detach().clone(), v.device) for n, c in pipe.components.items()
               if isinstance(c, torch.nn.Module) for k, v in c.state_dict().items()}
    hooks = {n: getattr(c, "_hf_hook", None) for n, c in pipe.components.items()}
    # transformers 5 installs hooks of its own on a CLIP's first call for hidden states (diffusers' encode_prompt
    # does the same): not stylegrad's
    torch_hooks = sum(1 for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
                      for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                      if "output_capturing" not in getattr(h, "__qualname__", ""))
    return {"tensors": tensors, "hooks": hooks, "all_hooks": list(getattr(pipe, "_all_hooks", [])),
            "torch_hooks": torch_hooks}


def _same(a: dict, b: dict) -> bool:
    return (a["hooks"] == b["hooks"] and a["all_hooks"] == b["all_hooks"] and a["torch_hooks"] == b["torch_hooks"] == 0
            and a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(a["tensors"][k][0], b["tensors"][k][0]) and a["tensors"][k][1] == b["tensors"][k][1]
                    for k in a["tensors"]))


def test_styled_generation_with_a_lora_and_an_embedding_under_model_cpu_offload(addons):
    """The same pixels as without offload; the tower resolved the hook's execution device (``cpu:0``, not the
    weights' ``cpu``) and let go of what it read; the user's pipeline has its tensors, its hooks and nothing else
    (before the fix, our pipeline object's call re-hooked the shared components for itself)."""
    loras, embeddings, style = addons
    clip = tiny_clip(0)
    request = GenerationRequest("a glossy red house <lora:inked:0.8>", negative="blurry", seed=3, steps=2, width=32,
                                height=32, style=str(style), style_options=StyleOptions(steps=2, lr=3e-3))
    images = {}
    for offload in (False, True):
        pipe = tiny_pipeline(clip)
        if offload:
            pipe.enable_model_cpu_offload(device="cpu")
            before = _state(pipe)
        gen = Generator(pipe, "tiny", text_with_projection(clip), embeddings_dirs=[str(embeddings)],
                        loras_dirs=[str(loras)])
        ((images[offload], text),) = gen.images(request)
        assert "Lora hashes" in text and "TI hashes" in text and "Device: cpu" in text
    tower = gen.encoder().towers[""]
    assert pipe._execution_device == torch.device("cpu", 0) and tower.device == torch.device("cpu", 0)
    assert tower._text_tower.base == {}  # released after the prompt
    assert _same(before, _state(pipe))
    assert np.array_equal(np.asarray(images[False]), np.asarray(images[True]))


def test_sdxl_both_towers_under_model_cpu_offload():
    """SDXL's chain (CLIP-L, bigG, UNet, VAE): both towers tuned where their hooks run them, the pooled embedding
    too; the same tensors as without offload, and the pipeline as it was."""
    from ckpt_layout import family_pipeline
    from test_sdxl_tuning import xl_style

    out = {}
    for offload in (False, True):
        pipe = family_pipeline("sdxl", seed=3)
        clip_l = text_with_projection(tiny_clip(1))
        if offload:
            pipe.enable_model_cpu_offload(device="cpu")
            before = _state(pipe)
        enc = AestheticEncoder.from_pipeline(pipe, clip_l)
        out[offload] = enc.encode("a red house", xl_style(pipe, clip_l), StyleOptions(steps=2, lr=3e-3), "blurry")
    assert [t.device for t in enc.towers.values()] == [torch.device("cpu", 0)] * 2
    assert _same(before, _state(pipe))
    for name, t in out[False].pipeline_kwargs().items():
        assert torch.equal(t, getattr(out[True], name)), name


def test_the_tower_reads_the_encoder_where_its_hook_runs_it(clip):
    """The hook's execution device here is ``meta`` (placement only): the tower puts the encoder there through its
    hook and reads it there (tokens, layers; the projection in float32), drops it on ``release`` and reads it
    again when next used. Before, it read the weights where they waited (the CPU) and tuned there."""
    pipe = tiny_pipeline(clip)
    _, hook = cpu_offload_with_hook(pipe.text_encoder, "meta")
    enc = AestheticEncoder.from_pipeline(pipe, text_with_projection(clip).half())
    prompt_tower = enc.towers[""]
    assert prompt_tower.device == torch.device("meta") == execution_device(pipe.text_encoder)
    tower = prompt_tower.text_tower
    assert {t.device.type for t in tower.base.values()} == {"meta"} and tower.device == torch.device("meta")
    assert tower.projection.device.type == "meta" and tower.projection.dtype is torch.float32
    prompt_tower.release()
    assert tower.base == {}
    assert prompt_tower.text_tower.base.keys() == readable_parameters(pipe.text_encoder).keys()
    hook.remove()


def test_sequential_offload_is_refused_in_one_line_for_styled_prompts(clip):
    """Sequential offload keeps the weights outside the modules (on ``meta``, in the hooks' maps): tuning cannot
    read them, and says so rather than tuning meta tensors."""
    encoder = tiny_pipeline(clip).text_encoder
    cpu_offload(encoder, "cpu")
    with pytest.raises(StylegradError, match="sequential CPU offload"):
        tower_for(encoder, tiny_tokenizer(), text_with_projection(clip))


def test_the_tower_follows_the_encoder_to_another_device(clip):
    """A pipeline moved after its encoder was made (``meta`` stands in for the card, and ``OneDevice`` applies
    CUDA's one-device rule): the tower reads the tensors where they now are, SD2's extra layer and the projection
    follow, and its skeleton runs there (its position ids, made on the CPU, move too)."""
    from test_lora_devices import OneDevice

    pipe = tiny_pipeline(clip, text_layers=1)  # SD2's shape: the CLIP's last layer is the tower's own
    enc = AestheticEncoder.from_pipeline(pipe, text_with_projection(clip))
    assert {t.device.type for t in enc.text_tower("").base.values()} == {"cpu"}
    pipe.text_encoder.to("meta")
    tower = enc.text_tower("")
    assert {t.device.type for t in tower.base.values()} == {"meta"} and "encoder.layers.1.mlp.fc1.weight" in tower.base
    assert tower.projection.device.type == "meta" and enc.towers[""].device.type == "meta"
    with OneDevice():
        out = tower.run(tower.base, torch.zeros(1, 77, dtype=torch.long, device="meta"), hidden=True)
    assert out.last_hidden_state.device.type == "meta"
