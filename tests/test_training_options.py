"""The fine-tuning options of issue 18 on the tiny random GPT-2 (plumbing, seconds): label-covering
training prompts, the relative PID input, kept checkpoints (a killed run still resumes to the same weights)
and the validation accuracy of every kept checkpoint (a LoRA run's too). What the options do to ABFT is measured by
benchmarks/bench_ablations.py, not here."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch

import abft_lens.training.job as training_job  # the module whose _train looks write_checkpoint up
import abft_lens.training.lr_search as lr_search_module  # where select_lr looks FinetuneRunner up
from abft_lens.errors import AbftLensError
from abft_lens.lora import has_lora, remove_lora
from abft_lens.models import load_model
from abft_lens.prompts import share_without_query_label
from abft_lens.runs import (
    CONFIG_FILE,
    LR_SEARCH_FILE,
    RESUME_STATE_FILE,
    TRAINED_FILE,
    VALIDATION_TRAJECTORY_FILE,
    checkpoint_dirs,
    read_trained_tensors,
    run_record,
    trained_tensor_files,
)
from abft_lens.training import (
    FinetuneConfig,
    FinetuneRunner,
    apply_tensors,
    load_trained_model,
    plan_heads,
    run_finetune,
    snapshot,
    trainable_parameters,
    training_prompts,
    validation_accuracy,
    validation_trajectory,
)

TINY = dict(n_train=8, n_val=8, k=2, lr=1e-2, batch_size=4, micro_batch_size=4, steps=4, checkpoint_every=1,
            heads="all", seed=0, precision="fp32")


@pytest.fixture
def model(tiny_gpt2):
    """The session's tiny GPT-2, put back to its initial weights after the test."""
    pristine = {name: p.detach().clone() for name, p in tiny_gpt2.named_parameters()}
    yield tiny_gpt2
    apply_tensors(tiny_gpt2, pristine)


def config_for(model_dir, data, out, **fields) -> FinetuneConfig:
    return FinetuneConfig(model=str(model_dir), dataset=str(data), out=str(out), **{**TINY, **fields})


@pytest.fixture(scope="module")
def kept_run(tiny_gpt2, tiny_gpt2_dir, short_sst2, tmp_path_factory):
    """An uninterrupted 4-step run that keeps its checkpoints (the reference of the resume test)."""
    pristine = snapshot(trainable_parameters(tiny_gpt2, "qk"))
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path_factory.mktemp("kept") / "run", keep_checkpoints=True)
    try:
        result = run_finetune(config, model=tiny_gpt2, progress=False)
    finally:
        apply_tensors(tiny_gpt2, pristine)
    return result


