"""The experiment's outputs a person looks at: the metrics plot and one self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from stylegrad.files.atomic import atomic_write

METRICS = ("aesthetic", "clip_score", "style_similarity")
LABELS = {"aesthetic": "aesthetic score", "clip_score": "CLIP score (prompt)", "style_similarity": "style similarity"}


def plot(summary: dict, path: Path) -> None:
    """Each metric against steps, one line (mean with std bars) per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, m in zip(axes, METRICS):
        for name, by_steps in summary.items():
            ks = sorted(by_steps, key=int)
            ax.errorbar([int(k) for k in ks], [by_steps[k][m]["mean"] for k in ks],
                        yerr=[by_steps[k][m]["std"] for k in ks], marker="o", capsize=3, label=name)
        ax.set_xlabel("aesthetic-gradient steps")
        ax.set_title(LABELS[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def report(summary: dict, prompts: list[str], grids: dict[str, Image.Image], plot_path: Path, meta: dict) -> str:
    """One self-contained HTML page: settings, the summary table, the plot and the grids, all inlined."""
    e = html.escape
    head = "".join(f"<th>{e(LABELS[m])}</th>" for m in METRICS)
    body = []
    for name, by_steps in summary.items():
        for k in sorted(by_steps, key=int):
            cells = "".join(f"<td>{by_steps[k][m]['mean']:.3f} ± {by_steps[k][m]['std']:.3f}</td>" for m in METRICS)
            body.append(f"<tr><td>{e(name)}</td><td>{k}</td><td>{by_steps[k][METRICS[0]]['n']}</td>{cells}</tr>")
    with Image.open(plot_path) as im:
        plot_uri = _data_uri(im.convert("RGB"))
    grid_html = "".join(f"<h3>{e(name)}</h3><img alt='grid {e(name)}' src='{_data_uri(g, 'JPEG')}'>"
                        for name, g in grids.items())
    prompt_list = "".join(f"<li value='{i}'>{e(p)}</li>" for i, p in enumerate(prompts))
    settings = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stylegrad evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
</style></head><body>
<h1>stylegrad evaluation</h1>
<p>Mean ± standard deviation over prompts and seeds. Aesthetic score: the predictor's 1–10 rating of each image.
CLIP score: 100 × cosine of prompt and image (prompt fidelity). Style similarity: cosine of image and style.</p>
<table><tr><th>style</th><th>steps</th><th>n</th>{head}</tr>{''.join(body)}</table>
<img alt="metrics against steps" src="{plot_uri}">
<h2>Grids (first seed)</h2>{grid_html}
<h2>Prompts</h2><ol start="0">{prompt_list}</ol>
<h2>Settings</h2><table>{settings}</table>
</body></html>"""


