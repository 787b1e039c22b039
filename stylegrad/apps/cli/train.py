"""``train``: textual inversion and LoRA from a folder of pictures, and the Stylecodes paper's recipe."""

from __future__ import annotations

from stylegrad.apps.cli.args import add_device


def cmd_stylecodes(a) -> None:
    from stylegrad.stylecodes.training import TrainConfig, train

    cfg = TrainConfig(data=a.data, out=a.out, model=a.model, siglip=a.siglip_model, init=a.init, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, resolution=a.resolution, grad_accum=a.grad_accum,
                      checkpoint_every=a.checkpoint_every, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, mixed_precision=a.mixed_precision,
                      autoencoder_width=a.autoencoder_width, device=a.device, dtype=a.dtype)
    print(train(cfg, resume=not a.restart))


def _common(a) -> dict:
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    return dict(model=a.model or DEFAULT_MODEL, device=a.device, dtype=a.dtype, vae=a.vae, models_dir=a.models_dir,
                resume=not a.restart, steps=a.steps, lr=a.lr, batch_size=a.batch_size, grad_accum=a.grad_accum,
                resolution=a.resolution, seed=a.seed, checkpoint_every=a.checkpoint_every,
                sample_every=a.sample_every, sample_prompt=a.sample_prompt, mixed_precision=a.mixed_precision,
                gradient_checkpointing=a.gradient_checkpointing, work=a.work)


def cmd_textual_inversion(a) -> None:
    from stylegrad.training.recipes import train_textual_inversion

    for path in train_textual_inversion(a.images, a.out, a.token, init=a.init, vectors=a.vectors,
                                        kind="object" if a.object else "style", **_common(a)):
        print(path)


def cmd_lora(a) -> None:
    from stylegrad.training.recipes import train_lora

    for path in train_lora(a.images, a.out, rank=a.rank, alpha=a.alpha, text_encoder=a.text_encoder, word=a.word,
                           **_common(a)):
        print(path)


def _training_options(q, defaults: dict) -> None:
    from stylegrad.apps.cli.args import add_model_options
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    q.add_argument("images", nargs="+", metavar="IMAGES", help="pictures, or folders of them (a .txt file beside a "
                   "picture is its caption)")
    q.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    add_model_options(q, DEFAULT_MODEL)
    q.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults['steps']})")
    q.add_argument("--lr", type=float, help=f"AdamW learning rate (default {defaults['lr']})")
    q.add_argument("--batch-size", type=int, help=f"pictures per step (default {defaults['batch_size']})")
    q.add_argument("--grad-accum", type=int, metavar="K", help="batches accumulated per step: a bigger batch in the "
                   f"same memory (default {defaults['grad_accum']})")
    q.add_argument("--resolution", type=int, default=None, help="training size in pixels (default 512; 1024 for "
                   "SDXL models is usual)")
    q.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and timesteps (default 0)")
    q.add_argument("--checkpoint-every", type=int, default=500, metavar="N", help="steps between checkpoints")
    q.add_argument("--sample-every", type=int, default=0, metavar="N", help="a sample picture every N steps into "
                   "the work folder's samples/ (default: none)")
    q.add_argument("--sample-prompt", metavar="TEXT", help="the sample's prompt (default: a template with the word)")
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="the forward's autocast, as kohya's and diffusers' --mixed_precision (default: as --dtype; "
                   "fp16 adds loss scaling). Alone it also sets --dtype; with --dtype fp32 it is classic AMP "
                   "(fp32 weights, half compute); half weights train only under their own")
    q.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    q.add_argument("--work", metavar="DIR", help="checkpoints and samples (default: OUT's name + '-training' beside "
                   "it); rerunning the same command resumes from there")
    q.add_argument("--restart", action="store_true", help="ignore checkpoints in the work folder and start over")
    add_device(q, dtype=True, dtype_note="Training keeps the frozen weights in it, trains its own tensors in fp32 "
               "and runs the forward under autocast in it when it is half")


def register(sub) -> None:
    sub.add_parser("train", help="train textual inversions, LoRAs or a Stylecodes model", arguments=_arguments)