# --- label-covering training prompts ------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["label_covering", "label_covering_resampled"])
def test_label_covering_training_prompts_always_show_the_query_label(model, tiny_gpt2_dir, short_sst2, tmp_path,
                                                                     sampling):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", training_demos=sampling, steps=1)
    train, validation = training_prompts(model, config)
    assert all(prompt.query_label in prompt.demo_labels for prompt in train.prompts)
    assert share_without_query_label(train) == 0.0
    assert validation.metadata["demo_sampling"] == "random"  # validation stands in for the test prompts
    run_finetune(config, model=model, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["training_demos"] == sampling
    assert saved["prompts"]["demo_sampling"] == sampling
    assert saved["prompts"]["share_without_query_label"] == 0.0


# --- what the PID counts ------------------------------------------------------------------------------


def test_the_pid_counts_the_heads_above_the_threshold_whatever_the_loss_acts_on():
    from abft_lens.heads import induction_head_mask
    from abft_lens.training.head_plan import HeadPlan, counted_heads, head_mask_for

    # One prompt of 10 tokens, 2 layers x 2 heads, k = 2: the paper's threshold 2 / (2 + ln 10) is about 0.46,
    # so heads (0, 0) (mass 0.7) and (1, 0) (0.5) pass and (0, 1) (0.2) and (1, 1) (0.1) do not.
    attention = torch.tensor([[[[0.4, 0.3], [0.1, 0.1]], [[0.3, 0.2], [0.0, 0.1]]]])
    lengths = torch.tensor([10])
    induction = induction_head_mask(attention, lengths)
    assert induction.tolist() == [[[True, False], [True, False]]]

    def counted(plan: HeadPlan) -> list:
        mask = head_mask_for(plan, attention, lengths, "paper", 2.0)
        return counted_heads(plan, mask, attention, lengths, "paper", 2.0).tolist()

    assert counted(HeadPlan("per-prompt", (0, 1))) == induction.tolist()
    # No head filter: the loss acts on all 4 heads, the PID still sees the 2 induction heads, not a constant 4.
    assert head_mask_for(HeadPlan("all", (0, 1)), attention, lengths, "paper", 2.0).all()
    assert counted(HeadPlan("all", (0, 1))) == induction.tolist()
    # A fixed head set: those of its heads that are induction heads on the prompt.
    assert counted(HeadPlan("fixed", (0, 1), ((0, 0), (0, 1)))) == [[[True, False], [False, False]]]


def test_steps_logged_before_the_induction_count_existed_give_the_flagged_heads_their_pid_counted():
    from abft_lens.runs import pid_input_counts

    old_all_heads = pd.DataFrame({"step": [1, 2], "flagged_heads": [270.0, 270.0]})  # its PID counted all 270
    assert pid_input_counts(old_all_heads).tolist() == [270.0, 270.0]
    # A per-prompt run resumed across the change: its first step has no induction count.
    resumed = pd.DataFrame({"step": [1, 2], "flagged_heads": [15.4, 24.4], "induction_heads": [float("nan"), 24.4]})
    assert pid_input_counts(resumed).tolist() == [15.4, 24.4]


def test_without_the_head_filter_the_controller_is_fed_the_induction_head_count(model, tiny_gpt2_dir, short_sst2,
                                                                                tmp_path):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", heads="all", steps=3)
    train, _ = training_prompts(model, config)
    plan = plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    runner = FinetuneRunner(model, train, config, 1e-2, plan, trainable_parameters(model, "qk"))
    rows = [runner.step() for _ in range(config.steps)]  # the fixture puts the weights back
    assert all(row["flagged_heads"] == model.cfg.n_layers * model.cfg.n_heads for row in rows)
    assert any(row["induction_heads"] < row["flagged_heads"] for row in rows)  # else this could not tell them apart
    assert runner.controller.history == [row["induction_heads"] for row in rows]

    # A checkpoint from before the PID counted induction heads holds the other count: it does not resume.
    old = {key: value for key, value in runner.state_dict().items() if key != "pid_counts"}
    with pytest.raises(AbftLensError, match="Cannot resume.*--heads all"):
        runner.load_state_dict(old)
    per_prompt = dataclasses.replace(config, heads="per-prompt")
    plan = plan_heads("per-prompt", model.cfg.n_layers, model.cfg.n_heads)
    FinetuneRunner(model, train, per_prompt, 1e-2, plan, trainable_parameters(model, "qk")).load_state_dict(old)


# --- the relative PID input ---------------------------------------------------------------------------


def test_relative_pid_settings_reach_the_controller_and_the_saved_config(model, tiny_gpt2_dir, short_sst2, tmp_path):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", pid_input="relative", pid_reference_heads=20.0,
                        heads="per-prompt", steps=3)
    train, _ = training_prompts(model, config)
    plan = plan_heads(config.heads, model.cfg.n_layers, model.cfg.n_heads, config.head_top)
    runner = FinetuneRunner(model, train, config, 1e-2, plan, trainable_parameters(model, "qk"))
    assert (runner.controller.config.pid_input, runner.controller.config.pid_reference_heads) == ("relative", 20.0)
    result = run_finetune(config, model=model, progress=False)
    assert run_record(result.run_dir)["pid_input"] == "relative"
    assert result.metrics["punish_weight"].notna().all()


# --- kept checkpoints ----------------------------------------------------------------------------------


def test_keep_checkpoints_keeps_every_checkpoint_and_drops_only_their_optimiser_state(kept_run):
    kept = checkpoint_dirs(kept_run.run_dir)
    assert [step for step, _ in kept] == [1, 2, 3, 4]
    assert all((folder / TRAINED_FILE).is_file() and not (folder / RESUME_STATE_FILE).exists() for _, folder in kept)
    final, last = read_trained_tensors(kept_run.run_dir / TRAINED_FILE), read_trained_tensors(kept[-1][1] / TRAINED_FILE)
    assert all(torch.equal(final[name], last[name]) for name in final)


