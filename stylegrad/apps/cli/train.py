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


def _training_options(q, defaults: dict, out: tuple[str, str] = ("FILE", "the file to write")) -> None:
    from stylegrad.apps.cli.args import add_model_options
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    q.add_argument("images", nargs="+", metavar="IMAGES", help="pictures, or folders of them (a .txt file beside a "
                   "picture is its caption)")
    q.add_argument("--out", required=True, metavar=out[0], help=out[1])
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
    sub.add_parser("train", help="train textual inversions, LoRAs, DreamArtist pairs, negative embeddings, "
                   "fine-tunes or a Stylecodes model", arguments=_arguments)


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
    _more_methods(train_sub)
    _hypernetwork_method(train_sub)


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


# -- DreamArtist, the learned negative embedding, full fine-tuning ----------------------------------------------
def cmd_dreamartist(a) -> None:
    from stylegrad.training.recipes import train_dreamartist

    for path in train_dreamartist(a.images, a.out, a.word, init=a.init, vectors=a.vectors,
                                  negative_vectors=a.negative_vectors, guidance=a.guidance,
                                  kind="object" if a.object else "style", **_common(a)):
        print(path)


def cmd_negative(a) -> None:
    from stylegrad.training.recipes import train_negative

    for path in train_negative(a.images, a.out, init=a.init, vectors=a.vectors, guidance=a.guidance, **_common(a)):
        print(path)


def cmd_finetune(a) -> None:
    from stylegrad.training.recipes import train_finetune

    for path in train_finetune(a.images, a.out, text_encoder=a.text_encoder, word=a.word, **_common(a)):
        print(path)


def _more_methods(train_sub) -> None:
    """DreamArtist, the learned negative and the fine-tune: the trainers beside textual inversion and LoRA."""
    train_sub.add_parser("dreamartist", help="a positive and a negative embedding trained together (DreamArtist)",
                         description="DreamArtist (arXiv 2211.11337): embeddings NAME and NAME-neg trained together "
                         "with the loss on guidance's e_neg + s*(e_pos - e_neg), the A1111 extension's recipe and "
                         "defaults. Writes OUT as NAME.pt and NAME-neg.pt (A1111 embeddings, with .safetensors "
                         "twins). Write NAME in a prompt; stylegrad adds NAME-neg to the negative prompt itself.",
                         epilog="Example: stylegrad train dreamartist my_pictures/ --out embeddings/mystyle.pt, then "
                         "stylegrad generate 'a house, mystyle' --embeddings embeddings", arguments=_dreamartist_arguments)
    train_sub.add_parser("negative", help="a negative-prompt embedding learned from your pictures",
                         description="A learned negative embedding (the methods table's \"null-text inversion\": an "
                         "unconditional embedding trained for classifier-free guidance): N vectors for the negative "
                         "prompt, trained with each picture's .txt caption as the prompt and guidance in the loss. "
                         "Writes OUT as A1111's .pt and a .safetensors; put the file's name in the negative prompt. "
                         "Not the per-image editing method of arXiv 2211.09794.",
                         epilog="Example: stylegrad train negative my_pictures/ --out embeddings/mine-neg.pt, then "
                         "stylegrad generate 'a house' --negative mine-neg --embeddings embeddings",
                         arguments=_negative_arguments)
    train_sub.add_parser("finetune", help="the whole UNet fine-tuned on your pictures (a new model folder)",
                         description="Full fine-tuning: every UNet weight (and the text encoder's with "
                         "--text-encoder) trained on the pictures, DreamBooth without prior preservation. Writes "
                         "OUT as a diffusers folder that --model loads.", epilog="Example: stylegrad train finetune "
                         "my_pictures/ --word mystyle --out models/mystyle", arguments=_finetune_arguments)


def _dreamartist_arguments(q) -> None:
    from stylegrad.training import dreamartist

    q.add_argument("--word", metavar="NAME", help="the word the captions carry while training (default: OUT's "
                   "name, the word prompts use)")
    q.add_argument("--init", metavar="WORD", help="start both embeddings from this word's vectors (default: the "
                   "token table's mean)")
    q.add_argument("--vectors", type=int, default=3, metavar="N", help="positive vectors (default 3, the extension's)")
    q.add_argument("--negative-vectors", type=int, default=6, metavar="N", help="negative vectors (default 6)")
    q.add_argument("--guidance", type=float, default=dreamartist.GUIDANCE, metavar="S",
                   help=f"the CFG scale of the loss (default {dreamartist.GUIDANCE:g}, the extension's)")
    kind = q.add_mutually_exclusive_group()
    kind.add_argument("--style", action="store_true", help="style prompt templates (the default)")
    kind.add_argument("--object", action="store_true", help="object prompt templates")
    _training_options(q, dreamartist.DEFAULTS, ("FILE", "NAME.pt: writes NAME.pt and NAME-neg.pt"))
    q.set_defaults(func=cmd_dreamartist)


