"""The personalization methods, measured on the small world instead of judged by hearsay: one run trains and
measures every method on the same pictures, prompts and seeds, and writes docs/methods.md (table, plot, grid).

Rows (each a function of one ``Bench``; a row whose code fails is listed as missing on the page, never faked):
- no style (the baseline);
- aesthetic gradients at 5, 10 and 20 steps, and the consistent mode (``StyleOptions.target_gain``: each prompt
  stopped once its cosine to the style has closed that share of its distance to 1, or ``target_similarity``: once
  it reaches that cosine; 40 steps a cap);
- trained for the style, on the style's pictures: textual inversion, LoRA rank 4, Custom Diffusion (K/V), a
  hypernetwork (A1111's), DreamArtist (a positive and a negative embedding), a learned negative embedding, full
  fine-tuning, DreamBooth (prior preservation) and the base merged with it at 0.5;
- training-free at use time, trained once for the whole world (``world/ipadapter.py``, ``world/stylecodes.py``):
  IP-Adapter at several scales and InstantStyle (the image on the style blocks only), with the style's pictures
  as the reference pictures, through stylegrad's own generation path; Stylecodes, the codes of the style's
  pictures blended.
Two styles of the world's own: the bundled striped pictures and 12 outlined ones. Methods that learn a word learn
"zq" from the pictures with their content captions ("zq, a red triangle") and are prompted "zq, a red circle";
the others get the plain prompt (the learned negative its word in the negative prompt, DreamArtist "zq-neg").

For each: file size, training time, extra time per image against the baseline, style similarity (CLIP image
cosine to the style's mean embedding) and prompt kept (the world's zero-shot probe recognizes the color and shape
asked for), with their spread across prompts (the standard deviation of the per-prompt means), and the spread of
each prompt's style gain over the baseline's same prompt (how evenly the style lands). One thread by default:
on a shared machine two threads per process thrash. The page is rewritten after each style. Last line JSON.

    python bench/methods.py [--out docs] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stylegrad.world.demo import EXAMPLES, WEIGHTS  # noqa: E402
from stylegrad.world.measure import DEMO_LR, DENOISE, PROMPTS, split_caption, zero_shot  # noqa: E402

WORD = "zq"
NEGATIVE_WORD = "zn"  # the learned negative's word
SEEDS = (0, 1)
# learning rates for the small world's 64-wide model: the real-model defaults (TI 5e-4, LoRA 1e-4, CD 1e-5,
# DreamBooth 5e-6, hypernetwork 5e-6, DreamArtist 3e-3) barely move it in a few hundred steps
LR = {"ti": 5e-3, "lora": 1e-2, "cd": 1e-3, "db": 1e-4, "ft": 1e-4, "hn": 1e-3, "da": 5e-3, "neg": 5e-3}
FULL_STEPS = {"ti": 400, "lora": 400, "cd": 300, "db": 300, "ft": 300, "hn": 400, "da": 300, "neg": 300}
QUICK_STEPS = {"ti": 20, "lora": 20, "cd": 20, "db": 10, "ft": 10, "hn": 20, "da": 20, "neg": 20}
AG_STEPS = (5, 10, 20)
CONSISTENT_GAINS = (0.2, 0.3, 0.4)  # target_gain of the consistent rows (relative goals)
CONSISTENT_TARGETS = (0.4, 0.5)  # target_similarity of the consistent rows (absolute goals)
CONSISTENT_CAP = 40  # steps: a cap, not a count (20 fixed steps already cost most prompts their content)
IP_SCALES = (0.3, 0.6, 1.0)
INSTANTSTYLE_SCALES = (1.0, 2.0)
PLAIN_SAMPLES = 4  # plain pictures timed beside each row
STYLECODE_STRENGTHS = (1.0,)
GROUPS = {"none": "no style", "ag": "aesthetic gradients", "trained": "trained on the style's pictures",
          "free": "training-free at use (trained once for the world)"}


@dataclass
class Result:
    method: str
    style: str
    group: str = "trained"  # none | ag | trained | free
    file_bytes: int = 0
    train_s: float = 0.0
    extra_s_per_image: float = 0.0
    style_similarity: float = 0.0
    style_spread: float = 0.0
    gain_spread: float = 0.0  # spread across prompts of (this row's style similarity - the baseline's), per prompt
    prompt_kept: float = 0.0
    kept_spread: float = 0.0
    recipe: str = ""
    train_note: str = ""  # how the training column reads when it is not per style
    per_prompt: list = field(default_factory=list, repr=False)  # style similarity per prompt
    images: list = field(default_factory=list, repr=False)


@dataclass
class Bench:
    """What every row of one style shares: the pictures, the style, the settings and the baseline."""

    style_name: str
    folder: Path
    work: Path
    steps: dict
    prompts: tuple = PROMPTS
    seeds: tuple = SEEDS
    denoise: object = DENOISE
    quick: bool = False
    ipadapter: object = None  # world/ipadapter.py Settings (None: its defaults)
    stylecodes: object = None  # world/stylecodes.py Settings (None: its defaults)
    cache: Path | None = None  # where the world-wide adapters are cached (None: the temp dir)
    embedder: object = None
    style: object = None
    style_file: Path | None = None
    embed_s: float = 0.0
    data: object = None
    base: Result | None = None
    base_s: float = 0.0
    plain_models: object = None

    @property
    def worded(self) -> list[str]:
        return [f"{WORD}, {p}" for p in self.prompts]

    @property
    def sd(self) -> str:
        return str(WEIGHTS / "sd")

    @property
    def clip(self) -> str:
        return str(WEIGHTS / "clip")

    def request(self, prompt: str, seed: int, **kw):
        return replace(self.denoise, prompt=prompt, seed=seed, **kw)

    def settings(self, name: str, n: int, lr: float, batch: int = 4):
        from stylegrad.training.loop import TrainSettings

        return TrainSettings(steps=n, lr=lr, batch_size=batch, resolution=32, checkpoint_every=10**9,
                             work=self.work / f"train-{name.replace(' ', '-')}")

    def pictures(self) -> list[Path]:
        return sorted(self.folder.glob("*.png"))

    def plain_now(self, run=None) -> float:
        """The median seconds of a few plain pictures taken now (``run(prompt, seed)`` makes one; default the base
        model): each row's extra time is against plain pictures timed beside it, since this shared machine's
        load changes by several times within a run."""
        from stylegrad.pipelines.generation import run_pipeline
        from stylegrad.training.models import condition

        times = []
        for i in range(PLAIN_SAMPLES):
            prompt, seed = self.prompts[i % len(self.prompts)], i
            t = time.perf_counter()
            if run is not None:
                run(prompt, seed)
            else:
                with torch.no_grad():
                    m = self.plain_models
                    run_pipeline(m.pipe, condition(m, [prompt])["encoder_hidden_states"],
                                 condition(m, [""])["encoder_hidden_states"], self.request(prompt, seed))
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def captioned_copy(folder: Path, out: Path) -> Path:
    """The pictures with their content captions ('a red triangle', from the file names) beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.glob("*.png")):
        _, _, color, shape = p.stem.split("-")
        shutil.copy(p, out / p.name)
        (out / p.name).with_suffix(".txt").write_text(f"a {color} {shape}")
    return out


