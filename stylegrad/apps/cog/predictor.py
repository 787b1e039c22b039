"""The Cog predictor (``cog.yaml``: ``run: "stylegrad/apps/cog/predictor.py:Predictor"``).

Cog reads this signature twice: its Go CLI parses the source for the schema at ``cog build`` (so every ``Input``
argument here is a literal, or a constant of this module), and the Python server calls ``run`` with the inputs the
schema let through. The limits are a server's (``pipelines.limits.SERVER``), the style defaults ``StyleOptions``'
(the paper's), the choices the paper's embeddings and A1111's sampler names: tests/test_cog.py holds them equal.
Cog loads this file as a top-level module, so its imports are absolute."""

import os
import pathlib
import shutil
import sys
import tempfile
import traceback

from cog import BaseRunner, Input, Path

from stylegrad.apps.cog.models import Models
from stylegrad.apps.cog.run import predict
from stylegrad.apps.cog.settings import Deployment
from stylegrad.errors import RequestError, StylegradError, describe

PAPER_EMBEDDINGS = ["aivazovsky", "cloudcore", "fantasy", "flower_plant", "gloomcore", "glowwave", "laion_7plus",
                    "sac_8plus", "watercolor", "none"]
SAMPLER_NAMES = ["DDIM", "PLMS", "Euler", "Euler a", "Euler Karras", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
                 "DPM++ 2M SDE Karras", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras", "UniPC", "LMS", "LMS Karras",
                 "Heun", "LCM"]
TOWERS = ["l", "g", "both"]