def test_without_keep_checkpoints_a_finished_run_keeps_none(model, tiny_gpt2_dir, short_sst2, tmp_path):
    result = run_finetune(config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", steps=2), model=model, progress=False)
    assert checkpoint_dirs(result.run_dir) == [] and (result.run_dir / TRAINED_FILE).is_file()


def kill_after_step(monkeypatch, step: int) -> None:
    write_checkpoint = training_job.write_checkpoint

    def write_then_die(run_dir, runner, **kwargs):
        path = write_checkpoint(run_dir, runner, **kwargs)
        if runner.completed == step:
            raise RuntimeError(f"killed after the step-{step} checkpoint")
        return path

    monkeypatch.setattr(training_job, "write_checkpoint", write_then_die)


def run_killed_after(step: int, config, model, monkeypatch) -> None:
    """Run ``config`` until the process "dies" right after its step-``step`` checkpoint."""
    kill_after_step(monkeypatch, step)
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(config, model=model, progress=False)
    monkeypatch.undo()


def test_a_killed_run_that_keeps_checkpoints_resumes_to_the_same_weights(kept_run, model, tiny_gpt2_dir, short_sst2,
                                                                         tmp_path, monkeypatch):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", keep_checkpoints=True)
    pristine = snapshot(trainable_parameters(model, "qk"))
    run_killed_after(2, config, model, monkeypatch)
    # Only the newest checkpoint can be resumed from; the older one keeps its tensors.
    assert [(step, (folder / RESUME_STATE_FILE).is_file()) for step, folder in checkpoint_dirs(config.run_dir())] \
        == [(1, False), (2, True)]
    apply_tensors(model, pristine)  # a fresh process would load the base model
    resumed = run_finetune(dataclasses.replace(config, resume=True), model=model, progress=False)
    assert resumed.resumed_from_step == 2
    assert [step for step, _ in checkpoint_dirs(config.run_dir())] == [1, 2, 3, 4]
    final, reference = (read_trained_tensors(run.run_dir / TRAINED_FILE) for run in (resumed, kept_run))
    assert all(torch.equal(final[name], reference[name]) for name in reference)
    assert resumed.metrics["loss"].tolist() == kept_run.metrics["loss"].tolist()


SEARCH = dict(lr=None, lr_grid=(1e-3, 1e-2, 1e-1), lr_search_steps=2, steps=2)


@pytest.mark.parametrize(("trial_steps", "expected"), [("default", 3), (1, 1)])
def test_each_lr_trial_is_as_long_as_the_run_unless_told(trial_steps, expected, model, tiny_gpt2_dir, short_sst2,
                                                         tmp_path, monkeypatch):
    # Full-length trials are the default because they predicted the test result best (RESULTS.md, lr choice).
    trial_lengths = []
    runner_class = lr_search_module.FinetuneRunner

    def counted_runner(model, prompts, config, *rest):
        trial_lengths.append(config.steps)
        return runner_class(model, prompts, config, *rest)

    monkeypatch.setattr(lr_search_module, "FinetuneRunner", counted_runner)
    pristine = snapshot(trainable_parameters(model, "qk"))
    told = {} if trial_steps == "default" else {"lr_search_steps": trial_steps}
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", lr=None, lr_grid=(1e-3, 1e-2), steps=3, **told)
    result = run_finetune(config, model=model, progress=False)
    apply_tensors(model, pristine)
    assert trial_lengths == [expected, expected] and result.lr_search.steps == expected
    assert len(result.metrics) == 3  # the run itself keeps its own length


def test_a_killed_lr_search_goes_on_from_its_finished_trials_to_the_same_run(model, tiny_gpt2_dir, short_sst2,
                                                                             tmp_path, monkeypatch):
    pristine = snapshot(trainable_parameters(model, "qk"))
    whole = run_finetune(config_for(tiny_gpt2_dir, short_sst2, tmp_path / "whole", **SEARCH), model=model,
                         progress=False)
    apply_tensors(model, pristine)

    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "killed", **SEARCH)
    save_progress = training_job._save_lr_search_progress

    def save_then_die(run_dir, config, so_far, precision_reasons):
        save_progress(run_dir, config, so_far, precision_reasons)
        if len(so_far["trials"]) == 2:
            raise RuntimeError("killed after the second lr trial")

    monkeypatch.setattr(training_job, "_save_lr_search_progress", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(config, model=model, progress=False)
    monkeypatch.undo()
    run_dir = config.run_dir()
    saved_file = json.loads((run_dir / LR_SEARCH_FILE).read_text())
    saved = saved_file["lr_search"]
    assert saved["trials"] == whole.lr_search.trials[:2] and not (run_dir / CONFIG_FILE).exists()
    whole_record = json.loads((whole.run_dir / CONFIG_FILE).read_text())
    assert saved_file["precision_reasons"] == [whole_record["precision_reason"]]
    # As if the killed process ran on another machine: its trials' times were measured under another reason.
    started = "auto: another CPU, so bf16 would not be faster"
    (run_dir / LR_SEARCH_FILE).write_text(json.dumps({**saved_file, "precision_reasons": [started]}))
    apply_tensors(model, pristine)  # a fresh process would load the base model
    with pytest.raises(AbftLensError, match=r"lr_search.json was made with other settings \(lr_grid"):
        run_finetune(dataclasses.replace(config, resume=True, lr_grid=(1e-3, 3e-3)), model=model, progress=False)

    # A fresh run (no --resume) killed in its first trial leaves no older run's trials to be resumed into it.
    fresh = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "fresh", **SEARCH)
    fresh.run_dir().mkdir(parents=True)
    shutil.copy(run_dir / LR_SEARCH_FILE, fresh.run_dir() / LR_SEARCH_FILE)

    def dying_runner(*args):
        raise RuntimeError("killed in the first lr trial")

    monkeypatch.setattr(lr_search_module, "FinetuneRunner", dying_runner)
    with pytest.raises(RuntimeError, match="killed"):
        run_finetune(fresh, model=model, progress=False)
    monkeypatch.undo()
    assert not (fresh.run_dir() / LR_SEARCH_FILE).exists()
    apply_tensors(model, pristine)

    trial_lrs, validation_passes = [], []
    runner_class, score = lr_search_module.FinetuneRunner, lr_search_module.validation_accuracy

    def counted_runner(model, prompts, config, lr, *args):
        trial_lrs.append(lr)
        return runner_class(model, prompts, config, lr, *args)

    def counted_score(*args):
        validation_passes.append(args)
        return score(*args)

    monkeypatch.setattr(lr_search_module, "FinetuneRunner", counted_runner)
    monkeypatch.setattr(lr_search_module, "validation_accuracy", counted_score)
    resumed = run_finetune(dataclasses.replace(config, resume=True), model=model, progress=False)
    assert trial_lrs == [1e-1]  # only the trial the killed process had not finished
    assert len(validation_passes) == 1  # that trial's: the untrained model's accuracy was saved too
    assert resumed.lr_search.trials == whole.lr_search.trials and resumed.lr == whole.lr
    assert resumed.lr_search.baseline_accuracy == whole.lr_search.baseline_accuracy
    assert resumed.lr_search.seconds > saved["seconds"] > 0  # the killed process's trials count
    record = json.loads((run_dir / CONFIG_FILE).read_text())
    assert record["lr_search"]["trials"] == whole.lr_search.trials
    assert record["precision_reasons"] == [started, record["precision_reason"]]
    assert "lr search was started under precision" in (run_dir / "run.log").read_text()
    assert "precision_reasons" not in whole_record
    assert not (run_dir / LR_SEARCH_FILE).exists()
    final, reference = (read_trained_tensors(run.run_dir / TRAINED_FILE) for run in (resumed, whole))
    assert all(torch.equal(final[name], reference[name]) for name in reference)