def _negative_arguments(q) -> None:
    from stylegrad.training import negative

    q.add_argument("--init", metavar="WORD", help="start the vectors from this word's (default: the table's mean)")
    q.add_argument("--vectors", type=int, default=4, metavar="N", help="vectors (default 4)")
    q.add_argument("--guidance", type=float, default=negative.GUIDANCE, metavar="S",
                   help=f"the CFG scale it is trained for (default {negative.GUIDANCE:g}: generate's)")
    _training_options(q, negative.DEFAULTS, ("FILE", "NAME.pt: NAME is the word for the negative prompt"))
    q.set_defaults(func=cmd_negative)


def _finetune_arguments(q) -> None:
    from stylegrad.training import finetune

    q.add_argument("--text-encoder", action="store_true", help="also train the text encoder(s)")
    q.add_argument("--word", metavar="WORD", help="a trigger word for the captions (style templates without .txt "
                   "captions)")
    _training_options(q, finetune.DEFAULTS, ("DIR", "the diffusers folder to write (a model for --model)"))
    q.set_defaults(func=cmd_finetune)


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


# -- hypernetworks ----------------------------------------------------------------------------------------------
def cmd_hypernetwork(a) -> None:
    from stylegrad.training.hypernetwork import train_hypernetwork

    for path in train_hypernetwork(a.images, a.out, layer_structure=a.layer_structure, activation=a.activation,
                                   layer_norm=a.layer_norm, use_dropout=a.dropout,
                                   dropout_structure=a.dropout_structure, last_layer_dropout=a.last_layer_dropout,
                                   activate_output=a.activate_output, weight_init=a.weight_init, widths=a.widths,
                                   word=a.word, **_common(a)):
        print(path)


def _numbers(text: str) -> list[float]:
    import argparse

    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from None


def _hypernetwork_method(train_sub) -> None:
    train_sub.add_parser("hypernetwork", help="an A1111 hypernetwork from your pictures",
                         description="A hypernetwork as A1111 trains one: per context width, an MLP for the keys "
                         "and one for the values of every attention layer (c + mlp(c) feeds to_k and to_v), the "
                         "model frozen. Writes OUT as A1111's .pt (A1111, ComfyUI and stylegrad load it; "
                         "<hypernet:NAME:MULT> in a prompt) and OUT.optim, the optimizer's state as A1111 keeps it. "
                         "Defaults are A1111's: layer structure 1,2,1, linear, no layer norm, no dropout, lr 5e-6.",
                         epilog="Example: stylegrad train hypernetwork my_pictures/ --out models/hypernetworks/ink.pt",
                         arguments=_hypernetwork_arguments)


def _hypernetwork_arguments(q) -> None:
    from stylegrad.addons.hypernetworks.layout import activations
    from stylegrad.training import hypernetwork

    q.add_argument("--layer-structure", type=_numbers, default=[1, 2, 1], metavar="1,2,1",
                   help="each layer's width as a multiple of the context's, starting and ending with 1 (default 1,2,1)")
    q.add_argument("--activation", default="linear", choices=sorted(activations()), metavar="NAME",
                   help="A1111's activation names: linear (none; the default), relu, leakyrelu, elu, swish "
                   "(Hardswish), tanh, sigmoid, or any torch activation's lower-cased name (gelu, mish, ...)")
    q.add_argument("--layer-norm", action="store_true", help="a LayerNorm after every layer")
    q.add_argument("--activate-output", action="store_true", help="the activation after the last layer too")
    q.add_argument("--dropout", action="store_true", help="dropout 0.3 after the hidden layers (A1111's use_dropout)")
    q.add_argument("--last-layer-dropout", action="store_true", help="with --dropout: after the last hidden layer too")
    q.add_argument("--dropout-structure", type=_numbers, metavar="0,0.3,0",
                   help="a dropout probability per layer boundary, as A1111's dropout_structure (0 first and last)")
    q.add_argument("--weight-init", default="Normal", choices=list(hypernetwork.INITS),
                   help="A1111's initialisation (default Normal)")
    q.add_argument("--widths", type=lambda t: [int(x) for x in _numbers(t)], metavar="768,320,640,1280",
                   help="context widths to train (default: the model's: its attention layers' to_k inputs)")
    q.add_argument("--word", metavar="WORD", help="a word for the captions (style templates without .txt captions)")
    _training_options(q, hypernetwork.DEFAULTS, ("FILE.pt", "the hypernetwork file to write (and FILE.pt.optim)"))
    q.set_defaults(func=cmd_hypernetwork)
