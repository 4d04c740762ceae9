"""Evaluation metrics that work offline.

- :data:`PERPLEXITY_METRIC_PATH`: a local ``evaluate`` module (token-weighted perplexity from summed NLL and token
  counts); ``evaluate.load(PERPLEXITY_METRIC_PATH)`` works without the Hub.
- :func:`evaluate_perplexity`: the evaluation loop every method shares (model loss on shifted labels, no grad).

Example:
    >>> import evaluate
    >>> metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    >>> metric.compute(nll_sum=[6.0], num_tokens=[3])["loss"]
    2.0
"""

from pathlib import Path

from .loss_eval import evaluate_perplexity, perplexity_from_nll

PERPLEXITY_METRIC_PATH = str(Path(__file__).resolve().parent / "perplexity")
"""Folder of the local ``evaluate`` perplexity module (pass it to ``evaluate.load``)."""


def load_perplexity_metric(**kwargs):
    """``evaluate.load`` of the local perplexity module (offline); ``kwargs`` go to ``evaluate.load``.

    Example:
        >>> load_perplexity_metric().compute(nll_sum=[4.0], num_tokens=[2])["num_tokens"]
        2
    """
    import evaluate

    return evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)


__all__ = ["PERPLEXITY_METRIC_PATH", "evaluate_perplexity", "load_perplexity_metric", "perplexity_from_nll"]
