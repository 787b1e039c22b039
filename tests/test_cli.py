"""The CLI's contract with a user: bad input is one line and a non-zero exit, never a traceback."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from stylegrad import Style, StylegradError, save_style
from stylegrad.apps.cli import main
from stylegrad.apps.cli.errors import error_line

CONSOLE = shutil.which("stylegrad") or str(Path(sys.executable).parent / "stylegrad")


def _bad_lines(tmp: Path, shared: Path) -> list[list[str]]:
    style = str(save_style(Style(torch.randn(8)), tmp / "s.safetensors"))
    latin1 = tmp / "prompts.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    ti = str(shared / "community" / "textual_inversion" / "test_embedding.safetensors")
    image = str(shared / "community" / "png" / "automatic1111_cropped.png")
    return [  # (command line, what its one error line must say)
        (["info", ti, str(tmp / "missing.pt")], "no such file"),
        (["mix", ti, "-o", str(tmp / "m.safetensors")], "textual-inversion"),
        (["generate", "x", "--style", ti], "textual-inversion"),
        (["generate", "x", "--compare-steps", "5,x"], "--compare-steps"),
        (["generate", "x", "--width", "30"], "width must be a positive multiple of 8"),
        (["generate", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["generate", "--from", image], "model 'realistic_realisticVisionV20_v20' is not a file"),  # A1111's Model: stem
        (["generate", "x", "--device", "foo"], "unknown --device 'foo'"),
        (["demo", "--style-steps", "x"], "--style-steps"),
        (["embed", image, "-o", str(tmp / "e.safetensors"), "--device", "foo"], "unknown --device 'foo'"),
        (["score", style, image, "--device", "foo"], "unknown --device 'foo'"),
        (["code", "encode", image, "--device", "foo"], "unknown --device 'foo'"),
        (["train", "stylecodes", str(tmp / "data"), "--out", str(tmp / "t"), "--device", "foo"], "unknown --device"),
        (["evaluate", "--style", style, "--prompts", str(latin1), "--out", str(tmp / "e")], "not UTF-8 text"),
        (["mix", style, "-o", str(Path(style) / "sub" / "m.safetensors")], "m.safetensors"),  # unwritable, even as root
        (["code", "decode", "not-a-code"], "stylecode 'not-a-code'"),
        (["embed", str(tmp / "nothing"), "-o", str(tmp / "x.safetensors")], "no such file or folder"),
        (["generate"], "give a PROMPT"),
        (["generate", "x", "--lora", str(shared / "community" / "lora" / "lora_pop.pt")], "unnamed tensors"),
        (["generate", "x", "--lora", ti], "is not a LoRA"),
        (["generate", "x", "--lora", "nothere:0.5"], "LoRA not found: nothere"),
        (["generate", "x", "--embedding", str(shared / "community" / "lora" / "lora_disney.safetensors")],
         "is not a textual-inversion embedding"),
        (["generate", "x", "--loras", str(tmp / "nofolder")], "LoRA folder not found"),
    ]


def _is_progress(line: str) -> bool:
    return "it/s]" in line or "%|" in line


def test_bad_command_lines_through_the_console_script(tmp_path, shared):
    """Each line: non-zero exit, no traceback, one error line on stderr (besides progress bars and notes, such as
    what an A1111 PNG asks for that cannot be honoured)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STYLEGRAD_DEBUG": ""}
    lines = _bad_lines(tmp_path, shared)

    def run(line):
        args, _ = line
        return line, subprocess.run([CONSOLE, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                                    timeout=120)

    with ThreadPoolExecutor(2) as pool:
        for (args, says), proc in pool.map(run, lines):
            errors = [line for line in proc.stderr.splitlines()
                      if line.strip() and not _is_progress(line) and not line.startswith("Note: ")]
            assert proc.returncode != 0, args
            assert "Traceback" not in proc.stderr, (args, proc.stderr)
            assert len(errors) <= 1, (args, errors)
            assert errors and errors[0].startswith("Error: ") and says in errors[0], (args, proc.stderr)


@pytest.mark.parametrize("error,expected", [
    (StylegradError("bad input"), "bad input"),
    (FileNotFoundError(2, "No such file or directory", "x.png"), "No such file or directory: x.png"),
    (PermissionError(13, "Permission denied", "/out/a.png"), "Permission denied: /out/a.png"),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid"),
     "not UTF-8 text"),
    (ValueError(), "unexpected ValueError: ValueError"),  # an empty message still says something
    (RuntimeError(""), "unexpected RuntimeError: RuntimeError"),
    (MemoryError(), "out of memory"),
])
def test_error_table(error, expected):
    assert expected in error_line(error) and "\n" not in error_line(error)


def test_debug_shows_the_traceback_and_ctrl_c_is_130(monkeypatch, capsys):
    import stylegrad.apps.cli.styles as styles

    def interrupted(a):
        raise KeyboardInterrupt

    def broken(a):
        raise StylegradError("broken on purpose")

    monkeypatch.setattr(styles, "cmd_info", interrupted)
    assert main(["info", "x"]) == 130 and "Interrupted." in capsys.readouterr().err
    monkeypatch.setattr(styles, "cmd_info", broken)
    assert main(["info", "x"]) == 1
    monkeypatch.setenv("STYLEGRAD_DEBUG", "1")
    with pytest.raises(StylegradError, match="broken on purpose"):
        main(["info", "x"])


def test_style_flags_come_from_the_library():
    """Every StyleOptions field has a --style-* flag whose default and help are the field's."""
    from dataclasses import fields

    from stylegrad import StyleOptions
    from stylegrad.apps.cli import build_parser

    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices["generate"].complete()  # flags are added when first needed
    by_dest = {a.dest: a for a in gen._actions}
    for f in fields(StyleOptions):
        action = by_dest[f"style_{f.name}"]
        assert action.option_strings == ["--style-" + f.name.replace("_", "-")]
        assert f.metadata["help"] in action.help
        default = f.default
        assert action.default == default or (isinstance(default, tuple) and tuple(action.default) == default)
    flags = {s for a in gen._actions for s in a.option_strings}
    for keep in ("--style --style-steps --style-lr --style-weight --model --clip-model --negative --seed --steps "
                 "--cfg --width --height --n --out --compare --init-image --strength --device --stylecode "
                 "--stylecodes-model").split():
        assert keep in flags
    assert "--style-image" not in flags and "--style-negative" not in flags  # no prefix reused by another method
