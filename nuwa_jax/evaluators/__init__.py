"""Evaluators: metrics of a trained run, built from `config.evals` (see common.py)."""
