"""Specification of the evaluation: metric math on hand-made cases, plumbing on a tiny random
GPT-2, and the behavioural claims (ICL works, calibration moves the label distribution, unseen
labels hurt) on the real embedded model at sizes measured to be robust."""

import contextlib
import json
import math

import pandas as pd
import pytest
import torch

from abft_lens.data import load_dataset, split_pools
from abft_lens.errors import ConfigError, DataError
from abft_lens.evaluation import (
    EvaluateConfig,
    accuracy,
    calibrate_probabilities,
    collapsed_label,
    consistency_score,
    default_out,
    evaluate,
    evaluate_datasets,
    headline,
    induction_label_mass,
    is_run_dir,
    macro_f1,
    run_defaults,
    summarise_induction,
)
from abft_lens.prompts import build_prompts

T, F = True, False

# --- pure metric functions ---------------------------------------------------------------------


def test_macro_f1_matches_hand_computed_value():
    true = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 0 -> 0
    assert macro_f1(true, predicted, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert accuracy(true, predicted) == pytest.approx(3 / 5)


def test_macro_f1_is_one_only_when_every_prediction_is_right():
    true = torch.tensor([0, 1, 1, 0])
    assert macro_f1(true, true.clone(), 2) == 1.0
    assert macro_f1(true, torch.tensor([0, 1, 1, 1]), 2) < 1.0


def test_macro_f1_averages_over_the_whole_label_space():
    # StaICC's convention: a class that never occurs and is never predicted counts as 0.
    true = torch.tensor([0, 1])
    assert macro_f1(true, true.clone(), 3) == pytest.approx(2 / 3)


def test_macro_f1_punishes_always_predicting_the_majority_class():
    true = torch.tensor([1, 1, 1, 0])
    majority = torch.ones(4, dtype=torch.long)
    assert accuracy(true, majority) == 0.75
    assert macro_f1(true, majority, 2) == pytest.approx((0 + 2 * 3 / (2 * 3 + 1)) / 2)


def test_paired_difference_resamples_whole_queries_and_cancels_what_both_share():
    from abft_lens.evaluation.metrics import paired_difference

    generator = torch.Generator().manual_seed(0)
    true = torch.randint(0, 2, (400,), generator=generator)
    first = torch.where(torch.rand(400, generator=generator) < 0.6, true, 1 - true)
    # The same answers: no difference, and no error of it however they are resampled.
    same = paired_difference(true, first, first.clone(), torch.arange(400), 2, n_boot=50)
    assert same["accuracy_difference"] == 0 and same["accuracy_difference_se"] == 0
    assert same["macro_f1_difference_se"] == 0
    # Right on every input against right on a share p: the error of the difference is binomial(p).
    p = float((first == true).double().mean())
    perfect = paired_difference(true, first, true.clone(), torch.arange(400), 2, n_boot=2000)
    assert perfect["accuracy_difference"] == pytest.approx(1 - p)
    assert perfect["accuracy_difference_se"] == pytest.approx((p * (1 - p) / 400) ** 0.5, rel=0.1)
    assert perfect["macro_f1_difference"] == pytest.approx(1 - macro_f1(true, first, 2))
    # Each query shown twice with the same answers (two demonstration sets, fully dependent): resampling
    # queries gives sqrt(2) times the error of treating the 800 inputs as independent.
    twice = [torch.cat([t, t]) for t in (true, first, true)]
    grouped = paired_difference(*twice, torch.cat([torch.arange(400)] * 2), 2, n_boot=2000)
    independent = paired_difference(*twice, torch.arange(800), 2, n_boot=2000)
    assert grouped["n_groups"] == 400 and grouped["n_inputs"] == 800
    assert grouped["accuracy_difference_se"] / independent["accuracy_difference_se"] == pytest.approx(2 ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="one entry per input"):
        paired_difference(true, first, true[:10], torch.arange(400), 2)


def test_bootstrap_errors_resample_whole_queries():
    from abft_lens.evaluation.metrics import bootstrap_standard_errors

    generator = torch.Generator().manual_seed(1)
    true = torch.randint(0, 2, (400,), generator=generator)
    predicted = torch.where(torch.rand(400, generator=generator) < 0.7, true, 1 - true)
    p = float((predicted == true).double().mean())
    alone = bootstrap_standard_errors(true, predicted, torch.arange(400), 2, n_boot=2000)
    assert alone["accuracy"] == pytest.approx((p * (1 - p) / 400) ** 0.5, rel=0.1)  # binomial
    # Each query twice with the same answers: whole queries give the 400-input error, sqrt(2) times that
    # of 800 independent inputs.
    twice = [torch.cat([t, t]) for t in (true, predicted)]
    grouped = bootstrap_standard_errors(*twice, torch.cat([torch.arange(400)] * 2), 2, n_boot=2000)
    independent = bootstrap_standard_errors(*twice, torch.arange(800), 2, n_boot=2000)
    for name in ("accuracy", "macro_f1"):
        assert grouped[name] / independent[name] == pytest.approx(2 ** 0.5, rel=0.1)
    assert bootstrap_standard_errors(true, true.clone(), torch.arange(400), 2, n_boot=50)["accuracy"] == 0


def test_label_words_are_encoded_in_the_evaluations_label_space():
    from abft_lens.evaluation.metrics import encode_labels

    words, (true, predicted) = encode_labels(["negative", "positive", "neutral"], ["positive", "negative"],
                                             ["neutral", "neutral"])
    assert words == ["negative", "positive", "neutral"]  # the given order, unshown labels kept
    assert true.tolist() == [1, 0] and predicted.tolist() == [2, 2] and true.dtype == torch.long
    with pytest.raises(DataError, match=r"outside the label words .*\['maybe'\]"):
        encode_labels(["no", "yes"], ["yes"], ["maybe"])
    words, (answers,) = encode_labels(["no", "yes"], ["yes", "perhaps", "maybe"], strays=True)
    assert words == ["no", "yes", "maybe", "perhaps"] and answers.tolist() == [1, 3, 2]


def test_consistency_is_the_largest_agreeing_share_averaged_over_queries():
    predictions = torch.tensor([[0, 0, 1], [1, 1, 1]])
    assert consistency_score(predictions) == pytest.approx((2 / 3 + 1) / 2)
    assert consistency_score(torch.tensor([[0, 1, 2]])) == pytest.approx(1 / 3)


def test_consistency_ignores_accuracy():
    # Always the same (wrong or right) answer is perfectly consistent.
    assert consistency_score(torch.tensor([[2, 2, 2, 2], [0, 0, 0, 0]])) == 1.0


def test_consistency_rejects_a_flat_vector():
    with pytest.raises(ValueError):
        consistency_score(torch.tensor([0, 1, 1]))


def test_calibration_divides_by_the_content_free_mean_and_renormalises():
    probabilities = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    content_free = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)  # mean [0.7, 0.3]
    calibrated = calibrate_probabilities(probabilities, content_free)
    expected = torch.tensor([0.6 / 0.7, 0.4 / 0.3], dtype=torch.float64)
    torch.testing.assert_close(calibrated[0], expected / expected.sum())
    assert calibrated.argmax(-1).item() == 1  # the biased-towards-label-0 prediction flips


