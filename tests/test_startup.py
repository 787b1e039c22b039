"""A fast start: ``import stylegrad`` is lazy, and the commands that never load a model (``--help``, ``info`` on a
safetensors file, ``models``) never import torch, diffusers or transformers. Each check runs in a fresh Python
process and reads its ``sys.modules`` at exit (bench/startup.py times the same commands)."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import stylegrad
from stylegrad.errors import StylegradError

HEAVY = ("torch", "diffusers", "transformers")

# Runs CLI command lines in one process; after each, the heavy packages loaded so far. Prints JSON.
RUN_COMMANDS = textwrap.dedent("""
    import contextlib, io, json, sys
    from stylegrad.apps.cli import main

    heavy = {heavy!r}
    report = []
    for argv in json.loads(sys.argv[1]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))
        report.append({{"argv": argv, "code": code, "out": out.getvalue(), "loaded": loaded}})
    print(json.dumps(report))
""").format(heavy=HEAVY)


def _run(command_lines: list[list[str]], **env: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "STYLEGRAD_DEBUG": "", **env}
    proc = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(command_lines)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _loaded_by(report: list[dict], package: str) -> list[str] | None:
    """The first command line after which ``package`` was imported, or None."""
    return next((r["argv"] for r in report if package in r["loaded"]), None)


def _style_files(folder):
    folder.mkdir(exist_ok=True)
    v = torch.randn(1, 768, generator=torch.Generator().manual_seed(0))
    files = {
        "style.safetensors": {"aesthetic_embedding": v},
        "half.safetensors": {"aesthetic_embedding": v.half()},
        "bf16.safetensors": {"aesthetic_embedding": v.bfloat16()},
        "nan.safetensors": {"aesthetic_embedding": torch.where(torch.arange(768) == 3, float("nan"), v)},
        "zeros.safetensors": {"aesthetic_embedding": torch.zeros(1, 768)},
        "ti.safetensors": {"emb_params": torch.randn(2, 768)},
    }
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
    return {name: folder / name for name in files}


def _sd1_shapes() -> dict[str, torch.Tensor]:
    """The keys and shapes checkpoints/families.py reads an SD1.x checkpoint by (zeros: nothing is loaded)."""
    unet = "model.diffusion_model."
    return {unet + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
            "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}


def test_import_stylegrad_loads_nothing_heavy():
    code = f"import sys, stylegrad; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_public_name_resolves():
    assert sorted(stylegrad.__all__) == sorted(stylegrad._EXPORTS)
    for name in stylegrad.__all__:
        value = getattr(stylegrad, name)
        assert value.__name__ == name and value.__module__.startswith("stylegrad.")
    assert set(stylegrad.__all__) <= set(dir(stylegrad))
    from stylegrad import GenerationRequest, StyleOptions, inspect_file  # noqa: F401 - the import form works
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        stylegrad.nothing_here  # noqa: B018


def test_help_info_and_models_start_without_torch(tmp_path):
    files = _style_files(tmp_path / "styles")
    models = tmp_path / "models"
    models.mkdir()
    save_file(_sd1_shapes(), str(models / "tiny_sd1.safetensors"))
    save_file({"emb_params": torch.zeros(2, 768)}, str(models / "oops-embedding.safetensors"))
    lines = [["--help"], ["info", "--help"], ["models", "--help"], ["mix", "--help"], ["code", "--help"],
             ["code", "decode", "--help"], ["train", "--help"], ["info", *map(str, files.values())],
             ["info", "--json", *map(str, files.values())], ["models", "--models-dir", str(models), "--json"],
             ["models", "--models-dir", str(models)]]
    report = _run(lines, STYLEGRAD_CACHE=str(tmp_path / "cache"))
    for package in HEAVY:
        assert _loaded_by(report, package) is None, f"{package} imported by {_loaded_by(report, package)}"
    assert all(r["code"] == 0 for r in report), [(r["argv"], r["code"]) for r in report]
    by_argv = {" ".join(r["argv"]): r["out"] for r in report}
    assert "info" in by_argv["--help"] and "models" in by_argv["--help"] and "generate" in by_argv["--help"]
    assert "--json" in by_argv["info --help"]  # a command's flags are there when its help is shown
    listed = {e["name"]: e for e in json.loads(report[-2]["out"])}
    assert listed["tiny_sd1"]["family"] == "sd1" and listed["tiny_sd1"]["usable"]
    assert not listed["oops-embedding"]["usable"]
    assert "Stable Diffusion 1.x" in report[-1]["out"]

    # the same descriptions as in a process where torch is loaded (this one)
    from stylegrad.files.recognize import inspect_file

    described = json.loads(report[-3]["out"])
    assert described == [inspect_file(f).as_dict() for f in files.values()]


def test_every_command_help_shows_its_flags_without_diffusers_or_transformers():
    from stylegrad.apps.cli import COMMAND_GROUPS, build_parser

    commands = list(build_parser()._subparsers._group_actions[0].choices)
    assert len(commands) >= len(COMMAND_GROUPS)
    lines = [[c, "--help"] for c in commands]
    lines += [["train", w, "--help"] for w in ("textual-inversion", "lora", "stylecodes")] + [["code", "encode", "--help"]]
    report = _run(lines)
    assert _loaded_by(report, "diffusers") is None, f"diffusers imported by {_loaded_by(report, 'diffusers')}"
    assert _loaded_by(report, "transformers") is None, f"transformers imported by {_loaded_by(report, 'transformers')}"
    helps = {" ".join(r["argv"][:-1]): r["out"] for r in report}
    assert "--style-steps" in helps["generate"] and "--sampler" in helps["generate"]
    assert "--alpha" in helps["merge"] and "--rank" in helps["train lora"]


def test_style_vectors_are_read_without_torch_as_torch_reads_them(tmp_path):
    """info's norm and NaN check come from the file's bytes; they agree with torch's float32 reading."""
    from stylegrad.files.recognize import inspect_file

    files = _style_files(tmp_path)
    for name in ("style.safetensors", "half.safetensors", "bf16.safetensors"):
        info = inspect_file(files[name])
        expected = float(load_file(files[name])["aesthetic_embedding"].float().norm())
        assert info.usable and math.isclose(info.norm, expected, rel_tol=1e-6), name
    assert not inspect_file(files["nan.safetensors"]).usable
    assert "NaN or infinite" in inspect_file(files["nan.safetensors"]).detail
    assert "all zeros" in inspect_file(files["zeros.safetensors"]).detail
    pt = tmp_path / "bare.pt"
    vector = torch.randn(1, 768)
    torch.save(vector, pt)
    assert math.isclose(inspect_file(pt).norm, float(vector.norm()), rel_tol=1e-6)  # a pickle: through torch


def test_models_folder_kind_agrees_with_the_loader(tmp_path):
    """The models listing reads safetensors headers itself; it must say what the loader's reader says."""
    from stylegrad.checkpoints.library import checkpoint_kind
    from stylegrad.checkpoints.loading import open_checkpoint

    good = tmp_path / "sd1.safetensors"
    save_file(_sd1_shapes(), str(good))
    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": _sd1_shapes()}, ckpt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    odd = tmp_path / "odd.safetensors"
    text = json.dumps({"x": {"dtype": "U16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    odd.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")

    def loader(path):
        try:
            tf, _, kind = open_checkpoint(path)
            tf.close()
            return kind
        except StylegradError as e:
            return str(e)

    def header(path):
        try:
            return checkpoint_kind(path)
        except StylegradError as e:
            return str(e)

    for path in (good, ckpt, truncated, odd, broken):
        assert header(path) == loader(path), path.name
    assert header(good).family == "sd1" and "truncated" in header(truncated) and "U16" in header(odd)
