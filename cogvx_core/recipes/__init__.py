"""Recipes: whole, seeded training runs built from this project's own pieces (synthetic data, the VAE trainer, the
transformer trainer) that end in a model folder the ordinary loaders read. `tiny.py` makes the built-in model,
`demos.py` runs the LoRA demo and the EUS ablation on it.

The small-model toolkit they share: `synthetic.py` draws the captioned clips, `analysis.py` judges what a clip shows,
`quality.py` scores a model with it (`python -m cogvx_core eval`)."""