def test_a_run_saved_before_the_new_fields_existed_still_resumes(model, tiny_gpt2_dir, short_sst2, tmp_path,
                                                                 monkeypatch):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run")
    run_killed_after(2, config, model, monkeypatch)
    path = config.run_dir() / "config.json"
    saved = json.loads(path.read_text())
    for field in ("training_demos", "pid_input", "pid_reference_heads", "reward_weight", "keep_checkpoints"):
        del saved["config"][field]
    path.write_text(json.dumps(saved))
    resumed = run_finetune(dataclasses.replace(config, resume=True), model=model, progress=False)
    assert resumed.resumed_from_step == 2 and len(resumed.metrics) == 4
    with pytest.raises(AbftLensError, match="other settings.*training_demos"):
        run_finetune(dataclasses.replace(config, resume=True, training_demos="label_covering"), model=model,
                     progress=False)


def test_a_fixed_lr_run_saved_with_8_step_trials_resumes_under_the_full_length_default(model, tiny_gpt2_dir,
                                                                                      short_sst2, tmp_path,
                                                                                      monkeypatch):
    # Runs started before the default became full-length trials recorded lr_search_steps 8.
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run")
    assert config.lr is not None and config.lr_search_steps is None
    run_killed_after(2, config, model, monkeypatch)
    path = config.run_dir() / "config.json"
    saved = json.loads(path.read_text())
    saved["config"]["lr_search_steps"] = 8
    path.write_text(json.dumps(saved))
    resumed = run_finetune(dataclasses.replace(config, resume=True), model=model, progress=False)
    assert resumed.resumed_from_step == 2 and len(resumed.metrics) == 4


