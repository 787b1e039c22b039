"""The GPU check: every stylegrad path in fp16 and bf16 against fp32 on one accelerator, with the timings and the
memory users will judge, on the real SD1.5, SD2 and SDXL architectures (built from the configs stylegrad ships, with
random weights: there is no hub on that machine).

For each family, one pipeline is built in float32 on the device, and copies of it cast to fp16 and bf16. Each path
runs on all three and is compared with the fp32 result (max abs difference; NaN or inf is a failure):

- plain: a generation without a style (4 steps, SD1/SD2 at 512, SDXL at 768);
- styled: aesthetic gradients, T=10 (SD1 and SD2 one tower, SDXL both; the conditioning and the image);
- lora / loha: a kohya LoRA and a LyCORIS LoHa on the UNet and the text encoder(s) (rank 16), each difference about
  a fifth of its layer's weights, at multiplier 0.8;
- ti: a textual-inversion word (two vectors, A1111 .safetensors) in a styled prompt;
- stylecode: a code decoded into the SD1.5 UNet's control network (random control weights);
- embed: a style from 8 images through the CLIP ViT-L/14 image tower (SD1; the vector, always CPU float32);
- score: an aesthetic predictor (LAION's MLP layout) on those embeddings.
- train-lora: three LoRA training steps (SD1), frozen weights in the dtype, the LoRA in float32 (the trained
  tensors' distance from fp32's, relative to their size, and the losses').
Serve requests and batch jobs are the same Generator calls behind other doors (tests/test_half_paths.py runs them
in half precision on the CPU).

Then, on the fp16 pipeline (what users run): the time of a styled prompt (T=10) against the reference loop
(aesthetic/method.py: a float32 copy, torch's Adam, 77 tokens) and against a plain prompt; the extra peak memory of
SD1 and SDXL tuning in each memory mode (``torch.cuda.max_memory_allocated`` above what the pipeline holds: the
target is SDXL both towers in <= 4 GB); and a LoRA's apply/remove time.

    python bench/gpu_check.py                          # a table per section, then one JSON line
    python bench/gpu_check.py --size tiny --device cpu # the same script on tiny models (tests/test_gpu_check.py)

On a lent GPU machine (Python 3.12 with torch and transformers, no diffusers, no network): the wheels it lacks
travel with the tree (kept out of git by .git/info/exclude), downloaded here once with
``pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
open_clip_torch==3.3.0 importlib_metadata`` (open_clip_torch only for CLIP's BPE merges); the command there, with
``.whl`` carried, is

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \
        python3 bench/gpu_check.py | tee $OUT/gpu_check.txt

The compiled CPU kernels are not built there (stylegrad falls back to torch's, which is what a GPU runs anyway).

Under 8 minutes on one H100: building the three real-size pipelines takes most of it."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIGS = ROOT / "tests" / "checkpoint_configs"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
T = 10  # Adam steps of a styled prompt (the paper's default)
SIZES = {"real": {"sd1": 512, "sd2": 512, "sdxl": 768, "steps": 4, "rank": 16, "images": 8},
         "tiny": {"sd1": 64, "sd2": 64, "sdxl": 64, "steps": 2, "rank": 2, "images": 2}}


# -- building ---------------------------------------------------------------------------------------------------------

def _text_model(cfg: dict, projection: int | None):
    """A CLIP text model from a shipped config (random weights); with ``projection`` the variant with one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kwargs = {k: v for k, v in cfg.items() if k not in ("class", "prefix", "layout")}
    if projection:
        kwargs["projection_dim"] = projection
        return CLIPTextModelWithProjection(CLIPTextConfig(**kwargs)).eval()
    return CLIPTextModel(CLIPTextConfig(**kwargs)).eval()


