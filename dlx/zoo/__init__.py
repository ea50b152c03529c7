"""Small models that ship inside dlx (no downloads): `load`, `info`, `adherence`.

Importing this module is light: diffusers, transformers and pandas are imported only
when a model is loaded or a DataFrame is built.
"""
