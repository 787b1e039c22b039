"""Training in half precision, on the CPU (as a GPU would, with torch's CPU autocast): each method trained in fp16
and bf16 follows the same run in fp32; the frozen weights keep the half dtype (and half the bytes) while the trained
tensors are float32; an fp16 run stopped and resumed equals an uninterrupted one bit for bit, loss scale included;
``--dtype`` and ``--mixed-precision`` on the command line, and the combinations that cannot train refused in one line
before anything loads."""

import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylegrad.errors import RequestError
from stylegrad.training import custom_diffusion, dreambooth, lora, textual_inversion
from stylegrad.training.data import read_training_set
from stylegrad.training.loop import TrainSettings, train
from stylegrad.training.models import load_models
from stylegrad.training.precision import training_precision
from stylegrad.training.recipes import train_lora

FAST = dict(resolution=32, batch_size=2, grad_accum=1)
STEPS = 3
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# ||update(half) - update(fp32)|| / ||update(fp32)|| after STEPS AdamW steps from the same start. Adam's first steps
# are about lr * sign(gradient), so the difference is the share of elements whose gradient is near zero and changes
# sign under rounding: measured 0.003-0.034 in fp16 (11-bit mantissa) and 0.10-0.16 in bf16 (8-bit) on these models.
UPDATE_TOL = {"fp16": 0.1, "bf16": 0.35}
# the per-step losses, relative: the forward's rounding only (measured below 3e-5 in fp16, 2e-3 in bf16)
LOSS_TOL = {"fp16": 1e-3, "bf16": 1e-2}
LR = {"textual-inversion": 1e-2, "lora": 1e-2, "custom-diffusion": 1e-3, "dreambooth": 1e-4}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from ckpt_layout import family_pipeline

    folder = tmp_path_factory.mktemp("sdxl")
    family_pipeline("sdxl", seed=1).save_pretrained(folder)
    return folder


def _method(kind: str, models, data):
    if kind == "textual-inversion":
        return textual_inversion.TextualInversion(models, "zq", "red", 2)
    if kind == "lora":
        return lora.LoRA(models, rank=4, text_encoder=True, word="zq")
    if kind == "custom-diffusion":
        return custom_diffusion.CustomDiffusion(models, "zq")
    return dreambooth.DreamBooth(models, "zq", data.pixels[:2], ["a picture", "a thing"])


def _frozen(models, trained: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    ids = {id(t) for t in trained.values()}
    modules = [models.unet, models.vae, *models.text_encoders]
    return [p for m in modules for p in m.parameters() if id(p) not in ids]


def _train(kind: str, dtype: str, model: Path, data, work: Path):
    """(trained tensors, their update, losses, frozen weights, the frozen weights' dtypes after each step) after
    STEPS steps of ``kind`` with the model in ``dtype``."""
    models = load_models(str(model), "cpu", dtype=dtype)
    method = _method(kind, models, data)
    start = {k: v.detach().clone() for k, v in method.trained().items()}
    frozen, seen = _frozen(models, method.trained()), []
    method.after_step = lambda: seen.append({p.dtype for p in frozen})
    result = train(method, models, data, TrainSettings(steps=STEPS, lr=LR[kind], work=work, **FAST), progress=False)
    trained = method.trained()
    update = torch.cat([(t.detach() - start[k]).flatten() for k, t in trained.items()])
    return trained, update, result["losses"], frozen, seen


@pytest.mark.parametrize("half", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["textual-inversion", "lora", "custom-diffusion", "dreambooth"])
def test_half_precision_training_follows_fp32_with_frozen_weights_half(world, pictures, tmp_path, kind, half):
    data = read_training_set([pictures], 32)
    _, reference, ref_losses, _, _ = _train(kind, "fp32", world[1], data, tmp_path / "fp32")
    trained, update, losses, frozen, seen = _train(kind, half, world[1], data, tmp_path / half)

    assert reference.norm() > 0
    assert float((update - reference).norm() / reference.norm()) < UPDATE_TOL[half]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_TOL[half], atol=0)
    # what the method trains is float32; everything else stays in the half dtype at every step, at half the bytes
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert frozen and seen == [{HALF[half]}] * STEPS
    assert sum(p.numel() * p.element_size() for p in frozen) == 2 * sum(p.numel() for p in frozen)


@pytest.mark.parametrize("kind", ["textual-inversion", "lora"])
def test_sdxl_trains_in_fp16_as_in_fp32(sdxl, pictures, tmp_path, kind):
    """Both towers, bigG's pooled embedding and the size conditioning under autocast."""
    data = read_training_set([pictures], 32)
    _, reference, ref_losses, _, _ = _train(kind, "fp32", sdxl, data, tmp_path / "fp32")
    trained, update, losses, frozen, seen = _train(kind, "fp16", sdxl, data, tmp_path / "fp16")
    assert float((update - reference).norm() / reference.norm()) < UPDATE_TOL["fp16"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_TOL["fp16"], atol=0)
    assert all(t.dtype == torch.float32 for t in trained.values()) and seen == [{torch.float16}] * STEPS


def test_an_fp16_vae_encodes_the_pictures_in_float32(world, pictures):
    """SDXL's VAE overflows in fp16 (``force_upcast`` in its config): the latents are read once, in float32, from
    the same weights, and the VAE is back in fp16 afterwards."""
    import copy

    from stylegrad.training.step import latent_moments

    vae = load_models(str(world[1]), "cpu", dtype="fp16").vae
    assert vae.config.force_upcast
    pixels = read_training_set([pictures], 32).pixels
    mean, std = latent_moments(vae, pixels)
    want_mean, want_std = latent_moments(copy.deepcopy(vae).float(), pixels)
    assert next(vae.parameters()).dtype == torch.float16 and mean.dtype == torch.float32
    assert torch.equal(mean, want_mean) and torch.equal(std, want_std)