def measure(b: Bench, name: str, images_by_prompt, seconds_per_image: float, group: str = "trained",
            plain: float | None = None) -> Result:
    """The row's pictures measured; its extra time is against ``plain`` (default: plain pictures timed now)."""
    from stylegrad.evaluation.metrics import style_similarity

    plain = b.plain_now() if plain is None else plain
    sims, kept = [], []
    flat = [im for ims in images_by_prompt for im in ims]
    got = zero_shot(b.embedder, flat)
    all_sims = style_similarity(b.embedder.images(flat), b.style.direction).tolist()
    n = len(b.seeds)
    for p, prompt in enumerate(b.prompts):
        sims.append(statistics.fmean(all_sims[p * n:(p + 1) * n]))
        kept.append(statistics.fmean(split_caption(g) == split_caption(prompt) for g in got[p * n:(p + 1) * n]))
    base = b.base.per_prompt if b.base is not None else sims
    gains = [s - s0 for s, s0 in zip(sims, base)]
    return Result(name, b.style_name, group, extra_s_per_image=seconds_per_image - plain,
                  style_similarity=statistics.fmean(sims), style_spread=statistics.pstdev(sims),
                  gain_spread=statistics.pstdev(gains), prompt_kept=statistics.fmean(kept),
                  kept_spread=statistics.pstdev(kept), per_prompt=sims, images=flat)


def denoise(b: Bench, pipe, conditioning, prompts=None) -> tuple[list, float]:
    """Images for every prompt and seed; ``conditioning(prompt)`` -> (prompt_embeds, negative_prompt_embeds).
    Returns them and the median seconds of one picture (medians: this shared machine's hiccups move single timings
    by a tenth of a second)."""
    from stylegrad.pipelines.generation import run_pipeline

    pipe.set_progress_bar_config(disable=True)
    out, times = [], []
    with torch.no_grad():
        for prompt in prompts or b.prompts:
            pos, neg = conditioning(prompt)
            row = []
            for s in b.seeds:
                t = time.perf_counter()
                row.append(run_pipeline(pipe, pos, neg, b.request(prompt, s)))
                times.append(time.perf_counter() - t)
            out.append(row)
    return out, statistics.median(times)


def generate(b: Bench, models, prompts, words=None, negative: str = "") -> tuple[list, float]:
    """``denoise`` with the models' current weights, the prompts read as training reads captions."""
    from stylegrad.training.models import condition

    def conditioning(prompt):
        return (condition(models, [prompt], words)["encoder_hidden_states"],
                condition(models, [negative], words)["encoder_hidden_states"])

    return denoise(b, models.pipe, conditioning, prompts)


