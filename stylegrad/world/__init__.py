"""A small trained world: a procedural dataset of shapes in visual styles, and a small CLIP and text-to-image
model trained on it on a CPU, shipped with the package so the whole stylegrad path runs offline."""
