"""``train stylecodes``: the Stylecodes paper's training recipe."""

from __future__ import annotations

from stylegrad.apps.cli.args import add_device
from stylegrad.pipelines.loading import DEFAULT_MODEL
from stylegrad.stylecodes.model import SIGLIP
from stylegrad.stylecodes.training import TrainConfig, train


def cmd_stylecodes(a) -> None:
    cfg = TrainConfig(data=a.data, out=a.out, model=a.model, siglip=a.siglip_model, init=a.init, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, resolution=a.resolution, grad_accum=a.grad_accum,
                      checkpoint_every=a.checkpoint_every, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, mixed_precision=a.mixed_precision,
                      autoencoder_width=a.autoencoder_width, device=a.device)
    print(train(cfg, resume=not a.restart))


def register(sub) -> None:
    p = sub.add_parser("train", help="train models (stylecodes)")
    train_sub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT", parser_class=type(p))
    q = train_sub.add_parser("stylecodes", help="train a Stylecodes model on (style image, prompt, target) triples",
                             description="The Stylecodes paper's recipe: SD and SigLIP frozen; the style encoder, "
                             "decoder and control module trained end to end with the diffusion loss. DATA holds "
                             "index.csv or index.jsonl with columns style_image, prompt, target_image. Checkpoints go "
                             "to OUT/checkpoint-N; rerunning the same command resumes exactly.")
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
    q.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="autocast on CUDA (default no; CPU always trains in fp32)")
    q.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="steps between checkpoints")
    q.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and initialization")
    q.add_argument("--autoencoder-width", type=int, default=512, help="style encoder width (512 as published)")
    q.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    add_device(q)
    q.set_defaults(func=cmd_stylecodes)