def size_of(paths) -> int:
    """Bytes of the files a method writes (a folder: everything in it)."""
    total = 0
    for p in map(Path, paths):
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def setup(b: Bench) -> Bench:
    """The style, the training pictures and the baseline (the first row)."""
    from stylegrad import embed_images, save_style
    from stylegrad.evaluation.metrics import ClipEmbedder
    from stylegrad.training.data import read_training_set
    from stylegrad.training.models import load_models

    b.work.mkdir(parents=True, exist_ok=True)
    b.embedder = ClipEmbedder(b.clip)
    t = time.perf_counter()
    b.style = embed_images([b.folder], b.clip, name=b.style_name, progress=False)
    b.embed_s = time.perf_counter() - t
    b.style_file = save_style(b.style, b.work / f"{b.style_name}.safetensors")
    b.data = read_training_set([captioned_copy(b.folder, b.work / "pictures")], 32)
    models = b.plain_models = load_models(b.sd, "cpu")
    generate(b, models, b.prompts[:1])  # warm-up: the first pictures of a process are slower
    images, b.base_s = generate(b, models, b.prompts)
    b.base = measure(b, "no style", images, b.base_s, group="none", plain=b.base_s)
    return b


def row_baseline(b: Bench) -> list[Result]:
    return [b.base]


def _aesthetic(b: Bench, name: str, options, recipe: str) -> Result:
    from stylegrad import AestheticEncoder
    from stylegrad.pipelines.generation import run_pipeline
    from stylegrad.training.models import load_models

    models = load_models(b.sd, "cpu")
    models.pipe.set_progress_bar_config(disable=True)
    enc = AestheticEncoder.from_pipeline(models.pipe, b.clip)
    tuning, times, imgs = [], [], []
    for prompt in b.prompts:
        t = time.perf_counter()
        pe, ne = enc.encode(prompt, b.style, options)
        tuning.append(time.perf_counter() - t)
        row = []
        for s in b.seeds:
            t = time.perf_counter()
            with torch.no_grad():
                row.append(run_pipeline(models.pipe, pe, ne, b.request(prompt, s)))
            times.append(time.perf_counter() - t)
        imgs.append(row)
    # the tuning runs once per prompt and serves every seed
    per = statistics.median(times) + statistics.fmean(tuning) / len(b.seeds)
    r = measure(b, name, imgs, per, group="ag")
    r.file_bytes, r.train_s, r.recipe = b.style_file.stat().st_size, b.embed_s, recipe
    return r


def rows_aesthetic(b: Bench) -> list[Result]:
    from stylegrad import StyleOptions

    return [_aesthetic(b, f"aesthetic gradients, {k} steps", StyleOptions(steps=k, lr=DEMO_LR), f"lr {DEMO_LR:g}")
            for k in AG_STEPS]


def rows_consistent(b: Bench) -> list[Result]:
    """The consistent mode: every prompt tuned until it has closed ``gain`` of its cosine's distance to 1 (relative),
    or until its cosine reaches a target (absolute)."""
    from stylegrad import StyleOptions

    rows = [_aesthetic(b, f"consistent AG, gain {g:g}", StyleOptions(steps=CONSISTENT_CAP, lr=DEMO_LR, target_gain=g),
                       f"target gain {g:g}, at most {CONSISTENT_CAP} steps, lr {DEMO_LR:g}") for g in CONSISTENT_GAINS]
    return rows + [_aesthetic(b, f"consistent AG, target {c:g}",
                              StyleOptions(steps=CONSISTENT_CAP, lr=DEMO_LR, target_similarity=c),
                              f"target similarity {c:g}, at most {CONSISTENT_CAP} steps, lr {DEMO_LR:g}")
                   for c in CONSISTENT_TARGETS]


def _trained(b: Bench, name: str, make, key: str, batch: int = 4, prompts=None, words: bool = False,
             negative: str = "", out_name: str | None = None) -> tuple[Result, object, object]:
    """Train ``make(models)`` on the style's pictures, then generate with the trained models."""
    from stylegrad.training.loop import train
    from stylegrad.training.models import load_models

    n, lr = b.steps[key], LR[key]
    m = load_models(b.sd, "cpu")
    method = make(m)
    t = time.perf_counter()
    train(method, m, b.data, b.settings(name, n, lr, batch), resume=False, progress=False)
    train_s = time.perf_counter() - t
    files = method.export(b.work / (out_name or f"{name.replace(' ', '-').replace('/', '')}.safetensors"), n)
    imgs, per = generate(b, m, prompts or b.worded, method.words() if words else None, negative)
    r = measure(b, name, imgs, per)
    r.file_bytes = size_of(files)
    r.train_s, r.recipe = train_s, f"{n} steps, lr {lr:g}, batch {batch}"
    return r, m, method


def row_textual_inversion(b: Bench) -> list[Result]:
    from stylegrad.training import textual_inversion

    r, _, _ = _trained(b, "textual inversion", lambda m: textual_inversion.TextualInversion(m, WORD, "striped", 1),
                       "ti", words=True)
    r.file_bytes = size_of([b.work / "textual-inversion.safetensors"])  # one of its twin files (.pt, .safetensors)
    return [r]


def row_lora(b: Bench) -> list[Result]:
    from stylegrad.training import lora

    return [_trained(b, "LoRA rank 4", lambda m: lora.LoRA(m, rank=4, word=WORD), "lora")[0]]


def row_custom_diffusion(b: Bench) -> list[Result]:
    from stylegrad.training import custom_diffusion

    return [_trained(b, "Custom Diffusion (K/V)", lambda m: custom_diffusion.CustomDiffusion(m, WORD), "cd")[0]]