def test_calibration_maps_the_content_free_mean_to_uniform():
    content_free = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]], dtype=torch.float64)
    calibrated = calibrate_probabilities(content_free.mean(0, keepdim=True), content_free)
    torch.testing.assert_close(calibrated, torch.full((1, 3), 1 / 3, dtype=torch.float64))


def test_calibration_keeps_rows_normalised():
    probabilities = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), -1)
    content_free = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(1)), -1)
    torch.testing.assert_close(calibrate_probabilities(probabilities, content_free).sum(-1), torch.ones(5))


def test_induction_mass_counts_only_heads_above_the_paper_threshold():
    # n_t = 100, k = 4: threshold 4 / (4 + ln 100) = 0.465. Head 0 has S = 0.55, head 1 S = 0.40.
    attention = torch.tensor([[[[0.30, 0.10, 0.10, 0.05], [0.10, 0.10, 0.10, 0.10]]]])
    sums = induction_label_mass(attention, torch.tensor([[T, F, T, F]]), torch.tensor([100]))
    summary = summarise_induction(sums)
    assert summary["induction_heads_per_prompt"] == 1.0
    assert summary["induction_correct_mass"] == pytest.approx(0.40)
    assert summary["induction_wrong_mass"] == pytest.approx(0.15)


def test_no_induction_heads_gives_nan_masses_not_an_error():
    attention = torch.full((1, 1, 2, 4), 0.01)
    sums = induction_label_mass(attention, torch.tensor([[T, F, T, F]]), torch.tensor([100]))
    summary = summarise_induction(sums)
    assert summary["induction_heads_per_prompt"] == 0.0
    assert math.isnan(summary["induction_correct_mass"])


