"""A small trained world: a procedural dataset of shapes in visual styles, and a small CLIP and text-to-image
model trained on it on a CPU, shipped with the package so the whole stylegrad path runs offline."""

STEPS = (0, 2, 5, 10, 20)  # the tuning steps the demo and the measurements compare (here: `demo --help` reads it)