def row_hypernetwork(b: Bench) -> list[Result]:
    """A1111's hypernetwork ([1, 2, 1], linear): it acts on every prompt, so it learns from the plain captions and
    is prompted plainly (A1111's users add it with a tag, not a word)."""
    from stylegrad.training import hypernetwork

    r, _, _ = _trained(b, "hypernetwork", lambda m: hypernetwork.Hypernetwork(m, name="world"), "hn",
                       prompts=list(b.prompts), out_name="hypernetwork.pt")
    r.file_bytes = size_of([b.work / "hypernetwork.pt"])  # the .pt.optim beside it is the optimizer's, not used
    return [r]


def row_dreamartist(b: Bench) -> list[Result]:
    from stylegrad.training import dreamartist

    r, _, _ = _trained(b, "DreamArtist", lambda m: dreamartist.DreamArtist(m, WORD, guidance=b.denoise.cfg), "da",
                       words=True, negative=WORD + dreamartist.NEG, out_name=f"{WORD}.safetensors")
    r.file_bytes = size_of([b.work / f"{WORD}.safetensors", b.work / f"{WORD}{dreamartist.NEG}.safetensors"])
    r.recipe += f", guidance {b.denoise.cfg:g}, 3 + 6 vectors"
    return [r]


def row_negative(b: Bench) -> list[Result]:
    from stylegrad.training import negative

    r, _, _ = _trained(b, "learned negative", lambda m: negative.LearnedNegative(m, NEGATIVE_WORD,
                                                                                  guidance=b.denoise.cfg),
                       "neg", prompts=list(b.prompts), words=True, negative=NEGATIVE_WORD,
                       out_name=f"{NEGATIVE_WORD}.safetensors")
    r.file_bytes = size_of([b.work / f"{NEGATIVE_WORD}.safetensors"])
    r.recipe += f", guidance {b.denoise.cfg:g}, 4 vectors"
    return [r]


def row_finetune(b: Bench) -> list[Result]:
    from stylegrad.training import finetune

    r, _, _ = _trained(b, "full fine-tune", lambda m: finetune.FineTune(m, WORD), "ft", batch=2,
                       out_name="finetune")
    r.recipe += " (the UNet; shared as the whole pipeline folder)"
    return [r]


def rows_dreambooth(b: Bench) -> list[Result]:
    """DreamBooth with prior preservation (the base model's pictures of the captions' content are the prior),
    then the base merged with it at 0.5."""
    import numpy as np

    from stylegrad.pipelines.generation import run_pipeline
    from stylegrad.training import dreambooth
    from stylegrad.training.models import load_models

    base = load_models(b.sd, "cpu")
    base.pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    class_prompts = b.data.captions
    with torch.no_grad():
        class_images = [run_pipeline(base.pipe, *base.pipe.encode_prompt(c, "cpu", 1, True, "")[:2],
                                     b.request(c, 100 + i)) for i, c in enumerate(class_prompts)]
    class_s = time.perf_counter() - t
    class_pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32")).permute(2, 0, 1)
                                / 127.5 - 1 for im in class_images])
    r, _, method = _trained(b, "DreamBooth fine-tune",
                            lambda m: dreambooth.DreamBooth(m, WORD, class_pixels, class_prompts, batch_size=2),
                            "db", batch=2)
    r.train_s += class_s
    tuned = {k: v.detach().clone() for k, v in method.trained().items()}
    merged_models = load_models(b.sd, "cpu")
    merged_models.unet.load_state_dict(dreambooth.merge(dict(merged_models.unet.state_dict()), tuned, 0.5))
    imgs, per = generate(b, merged_models, b.worded)
    merged = measure(b, "base + fine-tune merged 0.5", imgs, per)
    merged.file_bytes, merged.train_s, merged.recipe = r.file_bytes, r.train_s, "alpha 0.5"
    return [r, merged]


def _world_adapter(b: Bench) -> dict:
    from stylegrad.world import ipadapter

    return ipadapter.cached(b.ipadapter or ipadapter.Settings(), b.cache and b.cache / "ipadapter", progress=False)


def rows_ipadapter(b: Bench) -> list[Result]:
    """IP-Adapter (every cross-attention) at several scales and InstantStyle (the style blocks only), the style's
    pictures as the reference, through stylegrad's generation path (GenerationRequest.ip_*)."""
    from stylegrad.pipelines.generation import Generator
    from stylegrad.training.models import load_models

    trained = _world_adapter(b)
    models = load_models(b.sd, "cpu")
    models.pipe.set_progress_bar_config(disable=True)
    gen = Generator(models.pipe)
    gen.images(b.request(b.prompts[0], 0))  # warm-up
    pictures = tuple(str(p) for p in b.pictures())
    settings = trained.get("settings") or {}
    out = []
    for label, style_only, scales in (("IP-Adapter", False, IP_SCALES), ("InstantStyle", True, INSTANTSTYLE_SCALES)):
        for scale in scales:
            times, imgs = [], []
            fields = dict(ip_adapter=str(trained["file"]), ip_images=pictures, ip_scale=scale, ip_style=style_only,
                          ip_image_encoder=str(trained["image_encoder"]))
            gen.images(b.request(b.prompts[0], 0, **fields))  # the pictures' embeddings computed (and cached)
            for prompt in b.prompts:
                row = []
                for s in b.seeds:
                    t = time.perf_counter()
                    row.append(gen.images(b.request(prompt, s, **fields))[0][0])
                    times.append(time.perf_counter() - t)
                imgs.append(row)
            # against plain pictures through the same generation path, timed beside the row
            plain = b.plain_now(lambda prompt, seed: gen.images(b.request(prompt, seed)))
            r = measure(b, f"{label}, scale {scale:g}", imgs, statistics.median(times), "free", plain=plain)
            r.file_bytes, r.train_s = size_of([trained["file"]]), trained["seconds"]
            r.train_note = f"{trained['seconds']:.0f} s, once for the world"
            r.recipe = (f"{'SD1.x style blocks (up_blocks.1)' if style_only else 'all cross-attention'}; adapter: "
                        f"{settings.get('steps', '?')} steps on {settings.get('images', '?')} world pictures")
            out.append(r)
    return out


