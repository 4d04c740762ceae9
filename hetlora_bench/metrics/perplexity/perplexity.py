"""Token-weighted perplexity from summed negative log-likelihoods: a local `evaluate` module.

`evaluate.load("perplexity")` fetches a script from the Hub (and runs a model itself); this module works offline
with `evaluate.load(path_to_this_folder)` and takes what every method's evaluation loop already has: per batch,
the summed token NLL (natural log) and the number of predicted tokens. Keep one import per line: `evaluate`
parses this file's imports.
"""

import math

import datasets
import evaluate

_CITATION = """\
@inproceedings{cho2024hetlora,
  title={Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models},
  author={Cho, Yae Jee and Liu, Luyang and Xu, Zheng and Fahrezi, Aldi and Joshi, Gauri},
  booktitle={EMNLP},
  year={2024}
}
"""

_DESCRIPTION = """\
Token-weighted perplexity: exp(sum of per-token negative log-likelihoods / number of tokens), pooled over all
batches (not a mean of per-batch perplexities), so batches with more tokens count more, exactly as if the whole
evaluation set were one sequence of predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list` of `float`): per batch, the sum of the per-token negative log-likelihoods (natural log) over
        the predicted (non-masked) tokens.
    num_tokens (`list` of `int`): per batch, the number of predicted tokens.
Returns:
    perplexity (`float`): exp(loss); `inf` when the loss overflows, `nan` when there are no tokens.
    loss (`float`): sum(nll_sum) / sum(num_tokens), the mean token NLL.
    num_tokens (`int`): sum(num_tokens).
Examples:
    >>> metric = evaluate.load("hetlora_bench/metrics/perplexity")
    >>> metric.compute(nll_sum=[20.0, 10.0], num_tokens=[10, 5])["loss"]
    2.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Token-weighted perplexity from per-batch NLL sums and token counts."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll_sum": datasets.Value("float64"),
                    "num_tokens": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2401.06432"],
        )

    def _compute(self, nll_sum, num_tokens):
        total_nll = math.fsum(float(x) for x in nll_sum)
        total_tokens = int(sum(int(n) for n in num_tokens))
        if any(int(n) < 0 for n in num_tokens):
            raise ValueError("num_tokens must be non-negative.")
        if total_tokens == 0:
            return {"perplexity": float("nan"), "loss": float("nan"), "num_tokens": 0}
        loss = total_nll / total_tokens
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = float("inf")
        return {"perplexity": perplexity, "loss": loss, "num_tokens": total_tokens}