class Predictor(BaseRunner):
    def setup(self, weights: Path | str | None = None) -> None:
        """The deployment's model, loaded once: ``weights`` (a fine-tune's, from Cog) or $STYLEGRAD_MODEL."""
        self.models = Models(Deployment.from_env(str(weights) if weights else None))
        self.models.get()
        self.out: str | None = None

    def run(
        self,
        prompt: str = Input(description="Input prompt (A1111's syntax: (emphasis:1.2), BREAK, <lora:NAME:0.8>)"),
        negative_prompt: str = Input(default="", description="What the images should not show"),
        n_samples: int = Input(default=1, ge=1, le=8, description="How many images (seeds seed, seed+1, ...)"),
        width: int | None = Input(default=None, ge=8, le=2048,
                                  description="Width in pixels, a multiple of 8 (default: the model's, 512 for SD1.x)"),
        height: int | None = Input(default=None, ge=8, le=2048,
                                   description="Height in pixels, a multiple of 8 (default: the model's)"),
        scale: float = Input(default=7.5, ge=0, le=100, description="Classifier-free guidance scale"),
        ddim_steps: int = Input(default=50, ge=1, le=150, description="Denoising steps (of whichever sampler runs)"),
        plms: bool = Input(default=True, description="PLMS sampling, else DDIM (when no sampler is given)"),
        sampler: str | None = Input(default=None, choices=SAMPLER_NAMES,
                                    description="Sampler by A1111's name; overrides plms"),
        seed: int | None = Input(default=None, ge=-1, le=4294967295,
                                 description="Seed of the first image; empty or -1: a random one (the PNG records it)"),
        aesthetic_embedding: str = Input(default="sac_8plus", choices=PAPER_EMBEDDINGS,
                                         description="One of the paper's embeddings (none: no style)"),
        aesthetic_steps: int = Input(default=10, ge=0, le=100,
                                     description="Aesthetic gradient steps per prompt; 0: no style"),
        aesthetic_lr: float = Input(default=0.0001, ge=0, le=1,
                                    description="Learning rate of the aesthetic gradient steps (above 0)"),
        aesthetic_weight: float = Input(default=1.0, ge=-10, le=10,
                                        description="Blend of tuned and original prompt: 0 original, 1 tuned"),
        aesthetic_slerp: bool = Input(default=False, description="Blend with spherical interpolation per token"),
        aesthetic_text: str = Input(default="", description="Text that rotates the style towards it (or away)"),
        aesthetic_text_angle: float = Input(default=0.1, ge=0, le=1,
                                            description="How far the style moves towards aesthetic_text"),
        aesthetic_text_negative: bool = Input(default=False, description="Steer away from aesthetic_text"),
        aesthetic_regularization: float = Input(default=0.0, ge=0, le=1000000,
                                                description="Penalty on how far the tuned prompt moves"),
        aesthetic_target_similarity: float | None = Input(default=None, ge=-1, le=1,
                                                          description="Stop early at this cosine to the style"),
        aesthetic_target_gain: float | None = Input(default=None, ge=0, le=1,
                                                    description="Stop each prompt this share of its way to the style"),
        aesthetic_personalize_negative: bool = Input(default=False, description="Tune the negative prompt too"),
        aesthetic_towers: str = Input(default="both", choices=TOWERS, description="SDXL: the text towers to tune"),
        aesthetic_beta1: float = Input(default=0.9, ge=0, le=0.999999, description="Adam's beta1"),
        aesthetic_beta2: float = Input(default=0.999, ge=0, le=0.999999, description="Adam's beta2"),
        aesthetic_eps: float = Input(default=1e-08, ge=0, le=1, description="Adam's epsilon (above 0)"),
        style_file: Path | None = Input(default=None,
                                        description="A style file (.safetensors or .pt); replaces aesthetic_embedding"),
        style_images: list[Path] | None = Input(default=None,
                                                description="Your pictures (images or zips) made into a style (returned)"),
        stylecode: str = Input(default="", description="A stylecode, or several with weights 'A::2 B::1' (SD1.x)"),
        stylecode_image: Path | None = Input(default=None, description="Make the stylecode from this image"),
        stylecode_strength: float = Input(default=1.0, ge=0, le=10, description="How strongly the stylecode acts"),
        stylecode_guidance: bool = Input(default=False, description="Give the stylecode to the conditional half only"),
        lora_files: list[Path] | None = Input(default=None, description="LoRA / LyCORIS files"),
        lora_scale: float = Input(default=1.0, ge=-10, le=10, description="Multiplier of every LoRA file"),
        embedding_files: list[Path] | None = Input(default=None, description="Textual-inversion embedding files"),
        embedding_tokens: str = Input(default="", description="Their trigger words, one per file, comma-separated"),
        init_image: Path | None = Input(default=None, description="Start from this image (img2img)"),
        strength: float = Input(default=0.75, ge=0, le=1, description="img2img: how much the image changes"),
        clip_skip: int | None = Input(default=None, ge=1, le=12, description="A1111's Clip skip (1: the last layer)"),
        prompt_weighting: bool = Input(default=True, description="Read A1111's emphasis syntax"),
        model: str = Input(default="", description="Another model: a hub id, or an http(s) URL of a checkpoint file"),
        model_file: Path | None = Input(default=None, description="Another model: a checkpoint file"),
        device: str = Input(default="", regex="^(|auto|cpu|mps|cuda(:[0-9]+)?)$",
                            description="auto, cpu, cuda, cuda:N or mps (default: the deployment's)"),
        dtype: str = Input(default="", regex="^(|auto|fp32|fp16|bf16)$",
                           description="auto (fp16 on GPUs), fp32, fp16 or bf16 (default: the deployment's)"),
    ) -> list[Path]:
        given = {k: v for k, v in locals().items() if k != "self"}
        if self.out:
            shutil.rmtree(self.out, ignore_errors=True)  # the last prediction's files have been sent
        self.out = tempfile.mkdtemp(prefix="stylegrad-cog-")
        try:
            return [Path(p) for p in predict(self.models, given, pathlib.Path(self.out))]
        except RequestError:
            raise
        except Exception as e:  # one line in the prediction's error, never a traceback
            if os.environ.get("STYLEGRAD_DEBUG"):
                traceback.print_exc(file=sys.stderr)
            raise StylegradError(describe(e)) from None