def test_fp16_resume_is_exact_with_the_loss_scale(world, pictures, tmp_path, monkeypatch):
    """The scale doubles after every finite step here (growth_interval 1) and halves on an overflow, so it is far from
    a fresh scaler's when the run stops: a resumed run that started a new scale would skip other steps."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=1))

    def run(out, stop_after=None):
        return train_lora([str(pictures)], out, text_encoder=True, word="zq", model=str(world[1]), device="cpu",
                          dtype="fp16", progress=False, steps=6, lr=1e-2, checkpoint_every=3, stop_after=stop_after,
                          **FAST)

    (whole,) = run(tmp_path / "a" / "x.safetensors")
    run(tmp_path / "b" / "x.safetensors", stop_after=3)
    kept = torch.load(tmp_path / "b" / "x-training" / "checkpoint-3" / "optimizer.pt", weights_only=True)["scaler"]
    assert kept["scale"] != torch.amp.GradScaler("cpu").get_scale()  # the test exercises a moved scale
    (resumed,) = run(tmp_path / "b" / "x.safetensors")
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "b" / "x-training" / "checkpoint-6" / "state.json").read_text())
    assert state["precision"] == {"dtype": "fp16", "mixed_precision": "fp16"}


def test_the_cli_trains_with_a_half_dtype(world, pictures, tmp_path):
    from stylegrad.apps.cli import main

    out = tmp_path / "x.safetensors"
    assert main(["train", "lora", str(pictures), "--word", "zq", "--model", str(world[1]), "--device", "cpu",
                 "--dtype", "bf16", "--steps", "2", "--resolution", "32", "--batch-size", "2", "--out", str(out)]) == 0
    tensors = load_file(str(out))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_up" in k)
    work = tmp_path / "x-training"
    state = json.loads((work / "checkpoint-2" / "state.json").read_text())
    assert state["precision"] == {"dtype": "bf16", "mixed_precision": "bf16"}


def test_samples_in_half_precision_run_the_mixed_unet_and_record_the_dtype(world, pictures, tmp_path):
    """Custom Diffusion's float32 K/V inside an fp16 UNet: the sample picture runs under the run's autocast."""
    models = load_models(str(world[1]), "cpu", dtype="fp16")
    method = custom_diffusion.CustomDiffusion(models, "zq")
    settings = TrainSettings(steps=1, lr=1e-3, work=tmp_path, sample_every=1, sample_steps=2, **FAST)
    train(method, models, read_training_set([pictures], 32), settings, progress=False)
    with Image.open(tmp_path / "samples" / "step-000001.png") as sample:
        assert "Device: cpu, Dtype: fp16" in sample.text["parameters"]


@pytest.mark.parametrize("dtype, mixed, weights, autocast", [
    ("auto", None, torch.float32, None),  # the CPU's policy: fp32
    ("auto", "no", torch.float32, None),
    ("auto", "fp16", torch.float16, torch.float16),  # kohya's --mixed_precision alone: weights in it too
    ("auto", "bf16", torch.bfloat16, torch.bfloat16),
    ("fp32", None, torch.float32, None),
    ("fp32", "bf16", torch.float32, torch.bfloat16),  # classic AMP
    ("fp16", None, torch.float16, torch.float16),
    ("bf16", "bf16", torch.bfloat16, torch.bfloat16),
])
def test_the_precision_table(dtype, mixed, weights, autocast):
    p = training_precision("cpu", dtype, mixed)
    assert (p.weights, p.autocast) == (weights, autocast)
    assert (p.scaler() is not None) == (autocast is torch.float16)


REFUSED = [  # (flags, the error line's start)
    (["--dtype", "fp16", "--mixed-precision", "no"], "Error: --mixed-precision no with fp16 weights"),
    (["--dtype", "bf16", "--mixed-precision", "fp16"], "Error: --mixed-precision fp16 with bf16 weights"),
    (["--mixed-precision", "bf16"], "Error: --mixed-precision bf16 cannot apply on cpu"),
    (["--dtype", "fp16"], "Error: --dtype fp16 cannot apply on cpu"),
]


@pytest.mark.parametrize("flags, expected", REFUSED)
def test_combinations_that_cannot_train_are_one_line_before_loading(pictures, tmp_path, capsys, monkeypatch, flags,
                                                                   expected):
    """The model named does not exist: the precision's line comes first. Where torch's autocast is missing (as on a
    torch without it for the device), a half run cannot apply: emulated here for the CPU."""
    from stylegrad.apps.cli import main

    if "cannot apply" in expected:
        monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    args = ["train", "lora", str(pictures), "--word", "zq", "--model", str(tmp_path / "missing"), "--device", "cpu",
            "--steps", "1", "--out", str(tmp_path / "x.safetensors"), *flags]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_half_model_loaded_by_the_caller_is_checked_before_a_step(world, pictures, tmp_path):
    models = load_models(str(world[1]), "cpu", dtype="fp16")
    method = lora.LoRA(models, rank=2)
    settings = TrainSettings(steps=1, lr=1e-2, work=tmp_path / "w", mixed_precision="no", **FAST)
    with pytest.raises(RequestError, match="mixed_precision no with fp16 weights"):
        train(method, models, read_training_set([pictures], 32), settings, progress=False)
    assert not (tmp_path / "w").exists()
