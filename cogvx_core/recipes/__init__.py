"""Recipes: whole, seeded training runs built from this project's own pieces (synthetic data, the VAE trainer, the
transformer trainer) that end in a model folder the ordinary loaders read. `tiny.py` makes the built-in model."""
