"""Generative perplexity of generated text under a judge causal LM, as a local `evaluate` metric.

A thin wrapper over :func:`dsl_diffusion.evaluation.metrics.compute_generative_perplexity` (the protocol of the DSL
paper: retokenize with the judge's tokenizer, truncate at 1024 tokens, count all non-EOS tokens plus the first EOS,
corpus-level ``exp(sum nll / sum count)``)::

    import evaluate
    from dsl_diffusion.evaluation import evaluate_module_path

    gen_ppl = evaluate.load(evaluate_module_path("generative_perplexity"))
    gen_ppl.compute(predictions=texts, judge="gpt2-large")
"""

import datasets
import evaluate

from dsl_diffusion.evaluation.metrics import PROTOCOL_JUDGE, compute_generative_perplexity


_DESCRIPTION = """Corpus-level perplexity of generated texts under a judge causal language model ("Gen PPL"). The
texts are retokenized with the judge's tokenizer and truncated at `max_length`; next-token cross-entropy is summed
over all non-EOS tokens plus the first EOS of each text. Report unigram entropy beside it: repetitive text games
Gen PPL."""

_CITATION = """@inproceedings{sahoo2024simple,
  title={Simple and Effective Masked Diffusion Language Models},
  author={Sahoo, Subham Sekhar and Arriola, Marianne and Schiff, Yair and Gokaslan, Aaron and Marroquin, Edgar
          and Chiu, Justin T and Rush, Alexander and Kuleshov, Volodymyr},
  booktitle={NeurIPS},
  year={2024}
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the decoded samples.
    judge (`str` or `Judge`): Hub id or local folder of the judge causal LM, or a loaded
        `dsl_diffusion.evaluation.Judge`. Defaults to "gpt2-large".
    gguf_file (`str`, optional): a GGUF file inside the judge folder.
    max_length (`int`): truncation length of the retokenized texts. Defaults to 1024.
    batch_size (`int`): texts per forward pass. Defaults to 8.
    device (`str`, optional): where the judge runs.
Returns:
    gen_ppl, nll_sum, num_tokens, num_samples, num_truncated, max_length, judge, per_sample_nll, per_sample_tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerativePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, judge=PROTOCOL_JUDGE, gguf_file=None, max_length=1024, batch_size=8, device=None):
        result = compute_generative_perplexity(
            predictions, judge, gguf_file=gguf_file, max_length=max_length, batch_size=batch_size, device=device
        )
        return result.to_dict()