def test_config_rejects_impossible_sizes():
    with pytest.raises(ConfigError, match="n_test"):
        EvaluateConfig(n_test=0)
    with pytest.raises(ConfigError, match="k must be"):
        EvaluateConfig(k=0)


# --- plumbing on a tiny random GPT-2 (the real GPT-2 tokenizer) ----------------------------------


def test_zero_shot_prompts_hold_only_the_query(tiny_gpt2, sst2):
    pools = split_pools(sst2)
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:3], k=0)
    batch = prompts.collate([0, 1, 2])
    assert prompts.k == 0 and batch.label_positions.shape == (3, 0)
    assert batch.label_positions.dtype == torch.long and batch.correct_mask.dtype == torch.bool
    text = tiny_gpt2.tokenizer.decode(prompts[0].tokens)
    assert text.count("sentiment:") == 1 and text.rstrip().endswith("sentiment:")


def test_robustness_scores_nine_templates_and_eight_demo_sets(tiny_gpt2, sst2):
    config = EvaluateConfig(n_test=3, demo_sets=1, robustness=True, robustness_queries=3, attention=False)
    result = evaluate(tiny_gpt2, sst2, config, progress=False)
    table = result.tables["robustness"]
    assert table.groupby("variant")["variant_index"].nunique().to_dict() == {"template": 9, "demos": 8}
    assert len(table) == 3 * (9 + 8)
    # Recompute the template score from the table: the metric is the table's consistency.
    templates = table[table.variant == "template"]
    grid = templates.pivot(index="query", columns="variant_index", values="predicted_label")
    share = grid.apply(lambda row: row.value_counts().iloc[0] / 9, axis=1).mean()
    assert result.metrics["consistency_templates"] == pytest.approx(share)
    assert result.metrics["consistency"] == pytest.approx(
        (result.metrics["consistency_templates"] + result.metrics["consistency_demos"]) / 2)


def test_predictions_table_follows_queries_and_repeats(tiny_gpt2, sst2):
    result = evaluate(tiny_gpt2, sst2, EvaluateConfig(n_test=5, demo_sets=2), progress=False)
    frame = result.predictions
    assert len(frame) == result.metrics["n_inputs"] == 10
    assert frame["repeat"].tolist() == [0] * 5 + [1] * 5
    queries = split_pools(sst2).test[:5]
    expected = [sst2.label_words[q.label] for q in queries] * 2
    assert frame["true_label"].tolist() == expected
    probabilities = frame[[f"prob_{w}" for w in sst2.label_words]].sum(axis=1)
    assert probabilities.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert result.metrics["accuracy"] == pytest.approx(frame["correct"].mean())


def test_predictions_come_back_in_the_sets_order_though_batches_are_cut_by_length(tiny_gpt2, sst2):
    from tolerances import ATTENTION_ATOL

    from abft_lens.evaluation.prediction import predict
    from abft_lens.forward import label_logits

    pools = split_pools(sst2)
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:12], k=4, seed=42, demo_pool=pools.demo)
    lengths = [len(p.tokens) for p in prompts.prompts]
    assert lengths != sorted(lengths)  # else the test could not tell the orders apart
    assert [lengths[i] for i in prompts.by_length()] == sorted(lengths)
    with torch.inference_mode():
        one_by_one = torch.cat([label_logits(tiny_gpt2, prompts.collate([i])) for i in range(len(prompts))])
    batched = predict(tiny_gpt2, prompts, batch_size=5, progress=False)
    assert batched.true.tolist() == [p.query_label for p in prompts.prompts]
    # Different paths (each prompt alone against padded batches of 5): float32 closeness with the
    # activations' relative error bound and the attention tolerance (tests/tolerances.py); a prompt's
    # logits landing on another prompt's row differ by far more.
    torch.testing.assert_close(batched.logits, one_by_one, atol=ATTENTION_ATOL, rtol=1e-4)


class Interrupted(Exception):
    """Stands for a kill or Ctrl-C in the middle of a prediction loop."""


