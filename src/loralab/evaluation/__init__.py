"""Evaluation: predictions from models with their adapters, metrics, re-scoring."""
