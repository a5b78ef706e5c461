"""Unigram entropy (nats) of generated token sequences, as a local `evaluate` metric.

A thin wrapper over :func:`dsl_diffusion.evaluation.metrics.compute_unigram_entropy`: per sample, the entropy of
the empirical distribution of its raw token ids; the mean is reported::

    import evaluate
    from dsl_diffusion.evaluation import evaluate_module_path

    entropy = evaluate.load(evaluate_module_path("unigram_entropy"))
    entropy.compute(predictions=[[50256, 464, 3290, ...], ...])
"""

import datasets
import evaluate

from dsl_diffusion.evaluation.metrics import compute_unigram_entropy


_DESCRIPTION = """Unigram entropy, in nats, of each generated sequence of token ids (special tokens included), and
its mean over the samples. Low entropy flags repetitive text, which generative perplexity alone rewards."""

_CITATION = """@article{zheng2024masked,
  title={Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit Inaccurate Categorical
         Sampling},
  author={Zheng, Kaiwen and Chen, Yongxin and Mao, Hanzi and Liu, Ming-Yu and Zhu, Jun and Zhang, Qinsheng},
  journal={arXiv preprint arXiv:2409.02908},
  year={2024}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): the generated token ids, one list per sample.
Returns:
    mean, std, num_samples, per_sample.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnigramEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions):
        return compute_unigram_entropy(predictions).to_dict()