def _tokenizer(config: dict, part: str):
    """CLIP's real tokenizer where this machine has its merges (open_clip_torch's wheel), else a word tokenizer
    with the same special tokens (bench/personalize.py's), which is all the numbers here need; the tiny models'
    character tokenizer for the tiny configs."""
    from stylegrad.checkpoints.loading import _tokenizer as shipped
    from stylegrad.errors import StylegradError

    if os.environ.get("STYLEGRAD_CHECKPOINT_CONFIGS") == str(TINY_CONFIGS):  # the tiny models' character tokenizer
        from stylegrad.world.tokenizer import char_tokenizer

        return char_tokenizer()
    try:
        return shipped(config, part)
    except StylegradError:
        sys.path.insert(0, str(ROOT / "bench"))
        from personalize import PadTokenizer, PromptTokenizer

        return PadTokenizer() if part == "tokenizer_2" else PromptTokenizer()


def build(family: str, device: torch.device, seed: int = 0):
    """(fp32 pipeline on ``device``, the CLIP text model with projection that defines its style space: CLIP-L for
    SD1 and SDXL's first tower, the whole ViT-H text tower for SD2)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from stylegrad.checkpoints.loading import _scheduler, assemble, family_config

    config = family_config(family, "v_prediction" if family == "sd2" else "epsilon")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config["unet"]).eval()
        vae = AutoencoderKL.from_config(config["vae"]).eval()
        te_cfg = config["text_encoder"]
        if family == "sd2":  # the pipeline's encoder stops a layer short of OpenCLIP ViT-H's text tower
            tower_cfg = {**te_cfg, "num_hidden_layers": te_cfg["num_hidden_layers"] + 1}
            clip = _text_model(tower_cfg, te_cfg["hidden_size"])
        else:
            clip = _text_model(te_cfg, te_cfg["hidden_size"])
        text = _text_model(te_cfg, None)
        getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict(), strict=False)  # SD2: L layers
        parts = dict(unet=unet, vae=vae, text_encoder=text, scheduler=_scheduler(config["scheduler"]),
                     tokenizer=_tokenizer(config, "tokenizer"))
        if family == "sdxl":
            g_cfg = config["text_encoder_2"]
            parts.update(text_encoder_2=_text_model(g_cfg, g_cfg.get("projection_dim") or g_cfg["hidden_size"]),
                         tokenizer_2=_tokenizer(config, "tokenizer_2"))
        pipe = assemble(family, parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, clip


def cast(pipe, dtype: torch.dtype):
    """A copy of ``pipe`` in ``dtype`` (the fp32 one is kept as the reference)."""
    if dtype == torch.float32:
        return pipe
    return copy.deepcopy(pipe).to(dtype)


# -- files the paths read ---------------------------------------------------------------------------------------------

def _targets(pipe):
    """(prefix, name, module) of the layers a kohya LoRA trains: attention/feed-forward/proj in the UNet's
    transformers, attention and MLP in the text encoder(s)."""
    for name, m in pipe.unet.named_modules():
        if (".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))) and \
                isinstance(m, torch.nn.Linear):
            yield "lora_unet", name, m
    encoders = [("lora_te1" if getattr(pipe, "text_encoder_2", None) is not None else "lora_te", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append(("lora_te2", pipe.text_encoder_2))
    for prefix, encoder in encoders:
        inner = getattr(encoder, "text_model", encoder)
        for name, m in inner.named_modules():
            if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                yield prefix, "text_model." + name, m


def write_lora(pipe, path: Path, rank: int, kind: str = "lora") -> Path:
    """A kohya LoRA (lora_down/lora_up/alpha) or a LyCORIS LoHa (hada_w1_a/b, hada_w2_a/b, alpha), fp16."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    tensors = {}
    for prefix, name, m in _targets(pipe):
        out, inp = m.weight.shape
        key = f"{prefix}_{name.replace('.', '_')}"
        size = 0.2 * float(m.weight.float().std())  # each difference about a fifth of the layer's own weights
        rnd = lambda *shape, std: torch.randn(*shape, generator=g) * std  # noqa: E731
        if kind == "loha":  # (w1a w1b) * (w2a w2b): each product about sqrt(size)
            for i in (1, 2):
                tensors.update({f"{key}.hada_w{i}_a": rnd(out, rank, std=size ** 0.5),
                                f"{key}.hada_w{i}_b": rnd(rank, inp, std=rank ** -0.5)})
        else:
            tensors.update({f"{key}.lora_down.weight": rnd(rank, inp, std=rank ** -0.5),
                            f"{key}.lora_up.weight": rnd(out, rank, std=size)})
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))  # alpha = rank: scale 1
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_embedding(width: int, path: Path) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(8)
    save_file({"emb_params": (torch.randn(2, width, generator=g) * 0.02).contiguous()}, str(path))
    return path