@contextlib.contextmanager
def counted_forwards(model, interrupt_at: int | None = None, before_interrupting=lambda: None):
    """Count the model's forwards (one per batch); with ``interrupt_at``, that forward calls
    ``before_interrupting`` and raises ``Interrupted`` before it runs."""
    calls = []

    def count(module, args):
        calls.append(1)
        if len(calls) == interrupt_at:
            before_interrupting()
            raise Interrupted

    handle = model.hook_dict["blocks.0.hook_resid_pre"].register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("every_seconds", [0.0, 1e9], ids=["saved-as-it-goes", "saved-on-interruption"])
def test_an_interrupted_prediction_resumes_after_its_saved_batches_with_the_same_result(tiny_gpt2, sst2, tmp_path,
                                                                                       every_seconds):
    from abft_lens.evaluation.partial import PartialPredictions, read_predictions
    from abft_lens.evaluation.prediction import predict

    pools = split_pools(sst2)
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:10], k=4, seed=42, demo_pool=pools.demo)
    uninterrupted = predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False)
    partial = PartialPredictions.for_model(tmp_path / "partial", tiny_gpt2, "fp32", every_seconds=every_seconds)
    path = partial.file_for(prompts, 4, attention=True).path
    on_disk = []  # what a SIGKILL at the third batch would leave

    def look() -> None:
        on_disk.append(len(read_predictions(path).true) if path.exists() else 0)

    with counted_forwards(tiny_gpt2, interrupt_at=3, before_interrupting=look), pytest.raises(Interrupted):
        predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    assert on_disk == [8 if every_seconds == 0 else 0]
    with counted_forwards(tiny_gpt2) as forwards:
        resumed = predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    assert len(forwards) == 1  # batches of 4, 4 and 2: the first two were saved before the interruption
    # Identity, not closeness: the same batches in the same process run the same float32 sums.
    assert torch.equal(resumed.logits, uninterrupted.logits) and torch.equal(resumed.true, uninterrupted.true)
    assert resumed.induction_sums.keys() == uninterrupted.induction_sums.keys()
    for key, value in uninterrupted.induction_sums.items():
        assert torch.equal(resumed.induction_sums[key], value), key
    with counted_forwards(tiny_gpt2) as forwards:  # a finished set is not computed again
        again = predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    assert not forwards and torch.equal(again.logits, uninterrupted.logits)


def test_an_interruption_between_a_batch_s_sums_and_its_logits_saves_neither(tiny_gpt2, sst2, tmp_path,
                                                                             monkeypatch):
    import abft_lens.evaluation.prediction as prediction
    from abft_lens.evaluation.partial import PartialPredictions, read_predictions

    pools = split_pools(sst2)
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:10], k=4, seed=42, demo_pool=pools.demo)
    uninterrupted = prediction.predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False)
    forward = prediction._logits_and_label_attention
    batches = []

    class LogitsInterruptedOnKeeping:
        def float(self):
            raise Interrupted

    def third_interrupted(model, batch):
        logits, attention = forward(model, batch)
        batches.append(1)
        return (LogitsInterruptedOnKeeping() if len(batches) == 3 else logits), attention

    monkeypatch.setattr(prediction, "_logits_and_label_attention", third_interrupted)
    partial = PartialPredictions.for_model(tmp_path, tiny_gpt2, "fp32", every_seconds=1e9)
    with pytest.raises(Interrupted):  # the third batch's sums are added, its logits never kept
        prediction.predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    saved = read_predictions(partial.file_for(prompts, 4, attention=True).path)
    assert len(saved.true) == 8
    monkeypatch.setattr(prediction, "_logits_and_label_attention", forward)
    partial = PartialPredictions.for_model(tmp_path, tiny_gpt2, "fp32", every_seconds=1e9)  # a new run
    resumed = prediction.predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    assert partial.read_back == 8
    prediction.predict(tiny_gpt2, prompts, batch_size=4, attention=True, progress=False, partial=partial)
    assert partial.read_back == 8  # the set this run finished, read again: not from an interrupted run
    for key, value in uninterrupted.induction_sums.items():  # the third batch counted once
        assert torch.equal(resumed.induction_sums[key], value), key


