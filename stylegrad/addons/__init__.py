"""The add-ons people download beside their checkpoints: textual-inversion embeddings and LoRA/LyCORIS files."""
