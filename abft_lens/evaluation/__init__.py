"""Predictions and evaluation metrics for ICL classification (method.md section 6).

``evaluate(model, dataset, config)`` measures, on held-out queries with demonstrations from a
separate pool:

- accuracy (argmax over the label tokens' logits at the query's last position) and macro-F1 on
  ``n_test`` queries x ``demo_sets`` demonstration sets, and the predicted-label distribution;
- contextual calibration (label probabilities divided by their mean over content-free queries,
  renormalised);
- robustness as prediction consistency over the 9 templates of an L9 orthogonal array and over
  8 demonstration sets;
- the unseen-label test (every demonstration carries a label other than the query's), beside
  random demonstrations and 0-shot;
- the label attention of the induction heads on the test prompts (collected in the same forward).

One module per part:

- ``metrics``: the metric math (macro-F1, consistency, calibration, induction-head masses), pure
  tensor code;
- ``outputs``: ``Predictions``, a prompt set's label logits beside its true labels;
- ``prediction``: ``predict``, the one loop that runs the model, and the content-free queries;
- ``partial``: an interrupted evaluation's finished batches, which the same evaluation resumes from;
- ``job``: ``EvaluateConfig``, ``evaluate`` and ``run_evaluation`` (the `evaluate` command's job);
- ``records``: a benchmark's results table completed from the run folders its rows name (not
  re-exported here: the figures import it only for a table that needs it).
"""

from abft_lens.evaluation.job import (
    EvaluateConfig,
    EvaluationResult,
    default_out,
    evaluate,
    evaluate_datasets,
    headline,
    load_model_or_run,
    out_of_domain_harm,
    predictions_frame,
    run_defaults,
    run_evaluation,
)
from abft_lens.evaluation.metrics import (
    COLLAPSE_MARGIN,
    COLLAPSE_SHARE,
    accuracy,
    calibrate_probabilities,
    collapsed_label,
    consistency_score,
    induction_label_mass,
    label_distribution,
    macro_f1,
    summarise_induction,
)
from abft_lens.evaluation.outputs import Predictions
from abft_lens.evaluation.prediction import content_free_probabilities, predict
from abft_lens.forward import label_logits
from abft_lens.runs import check_not_broken_run_dir, is_run_dir

__all__ = [
    "COLLAPSE_MARGIN", "COLLAPSE_SHARE", "EvaluateConfig", "EvaluationResult", "Predictions", "accuracy",
    "calibrate_probabilities", "check_not_broken_run_dir", "collapsed_label", "consistency_score",
    "content_free_probabilities", "default_out", "evaluate", "evaluate_datasets", "headline",
    "induction_label_mass", "is_run_dir", "label_distribution", "label_logits", "load_model_or_run", "macro_f1",
    "out_of_domain_harm", "predict", "predictions_frame", "run_defaults", "run_evaluation", "summarise_induction",
]