def test_saved_batches_serve_only_the_same_model_prompts_and_settings(tiny_gpt2, sst2, tmp_path):
    from abft_lens.evaluation.partial import PartialPredictions, weights_digest

    pools = split_pools(sst2)
    prompts = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:6], k=4, seed=42, demo_pool=pools.demo)
    other_demos = build_prompts(tiny_gpt2.tokenizer, sst2, pools.test[:6], k=4, seed=43, demo_pool=pools.demo)
    partial = PartialPredictions.for_model(tmp_path, tiny_gpt2, "fp32")
    path = partial.file_for(prompts, 4, attention=False).path
    assert partial.file_for(prompts, 4, attention=False).path == path
    changed = [partial.file_for(other_demos, 4, attention=False).path,
               partial.file_for(prompts, 2, attention=False).path,
               partial.file_for(prompts, 4, attention=True).path,
               PartialPredictions.for_model(tmp_path, tiny_gpt2, "bf16").file_for(prompts, 4, attention=False).path]
    assert path not in changed and len(set(changed)) == len(changed)
    with torch.no_grad():
        parameter = next(tiny_gpt2.parameters())
        original = parameter.view(-1)[0].clone()  # put back exactly: the model is shared by the session
        parameter.view(-1)[0] += 1e-3
        try:
            assert weights_digest(tiny_gpt2) != partial.weights  # a fine-tuned model does not reuse the base's
        finally:
            parameter.view(-1)[0] = original
    assert weights_digest(tiny_gpt2) == partial.weights


def test_the_numerics_context_tells_apart_what_changes_the_last_digits(monkeypatch):
    import abft_lens.evaluation.partial as partial

    cpu = torch.device("cpu")
    context = partial.numerics_context("fp32", "float32", cpu, "fp32 asked for")
    assert context == partial.numerics_context("fp32", "float32", cpu, "fp32 asked for")
    changed = [partial.numerics_context("bf16", "float32", cpu, "fp32 asked for"),
               partial.numerics_context("fp32", "bfloat16", cpu, "fp32 asked for"),
               partial.numerics_context("fp32", "float32", cpu, "bf16 emulated")]
    threads, matmul = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        torch.set_num_threads(threads + 1)  # float32 sums are split differently
        changed.append(partial.numerics_context("fp32", "float32", cpu, "fp32 asked for"))
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision("medium" if matmul != "medium" else "high")
        changed.append(partial.numerics_context("fp32", "float32", cpu, "fp32 asked for"))
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(matmul)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2-or-another")
    changed.append(partial.numerics_context("fp32", "float32", cpu, "fp32 asked for"))
    monkeypatch.undo()
    monkeypatch.setattr(partial, "code_digest", lambda: "edited")  # an edited abft_lens
    changed.append(partial.numerics_context("fp32", "float32", cpu, "fp32 asked for"))
    assert context not in changed and len(set(changed)) == len(changed)


def test_saved_batches_that_cannot_be_resumed_from_are_ignored(tmp_path):
    from abft_lens.evaluation import Predictions
    from abft_lens.evaluation.partial import PredictionFile

    file = PredictionFile(tmp_path / "set.safetensors")
    assert file.load(n_prompts=10, batch_size=4) is None  # nothing saved
    file.path.write_bytes(b"not a safetensors file")
    assert file.load(n_prompts=10, batch_size=4) is None

    def saved(n: int) -> Predictions:
        return Predictions(torch.randn(n, 2), torch.zeros(n, dtype=torch.long), None, 1.5)

    file.save(saved(8))
    assert len(file.load(n_prompts=10, batch_size=4).true) == 8
    assert file.load(n_prompts=10, batch_size=3) is None  # 8 prompts are not whole batches of 3
    assert file.load(n_prompts=6, batch_size=4) is None  # more prompts than the set holds
    file.save(saved(10))
    assert file.load(n_prompts=10, batch_size=4).seconds == 1.5  # a finished set of 10


def test_only_evaluate_resumes_in_a_folder_holding_saved_batches(tmp_path):
    from abft_lens.runs import EVALUATE_RESUMABLE, PARTIAL_PREDICTIONS_DIR, RUN_LOG, check_out_dir

    evaluate_resumes = EVALUATE_RESUMABLE
    (tmp_path / RUN_LOG).write_text("")
    assert check_out_dir(tmp_path) == tmp_path  # a failed job's log: any job
    (tmp_path / PARTIAL_PREDICTIONS_DIR).mkdir()
    assert check_out_dir(tmp_path, resumable=evaluate_resumes) == tmp_path
    with pytest.raises(ConfigError, match="not empty"):
        check_out_dir(tmp_path)  # find-heads, finetune
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="not empty"):
        check_out_dir(tmp_path, resumable=evaluate_resumes)  # a finished evaluation is not replaced


