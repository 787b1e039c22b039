"""stylegrad batch: JSONL jobs locally and on a local Ray cluster (2 CPUs, fractional-CPU actors): the same bytes as
the local runner, a worker killed mid-run, a driver killed and resumed, grouping by personalization, bad lines."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stylegrad import Style, save_style
from stylegrad.jobs.batch import run_batch
from stylegrad.jobs.cluster import KILL_HOOK, chunks
from stylegrad.jobs.work import WorkerSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(world, tmp_path_factory):
    """A jobs file over the tiny world's model: styled lines sharing a personalization (n seeds), plain lines, one
    unknown field and one line that is not JSON."""
    clip_dir, sd_dir = world
    root = tmp_path_factory.mktemp("batch")
    save_style(Style(torch.randn(24, generator=torch.Generator().manual_seed(3)), name="mine"), root / "mine.safetensors")
    base = {"steps": 2, "width": 32, "height": 32, "cfg": 5.0}
    lines = [
        {"prompt": "a red house", "seed": 1, "n": 3, "style": "mine.safetensors", "style_options": {"steps": 2},
         **base},
        {"prompt": "a blue boat", "seed": 5, "n": 2, **base},
        {"prompt": "a red house", "seed": 9, "style": "mine.safetensors", "style_steps": 2, **base},
        {"prompt": "oops", "colour": "red"},
        "not json {",
        {"prompt": "a green tree", "seed": 2, "name": "tree", "style": "mine.safetensors",
         "style_options": {"steps": 1, "lr": 1e-3}, **base},
    ]
    jobs = root / "jobs.jsonl"
    jobs.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    spec = WorkerSpec(str(sd_dir), "cpu", str(clip_dir))
    return jobs, spec, root


def _images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def local_run(batch):
    jobs, spec, root = batch
    out = root / "local"
    summary, bad = run_batch(jobs, str(out), spec, progress=False, threads=1)  # as Ray's 0.5-CPU workers
    return out, summary, bad


def test_local_batch_makes_every_image_and_reports_bad_lines(batch, local_run):
    out, summary, bad = local_run
    images = _images(out)
    assert sorted(images) == sorted(
        [f"L00001-seed{s}.png" for s in (1, 2, 3)] + ["L00002-seed5.png", "L00002-seed6.png", "L00003-seed9.png",
                                                      "tree-seed2.png"])
    assert [b.line for b in bad] == [4, 5] and "unknown field colour" in bad[0].reason and "not JSON" in bad[1].reason
    assert summary.done == 7 and summary.failed[:2] == [("line 4", bad[0].reason), ("line 5", bad[1].reason)]
    assert summary.cache_hits == 3 and summary.styled == 5  # line 1's seeds and line 3 share one tuning
    from stylegrad import read_generation_info

    info = read_generation_info(out / "images" / "L00001-seed2.png")
    assert info.prompt == "a red house" and str(info.parameters["Seed"]) == "2"
    assert str(info.parameters["Aesthetic steps"]) == "2"
    assert json.loads((out / "batch-summary.json").read_text())["done"] == 7


def test_rerun_resumes_and_refuses_a_changed_line(batch, local_run):
    jobs, spec, root = batch
    out, _, _ = local_run
    summary, _ = run_batch(jobs, str(out), spec, progress=False)
    assert summary.done == 0 and summary.already == 7
    changed = root / "jobs-edited.jsonl"  # beside the first: the same style file
    lines = jobs.read_text().splitlines()
    lines[1] = lines[1].replace('"cfg": 5.0', '"cfg": 6.0')
    changed.write_text("\n".join(lines))
    from stylegrad.errors import StylegradError

    with pytest.raises(StylegradError, match="line 2 asks for other settings"):
        run_batch(changed, str(out), spec, progress=False)


def test_chunks_keep_a_personalization_together(batch):
    from stylegrad.jobs.batchfile import read_jobs

    jobs, spec, _ = batch
    items, _ = read_jobs(jobs, spec.model)
    runs = chunks(items, 8)
    assert [len(r) for r in runs] == [4, 2, 1]  # line 1's 3 seeds + line 3 (same tuning), line 2, the tree
    assert all(len({i.group for i in r}) == 1 for r in runs)
    assert [len(r) for r in chunks(items, 2)] == [2, 2, 2, 1]


def test_cli_bad_line_is_one_error_and_exit_1(batch, tmp_path):
    jobs, spec, _ = batch
    r = subprocess.run([sys.executable, "-m", "stylegrad", "batch", str(jobs), "--out", str(tmp_path / "o"),
                        "--model", spec.model, "--clip-model", spec.clip_model, "--device", "cpu"],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "7 made, 0 already there, 0 retried, 2 failed" in r.stdout
    assert "failed: line 4: unknown field colour" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'stylegrad[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_local_runners_bytes_even_when_a_worker_dies(batch, local_run, ray_cluster, tmp_path,
                                                                   monkeypatch):
    jobs, spec, _ = batch
    monkeypatch.setenv(KILL_HOOK, "2")  # worker 0 dies after its second image
    summary, bad = run_batch(jobs, str(tmp_path / "ray"), spec, ray=True, progress=False, workers=2,
                             cpus_per_worker=0.5, chunk=2)
    assert summary.retried >= 1 and summary.done + summary.already == 7 and len(summary.failed) == 2
    assert _images(tmp_path / "ray") == _images(local_run[0])  # byte for byte, every job once
    assert summary.cache_hits >= 1


def test_a_killed_ray_driver_is_resumed_by_rerunning(batch, tmp_path):
    """Two personalizations of 8 seeds each: the one worker takes the first 8 at once; the driver is killed after
    the first image, so the second 8 are never handed out and the rerun must make them."""
    pytest.importorskip("ray")
    _, spec, root = batch
    jobs = root / "resume.jsonl"
    common = {"steps": 8, "width": 32, "height": 32, "n": 8, "seed": 1}
    jobs.write_text("\n".join(json.dumps({"prompt": p, **common}) for p in ("a red house", "a blue boat")))
    expected = tmp_path / "local"
    run_batch(jobs, str(expected), spec, progress=False, threads=1)
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "stylegrad", "batch", str(jobs), "--out", str(out), "--model", spec.model,
           "--clip-model", spec.clip_model, "--device", "cpu", "--ray", "--workers", "1", "--threads", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "images").glob("*.png")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    made, stable = -1, 0
    while stable < 3:  # an orphaned worker may finish what it was handed before Ray's processes follow the driver
        time.sleep(1)
        now = len(list((out / "images").glob("*.png")))
        stable = stable + 1 if now == made else 0
        made = now
    assert 1 <= made <= 8
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"{16 - made} made, {made} already there" in r.stdout, r.stdout + r.stderr
    assert _images(out) == _images(expected)


def test_evaluate_on_ray_makes_the_local_images_and_scores(world, tmp_path, tiny_predictor, ray_cluster):
    from test_evaluate import _evaluate_args

    from stylegrad.apps.cli import main

    local, on_ray = tmp_path / "local", tmp_path / "ray"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors' (pixels on CPUs depend on the thread count)
    try:
        assert main(_evaluate_args(world, tmp_path, tiny_predictor, local)) == 0
    finally:
        torch.set_num_threads(before)
    args = _evaluate_args(world, tmp_path, tiny_predictor, on_ray)
    assert main(args + ["--ray", "--workers", "2", "--threads", "1"]) == 0
    images = sorted(p.relative_to(local) for p in local.glob("images/**/*.png"))
    assert len(images) == 12 and images == sorted(p.relative_to(on_ray) for p in on_ray.glob("images/**/*.png"))
    assert all((local / p).read_bytes() == (on_ray / p).read_bytes() for p in images)
    # the same rows; the scores, computed on the driver, as floats: its thread count moves their last digits
    local_rows, ray_rows = (list(csv.DictReader((d / "results.csv").open())) for d in (local, on_ray))
    assert len(local_rows) == len(ray_rows) > 0 and local_rows[0].keys() == ray_rows[0].keys()
    for mine, theirs in zip(local_rows, ray_rows):
        for key, value in mine.items():
            try:
                assert float(value) == pytest.approx(float(theirs[key]), rel=1e-5, abs=1e-6), key
            except ValueError:  # not a number: the same text
                assert value == theirs[key], key


def test_output_to_an_fsspec_url(batch, local_run, tmp_path):
    jobs, spec, _ = batch
    summary, _ = run_batch(jobs, f"file://{tmp_path}/remote", spec, progress=False, threads=1)
    assert summary.done == 7 and _images(tmp_path / "remote") == _images(local_run[0])
    assert not list((tmp_path / "remote").rglob("*.tmp"))


# The digest and the evaluation manifest's keys of this request as stylegrad 6dee632 (before IP-Adapter,
# hypernetworks and target_gain) computed them, recorded by running that commit: folders it wrote must resume.
_BEFORE_REQUEST = dict(prompt="a red circle", seed=3, style="s.safetensors", loras=("a.safetensors:0.5",))
_BEFORE_DIGEST = "19713d13c9ed503b"
_BEFORE_SETTINGS = {"cfg", "clip_model", "clip_skip", "embeddings", "height", "init_image", "loras", "model",
                    "negative", "sampler", "steps", "strength", "stylecode", "stylecode_guidance", "stylecode_image",
                    "stylecode_strength", "stylecodes_model", "weighting", "width"}
_BEFORE_OPTIONS = {"betas", "eps", "lr", "personalize_negative", "regularization", "slerp", "target_similarity",
                   "text", "text_angle", "text_negative", "towers", "weight"}


def test_folders_made_before_later_fields_still_resume_and_set_fields_are_recorded():
    from stylegrad.aesthetic.options import StyleOptions
    from stylegrad.evaluation.experiment import manifest
    from stylegrad.jobs.work import WorkItem
    from stylegrad.pipelines.request import GenerationRequest

    request = GenerationRequest(**_BEFORE_REQUEST, style_options=StyleOptions(steps=7))
    assert WorkItem(request, "x.png", "line 1").digest == _BEFORE_DIGEST
    m = manifest(request, ["a red circle"], {}, [0, 5], [0])
    assert set(m["settings"]) == _BEFORE_SETTINGS and set(m["style_options"]) == _BEFORE_OPTIONS
    # a later field that is set changes what is recorded, so an older folder is not taken for this run
    hyper = GenerationRequest(**_BEFORE_REQUEST, hypernetworks=("h.pt:0.5",), style_options=StyleOptions(steps=7))
    assert WorkItem(hyper, "x.png", "line 1").digest != _BEFORE_DIGEST
    gain = GenerationRequest(**_BEFORE_REQUEST, style_options=StyleOptions(steps=7, target_gain=0.3))
    assert "target_gain" in manifest(gain, ["a red circle"], {}, [0, 5], [0])["style_options"]
