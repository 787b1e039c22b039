"""Measuring styles: predictors give their documented formulas, `score` and `evaluate` work and resume."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import PROJ

from stylegrad import Style, StylegradError, load_style, save_style
from stylegrad.apps.cli import main
from stylegrad.evaluation.metrics import ClipEmbedder, clip_score, style_similarity
from stylegrad.evaluation.predictors import load_predictor
from stylegrad.pipelines.grids import grid_cell


def _vectors(d, n=6):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(11)) * 7.0  # unnormalized on purpose


@pytest.mark.parametrize("name,width", [("sac_public_2022_06_29_vit_l_14_linear", 768),
                                        ("sac_public_2022_06_29_vit_b_16_linear", 512),
                                        ("sac_public_2022_06_29_vit_b_32_linear", 512)])
def test_simulacra_probe_formula(shared, name, width):
    path = shared / "aesthetic_predictors" / f"{name}.pth"
    sd = torch.load(path, weights_only=True, map_location="cpu")
    x = _vectors(width)
    expected = (F.normalize(x, dim=-1) * math.sqrt(width)) @ sd["linear.weight"].T + sd["linear.bias"]
    predictor = load_predictor(str(path))
    assert predictor.kind == "simulacra-linear" and predictor.width == width
    assert torch.allclose(predictor(x), expected[:, 0], atol=1e-5)


def test_laion_mlp_formula(shared):
    path = shared / "aesthetic_predictors" / "sac+logos+ava1-l14-linearMSE.pth"
    sd = torch.load(path, weights_only=True, map_location="cpu")
    h = F.normalize(_vectors(768), dim=-1)
    for i in (0, 2, 4, 6, 7):  # Linear layers; the dropouts between them are identity at inference
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    predictor = load_predictor(str(path))
    assert predictor.kind == "laion-mlp" and predictor.clip_model == "openai/clip-vit-large-patch14"
    assert torch.allclose(predictor(_vectors(768)), h[:, 0], atol=1e-5)


def test_short_names_use_the_cache_and_fail_clearly_offline(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEGRAD_CACHE", str(tmp_path))
    offline = r"not downloaded and downloads are off \(offline\).*sac_public_2022_06_29_vit_b_32"
    with pytest.raises(StylegradError, match=offline):
        load_predictor("sac-b32")
    (tmp_path / "predictors").mkdir()
    shutil.copy(shared / "aesthetic_predictors" / "sac_public_2022_06_29_vit_b_32_linear.pth", tmp_path / "predictors")
    p = load_predictor("sac-b32")
    assert p.width == 512 and p.clip_model == "openai/clip-vit-base-patch32"
    with pytest.raises(StylegradError, match="512-wide CLIP embeddings but the CLIP model gives 768-wide"):
        p.check_width(768)
    with pytest.raises(StylegradError, match="no predictor file or known name"):
        load_predictor("nonsense")


def test_metrics_formulas():
    t, i = _vectors(PROJ, 4), _vectors(PROJ, 4).flip(0)
    cos = F.cosine_similarity(t, i, dim=-1)
    assert torch.allclose(clip_score(t, i), 100 * cos.clamp(min=0))
    s = torch.randn(PROJ)
    assert torch.allclose(style_similarity(i, 3 * s), F.cosine_similarity(i, s[None], dim=-1))


def test_score_cli_on_style_files_is_the_formula(shared, capsys):
    pred = shared / "aesthetic_predictors" / "sac+logos+ava1-l14-linearMSE.pth"
    files = [shared / "aesthetic_embeddings" / f for f in ("watercolor.pt", "laion_7plus.pt")]
    assert main(["score", *map(str, files), "--predictor", str(pred), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    predictor = load_predictor(str(pred))
    for row, f in zip(rows, files):
        v = F.normalize(load_style(f).vector, dim=-1)
        h = v[None]
        for layer in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
            h = F.linear(h, predictor.state[f"{layer}.weight"], predictor.state[f"{layer}.bias"])
        assert row["kind"] == "style" and row["file"] == str(f)
        assert row["score"] == pytest.approx(float(h[0, 0]), abs=1e-5)
    b32 = shared / "aesthetic_predictors" / "sac_public_2022_06_29_vit_b_32_linear.pth"
    assert main(["score", str(files[0]), "--predictor", str(b32)]) == 1
    assert "512-wide" in capsys.readouterr().err


def test_score_cli_on_images(world, shared, tiny_predictor, capsys):
    clip_dir, _ = world
    images = sorted((shared / "images" / "simulacra" / "bad").iterdir())[:3]
    assert main(["score", *map(str, images), "--predictor", str(tiny_predictor), "--clip-model", str(clip_dir),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    embedder = ClipEmbedder(str(clip_dir))
    expected = load_predictor(str(tiny_predictor))(embedder.images([Image.open(p) for p in images]))
    assert [r["kind"] for r in rows] == ["image"] * 3
    assert torch.allclose(torch.tensor([r["score"] for r in rows]), expected, atol=1e-5)


def _evaluate_args(world, tmp_path, tiny_predictor, out):
    clip_dir, sd_dir = world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red house\n\na blue boat on the sea\n")
    styles = []
    for name, seed in (("warm", 1), ("cool", 2)):
        styles += ["--style", str(save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(seed)),
                                                   name=name), tmp_path / f"{name}.safetensors"))]
    return ["evaluate", "--prompts", str(prompts), *styles, "--style-steps", "0,3", "--style-lr", "5e-2",
            "--seeds", "2", "--model", str(sd_dir), "--clip-model", str(clip_dir), "--predictor",
            str(tiny_predictor), "--steps", "2", "--width", "32", "--height", "32", "--out", str(out)]


def test_evaluate_writes_everything_and_resumes(world, tmp_path, tiny_predictor, capsys):
    out = tmp_path / "eval"
    args = _evaluate_args(world, tmp_path, tiny_predictor, out)
    assert main(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2  # prompts x styles x steps x seeds
    assert {r["style"] for r in rows} == {"warm", "cool"} and {r["steps"] for r in rows} == {"0", "3"}
    assert all((out / r["file"]).is_file() for r in rows)
    images = sorted(out.glob("images/**/*.png"))
    assert len(images) == 2 * 2 + 2 * 2 * 2  # no-style images are shared by the styles
    summary = json.loads((out / "summary.json").read_text())["summary"]
    for name in ("warm", "cool"):
        for k in ("0", "3"):
            entry = summary[name][k]
            mine = [float(r["style_similarity"]) for r in rows if r["style"] == name and r["steps"] == k]
            assert entry["style_similarity"]["n"] == 4
            assert entry["style_similarity"]["mean"] == pytest.approx(sum(mine) / 4)
    with Image.open(out / "plots" / "metrics.png") as im:
        assert im.width > 200
    with Image.open(out / "grids" / "warm.png") as im:  # rows: prompts (first seed); columns: steps 0, 3
        grid = im.convert("RGB")
    for i in range(2):
        for j, folder in enumerate(["no-style", "warm/steps003"]):
            with Image.open(out / "images" / folder / f"p{i:03d}-seed0.png") as cell:
                assert np.array_equal(np.asarray(grid_cell(grid, (32, 32), 2, i, j)), np.asarray(cell.convert("RGB")))
    page = (out / "report.html").read_text()
    assert page.count("data:image/") == 3 and "src='http" not in page and 'src="http' not in page
    assert "a blue boat on the sea" in page and "±" in page
    assert "report.html" in capsys.readouterr().out

    # resume: nothing is regenerated; a run killed mid-write (missing image + stale temp file) redoes only that
    before = {p: p.stat().st_mtime_ns for p in images}
    victim = next(p for p in images if "steps003" in str(p))
    victim_bytes = victim.read_bytes()
    victim.unlink()
    (victim.parent / f".{victim.name}.abc.tmp").write_bytes(b"half an image")
    assert main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in sorted(out.glob("images/**/*.png"))}
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before.get(p)] == [victim]
    assert victim.read_bytes() == victim_bytes  # same seed, same image
    assert not list(out.rglob("*.tmp"))
    with open(out / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_evaluate_refuses_other_settings_in_the_same_folder(world, tmp_path, tiny_predictor, capsys):
    """Resuming on file names alone would pass old images off under new settings: the manifest names what differs."""
    out = tmp_path / "eval"
    args = _evaluate_args(world, tmp_path, tiny_predictor, out)
    args[args.index("--style-steps") + 1] = "0"  # only the shared no-style images: quick
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == ["a red house", "a blue boat on the sea"]
    assert set(manifest["styles"]) == {"warm", "cool"}
    capsys.readouterr()
    for flag, value, named in [("--style-lr", "1e-3", "style_options.lr"), ("--model", str(tmp_path), "settings.model"),
                               ("--steps", "3", "settings.steps")]:
        changed = list(args)
        changed[changed.index(flag) + 1] = value
        assert main(changed) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("Error: ") and named in err and len(err.splitlines()) == 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\na green boat on the sea\n")  # a prompt's text changed, not its index
    assert main(args) == 1
    assert "prompts[1]" in capsys.readouterr().err
    prompts.write_text("a red house\na blue boat on the sea\n")
    assert main(args) == 0  # the same settings resume


def test_evaluate_bad_input_is_one_line(world, tmp_path, tiny_predictor, capsys):
    args = _evaluate_args(world, tmp_path, tiny_predictor, tmp_path / "o")
    bad = list(args)
    bad[bad.index("--style-steps") + 1] = "0,x"
    assert main(bad) == 2  # a usage error
    assert capsys.readouterr().err.strip().startswith("Error: argument --style-steps: '0,x' is not")
    bad = list(args)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    bad[bad.index("--prompts") + 1] = str(tmp_path / "latin1.txt")
    assert main(bad) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err
    bad = list(args)
    bad[bad.index("--prompts") + 1] = str(tmp_path / "missing.txt")
    assert main(bad) == 1
    assert "Error: cannot read prompts file" in capsys.readouterr().err


def test_shipped_prompt_set():
    from stylegrad.evaluation.experiment import read_prompts

    prompts = read_prompts()
    assert len(prompts) >= 15 and len(set(prompts)) == len(prompts)
    assert min(map(len, prompts)) < 20 and max(map(len, prompts)) > 60  # short and long