def test_the_evaluate_job_resumes_every_part_in_its_folder_and_removes_the_saved_batches(tiny_gpt2, sst2, tmp_path):
    from abft_lens.evaluation import run_evaluation
    from abft_lens.runs import PARTIAL_PREDICTIONS_DIR

    def config(out, overwrite=False):  # every part: test set, calibration, unseen labels, 0-shot, ICL tests, robustness
        return EvaluateConfig(dataset="sst2", n_test=6, demo_sets=1, calibrate=True, n_calibration=8, unseen_labels=True,
                              icl_tests=True, robustness=True, out=str(out), overwrite=overwrite)

    with counted_forwards(tiny_gpt2) as forwards:
        whole = run_evaluation(config(tmp_path / "whole"), model=tiny_gpt2, progress=False)
    out = tmp_path / "interrupted"
    with counted_forwards(tiny_gpt2, interrupt_at=len(forwards)), pytest.raises(Interrupted):
        run_evaluation(config(out), model=tiny_gpt2, progress=False)  # stopped at its last batch
    assert any((out / PARTIAL_PREDICTIONS_DIR).glob("*.safetensors"))
    with counted_forwards(tiny_gpt2) as resumed_forwards:
        resumed = run_evaluation(config(out), model=tiny_gpt2, progress=False)
    assert len(resumed_forwards) == 1  # every other batch of every part was read back
    assert not (out / PARTIAL_PREDICTIONS_DIR).exists()
    pd.testing.assert_frame_equal(resumed.predictions, whole.predictions)
    assert resumed.tables.keys() == whole.tables.keys()
    for name, table in whole.tables.items():
        pd.testing.assert_frame_equal(resumed.tables[name], table, obj=name)

    def timeless(metrics):  # as JSON, where the tiny model's NaN masses (no induction heads) compare equal
        return json.dumps({key: value for key, value in metrics.items()
                           if "seconds" not in key and key != "resumed_prompts"}, sort_keys=True)

    assert timeless(resumed.metrics) == timeless(whole.metrics)
    assert whole.metrics["resumed_prompts"] == 0
    assert 0 < resumed.metrics["resumed_prompts"] < resumed.metrics["n_forwards"]

    # --overwrite (needed where the folder holds earlier results) still reads matching batches back: they
    # are the same computation.
    with counted_forwards(tiny_gpt2, interrupt_at=len(forwards)), pytest.raises(Interrupted):
        run_evaluation(config(tmp_path / "again", overwrite=True), model=tiny_gpt2, progress=False)
    with counted_forwards(tiny_gpt2) as again_forwards:
        again = run_evaluation(config(tmp_path / "again", overwrite=True), model=tiny_gpt2, progress=False)
    assert len(again_forwards) == 1 and again.metrics["resumed_prompts"] == resumed.metrics["resumed_prompts"]


def test_evaluation_is_deterministic_for_a_fixed_seed(tiny_gpt2, sst2):
    config = EvaluateConfig(n_test=4, demo_sets=2, unseen_labels=True)
    first = evaluate(tiny_gpt2, sst2, config, progress=False)
    second = evaluate(tiny_gpt2, sst2, config, progress=False)
    # Identity: the same process and shapes run the same float32 sums.
    pd.testing.assert_frame_equal(first.predictions, second.predictions)
    pd.testing.assert_frame_equal(first.tables["unseen_label"], second.tables["unseen_label"])


def test_unseen_label_prompts_never_show_the_query_label(tiny_gpt2, sst2, predict_calls):
    config = EvaluateConfig(n_test=6, demo_sets=1, unseen_labels=True)
    result = evaluate(tiny_gpt2, sst2, config, progress=False)
    assert set(result.metrics) >= {"unseen_label_accuracy", "random_demo_accuracy", "zero_shot_accuracy"}
    unseen, zero_shot = predict_calls.only("unseen labels"), predict_calls.only("0-shot")
    assert len(unseen) == 6 and all(p.k == 4 and not any(p.correct_demos) for p in unseen.prompts)
    assert all(p.k == 0 for p in zero_shot.prompts)
    # The ordinary prompts do show the query's label sometimes, so the check above is not vacuous.
    assert any(any(p.correct_demos) for p in predict_calls.only("evaluating").prompts)


