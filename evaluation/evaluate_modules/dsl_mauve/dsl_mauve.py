"""MAUVE between generated and reference text that runs offline, as a local `evaluate` metric.

`evaluate.load("mauve")` fetches its script from the Hub and featurizes only with GPT-2 or BERT models by name. This
module is a thin wrapper over :func:`dsl_diffusion.evaluation.metrics.compute_mauve` (``mauve.compute_mauve`` on
features), so any local causal LM or encoder folder can featurize, several k-means seeds can be averaged, and every
protocol knob comes back with the score::

    import evaluate
    from dsl_diffusion.evaluation import evaluate_module_path, minilm_encoder_path

    mauve = evaluate.load(evaluate_module_path("dsl_mauve"))
    mauve.compute(predictions=samples, references=refs, featurizer=minilm_encoder_path())
"""

import datasets
import evaluate

from dsl_diffusion.evaluation.metrics import PROTOCOL_FEATURIZER, compute_mauve


_DESCRIPTION = """MAUVE (Pillutla et al., 2021) between model samples (predictions) and human references: the area
under the divergence frontier of the two quantized feature distributions, scaled by `mauve_scaling_factor`.
Defaults are the DSL protocol: gpt2-large features of the final token, 1024 tokens, buckets n/10, PCA 0.9, k-means
seed 25, scaling factor 5."""

_CITATION = """@inproceedings{pillutla-etal:mauve:neurips2021,
  title={MAUVE: Measuring the Gap Between Neural Text and Human Text using Divergence Frontiers},
  author={Pillutla, Krishna and Swayamdipta, Swabha and Zellers, Rowan and Thickstun, John and Welleck, Sean
          and Choi, Yejin and Harchaoui, Zaid},
  booktitle={NeurIPS},
  year={2021}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): model samples (MAUVE's q).
    references (`list` of `str`): human text (MAUVE's p), as many as predictions.
    featurizer (`str` or `TextFeaturizer`): Hub id or local folder of the featurizer. Defaults to "gpt2-large".
    max_text_length (`int`): truncation length in featurizer tokens. Defaults to 1024.
    seeds (`list` of `int`): k-means seeds; the score is their mean. Defaults to [25].
    num_buckets ("auto" or `int`), kmeans_explained_var, kmeans_num_redo, kmeans_max_iter, mauve_scaling_factor,
    device: as in `dsl_diffusion.evaluation.compute_mauve`.
Returns:
    mauve, mauve_std, mauve_per_seed, mauve_star, frontier_integral, sample counts and every protocol knob.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DSLMauve(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, featurizer=PROTOCOL_FEATURIZER, seeds=(25,), **mauve_kwargs):
        result = compute_mauve(
            p_text=references, q_text=predictions, featurizer=featurizer, seeds=seeds, **mauve_kwargs
        )
        return result.to_dict()