def test_the_precision_reason_is_recorded_and_a_resume_under_another_keeps_both(model, tiny_gpt2_dir, short_sst2,
                                                                               tmp_path, monkeypatch):
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", precision="fp32")
    run_killed_after(2, config, model, monkeypatch)
    path = config.run_dir() / "config.json"
    saved = json.loads(path.read_text())
    assert saved["precision_reason"].startswith("asked for") and "precision_reasons" not in saved
    # As if started with --precision auto on another machine (resolved to fp32 there too): the steps
    # before the kill were timed under that reason, the rest under this one; config.json keeps both.
    started = "auto: another CPU, so bf16 would not be faster"
    path.write_text(json.dumps({**saved, "precision_reason": started}))
    resumed = run_finetune(dataclasses.replace(config, resume=True), model=model, progress=False)
    record = json.loads(path.read_text())
    assert resumed.resumed_from_step == 2 and record["precision_reason"].startswith("asked for")
    assert record["precision_reasons"] == [started, record["precision_reason"]]
    assert "resumes under" in (resumed.run_dir / "run.log").read_text()


# --- validation accuracy along the kept trajectory --------------------------------------------------------


def test_validation_trajectory_scores_the_base_model_and_every_kept_checkpoint(kept_run, model, monkeypatch):
    from abft_lens.training import trajectory

    scored = []  # the trained weights in place at each scoring
    score = trajectory.validation_accuracy

    def recording_weights(scored_model, *args, **kwargs):
        scored.append(snapshot(trainable_parameters(scored_model, "qk")))
        return score(scored_model, *args, **kwargs)

    monkeypatch.setattr(trajectory, "validation_accuracy", recording_weights)
    before = snapshot(trainable_parameters(model, "qk"))
    frame = validation_trajectory(kept_run.run_dir, model=model, progress=False)
    # Accuracy on 8 prompts of a random model may not move, so check what was scored: the base weights,
    # then each kept checkpoint's and the final tensors, in step order.
    expected = [before] + [read_trained_tensors(path) for _, path in trained_tensor_files(kept_run.run_dir)]
    assert len(scored) == len(expected) == 5
    for weights, tensors in zip(scored, expected, strict=True):
        assert weights.keys() == tensors.keys() and all(torch.equal(weights[n], tensors[n]) for n in tensors)
    assert not all(torch.equal(scored[0][n], scored[-1][n]) for n in before)  # training moved them
    assert all(torch.equal(value, before[name]) for name, value in snapshot(trainable_parameters(model, "qk")).items())
    assert frame["step"].tolist() == [0, 1, 2, 3, 4]
    assert frame["validation_accuracy"].between(0, 1).all() and (frame["n_validation"] == 8).all()
    assert (frame["lr"] == kept_run.lr).all()
    _, validation = training_prompts(model, kept_run.config)
    assert frame["validation_accuracy"].iloc[0] == validation_accuracy(model, validation, 4, "fp32")
    apply_tensors(model, read_trained_tensors(kept_run.run_dir / TRAINED_FILE))
    assert frame["validation_accuracy"].iloc[-1] == validation_accuracy(model, validation, 4, "fp32")
    assert pd.read_csv(kept_run.run_dir / VALIDATION_TRAJECTORY_FILE)["step"].tolist() == [0, 1, 2, 3, 4]


def test_validation_trajectory_of_a_lora_run_scores_its_adapters_and_leaves_the_model_plain(tiny_gpt2_dir, short_sst2,
                                                                                          tmp_path):
    model = load_model(str(tiny_gpt2_dir))  # its own model: a LoRA run leaves its adapters on the one it is given
    config = config_for(tiny_gpt2_dir, short_sst2, tmp_path / "run", method="e2e-lora", lora_rank=2, lora_alpha=4.0,
                        steps=2, keep_checkpoints=True)
    run_finetune(config, model=model, progress=False)
    remove_lora(model, merge=False)
    before = snapshot(trainable_parameters(model, "qk"))
    frame = validation_trajectory(config.run_dir(), model=model, progress=False)
    assert not has_lora(model)
    assert all(torch.equal(value, before[name]) for name, value in snapshot(trainable_parameters(model, "qk")).items())
    assert frame["step"].tolist() == [0, 1, 2]
    _, validation = training_prompts(model, config)
    assert frame["validation_accuracy"].iloc[0] == validation_accuracy(model, validation, 4, "fp32")  # B = 0: the base
    trained = load_trained_model(config.run_dir(), merge=False)
    assert frame["validation_accuracy"].iloc[-1] == validation_accuracy(trained, validation, 4, "fp32")