def write_style(pipe, clip_l, family: str, path: Path) -> Path:
    from stylegrad import Style, save_style

    g = torch.Generator().manual_seed(9)
    width = clip_l.config.projection_dim
    g_part = None
    if family == "sdxl":
        g_part = torch.randn(pipe.text_encoder_2.config.projection_dim, generator=g)
    save_style(Style(torch.randn(width, generator=g), g=g_part), path)
    return path


# -- measuring --------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def max_diff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float32)) if not torch.is_tensor(a) else a.detach().float().cpu()
    b = torch.as_tensor(np.asarray(b, dtype=np.float32)) if not torch.is_tensor(b) else b.detach().float().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).abs().max())


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


@contextmanager
def peak(device: torch.device, out: dict):
    """``out["extra_mb"]``: the peak allocated inside the block above what was allocated when it began: CUDA's
    allocator statistics on a GPU, elsewhere bench/tuning_memory.py's count of the tensors the block creates."""
    if device.type != "cuda":
        sys.path.insert(0, str(ROOT / "bench"))
        from tuning_memory import AllocationTracker

        with AllocationTracker() as tracker:
            yield
        out["extra_mb"] = tracker.peak[device.type] / 2**20
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield
    sync(device)
    out["extra_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20


def timed(device: torch.device, fn, runs: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# -- the paths --------------------------------------------------------------------------------------------------------

def family_paths(family: str, device: torch.device, size: str, work: Path) -> tuple[list[dict], dict]:
    """Every path of one family in fp16 and bf16 against fp32: rows of the table, and the fp16 pipeline's timings
    and memory (SD1 and SDXL)."""
    from stylegrad import AestheticEncoder, EngineSettings, GenerationRequest, Generator, StyleOptions, load_style

    spec = SIZES[size]
    side = spec[family]
    t0 = time.perf_counter()
    base, clip_l = build(family, device)
    built_s = time.perf_counter() - t0
    style_file = write_style(base, clip_l, family, work / f"{family}-style.safetensors")
    files = {"lora": write_lora(base, work / f"{family}-lora.safetensors", spec["rank"]),
             "loha": write_lora(base, work / f"{family}-loha.safetensors", spec["rank"], "loha")}
    if family == "sd1":
        files["ti"] = write_embedding(base.text_encoder.config.hidden_size, work / "sgtok.safetensors")

    def request(**kw) -> GenerationRequest:
        return GenerationRequest(kw.pop("prompt", PROMPT), steps=spec["steps"], width=side, height=side, seed=1,
                                 clip_model=None, **kw)

    styled = dict(style=str(style_file), style_options=StyleOptions(steps=T))
    cases = {"plain": request(), "styled": request(**styled),
             "lora": None, "loha": None}  # made per dtype below, by file
    if family == "sd1":
        cases["ti"] = request(prompt=PROMPT + ", sgtok", embeddings=(f"{files['ti']}:sgtok",), **styled)
    results: dict[str, dict[str, object]] = {name: {} for name in cases}
    conditioning: dict[str, object] = {}
    extra: dict = {"built_s": built_s}
    clip_arg = clip_l
    for dname, dtype in DTYPES.items():
        pipe = cast(base, dtype)
        gen = Generator(pipe, f"{family}-random", clip_arg, loras_dirs=[str(work)])
        for name, req in cases.items():
            if name in ("lora", "loha"):  # by file name, as the request's tag says
                req = request(prompt=PROMPT, loras=(f"{files[name]}:0.8:0.8",))
            image, _ = gen.images(req)[0]
            results[name][dname] = pixels(image)
        enc = AestheticEncoder.from_pipeline(pipe, clip_arg, cache_size=0, engine=EngineSettings(memory="fast"))
        e = enc.encode(PROMPT, load_style(str(style_file)), StyleOptions(steps=T))
        conditioning[dname] = e
        if dname == "fp32":
            plain_conditioning = enc.encode(PROMPT, None)
        if family == "sd1":
            results.setdefault("stylecode", {})[dname] = stylecode_image(pipe, device, side, spec["steps"])
            results.setdefault("plain-pipeline", {})[dname] = plain_image(pipe, device, side, spec["steps"])
        if dname == "fp16" and family in ("sd1", "sdxl"):
            extra.update(fp16_costs(family, pipe, clip_arg, style_file, device, files["lora"]))
        del gen, enc
        if pipe is not base:
            del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for name, by_dtype in results.items():
        plain = results["plain-pipeline" if name == "stylecode" else "plain"]["fp32"]
        effect = None if name.startswith("plain") else max_diff(by_dtype["fp32"], plain)
        for dname in ("fp16", "bf16"):  # effect: what the path changes in fp32, the scale its error is read on
            rows.append({"family": family, "path": name, "dtype": dname, "effect": effect,
                         "image_max_diff": max_diff(by_dtype[dname], by_dtype["fp32"])})
    if family == "sd1":  # training: how far each precision's LoRA change is from fp32's, relative to it
        trained = {dname: train_lora_steps(base, dtype, work, side // 2) for dname, dtype in DTYPES.items()}
        ref, ref_losses = trained["fp32"]
        scale = max(float(t.abs().max()) for t in ref.values()) or 1.0
        for dname in ("fp16", "bf16"):
            tensors, losses = trained[dname]
            change = max(float((tensors[k] - ref[k]).abs().max()) for k in ref) / scale
            loss = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses))
            rows.append({"family": family, "path": "train-lora", "dtype": dname, "image_max_diff": None,
                         "embeds_max_diff": change, "loss_rel_diff": loss})
    for dname in ("fp16", "bf16"):
        e, ref = conditioning[dname], conditioning["fp32"]
        row = {"family": family, "path": "styled-conditioning", "dtype": dname, "image_max_diff": None,
               "effect": max_diff(ref.prompt_embeds, plain_conditioning.prompt_embeds),
               "embeds_max_diff": max_diff(e.prompt_embeds, ref.prompt_embeds)}
        if getattr(e, "pooled_prompt_embeds", None) is not None:
            row["pooled_max_diff"] = max_diff(e.pooled_prompt_embeds, ref.pooled_prompt_embeds)
        rows.append(row)
    return rows, extra


def stylecode_image(pipe, device: torch.device, side: int, steps: int) -> np.ndarray:
    """An image with a code decoded into the UNet's control network (random control weights, the published SD1.5
    layout); the same control weights and code for every dtype."""
    from stylegrad.stylecodes.model import StylecodesModel
    from stylegrad.stylecodes.unet import StylecodeUNet

    torch.manual_seed(11)
    with torch.device(device):  # float32 as a file is read; the control network follows the UNet when it runs
        control = StylecodesModel(pipe.unet).eval().float()
    code = torch.rand(1, 20, generator=torch.Generator().manual_seed(12)) * 2 - 1
    styled = copy.copy(pipe)
    styled.unet = StylecodeUNet(pipe.unet, control, code.to(device), 1.0)
    out = styled(PROMPT, num_inference_steps=steps, width=side, height=side, output_type="np",
                 generator=torch.Generator(device).manual_seed(1))
    return out.images[0].astype(np.float32)


def train_lora_steps(base, dtype: torch.dtype, work: Path, resolution: int) -> tuple[dict, list[float]]:
    """Three LoRA training steps (rank 4, UNet) on a copy of ``base`` in ``dtype``, as ``stylegrad train lora
    --dtype`` runs them: frozen weights in ``dtype``, the LoRA in float32, autocast (and a loss scaler in fp16).
    (the trained tensors, the losses)."""
    from diffusers import DDPMScheduler
    from PIL import Image

    from stylegrad.families import Family
    from stylegrad.training.data import read_training_set
    from stylegrad.training.loop import TrainSettings, train
    from stylegrad.training.lora import LoRA
    from stylegrad.training.models import Models

    folder = work / "train-images"
    if not folder.exists():
        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    pipe = cast(copy.deepcopy(base) if dtype == torch.float32 else base, dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    models = Models(pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config), [pipe.text_encoder],
                    [pipe.tokenizer], pipe, Family.SD1)
    method = LoRA(models, rank=4, seed=0)
    settings = TrainSettings(steps=3, lr=1e-3, resolution=resolution, work=work / f"train-{dtype}".replace(".", "-"),
                             checkpoint_every=1000)
    result = train(method, models, read_training_set([str(folder)], resolution), settings, resume=False,
                   progress=False)
    return {k: t.detach().float().cpu().clone() for k, t in method.trained().items()}, list(result["losses"])


def plain_image(pipe, device: torch.device, side: int, steps: int) -> np.ndarray:
    """The pipeline's own call with the same seed: the stylecode row's reference, which calls the pipeline the
    same way."""
    out = pipe(PROMPT, num_inference_steps=steps, width=side, height=side, output_type="np",
               generator=torch.Generator(device).manual_seed(1))
    return out.images[0].astype(np.float32)


def fp16_costs(family: str, pipe, clip_model, style_file: Path, device: torch.device, lora: Path) -> dict:
    """On the fp16 pipeline: a styled prompt against the reference loop and a plain prompt (seconds), the extra
    peak memory of tuning in each memory mode, and a LoRA's apply/remove."""
    from stylegrad import AestheticEncoder, EngineSettings, LoraNetwork, StyleOptions, load_style
    from stylegrad.aesthetic.method import tune_text_encoder

    style = load_style(str(style_file))
    options = StyleOptions(steps=T)
    out: dict = {}
    timing = AestheticEncoder.from_pipeline(pipe, clip_model, cache_size=0, engine=EngineSettings(memory="auto"))

    def encode(style_or_none):
        timing.clear_cache()  # every run tunes (or encodes) anew
        return timing.encode(PROMPT, style_or_none, options)

    out[f"{family}_styled_s"] = timed(device, lambda: encode(style))
    out[f"{family}_plain_s"] = timed(device, lambda: encode(None))
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    if family == "sd1":
        reference_model = copy.deepcopy(clip_model).to(device)
        out["sd1_reference_s"] = timed(device, lambda: tune_text_encoder(
            reference_model, ids, style.direction.to(device), steps=T, lr=options.lr), runs=1)
        del reference_model
    else:  # both towers, one after the other, as the method defines SDXL
        ids2 = pipe.tokenizer_2([PROMPT], padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        towers = [(copy.deepcopy(clip_model).to(device), ids, style.direction),
                  (pipe.text_encoder_2, ids2, style.g_direction if hasattr(style, "g_direction") else style.g)]

        def reference():
            for model, tokens, target in towers:
                tune_text_encoder(model, tokens, target.to(device), steps=T, lr=options.lr, layer=-2,
                                  final_norm=False)

        out["sdxl_reference_s"] = timed(device, reference, runs=1)
        del towers
    for mode in ("fast", "low", "auto"):
        enc = AestheticEncoder.from_pipeline(pipe, clip_model, cache_size=0, engine=EngineSettings(memory=mode))
        enc.encode("warm up", style, StyleOptions(steps=1))  # the tower's skeleton is built once, outside the peak
        measured: dict = {}
        enc.clear_cache()
        with peak(device, measured):
            enc.encode(PROMPT, style, options)
        out[f"{family}_tuning_{mode}_extra_mb"] = measured["extra_mb"]
        del enc
    network = LoraNetwork.for_pipeline(pipe, [(str(lora), 0.8, 0.8)])

    def apply_remove():
        with network.applied():
            pass

    out[f"{family}_lora_apply_remove_s"] = timed(device, apply_remove)
    return out


def image_side(device: torch.device, size: str, work: Path) -> list[dict]:
    """embed and score: 8 images through a CLIP ViT-L/14 image tower (random weights) in each dtype; the style
    vector is CPU float32 whatever the tower's dtype."""
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from stylegrad import embed_images
    from stylegrad.evaluation.predictors import MLP_LAYERS, AestheticPredictor

    n = SIZES[size]["images"]
    rng = np.random.default_rng(0)
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if size == "real":
        cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    else:
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                               image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(13)
    with torch.device(device):
        tower = CLIPVisionModelWithProjection(cfg).eval()
    widths = [cfg.projection_dim, 1024, 128, 64, 16, 1]
    g = torch.Generator().manual_seed(14)
    predictor = AestheticPredictor({f"{layer}.{kind}": torch.randn(*shape, generator=g) * 0.05
                                    for layer, (o, i) in zip(MLP_LAYERS, zip(widths[1:], widths[:-1]))
                                    for kind, shape in (("weight", (o, i)), ("bias", (o,)))}, "random-laion-mlp")
    styles, scores = {}, {}
    for dname, dtype in DTYPES.items():
        model = copy.deepcopy(tower).to(dtype) if dtype != torch.float32 else tower
        style = embed_images([str(folder)], encoder=(model, _processor(cfg.image_size)), device=device,
                             progress=False)
        styles[dname] = style.vector
        p = AestheticPredictor(dict(predictor.state), predictor.name).to(device=device, dtype=dtype)
        scores[dname] = p(style.vector.reshape(1, -1).to(device=device, dtype=dtype)).float().cpu()
        assert style.vector.device.type == "cpu" and style.vector.dtype == torch.float32
    rows = []
    for dname in ("fp16", "bf16"):
        rows.append({"family": "clip-l", "path": "embed", "dtype": dname,
                     "embeds_max_diff": max_diff(styles[dname], styles["fp32"])})
        rows.append({"family": "clip-l", "path": "score", "dtype": dname,
                     "embeds_max_diff": max_diff(scores[dname], scores["fp32"])})
    return rows


def _processor(side: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


# -- the report -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="real",
                        help="real: the shipped SD1.5/SD2/SDXL configs; tiny: the tests' tiny configs (a smoke run)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:1, mps, cpu")
    parser.add_argument("--families", default="sd1,sd2,sdxl", help="which families, comma-separated")
    args = parser.parse_args(argv)
    if args.size == "tiny":
        os.environ.setdefault("STYLEGRAD_CHECKPOINT_CONFIGS", str(TINY_CONFIGS))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stylegrad.devices import resolve_device

    device = resolve_device(args.device)
    start = time.perf_counter()
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for family in args.families.split(","):
            family_rows, extra = family_paths(family.strip(), device, args.size, work)
            rows += family_rows
            costs.update({f"{family}_{k}" if k == "built_s" else k: v for k, v in extra.items()})
        rows += image_side(device, args.size, work)
    ratios = {}
    for family in ("sd1", "sdxl"):
        if f"{family}_styled_s" in costs:
            ratios[f"{family}_styled_vs_reference"] = costs[f"{family}_styled_s"] / costs[f"{family}_reference_s"]
            ratios[f"{family}_styled_vs_plain"] = costs[f"{family}_styled_s"] / costs[f"{family}_plain_s"]
    print(f"{'family':8} {'path':20} {'dtype':5} {'fp32 effect':>12} {'image max diff':>15} {'embeds max diff':>16} "
          f"{'pooled/loss':>12}")
    for r in rows:
        cells = [r.get("effect"), r.get("image_max_diff"), r.get("embeds_max_diff"),
                 r.get("pooled_max_diff", r.get("loss_rel_diff"))]
        text = ["-" if c is None else f"{c:.3g}" for c in cells]
        print(f"{r['family']:8} {r['path']:20} {r['dtype']:5} {text[0]:>12} {text[1]:>15} {text[2]:>16} {text[3]:>12}")
    print()
    for key, value in {**costs, **ratios}.items():
        print(f"{key:36} {'-' if value is None else f'{value:.4g}'}")
    failed = [f"{r['family']}/{r['path']}/{r['dtype']}" for r in rows
              if any(v is not None and not math.isfinite(v) for v in
                     (r.get("image_max_diff"), r.get("embeds_max_diff"), r.get("pooled_max_diff")))]
    summary = {"device": str(device), "name": _device_name(device), "size": args.size, "rows": rows,
               **costs, **ratios, "non_finite": failed, "seconds": time.perf_counter() - start}
    print(json.dumps(summary))
    return summary


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


if __name__ == "__main__":
    main()
