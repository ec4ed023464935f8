"""Post-hoc analysis of a trained adapter (`loralab analyze`) and merging it into its base (`loralab merge`).

`source.py` finds the adapter, its base model, head and task (a run directory or an adapter directory + --base);
`params.py` counts parameters and hashes the frozen base; `spectra.py` computes per-module LoRA statistics from
the thin SVD; `representations.py` compares hidden states of base and adapted; `plots.py` draws the figures;
`analyze.py` puts them into analysis.json; `merge.py` merges, checks and times. Nothing here is imported by
training except `params.frozen_hash`, which has no heavy dependencies.
"""