def test_too_many_test_queries_is_a_clear_error(tiny_gpt2, sst2):
    with pytest.raises(DataError, match="test pool"):
        evaluate(tiny_gpt2, sst2, EvaluateConfig(n_test=100_000), progress=False)


def test_evaluate_datasets_gives_one_row_per_dataset(tiny_gpt2, sst2):
    mr = load_dataset("mr")
    table = evaluate_datasets(tiny_gpt2, [sst2, mr], EvaluateConfig(n_test=2, demo_sets=1), progress=False)
    assert table["dataset"].tolist() == ["sst2", "mr"]
    assert {"accuracy", "macro_f1", "n_inputs"} <= set(table.columns)


def test_run_folders_are_told_from_model_directories_and_set_the_defaults(tiny_gpt2_dir, tmp_path):
    assert not is_run_dir(tiny_gpt2_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"dataset": "mr", "seed": 3}}))
    (run / "trained.safetensors").write_bytes(b"")
    assert is_run_dir(run)
    # Evaluating a run follows its data set and pool seed (test queries never were training examples).
    assert run_defaults(str(run)) == {"dataset": "mr", "pool_seed": 3}
    assert default_out(EvaluateConfig(model_or_run=str(run), dataset="mr")) == run / "evaluate_mr"
    bare = default_out(EvaluateConfig(model_or_run="smollm2-135m"))
    assert bare.as_posix() == "runs/evaluate_smollm2-135m_sst2"


def test_method_comparison_figure_groups_methods_by_dataset():
    from abft_lens.plots import method_comparison

    results = pd.DataFrame({
        "dataset": ["sst2", "sst2", "sst2", "mr"], "method": ["vanilla", "abft", "abft", "vanilla"],
        "seed": [42, 42, 43, 42], "accuracy": [0.6, 0.8, 0.9, 0.55], "macro_f1": [0.5, 0.8, 0.88, 0.5],
    })
    figure = method_comparison(results)  # consistency absent: left out
    assert [a.text for a in figure.layout.annotations] == ["accuracy", "macro f1"]
    abft_accuracy = next(t for t in figure.data if t.name == "abft" and t.yaxis == "y")
    assert list(abft_accuracy.x) == ["sst2"] and abft_accuracy.y[0] == pytest.approx(0.85)
    assert abft_accuracy.error_y.array[0] == pytest.approx(pd.Series([0.8, 0.9]).std())
    vanilla_accuracy = next(t for t in figure.data if t.name == "vanilla" and t.yaxis == "y")
    # one seed and no n_inputs: no spread to draw, and no flat cap that would read as a spread of 0
    assert vanilla_accuracy.error_y.array == (None, None) and not vanilla_accuracy.error_y.visible
    # The axis keeps the data sets' order even where the first method lacks one (abft has no mr).
    assert list(figure.layout.xaxis.categoryarray) == ["sst2", "mr"]


# --- behaviour of the real embedded model (SmolLM2-135M) -----------------------------------------


@pytest.fixture(scope="module")
def sst2_evaluation(smollm2, sst2):
    """Vanilla 4-shot SmolLM2 on 32 SST-2 test queries, with calibration (16 content-free queries)
    and the unseen-label / 0-shot test."""
    config = EvaluateConfig(n_test=32, demo_sets=1, calibrate=True, n_calibration=16, unseen_labels=True,
                            batch_size=8)
    return evaluate(smollm2, sst2, config, progress=False)


@pytest.mark.slow
def test_vanilla_icl_tells_positive_from_negative_on_sst2(sst2_evaluation):
    # Measured (seed 42): accuracy 0.625 on these 32 prompts, 0.66 on 128; mean P(positive) 0.69 on
    # positive queries vs 0.41 on negative ones. Accuracy alone is too noisy at 32 prompts (0.50 on
    # the first 24), so the robust claim is the gap in the positive label's probability.
    frame = sst2_evaluation.predictions
    positive = frame["true_label"] == "positive"
    gap = frame.loc[positive, "prob_positive"].mean() - frame.loc[~positive, "prob_positive"].mean()
    assert gap > 0.15
    assert sst2_evaluation.metrics["accuracy"] > 0.5  # chance


@pytest.mark.slow
def test_calibration_moves_predictions_away_from_the_favoured_label(sst2_evaluation):
    metrics = sst2_evaluation.metrics
    bias = metrics["content_free_probabilities"]
    favoured = max(bias, key=bias.get)
    assert bias[favoured] > 0.55  # the content-free query is not neutral
    assert metrics["calibrated_predicted_distribution"][favoured] < metrics["predicted_distribution"][favoured]
    assert (sst2_evaluation.predictions["calibrated_label"] != sst2_evaluation.predictions["predicted_label"]).any()


