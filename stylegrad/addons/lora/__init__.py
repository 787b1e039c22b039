"""LoRA and LyCORIS files: read any format A1111's Lora extension reads, map it onto a pipeline's modules, run it
beside the weights (the user's modules are never written), merge it into text-encoder tensors for tuning, bake it
into a checkpoint."""
