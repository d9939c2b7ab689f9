"""Bad input fails fast (issue #16): one line ``error: ...`` on stderr and exit status 2, before any
model loads or data is read. No test here loads a model: the model is a missing .gguf (so even a check
that did not happen would end in a quick error, not a model load) and jobs that should start are
replaced by stubs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from abft_lens import cli
from abft_lens.errors import AbftLensError, ConfigError, DataError, LabelTokenError
from abft_lens.evaluation import EvaluateConfig
from abft_lens.find_heads import FindHeadsConfig
from abft_lens.runs import check_out_dir, load_config, with_overrides
from abft_lens.training import FinetuneConfig, load_trained_model, read_trained_tensors

MISSING_MODEL = "missing-model.gguf"


def run_main(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``abft-lens ARGS`` (in process)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(args))
    return stop.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


class Reached(AbftLensError):
    """Raised by a stub job: the CLI got as far as starting the work."""


@pytest.fixture
def stub_jobs(monkeypatch):
    """The find-heads, finetune and evaluate jobs replaced by stubs that record their config."""
    import abft_lens.evaluation
    import abft_lens.find_heads
    import abft_lens.training

    configs = {}

    def stub(name):
        def job(config, *args, **kwargs):
            configs[name] = config
            raise Reached(f"{name} started")
        return job

    monkeypatch.setattr(abft_lens.find_heads, "find_heads", stub("find-heads"))
    monkeypatch.setattr(abft_lens.training, "run_finetune", stub("finetune"))
    monkeypatch.setattr(abft_lens.evaluation, "run_evaluation", stub("evaluate"))
    return configs


# --- 1. an existing output folder ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["find-heads", "evaluate"])
def test_an_existing_non_empty_out_folder_is_refused_without_overwrite(command, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "heads.csv").write_text("kept\n")
    code, err = run_main(capsys, command, MISSING_MODEL, "--out", str(out))
    assert_one_line_error(code, err, str(out), "not empty", "--overwrite")
    assert (out / "heads.csv").read_text() == "kept\n"


@pytest.mark.parametrize("command", ["find-heads", "evaluate"])
def test_overwrite_or_an_empty_folder_lets_the_job_start(command, capsys, tmp_path, stub_jobs):
    out = tmp_path / "run"
    out.mkdir()
    code, err = run_main(capsys, command, MISSING_MODEL, "--out", str(out))  # empty: fine
    assert code == 2 and f"{command} started" in err
    (out / "heads.csv").write_text("old\n")
    code, err = run_main(capsys, command, MISSING_MODEL, "--out", str(out), "--overwrite")
    assert code == 2 and f"{command} started" in err
    assert stub_jobs[command].overwrite is True


@pytest.mark.parametrize("command", ["find-heads", "evaluate"])
def test_only_evaluate_goes_on_in_a_folder_of_an_interrupted_evaluation(command, capsys, tmp_path, stub_jobs):
    from abft_lens.runs import PARTIAL_PREDICTIONS_DIR, RUN_LOG

    out = tmp_path / "run"
    (out / PARTIAL_PREDICTIONS_DIR).mkdir(parents=True)
    (out / RUN_LOG).write_text("interrupted\n")
    code, err = run_main(capsys, command, MISSING_MODEL, "--out", str(out))
    if command == "evaluate":
        assert code == 2 and "evaluate started" in err
    else:
        assert_one_line_error(code, err, str(out), "not empty", "--overwrite")


def test_check_out_dir_refuses_files_paths_under_files_and_unwritable_places(tmp_path, monkeypatch):
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_out_dir(file)
    with pytest.raises(ConfigError, match="cannot create"):
        check_out_dir(file / "run", overwrite=True)
    import abft_lens.runs

    monkeypatch.setattr(abft_lens.runs.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="permission denied"):
        check_out_dir(tmp_path / "elsewhere")


# --- 2. enumerations and config errors ---------------------------------------------------------------


@pytest.mark.parametrize("args, field", [
    (("find-heads", "--rank-by", "nonsense"), "rank_by"),
    (("find-heads", "--threshold", "nonsense"), "threshold"),
    (("finetune", "--method", "nonsense"), "method"),
    (("finetune", "--terms", "nonsense"), "terms"),
    (("finetune", "--threshold", "nonsense"), "threshold"),
    (("finetune", "--e2e-softmax", "nonsense"), "e2e_softmax"),
    (("finetune", "--trainable", "nonsense"), "trainable"),
    (("finetune", "--precision", "nonsense"), "precision"),
    (("finetune", "--dtype", "nonsense"), "dtype"),
    (("finetune", "--pid-input", "nonsense"), "pid_input"),
    (("finetune", "--training-demos", "nonsense"), "training_demos"),
    (("evaluate", "--precision", "nonsense"), "precision"),
    (("show-attention", "--threshold", "nonsense"), "threshold"),
    (("analyze-gradients", "--precision", "nonsense"), "precision"),
])
def test_a_bad_choice_is_one_line_naming_field_and_value(args, field, capsys, tmp_path):
    command, *flags = args
    code, err = run_main(capsys, command, MISSING_MODEL, *flags, "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, f"{field} must be one of", "'nonsense'")


@pytest.mark.parametrize("command, default", [("finetune", "[default: auto]"), ("find-heads", "[default: paper]"),
                                              ("analyze-gradients", "[default: fp32")])
def test_help_shows_the_defaults_its_options_name(command, default, capsys):
    # Rich markup read "[default: ...]" as a tag and dropped it from every option's help.
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0 and default in " ".join(capsys.readouterr().out.split())  # whatever the width


def test_landscape_rejects_a_bad_precision_while_parsing(capsys, tmp_path):
    code, err = run_main(capsys, "landscape", "--precision", "nonsense", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "precision must be one of", "'nonsense'")


def test_every_job_config_raises_config_error():
    from analysis.jobs import AnalyzeGradientsConfig, LandscapeConfig

    for make in (lambda: FindHeadsConfig(rank_by="nonsense"), lambda: FindHeadsConfig(dtype="float16"),
                 lambda: FinetuneConfig(method="nonsense"), lambda: FinetuneConfig(dtype="bfloat16", precision="fp32"),
                 lambda: EvaluateConfig(n_test=0), lambda: EvaluateConfig(precision="fp16"),
                 lambda: AnalyzeGradientsConfig(softmax="nonsense"), lambda: AnalyzeGradientsConfig(n_prompts=0),
                 lambda: LandscapeConfig(precision="nonsense"), lambda: LandscapeConfig(grid=1)):
        with pytest.raises(ConfigError):
            make()


@pytest.mark.parametrize("command", ["find-heads", "finetune"])
def test_a_config_file_sets_the_job_s_fields_and_flags_override_it(command, capsys, tmp_path, stub_jobs):
    fields = {"dataset": "mr", "k": 2, "seed": 5}
    (tmp_path / "job.json").write_text(json.dumps(fields))
    code, err = run_main(capsys, command, MISSING_MODEL, "--config", str(tmp_path / "job.json"), "--k", "3",
                         "--out", str(tmp_path / "out"))
    assert code == 2 and f"{command} started" in err
    config = stub_jobs[command]
    assert (config.dataset, config.seed, config.k, config.model) == ("mr", 5, 3, MISSING_MODEL)
    (tmp_path / "bad.json").write_text(json.dumps({"datset": "mr"}))
    code, err = run_main(capsys, command, MISSING_MODEL, "--config", str(tmp_path / "bad.json"))
    assert_one_line_error(code, err, "unknown field", "datset")


def test_with_overrides_and_config_files_are_validated_at_once(tmp_path):
    with pytest.raises(ConfigError, match="k must be an integer >= 1; got 0"):
        with_overrides(FindHeadsConfig(), {"k": 0})
    (tmp_path / "bad.json").write_text(json.dumps({"rank_by": "nonsense"}))
    with pytest.raises(ConfigError, match="rank_by"):
        load_config(tmp_path / "bad.json", FindHeadsConfig)


# --- 3. --batch-size alone ----------------------------------------------------------------------------


def test_batch_size_alone_lowers_the_micro_batch_but_an_explicit_conflict_is_an_error(capsys, tmp_path, stub_jobs):
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--batch-size", "4", "--out", str(tmp_path / "a"))
    assert code == 2 and "finetune started" in err
    assert (stub_jobs["finetune"].batch_size, stub_jobs["finetune"].micro_batch_size) == (4, 4)
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--batch-size", "4", "--micro-batch-size", "8",
                         "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, "micro_batch_size (8) exceeds batch_size (4)")


# --- 3b. LoRA and 4-bit base weights (issue 14) -------------------------------------------------------


def test_lora_rank_trains_abft_or_e2e_as_lora(capsys, tmp_path, stub_jobs):
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--lora-rank", "8", "--out", str(tmp_path / "a"))
    assert code == 2 and "finetune started" in err
    assert (stub_jobs["finetune"].method, stub_jobs["finetune"].lora_rank) == ("abft-lora", 8)
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--method", "e2e", "--lora-rank", "4", "--lora-alpha",
                         "4", "--out", str(tmp_path / "b"))
    assert code == 2 and "finetune started" in err
    config = stub_jobs["finetune"]
    assert (config.method, config.lora_rank, config.lora_alpha, config.lora_dropout) == ("e2e-lora", 4, 4.0, 0.0)


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="4-bit weights can load here")
def test_4bit_without_a_gpu_or_bitsandbytes_is_one_line_before_the_model_loads(capsys, tmp_path):
    # MISSING_MODEL would fail to load with another message: this one comes first.
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--method", "e2e-lora", "--load-in-4bit",
                         "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "load_in_4bit needs", "fp32 or bf16")
    assert not (tmp_path / "a").exists()


def test_4bit_weights_need_a_lora_method(capsys, tmp_path):
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--load-in-4bit", "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "load_in_4bit", "LoRA method", "not abft")


# --- 3c. the training options of issue 18 (ablations and remedies) -------------------------------------


def test_the_issue_18_options_reach_the_finetune_config(capsys, tmp_path, stub_jobs):
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--training-demos", "label_covering", "--pid-input",
                         "relative", "--pid-reference-heads", "30", "--keep-checkpoints", "--initial-punish-weight",
                         "0.25", "--reward-weight", "2", "--out", str(tmp_path / "a"))
    assert code == 2 and "finetune started" in err
    config = stub_jobs["finetune"]
    assert (config.training_demos, config.pid_input, config.pid_reference_heads, config.keep_checkpoints) == (
        "label_covering", "relative", 30.0, True)
    assert config.loss_config().initial_punish_weight == 0.25 and config.loss_config().reward_weight == 2.0
    code, err = run_main(capsys, "finetune", MISSING_MODEL, "--out", str(tmp_path / "b"))
    defaults = stub_jobs["finetune"]  # the paper's recipe when no option is given
    assert (defaults.training_demos, defaults.pid_input, defaults.keep_checkpoints) == ("random", "count", False)


def test_validate_checkpoints_of_a_folder_that_is_not_a_run_is_one_line(capsys, tmp_path):
    code, err = run_main(capsys, "validate-checkpoints", str(tmp_path))
    assert_one_line_error(code, err, "is not a fine-tuning run folder")


# --- 4. one line instead of a traceback ---------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (("finetune", "--lr", "-1"), "got lr -1.0"),
    (("finetune", "--steps", "0"), "steps must be an integer >= 1; got 0"),
    (("finetune", "--batch-size", "0"), "batch_size must be an integer >= 1; got 0"),
    (("finetune", "--method", "e2e-lora", "--lora-rank", "0"), "lora_rank must be an integer >= 1; got 0"),
    (("finetune", "--method", "e2e-lora", "--lora-dropout", "1"), "lora_dropout must be a number in [0, 1); got 1.0"),
    (("finetune", "--pid-reference-heads", "0"), "pid_reference_heads must be a finite number > 0, got 0.0"),
    (("finetune", "--reward-weight", "-1"), "reward_weight must be a finite number >= 0, got -1.0"),
    (("finetune", "--initial-punish-weight", "nan"), "initial_punish_weight must be a finite number >= 0, got nan"),
    (("find-heads", "--batch-size", "0"), "batch_size must be an integer >= 1; got 0"),
    (("find-heads", "--n-prompts", "0"), "n_prompts must be an integer >= 1; got 0"),
    (("find-heads", "--k", "0"), "k must be an integer >= 1; got 0"),
])
def test_a_bad_number_is_one_line(args, fragment, capsys, tmp_path):
    command, *flags = args
    code, err = run_main(capsys, command, MISSING_MODEL, *flags, "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, fragment)


def test_a_gguf_of_random_bytes_is_one_line(capsys, tmp_path):
    model = tmp_path / "x.gguf"
    model.write_bytes(bytes(range(256)) * 64)
    code, err = run_main(capsys, "find-heads", str(model), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, str(model), "not a GGUF file")


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(capsys, tmp_path, monkeypatch):
    import abft_lens.find_heads

    def broken(config, *args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(abft_lens.find_heads, "find_heads", broken)
    code, err = run_main(capsys, "find-heads", MISSING_MODEL, "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "error: RuntimeError: boom second line (rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["find-heads", MISSING_MODEL, "--out", str(tmp_path / "b"), "--debug"])
    monkeypatch.setenv("ABFT_LENS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["find-heads", MISSING_MODEL, "--out", str(tmp_path / "c")])


@pytest.mark.parametrize("command, message", [
    ("finetune", "interrupted; rerun the same command with --resume to continue"),
    ("find-heads", "interrupted"),
])
def test_ctrl_c_is_one_line_and_exit_130(command, message, capsys, tmp_path, monkeypatch):
    import abft_lens.find_heads
    import abft_lens.training

    def interrupted(config, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(abft_lens.find_heads, "find_heads", interrupted)
    monkeypatch.setattr(abft_lens.training, "run_finetune", interrupted)
    code, err = run_main(capsys, command, MISSING_MODEL, "--out", str(tmp_path / "out"))
    assert code == 130
    assert err.strip().splitlines() == [message]


# --- 5. bad data files ----------------------------------------------------------------------------


def test_an_empty_csv_is_a_data_error_naming_the_file(tmp_path):
    from abft_lens.data import load_dataset

    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        load_dataset(str(path))


def test_a_broken_jsonl_line_is_a_data_error_naming_file_and_line(tmp_path, capsys):
    from abft_lens.data import load_dataset

    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": \n'
                    '{"text": "fine", "label": "negative"}\n')
    with pytest.raises(DataError, match=r"mine\.jsonl, line 2: not valid JSON"):
        load_dataset(str(path))
    code, err = run_main(capsys, "find-heads", MISSING_MODEL, "--dataset", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{path}, line 2")  # the data fails before the (missing) model loads


# --- 6. run folders -------------------------------------------------------------------------------


def test_a_folder_with_trained_tensors_but_no_config_json_is_not_a_model(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_file({"w": torch.zeros(2)}, str(run / "trained.safetensors"))
    code, err = run_main(capsys, "evaluate", str(run), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, str(run), "run folder", "no config.json")


def test_a_truncated_trained_safetensors_names_the_file_and_the_remedy(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"model": MISSING_MODEL}}))
    trained = run / "trained.safetensors"
    save_file({"w": torch.zeros(64)}, str(trained))
    trained.write_bytes(trained.read_bytes()[:-100])
    with pytest.raises(AbftLensError, match=r"trained\.safetensors.*truncated or damaged.*--resume"):
        read_trained_tensors(trained)
    with pytest.raises(AbftLensError, match="truncated or damaged"):
        load_trained_model(run)  # read before the model loads
    code, err = run_main(capsys, "evaluate", str(run), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, str(trained), "--resume")


def test_evaluating_a_run_takes_its_training_settings_over_a_config_file_and_flags_over_both(capsys, tmp_path,
                                                                                            stub_jobs):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"model": MISSING_MODEL, "dataset": "trec", "k": 6,
                                                            "seed": 43}}))
    save_file({"w": torch.zeros(2)}, str(run / "trained.safetensors"))
    (tmp_path / "eval.json").write_text(json.dumps({"dataset": "mr", "k": 2, "pool_seed": 42, "n_test": 64}))
    code, err = run_main(capsys, "evaluate", str(run), "--config", str(tmp_path / "eval.json"), "--out",
                         str(tmp_path / "a"))
    assert code == 2 and "evaluate started" in err
    config = stub_jobs["evaluate"]
    # The run's pool seed keeps the test pool disjoint from the pool it trained on.
    assert (config.dataset, config.k, config.pool_seed, config.n_test) == ("trec", 6, 43, 64)
    code, err = run_main(capsys, "evaluate", str(run), "--config", str(tmp_path / "eval.json"), "--dataset", "mr",
                         "--k", "4", "--out", str(tmp_path / "b"))
    assert code == 2 and "evaluate started" in err
    assert (stub_jobs["evaluate"].dataset, stub_jobs["evaluate"].k, stub_jobs["evaluate"].pool_seed) == ("mr", 4, 43)


# --- 7. the multi-token label-word message ------------------------------------------------------------


class CharTokenizer:
    """One token per character."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_a_multi_token_label_word_suggests_only_label_words():
    from abft_lens.prompts import label_token_ids

    with pytest.raises(LabelTokenError) as error:
        label_token_ids(CharTokenizer(), ["ab", "c"], "sentiment: ")
    message = str(error.value)
    assert "'ab' is not a single token" in message and "--label-words" in message
    assert "first-token" not in message and "first_token" not in message


def test_cli_options_named_in_messages_exist():
    """Every ``--flag`` the messages above suggest is an option of the command."""
    import typer.main

    command = typer.main.get_command(cli.app)
    options = {name for sub in command.commands.values() for param in sub.params for name in param.opts}
    assert {"--label-words", "--overwrite", "--resume", "--out"} <= options