@pytest.mark.slow
def test_unseen_label_demonstrations_pull_accuracy_below_random_ones(sst2_evaluation):
    metrics = sst2_evaluation.metrics
    # Measured: 0.08 vs 0.50 (24 prompts), 0.09 vs 0.66 (128): the model copies demonstration labels.
    assert metrics["unseen_label_accuracy"] <= metrics["random_demo_accuracy"] - 0.25


@pytest.mark.slow
def test_the_model_has_label_attending_induction_heads_on_test_prompts(sst2_evaluation):
    assert sst2_evaluation.metrics["induction_heads_per_prompt"] >= 3


@pytest.mark.slow
def test_evaluate_command_writes_metrics_json(smollm2, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from abft_lens import cli
    from abft_lens.evaluation import job

    # In process, with the session's model: the command's own parsing, job and files are real.
    monkeypatch.setattr(job, "load_model_or_run", lambda config: smollm2)  # where run_evaluation looks it up
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli.app, ["evaluate", "smollm2-135m", "--dataset", "sst2", "--n-test", "4",
                                          "--demo-sets", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "accuracy" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_inputs"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["model_or_run"] == "smollm2-135m"
    assert len(pd.read_csv(out / "predictions.csv")) == 4
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["n_test"] == 4 and saved["dataset"] == "sst2"


def test_a_run_is_collapsed_when_most_predictions_are_one_label_far_above_its_true_share():
    # SST-5 as ABFT predicted it: 'bad' 80% of the answers, 20% of the truth.
    truth = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    assert collapsed_label(torch.tensor([0.05, 0.80, 0.05, 0.05, 0.05], dtype=torch.float64), truth) == 1
    # SUBJ's punishment-only ablation: 97.7% 'objective' on a balanced set (51.4% true) is a collapse,
    # though its label is true for more than half the queries.
    assert collapsed_label(torch.tensor([0.977, 0.023], dtype=torch.float64),
                           torch.tensor([0.514, 0.486], dtype=torch.float64)) == 0
    # TEH's ABFT: 85% 'normal' against 57% true, 29 points above.
    assert collapsed_label(torch.tensor([0.854, 0.146], dtype=torch.float64),
                           torch.tensor([0.566, 0.434], dtype=torch.float64)) == 0
    # Mostly one label, but the truth is mostly that label too (15 points less): not a collapse.
    assert collapsed_label(torch.tensor([0.75, 0.25], dtype=torch.float64),
                           torch.tensor([0.6, 0.4], dtype=torch.float64)) is None
    # 70% exactly is not "more than 70%", even far above the truth.
    assert collapsed_label(torch.tensor([0.7, 0.3], dtype=torch.float64),
                           torch.tensor([0.3, 0.7], dtype=torch.float64)) is None
    # 20 points exactly is "at least 20 points", though 0.75 - 0.55 is a hair under 0.2 in floating point.
    assert collapsed_label(torch.tensor([0.75, 0.25], dtype=torch.float64),
                           torch.tensor([0.55, 0.45], dtype=torch.float64)) == 0
    assert collapsed_label(torch.tensor([0.75, 0.25], dtype=torch.float64),
                           torch.tensor([0.56, 0.44], dtype=torch.float64)) is None


def test_the_headline_says_how_far_a_collapsed_run_is_from_the_truth():
    metrics = {"accuracy": 0.531, "macro_f1": 0.383, "n_inputs": 1024, "n_queries": 256, "demo_sets": 4, "k": 4,
               "predicted_distribution": {"objective": 0.977, "subjective": 0.023},
               "true_distribution": {"objective": 0.514, "subjective": 0.486}, "collapsed_onto": "objective",
               "n_forwards": 1024, "seconds": 60.0, "seconds_per_prompt": 0.059}
    collapse = [line for line in headline(metrics) if line.startswith("COLLAPSED")]
    assert collapse == ["COLLAPSED onto 'objective': 98% of the predictions (over 70%), true share 51% "
                        "(at least 20 points below); read accuracy with care"]
    assert not any(line.startswith("COLLAPSED") for line in headline({**metrics, "collapsed_onto": None}))
