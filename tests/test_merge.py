"""``stylegrad merge``: A1111's Checkpoint Merger maths element by element on tiny original-layout files."""

import json

import pytest
import torch
from ckpt_layout import family_pipeline, original_state, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_clip, tiny_pipeline

from stylegrad.apps.cli import main
from stylegrad.checkpoints.blocks import block_names, block_of, parse_block_weights
from stylegrad.checkpoints.loading import load_checkpoint
from stylegrad.checkpoints.merge import legacy_hash
from stylegrad.checkpoints.tensors import SafetensorsWriter, TensorFile
from stylegrad.files.hashes import sha256_file

CONV = "model.diffusion_model.input_blocks.0.0.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


pytestmark = pytest.mark.usefixtures("tiny_checkpoint_configs")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [write_checkpoint(tiny_pipeline(tiny_clip(s), s), root / f"{n}.safetensors") for s, n in
            zip(range(3), "ABC")]


def _load(path):
    return load_file(str(path))


def _run(capsys, *args) -> str:
    code = main(["merge", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out.strip()


def test_weighted_sum_and_add_difference_are_a1111s_formulas(files, tmp_path, capsys):
    A, B, C = (_load(f) for f in files)
    ws = _load(_run(capsys, files[0], files[1], "--alpha", "0.35", "-o", tmp_path / "ws.safetensors"))
    ad = _load(_run(capsys, *files, "--method", "add-difference", "--alpha", "0.6", "-o", tmp_path / "ad.safetensors"))
    assert list(ws) == list(A) and list(ad) == list(A)
    for k, a in A.items():
        if k == POS:  # the text encoder's position_ids stay A's (and integers)
            assert torch.equal(ws[k], a) and torch.equal(ad[k], a) and ws[k].dtype == torch.int64
            continue
        assert torch.equal(ws[k], (a.float() * (1 - 0.35) + B[k].float() * 0.35).to(a.dtype)), k
        assert torch.equal(ad[k], (a.float() + (B[k].float() - C[k].float()) * 0.6).to(a.dtype)), k
    assert not torch.equal(ws[CONV], A[CONV])


def test_none_converts_prunes_and_bakes(files, tmp_path, capsys):
    A = _load(files[0])
    vae = {k[len("first_stage_model."):]: torch.full_like(v, 0.25) for k, v in A.items()
           if k.startswith("first_stage_model.")}
    vae["loss.logvar"] = torch.zeros(())  # training leftovers in VAE files are not baked
    save_file(vae, str(tmp_path / "vae.safetensors"))
    out = _load(_run(capsys, files[0], "--method", "none", "--fp16", "--bake-vae", tmp_path / "vae.safetensors",
                     "--discard", r"^cond_stage_model\..*layers\.1\.", "-o", tmp_path / "pruned.safetensors"))
    assert not any(".layers.1." in k and k.startswith("cond_stage_model.") for k in out)
    assert any(".layers.0." in k for k in out)
    for k, v in out.items():
        if k.startswith("first_stage_model."):
            assert v.dtype == torch.float16 and bool((v == 0.25).all()), k
        elif v.is_floating_point():
            assert v.dtype == torch.float16 and torch.equal(v, A[k].half()), k
    assert out[POS].dtype == torch.int64


def test_block_weights_apply_per_block(files, tmp_path, capsys):
    A, B = _load(files[0]), _load(files[1])
    weights = [i / 24 for i in range(25)]
    text = ",".join(["0.9"] + [str(w) for w in weights])  # BASE first
    out = _load(_run(capsys, files[0], files[1], "--block-weights", text, "-o", tmp_path / "mbw.safetensors"))
    names = block_names("sd1")
    seen = set()
    for k, a in A.items():
        if k == POS:
            continue
        block = block_of(k, "sd1")
        m = 0.9 if block is None else weights[names.index(block)]
        seen.add(block)
        assert torch.equal(out[k], (a.float() * (1 - m) + B[k].float() * m).to(a.dtype)), k
    assert None in seen and "M00" in seen and "IN00" in seen
    assert block_of("model.diffusion_model.time_embed.0.weight", "sd1") == "IN00"
    assert block_of("model.diffusion_model.out.2.bias", "sd1") == "OUT11"
    assert block_of("model.diffusion_model.out.2.bias", "sdxl") == "OUT08"
    assert len(block_names("sdxl")) == 19
    base, grad = parse_block_weights("GRAD_V", "sdxl", 0.3)
    assert base == 0.3 and grad["IN00"] == 1.0 and grad["M00"] == 0.0 and grad["OUT08"] == 1.0
    x = str(tmp_path / "x.safetensors")
    assert main(["merge", str(files[0]), str(files[1]), "--block-weights", "1,2,3", "-o", x]) == 1
    assert "25 weights" in capsys.readouterr().err


def test_inpainting_a_blends_its_first_four_channels(files, tmp_path, capsys):
    A, B = _load(files[0]), _load(files[1])
    w = A[CONV]
    inpaint = dict(A, **{CONV: torch.cat([w, w * 2, w[:, :1] * 3], dim=1)})  # 9 input channels
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    out = _load(_run(capsys, tmp_path / "inpaint.safetensors", files[1], "--alpha", "0.5",
                     "-o", tmp_path / "o.safetensors"))
    assert torch.equal(out[CONV][:, :4], inpaint[CONV][:, :4] * 0.5 + B[CONV] * 0.5)
    assert torch.equal(out[CONV][:, 4:], inpaint[CONV][:, 4:])
    recipe = json.loads(safe_open(str(tmp_path / "o.safetensors"), "pt").metadata()["sd_merge_recipe"])
    assert recipe["is_inpainting"] is True
    bad = tmp_path / "bad.safetensors"
    assert main(["merge", str(files[1]), str(tmp_path / "inpaint.safetensors"), "-o", str(bad)]) == 1
    assert "A must be the inpainting model" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_output_loads_back_with_a1111_metadata(files, tmp_path, capsys):
    out = tmp_path / "mix.safetensors"
    _run(capsys, files[0], files[1], "--alpha", "0.5", "-o", out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.5
    assert recipe["primary_model_hash"] == sha256_file(files[0])
    assert recipe["secondary_model_hash"] == sha256_file(files[1]) and recipe["tertiary_model_hash"] is None
    models = json.loads(meta["sd_merge_models"])
    assert models[sha256_file(files[1])] == {"name": "B.safetensors", "legacy_hash": legacy_hash(files[1]),
                                             "sd_merge_recipe": None}
    # merging the merge keeps the history, as A1111 does
    again = tmp_path / "again.safetensors"
    _run(capsys, out, files[2], "-o", again)
    history = json.loads(safe_open(str(again), "pt").metadata()["sd_merge_models"])
    assert sha256_file(files[0]) in history and history[sha256_file(out)]["sd_merge_recipe"] == meta["sd_merge_recipe"]
    # the output is a checkpoint --model loads, and generates
    pipe = load_checkpoint(out)
    mixed = _load(out)
    assert torch.equal(pipe.unet.conv_in.weight, mixed[CONV])
    assert main(["generate", "a cat", "--model", str(out), "--width", "32", "--height", "32", "--steps", "1",
                 "--out", str(tmp_path / "img")]) == 0
    # or a diffusers folder
    folder = tmp_path / "mix-diffusers"
    _run(capsys, files[0], files[1], "--alpha", "0.5", "-o", folder)
    from diffusers import StableDiffusionPipeline

    saved = StableDiffusionPipeline.from_pretrained(folder)
    assert torch.equal(saved.unet.conv_in.weight, mixed[CONV])
    assert not list(tmp_path.glob(".*merging*"))


def test_mismatches_fail_before_any_work(files, tmp_path, capsys):
    xl = write_checkpoint(family_pipeline("sdxl"), tmp_path / "xl.safetensors")
    assert main(["merge", str(files[0]), str(xl), "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert "different families" in err and "SDXL" in err and len(err.splitlines()) == 1
    other = tiny_pipeline(tiny_clip(0), 0)
    other_state = original_state(other)
    other_state[CONV] = torch.zeros(8, 4, 5, 5)
    save_file(other_state, str(tmp_path / "odd.safetensors"))
    assert main(["merge", str(files[0]), str(tmp_path / "odd.safetensors"), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "not of one architecture" in capsys.readouterr().err
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", str(files[0]), str(files[1]), "--method", "add-difference", "-o", out]) == 1
    assert "takes 3 models" in capsys.readouterr().err
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "emb.safetensors"))
    assert main(["merge", str(files[0]), str(tmp_path / "emb.safetensors"), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "textual-inversion embedding" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_ckpt_inputs_and_the_streaming_writer(files, tmp_path, capsys):
    A = _load(files[0])
    torch.save({"state_dict": A, "global_step": 1}, tmp_path / "A.ckpt")
    out = _load(_run(capsys, tmp_path / "A.ckpt", files[1], "--alpha", "0.5", "-o", tmp_path / "o.safetensors"))
    ref = _load(_run(capsys, files[0], files[1], "--alpha", "0.5", "-o", tmp_path / "ref.safetensors"))
    assert list(out) == list(ref) and all(torch.equal(out[k], ref[k]) for k in ref)
    # the writer: announced tensors in order, a file only once all are written, readable by safetensors
    entries = [("x", torch.float16, (3, 2)), ("y", torch.int64, (4,))]
    with SafetensorsWriter(tmp_path / "w.safetensors", entries, {"k": "v"}) as w:
        w.write("x", torch.ones(3, 2, dtype=torch.float16))
        w.write("y", torch.arange(4))
    got = _load(tmp_path / "w.safetensors")
    assert torch.equal(got["y"], torch.arange(4)) and got["x"].dtype == torch.float16
    with TensorFile(tmp_path / "w.safetensors") as tf:
        assert tf.metadata == {"k": "v"} and tf.shape("x") == (3, 2)
    with pytest.raises(ValueError), SafetensorsWriter(tmp_path / "partial.safetensors", entries) as w:
        w.write("x", torch.ones(3, 2, dtype=torch.float16))
    assert not (tmp_path / "partial.safetensors").exists()


def _kohya_for(pipe, path, sgm_names: bool):
    """A kohya LoRA on every attention q/v of the UNet and the text encoder(s), SDXL's with its SGM block names."""
    from ckpt_layout import unet_key

    g = torch.Generator().manual_seed(9)
    tensors = {}
    parts = [("lora_unet", pipe.unet)] + [(p, m) for p, m in (("lora_te1" if sgm_names else "lora_te",
                                                                  pipe.text_encoder),
                                                                 ("lora_te2", getattr(pipe, "text_encoder_2", None)))
                                          if m is not None]
    for prefix, model in parts:
        for name, m in model.named_modules():
            if not name.endswith(("to_q", "to_v", "q_proj", "v_proj", "out_proj", "fc1")):
                continue
            if prefix == "lora_unet":
                key = unet_key(name + ".weight", dict(pipe.unet.config))[:-len(".weight")] if sgm_names else name
            else:
                key = name if name.startswith("text_model.") else "text_model." + name
            key = f"{prefix}_{key.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, m.weight.shape[1], generator=g)
            tensors[f"{key}.lora_up.weight"] = torch.randn(m.weight.shape[0], 2, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_merge_bakes_loras_into_the_original_layout(family, tmp_path, capsys):
    """The baked file loads to the weights of the model with the LoRA merged in memory (fused q/k/v included)."""
    from stylegrad.addons.lora.formats import read_lora
    from stylegrad.addons.lora.network import LoraNetwork

    pipe = tiny_pipeline(tiny_clip(0)) if family == "sd1" else family_pipeline(family)
    model = write_checkpoint(pipe, tmp_path / "model.safetensors")
    lora = _kohya_for(pipe, tmp_path / "lora.safetensors", sgm_names=family == "sdxl")
    out = _run(capsys, model, "--lora", f"{lora}:0.5:0.8", "-o", tmp_path / "baked.safetensors")
    baked, original = load_checkpoint(out), load_checkpoint(model)
    LoraNetwork.for_pipeline(pipe, [(read_lora(lora), 0.5, 0.8)]).merge_into()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is None:
            continue
        want, got = getattr(pipe, part).state_dict(), getattr(baked, part).state_dict()
        before = getattr(original, part).state_dict()
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-5), (part, k)
        assert any(not torch.equal(v, before[k]) for k, v in want.items())  # the LoRA did change this part
    recipe = json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])
    assert recipe["loras"] == ["lora.safetensors:0.5:0.8"] and recipe["interp_method"] == "No interpolation"


def test_merge_bakes_loras_into_a_diffusers_folder(tmp_path, capsys):
    """A diffusers folder, which every other command takes as --model, is a bake input too: the result is a folder
    with the LoRA merged in; a weighted merge of a folder is one line saying what merge reads."""
    from diffusers import StableDiffusionPipeline

    from stylegrad.addons.lora.formats import read_lora
    from stylegrad.addons.lora.network import LoraNetwork

    pipe = tiny_pipeline(tiny_clip(0))
    pipe.save_pretrained(tmp_path / "folder")
    lora = _kohya_for(pipe, tmp_path / "lora.safetensors", sgm_names=False)
    out = _run(capsys, tmp_path / "folder", "--lora", f"{lora}:0.5:0.8", "-o", tmp_path / "baked")
    baked = StableDiffusionPipeline.from_pretrained(out)
    LoraNetwork.for_pipeline(pipe, [(read_lora(lora), 0.5, 0.8)]).merge_into()
    for part in ("unet", "text_encoder"):
        want, got = getattr(pipe, part).state_dict(), getattr(baked, part).state_dict()
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items()), part
    other = write_checkpoint(tiny_pipeline(tiny_clip(1), 1), tmp_path / "B.safetensors")
    assert main(["merge", str(tmp_path / "folder"), str(other), "-o", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "diffusers folder" in err and "single-file" in err and "not found" not in err


def test_library_errors_name_parameters_and_the_cli_names_flags(files, tmp_path, capsys):
    """The library's message names the parameter (a Python caller's word); the CLI prints the flag that sets it."""
    from stylegrad.checkpoints.merge import merge_checkpoints
    from stylegrad.errors import RequestError

    with pytest.raises(RequestError, match=r"^discard is not a valid regular expression") as e:
        merge_checkpoints(files[0], out=tmp_path / "x.safetensors", method="none", discard="(")
    assert "--" not in str(e.value)
    assert main(["merge", str(files[0]), "--method", "none", "--discard", "(", "-o", str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("Error: --discard is not a valid regular expression")
    assert main(["merge", "nosuchname", "-o", str(tmp_path / "y.safetensors")]) == 1
    assert "give a models folder as --models-dir" in capsys.readouterr().err
