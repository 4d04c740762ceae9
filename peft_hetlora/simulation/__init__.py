"""Federated simulation building blocks: the base model source, client corpora, evaluation and reports."""