def rows_stylecodes(b: Bench) -> list[Result]:
    """Stylecodes trained for the world (its CLIP image tower in SigLIP's place): the codes of the style's
    pictures, blended with equal weights, at each strength."""
    from stylegrad.training.models import condition, load_models
    from stylegrad.world import stylecodes

    trained = stylecodes.cached(b.stylecodes or stylecodes.Settings(), b.cache and b.cache / "stylecodes",
                                progress=False)
    models = load_models(b.sd, "cpu")
    sc = stylecodes.stylecodes_for(trained["file"], models.unet)
    t = time.perf_counter()
    codes = " ".join(sc.code_for(Image.open(p).convert("RGB")) for p in b.pictures())
    code_s = time.perf_counter() - t
    settings = trained["settings"]

    def conditioning(prompt):
        with torch.no_grad():
            return (condition(models, [prompt])["encoder_hidden_states"],
                    condition(models, [""])["encoder_hidden_states"])

    out = []
    for strength in STYLECODE_STRENGTHS:
        imgs, per = denoise(b, sc.pipeline(models.pipe, codes, strength), conditioning)
        r = measure(b, f"Stylecodes, strength {strength:g}", imgs, per, "free")
        r.file_bytes, r.train_s = size_of([trained["file"]]), trained["seconds"]
        r.train_note = f"{trained['seconds']:.0f} s, once for the world (codes: {code_s:.1f} s)"
        r.recipe = (f"{len(b.pictures())} codes blended; model: {settings['steps']} steps, batch "
                    f"{settings['batch_size']}, on {settings['images']} world triples")
        out.append(r)
    return out


ROWS = (("no style", row_baseline), ("aesthetic gradients", rows_aesthetic), ("consistent AG", rows_consistent),
        ("textual inversion", row_textual_inversion), ("LoRA", row_lora), ("Custom Diffusion", row_custom_diffusion),
        ("hypernetwork", row_hypernetwork), ("DreamArtist", row_dreamartist), ("learned negative", row_negative),
        ("full fine-tune", row_finetune), ("DreamBooth and merge", rows_dreambooth),
        ("IP-Adapter and InstantStyle", rows_ipadapter), ("Stylecodes", rows_stylecodes))


