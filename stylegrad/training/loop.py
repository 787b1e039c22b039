"""The loop every method runs: batches of pictures with their captions, the shared loss, AdamW on the method's
tensors (float32), gradient accumulation, half precision (frozen weights in fp16/bf16, the forward under autocast,
fp16's loss scaling: precision.py) and gradient checkpointing, a progress bar with the loss, a sample picture every
N steps, checkpoints, exact resume (the loss scale included)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stylegrad.devices import dtype_name
from stylegrad.errors import StylegradError
from stylegrad.training.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from stylegrad.training.data import TrainingSet
from stylegrad.training.models import Models, condition
from stylegrad.training.precision import MIXED, Precision, training_precision
from stylegrad.training.step import diffusion_loss, latent_moments


@dataclass
class TrainSettings:
    steps: int
    lr: float
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 512
    seed: int = 0
    weight_decay: float = 1e-2
    checkpoint_every: int = 500
    sample_every: int = 0  # 0: no samples
    sample_prompt: str | None = None
    sample_steps: int = 20
    mixed_precision: str | None = None  # the autocast: None follows the model's dtype, else no, fp16, bf16
    gradient_checkpointing: bool = False
    work: Path = field(default_factory=lambda: Path("training"))

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise StylegradError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise StylegradError(f"lr must be > 0, got {self.lr}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED:
            raise StylegradError(f"mixed precision must be no, fp16 or bf16, got {self.mixed_precision}")


class Method:
    """What a method adds to the loop. ``trained``: name -> the tensors it trains (leaves, float32, even where the
    model it trains in is half: ``models.train_float32``)."""

    name = "method"
    word: str | None = None  # the word its captions carry (textual inversion's token)
    templates: tuple[str, ...] = ("{}",)

    def trained(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def words(self) -> list[dict[str, torch.Tensor]] | None:
        return None

    def loss(self, models: Models, captions: list[str], mean: torch.Tensor, std: torch.Tensor,
             generator: torch.Generator, resolution: int | None = None) -> torch.Tensor:
        """The step's loss on a batch (latent moments and captions): the shared diffusion loss on the captions'
        conditioning. Methods that train a negative prompt (DreamArtist, the learned negative) guide it."""
        cond = condition(models, captions, self.words(), resolution)
        return diffusion_loss(models.unet, models.scheduler, mean, std, cond, generator)

    def negative_prompt(self) -> str:
        """The sample pictures' negative prompt."""
        return ""

    def extra_loss(self, models: Models, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def describe(self) -> dict:
        return {}


def precision_of(models: Models, mixed_precision: str | None = None) -> Precision:
    """The run's precision for models already loaded (their frozen weights' dtype), checked as the recipes check
    the user's choice before loading."""
    return training_precision(models.device, models.dtype, mixed_precision)


def train(method: Method, models: Models, data: TrainingSet, settings: TrainSettings, resume: bool = True,
          progress: bool = True, stop_after: int | None = None) -> dict:
    """Train ``settings.steps`` optimizer steps (resuming from the last checkpoint in ``settings.work``); returns
    {'step', 'losses'}. ``stop_after``: stop at that step (as an interrupted run would), checkpoint written."""
    precision = precision_of(models, settings.mixed_precision)
    tensors = method.trained()
    wrong = [name for name, t in tensors.items() if t.dtype != torch.float32]
    if wrong:
        raise ValueError(f"{method.name} trains {wrong[0]} in {tensors[wrong[0]].dtype}; trained tensors are float32")
    work = Path(settings.work)
    work.mkdir(parents=True, exist_ok=True)
    if settings.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers checkpoints only in training mode; the model has no dropout in use
    optimizer = torch.optim.AdamW(list(tensors.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    scaler = precision.scaler()
    start, losses = 0, []
    found = checkpoints(work) if resume else []
    if found:
        info = load_checkpoint(found[-1][1], tensors, optimizer, generator, scaler)
        start, losses = info["step"], info.get("losses", [])
        if info.get("settings", {}).get("seed") != settings.seed or info.get("method") != method.name:
            raise StylegradError(f"{work} holds a run with other settings; use another work folder or restart")
    mean, std = latent_moments(models.vae, data.pixels)
    end = min(settings.steps, stop_after or settings.steps)
    info = {"method": method.name, "settings": {**asdict(settings), "work": str(work)},
            "precision": precision.describe(), **method.describe()}
    with tqdm(total=settings.steps, initial=start, desc=f"train {method.name}", unit="step",
              disable=not progress) as bar:
        for step in range(start, end):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(settings.grad_accum):
                idx = torch.randint(len(data), (settings.batch_size,), generator=generator)
                captions = [data.caption(int(i), method.word, method.templates, generator) for i in idx]
                with precision.context():
                    loss = method.loss(models, captions, mean[idx], std[idx], generator, settings.resolution)
                    extra = method.extra_loss(models, generator)
                    if extra is not None:
                        loss = loss + extra
                loss = loss / settings.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                total += float(loss.detach())
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            method.after_step()
            losses.append(round(total, 6))
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if settings.sample_every and done % settings.sample_every == 0:
                sample(method, models, settings, work / "samples" / f"step-{done:06d}.png")
            if done % settings.checkpoint_every == 0 or done == end:
                save_checkpoint(work, done, tensors, optimizer, generator, {**info, "losses": losses}, scaler=scaler)
    (work / "losses.json").write_text(json.dumps(losses))
    return {"step": end, "losses": losses}


@torch.no_grad()
def sample(method: Method, models: Models, settings: TrainSettings, path: Path) -> Path:
    """One picture of the sample prompt with the weights as they are now (seed 0), under autocast where the frozen
    weights are half (what a method trains is float32 among them)."""
    from stylegrad.files.pnginfo import save_png
    from stylegrad.pipelines.generation import run_pipeline
    from stylegrad.pipelines.request import GenerationRequest

    prompt = settings.sample_prompt or method.templates[0].format(method.word or "").strip()
    words = method.words()
    negative = method.negative_prompt()
    pos, neg = condition(models, [prompt], words), condition(models, [negative], words)
    kw = {}
    if models.sdxl:
        kw = {"pooled_prompt_embeds": pos["added_cond_kwargs"]["text_embeds"],
              "negative_pooled_prompt_embeds": neg["added_cond_kwargs"]["text_embeds"]}
    models.unet.eval()
    side = settings.resolution
    request = GenerationRequest(prompt=prompt, negative=negative, steps=settings.sample_steps, width=side, height=side)
    with precision_of(models).context():
        image = run_pipeline(models.pipe, pos["encoder_hidden_states"], neg["encoder_hidden_states"], request, **kw)
    if settings.gradient_checkpointing:
        models.unet.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    where = f"Device: {models.device.type}, Dtype: {dtype_name(models.dtype)}"  # as generated pictures record them
    text = f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "")
    return save_png(image, path, f"{text}Steps: {settings.sample_steps}, Seed: 0, Sample of: {method.name}, {where}")


@torch.no_grad()
def evaluation_loss(method: Method, models: Models, data: TrainingSet, resolution: int, seed: int = 1234,
                    draws: int = 4) -> float:
    """The loss on every picture with fixed noise, timesteps and captions: comparable before and after training
    (computed as the run computes: under autocast when the frozen weights are half)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = latent_moments(models.vae, data.pixels)
    total = 0.0
    for _ in range(draws):
        captions = [data.caption(i, method.word, method.templates, generator) for i in range(len(data))]
        with precision_of(models).context():
            total += float(method.loss(models, captions, mean, std, generator, resolution))
    return total / draws