def _arguments(p) -> None:
    train_sub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT", parser_class=type(p))
    train_sub.add_parser("textual-inversion", help="a new word for your pictures' style or object",
                         description="Textual inversion (Gal et al. 2022): new vectors for --token, learned "
                         "from the pictures with the model frozen (the diffusers example's recipe and defaults). "
                         "Writes OUT as A1111's .pt and a .safetensors (A1111, ComfyUI, diffusers, stylegrad).",
                         epilog="Example: stylegrad train textual-inversion my_pictures/ --token mystyle --init "
                         "painting --out embeddings/mystyle.pt", arguments=_textual_inversion_arguments)
    train_sub.add_parser("lora", help="a LoRA (kohya format) from your pictures",
                         description="LoRA (Hu et al. 2021) beside the UNet's attention projections (and the text "
                         "encoders' with --text-encoder), saved in kohya's format for A1111, ComfyUI, diffusers "
                         "and stylegrad.", epilog="Example: stylegrad train lora my_pictures/ --word mystyle "
                         "--out models/Lora/mystyle.safetensors", arguments=_lora_arguments)
    train_sub.add_parser("stylecodes", help="train a Stylecodes model on (style image, prompt, target) triples",
                         description="The Stylecodes paper's recipe: SD and SigLIP frozen; the style encoder, "
                         "decoder and control module trained end to end with the diffusion loss. DATA holds "
                         "index.csv or index.jsonl with columns style_image, prompt, target_image. Checkpoints go "
                         "to OUT/checkpoint-N; rerunning the same command resumes exactly.", arguments=_stylecodes_arguments)


def _textual_inversion_arguments(q) -> None:
    from stylegrad.training import textual_inversion

    q.add_argument("--token", required=True, metavar="NAME", help="the word prompts will use")
    q.add_argument("--init", metavar="WORD", help="start the vectors from this word's (default: the table's mean)")
    q.add_argument("--vectors", type=int, default=1, metavar="N", help="vectors per token (default 1)")
    kind = q.add_mutually_exclusive_group()
    kind.add_argument("--style", action="store_true", help="style prompt templates (the default)")
    kind.add_argument("--object", action="store_true", help="object prompt templates")
    _training_options(q, textual_inversion.DEFAULTS)
    q.set_defaults(func=cmd_textual_inversion)


def _lora_arguments(q) -> None:
    from stylegrad.training import lora

    q.add_argument("--rank", type=int, default=4, help="rank (default 4)")
    q.add_argument("--alpha", type=float, help="alpha (default: the rank, so the scale is 1)")
    q.add_argument("--text-encoder", action="store_true", help="also train LoRA on the text encoder(s)")
    q.add_argument("--word", metavar="WORD", help="a trigger word for the captions (style templates without .txt "
                   "captions)")
    _training_options(q, lora.DEFAULTS)
    q.set_defaults(func=cmd_lora)


def _stylecodes_arguments(q) -> None:
    from stylegrad.pipelines.loading import DEFAULT_MODEL
    from stylegrad.stylecodes.model import SIGLIP

    q.add_argument("data", metavar="DATA", help="folder with index.csv or index.jsonl and the images")
    q.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final stylecodes.safetensors")
    q.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_PATH",
                   help="the frozen SD1.x model (default: %(default)s)")
    q.add_argument("--siglip-model", default=SIGLIP, metavar="ID_OR_PATH",
                   help="the frozen image encoder (default: %(default)s)")
    q.add_argument("--init", metavar="CKPT", help="start from this Stylecodes checkpoint (default: a fresh model)")
    q.add_argument("--steps", type=int, default=100_000, help="optimizer steps (default 100000, the paper)")
    q.add_argument("--batch-size", type=int, default=25, help="triples per step (default 25, the paper)")
    q.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default 1e-6, the paper)")
    q.add_argument("--resolution", type=int, default=512, help="target image size in pixels (default 512)")
    q.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="split each batch into K micro-batches: same update, less memory (default 1)")
    q.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="the forward's autocast, as for textual inversion and LoRA (default: as --dtype; fp16 adds "
                   "loss scaling)")
    q.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="steps between checkpoints")
    q.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialization")
    q.add_argument("--autoencoder-width", type=int, default=512, help="style encoder width (512 as published)")
    q.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    add_device(q, dtype=True, dtype_note="The frozen UNet, VAE and text encoder stay in it; the Stylecodes model "
               "and SigLIP are float32")
    q.set_defaults(func=cmd_stylecodes)