def run_style(b: Bench, log, rows=ROWS) -> tuple[list[Result], list[tuple[str, str, str]]]:
    """Every row for one style; a row that fails is (row, style, why) in the second list."""
    setup(b)
    results, missing = [], []
    for label, fn in rows:
        try:
            got = fn(b)
        except Exception as e:  # noqa: BLE001 - a row not ready is reported as missing, never faked
            traceback.print_exc()
            missing.append((label, b.style_name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        for r in got:
            log(r)
        results += got
    return results, missing


def fmt_bytes(n: int) -> str:
    return "-" if n == 0 else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB")


def frontier(rows: list[Result]) -> list[Result]:
    """The rows no other row beats on both style similarity and prompt kept (at least as good on both, better on
    one)."""
    return [r for r in rows if not any(
        o is not r and o.style_similarity >= r.style_similarity and o.prompt_kept >= r.prompt_kept and
        (o.style_similarity, o.prompt_kept) != (r.style_similarity, r.prompt_kept) for o in rows)]


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def verdict(results: list[Result]) -> list[str]:
    """Where each method wins and loses, said from this run's numbers (regenerated with them)."""
    out = []
    consistent_ok = []
    for s in dict.fromkeys(r.style for r in results):
        rows = [r for r in results if r.style == s]
        base = next((r for r in rows if r.group == "none"), None)
        styled = [r for r in rows if r.group != "none"]
        if base is None or not styled:
            continue
        ag = [r for r in styled if r.group == "ag" and not r.method.startswith("consistent")]
        cons = [r for r in styled if r.method.startswith("consistent")]
        trained = [r for r in styled if r.group == "trained"]
        free = [r for r in styled if r.group == "free"]
        front = frontier(styled)
        best = max(styled, key=lambda r: r.style_similarity)
        # "useful": at least 0.75 of the baseline's prompt kept; among those, the most stylish
        useful = [r for r in styled if r.prompt_kept >= 0.75 * base.prompt_kept]
        best_useful = max(useful, key=lambda r: r.style_similarity) if useful else None
        text = [f"**{s}.** Without any style the pictures score {base.style_similarity:.3f} in style similarity "
                f"and keep {base.prompt_kept:.2f} of the prompt. The most stylish row is {best.method} "
                f"({best.style_similarity:.3f}, prompt kept {best.prompt_kept:.2f})"]
        if best_useful is not None:
            text.append(f"; keeping at least three quarters of the baseline's prompt, {best_useful.method} "
                        f"({best_useful.style_similarity:.3f}, kept {best_useful.prompt_kept:.2f})")
        text.append(f". On the frontier (no row better on both measures): {', '.join(r.method for r in front)}.")
        if ag:
            text.append(f" Aesthetic gradients go from {ag[0].style_similarity:.3f} ({ag[0].method.split(', ')[1]}) "
                        f"to {ag[-1].style_similarity:.3f} ({ag[-1].method.split(', ')[1]}) while prompt kept goes "
                        f"from {ag[0].prompt_kept:.2f} to {ag[-1].prompt_kept:.2f}.")
        if trained:
            t_spread, t_gain = _mean(r.style_spread for r in trained), _mean(r.gain_spread for r in trained)
            text.append(f" The trained methods took {min(r.train_s for r in trained):.0f}-"
                        f"{max(r.train_s for r in trained):.0f} s and files of "
                        f"{fmt_bytes(min(r.file_bytes for r in trained))} to "
                        f"{fmt_bytes(max(r.file_bytes for r in trained))}; their spread across prompts is "
                        f"±{t_spread:.3f} in style similarity (±{t_gain:.3f} in style gain over the baseline's same "
                        f"prompt) and ±{_mean(r.kept_spread for r in trained):.2f} in prompt kept.")
            for group, label in ((ag, "Fixed-step aesthetic gradients"), (cons, "The consistent mode")):
                if group:
                    text.append(f" {label}: ±{_mean(r.style_spread for r in group):.3f} in style similarity, "
                                f"±{_mean(r.gain_spread for r in group):.3f} in gain, "
                                f"±{_mean(r.kept_spread for r in group):.2f} in prompt kept.")
            for r in cons:
                # compared as printed (3 decimals), so the words and the figures agree
                consistent_ok.append((s, r, r in front, round(r.style_spread, 3) <= round(t_spread, 3),
                                      round(r.gain_spread, 3) <= round(t_gain, 3), t_spread, t_gain))
        if free:
            best_free = max(free, key=lambda r: r.style_similarity)
            text.append(f" Training-free at use: {best_free.method} reaches {best_free.style_similarity:.3f} "
                        f"(kept {best_free.prompt_kept:.2f}) with no training per style, at "
                        f"{best_free.extra_s_per_image * 1000:+.0f} ms per image; their model was trained once for "
                        "the whole world.")
        out += ["".join(text), ""]
    if consistent_ok:
        lines = []
        for s, r, on, even, even_gain, t_spread, t_gain in consistent_ok:
            lines.append(f"{r.method} on {s} is {'on' if on else 'off'} the frontier, with a spread of "
                         f"±{r.style_spread:.3f} in style similarity against the trained methods' ±{t_spread:.3f} "
                         f"({'no larger' if even else 'larger'}) and ±{r.gain_spread:.3f} in gain against "
                         f"±{t_gain:.3f} ({'no larger' if even_gain else 'larger'})")
        met = [x for x in consistent_ok if x[2] and x[3]]
        styles = {x[0] for x in consistent_ok}
        answer = ("Yes, on every style measured" if {x[0] for x in met} == styles else
                  "On some styles" if met else "No, not here")
        met = [x for x in consistent_ok if x[2] and x[3]]
        strict = [x for x in met if x[4]]
        styles = list(dict.fromkeys(x[0] for x in consistent_ok))
        by_style = {s: [x[1].method for x in met if x[0] == s] for s in styles}
        if {x[0] for x in met} == set(styles):
            answer = ("Yes, on every style measured, by the issue's measure: "
                      + "; ".join(f"{s}: {', '.join(m)}" for s, m in by_style.items())
                      + " on the frontier with a style-similarity spread no larger than the trained methods'")
        elif met:
            answer = "On some styles only: " + "; ".join(f"{s}: {', '.join(m)}" for s, m in by_style.items() if m)
        else:
            answer = "No, not here: no consistent row is on the frontier with a spread no larger than the trained methods'"
        answer += (". By the stricter reading (the spread of each prompt's gain over its own baseline) "
                   + ("it holds too" if strict and {x[0] for x in strict} == set(styles) else
                      "it does not: prompts that start far from the style need more steps and lose more of the "
                      "prompt, so the gain and the prompt kept vary more than the trained methods'"))
        out += [f"**Does the consistent mode answer \"inconsistent results\"?** {answer}. The target: aesthetic "
                "gradients on the style-vs-prompt frontier with a spread across prompts (the table's ±, style "
                "similarity) no larger than the trained methods' (their mean). Row by row: " + "; ".join(lines) + ".",
                ""]
    out += by_method(results)
    out.append("Timings of a fraction of a second per image are noisy on this shared 2-core machine (±0.2 s, even as "
               "medians); the small world is one small model, so the ranking, not the values, is what may carry over "
               "to SD1.5, where each method's costs grow with the model (a LoRA of rank 4 is a few MB, a fine-tune the "
               "whole UNet, an IP-Adapter for SD1.5 about 44 MB with a 2.5 GB image encoder).")
    return out


def family(method: str) -> str:
    """A row's method without its setting ('IP-Adapter, scale 0.3' -> 'IP-Adapter')."""
    return method.split(",")[0]


def by_method(results: list[Result]) -> list[str]:
    """One line per method: where it is on the frontier, its best setting keeping three quarters of the prompt,
    and what it costs; said from this run's numbers."""
    styles = list(dict.fromkeys(r.style for r in results))
    bases = {r.style: r for r in results if r.group == "none"}
    fronts = {s: frontier([r for r in results if r.style == s and r.group != "none"]) for s in styles}
    out = ["**Method by method** (frontier: no other row is better on both style similarity and prompt kept; "
           "useful: keeps at least three quarters of the baseline's prompt):", ""]
    for name in dict.fromkeys(family(r.method) for r in results if r.group != "none"):
        rows = [r for r in results if family(r.method) == name]
        on = [f"{r.method} ({r.style})" for r in rows if r in fronts[r.style]]
        parts = []
        for s in styles:
            mine = [r for r in rows if r.style == s]
            if not mine or s not in bases:
                continue
            useful = [r for r in mine if r.prompt_kept >= 0.75 * bases[s].prompt_kept]
            best = max(useful or mine, key=lambda r: r.style_similarity)
            gain = best.style_similarity - bases[s].style_similarity
            parts.append(f"{s} {gain:+.3f} style at {best.prompt_kept:.2f} kept"
                         f"{'' if useful else ' (none of its settings keeps three quarters)'}")
        r0 = rows[0]
        cost = (f"file {fmt_bytes(r0.file_bytes)}, training {r0.train_note or f'{max(r.train_s for r in rows):.0f} s'}"
                f", extra {statistics.median(r.extra_s_per_image for r in rows) * 1000:+.0f} ms per image")
        out.append(f"- **{name}**: {'; '.join(parts)} (best useful setting, style similarity over the baseline). "
                   f"{'On the frontier: ' + ', '.join(on) if on else 'Never on the frontier'}. {cost}.")
    out += ["", STATEMENTS, ""]
    return out


STATEMENTS = """**What the table's other rows would be.** *Null-text inversion*: the row above named "learned negative" is
what the methods table describes (an unconditional embedding trained over the picture set, used in the negative
prompt); the per-image editing method of arXiv 2211.09794 (per-timestep unconditional embeddings that reconstruct
one picture) is a different tool and is not built. *CLIP inversion* ("like TI but with CLIP embeddings; requires a
specially fine-tuned model"): the models meant read a CLIP image embedding beside the text, such as Stable unCLIP 2.1
(OpenCLIP ViT-H embeddings; its `-small` variant CLIP ViT-L ones), so nothing needs inverting: one pass of the
image tower gives the conditioning. A stylegrad style is already such a vector (CLIP-L for SD1.x, ViT-H for SD2.x;
SDXL's CLIP-L + bigG fits no unCLIP model), and would have to be rescaled to a single embedding's norm first.
stylegrad loads SD1.x, SD2.x and SDXL text-to-image pipelines only, so that path is neither wired in nor measured
here; an ordinary SD checkpoint's UNet reads only text states, which is why aesthetic gradients move the text
encoder towards the image embedding and IP-Adapter trains an adapter to inject it. *Model merge* is the merged row."""


def write_docs(results: list[Result], missing: list, out: Path, seconds: float, quick: bool,
               styles_planned: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stylegrad.pipelines.grids import label_grid

    folder = out / "methods"
    folder.mkdir(parents=True, exist_ok=True)
    styles = list(dict.fromkeys(r.style for r in results))
    markers = {"none": "s", "ag": "o", "trained": "^", "free": "D"}
    fig, axes = plt.subplots(1, max(1, len(styles)), figsize=(7 * max(1, len(styles)), 6), squeeze=False)
    for ax, s in zip(axes[0], styles):
        for i, r in enumerate([r for r in results if r.style == s]):
            ax.errorbar(r.prompt_kept, r.style_similarity, xerr=r.kept_spread, yerr=r.style_spread,
                        fmt=markers.get(r.group, "o"), color=plt.cm.tab20(i % 20), capsize=2, alpha=0.85,
                        label=r.method)
        ax.set_xlabel("prompt kept (probe accuracy)")
        ax.set_ylabel("style similarity")
        ax.set_title(f"style: {s}  (square: none, circle: AG, triangle: trained, diamond: training-free)", fontsize=8)
    if styles:
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(folder / "plot.png", dpi=110)
    plt.close(fig)
    if styles:
        first = [r for r in results if r.style == styles[0]]
        n = len(first[0].images) // len(first[0].per_prompt)
        rows = [[r.images[p * n].resize((64, 64), Image.NEAREST) for p in range(len(r.per_prompt))] for r in first]
        label_grid(rows, [p[2:] for p in PROMPTS[:len(first[0].per_prompt)]], [r.method for r in first]).save(
            folder / "grid.png")

    n_prompts = len(results[0].per_prompt) if results else 0
    n_seeds = len(results[0].images) // max(1, n_prompts) if results else 0
    done = f"styles {', '.join(styles)} of {', '.join(styles_planned)}" if styles != styles_planned else ""
    lines = ["# The personalization methods, measured", "",
             "Generated by `python bench/methods.py` (the small world, 2 CPU cores shared with other work, one "
             f"thread, {time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} minutes{', --quick' if quick else ''}"
             f"{'; ' + done if done else ''}); rerun it to regenerate this page, the plot and the grid.", "",
             "Every method personalizes the same bundled world model (docs/world.md) towards the same pictures, and "
             f"is measured on the same {n_prompts} prompts x {n_seeds} seeds. Style "
             "similarity: CLIP image cosine to the style pictures' mean embedding. Prompt kept: share of images in "
             "which the world's zero-shot probe finds the color and shape the prompt asked for. ± is the spread "
             "across prompts (the standard deviation of the per-prompt means): the \"inconsistent results\" claim, "
             "measured; gain ± is the spread of each prompt's style similarity minus the baseline's for the same "
             "prompt (how evenly the style lands, whatever the prompt's own similarity). Methods that learn a word "
             f"learn `{WORD}` from the pictures with their content captions and are prompted `{WORD}, a red circle`; "
             "the others get the plain prompt. Extra time per image: the median time of one picture against the "
             f"median of {PLAIN_SAMPLES} plain pictures timed right after the row (the machine's load moves during a "
             "run), plus, for aesthetic gradients, the tuning (once per prompt) shared by the prompt's "
             "seeds; IP-Adapter rows are timed against plain pictures through the same generation path.", "",
             "Training-free rows: IP-Adapter (Ye 2023) and InstantStyle (Wang 2024) use an adapter trained once on "
             "world pictures of every style and content (`stylegrad/world/ipadapter.py`, the published file layout, "
             "the world CLIP's image tower as the image encoder), with the style's 12 pictures as the reference; "
             "Stylecodes (Rowles 2024) a model trained once for the world (`stylegrad/world/stylecodes.py`: the "
             "world CLIP image tower's states stand in for SigLIP's), the 12 pictures' codes blended.", ""]
    for s in styles:
        lines += [f"## Style: {s}", "", "| method | recipe | file | training | extra time / image | style similarity"
                  " | gain ± | prompt kept |", "|---|---|---|---|---|---|---|---|"]
        for r in [r for r in results if r.style == s]:
            train_s = r.train_note or ("-" if r.train_s == 0 else f"{r.train_s:.1f} s")
            lines.append(f"| {r.method} | {r.recipe or '-'} | {fmt_bytes(r.file_bytes)} | {train_s} | "
                         f"{r.extra_s_per_image * 1000:+.0f} ms | {r.style_similarity:.3f} ± {r.style_spread:.3f} | "
                         f"± {r.gain_spread:.3f} | {r.prompt_kept:.2f} ± {r.kept_spread:.2f} |")
        lines.append("")
    if missing:
        lines += ["## Missing rows", "", "Rows whose code failed in this run (listed, not faked):", ""]
        lines += [f"- {label} ({style}): {why}" for label, style, why in missing]
        lines.append("")
    if styles:
        lines += ["![style similarity against prompt kept](methods/plot.png)", "",
                  f"The same seed across methods (style {styles[0]}; rows: methods, columns: prompts):", "",
                  "![grid](methods/grid.png)", ""]
    lines += ["## Where each method wins and where it loses", "", *verdict(results), ""]
    (out / "methods.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where methods.md and methods/ go")
    ap.add_argument("--quick", action="store_true", help="few training steps, 4 prompts, 1 seed: a smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines thrash at 2)")
    ap.add_argument("--styles", default="striped,outlined", help="which styles, in order")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stylegrad-methods-"))
    os.environ.setdefault("STYLEGRAD_CACHE", str(tmp / "cache"))  # IP-Adapter's picture embeddings, not the user's
    from stylegrad.world import ipadapter, stylecodes
    from stylegrad.world.data import write_examples

    outlined = tmp / "outlined"
    write_examples(outlined, "outlined", 12, seed=321)
    folders = {"striped": EXAMPLES, "outlined": outlined}
    planned = [s for s in a.styles.split(",") if s]
    quick = dict(prompts=PROMPTS[:4], seeds=(0,), ipadapter=ipadapter.Settings(steps=30, images=200),
                 stylecodes=stylecodes.Settings(steps=20, images=100)) if a.quick else {}

    def log(r: Result) -> None:
        print(f"{r.style:9} {r.method:32} file {fmt_bytes(r.file_bytes):>9} train {r.train_s:6.1f} s  extra "
              f"{r.extra_s_per_image * 1000:+6.0f} ms  style {r.style_similarity:.3f}±{r.style_spread:.3f} "
              f"gain±{r.gain_spread:.3f}  kept {r.prompt_kept:.2f}±{r.kept_spread:.2f}", flush=True)

    results, missing = [], []
    for s in planned:
        b = Bench(s, folders[s], tmp / s, QUICK_STEPS if a.quick else FULL_STEPS, quick=a.quick, **quick)
        got, lost = run_style(b, log)
        results += got
        missing += lost
        write_docs(results, missing, Path(a.out), time.perf_counter() - t0, a.quick, planned)  # after each style
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 1), "missing": missing, "rows": [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.__dict__.items()
         if k not in ("images", "per_prompt")} for r in results]}))


if __name__ == "__main__":
    main()
