"""Analysis behind the studies in ``benchmarks/``: code a study's script runs and its tests check.

`sharpness` reads and summarises sharpness-by-block-type reports (the tables of
``benchmarks/studies/sharpness``, the ratios the blockwise-LR scripts take from them);
`sharpness_run` trains a model and measures it at checkpoints (what ``sharpness.py`` runs).
Both need the ``bench`` extras (matplotlib for the figure).
"""
