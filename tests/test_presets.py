"""Presets: `--config` takes a file or a preset name from any directory, and an installed wheel ships them.

README "Configuration" and "Commands" describe the contract: an existing path wins, then a preset
name with or without `.yaml` (or written as `configs/NAME.yaml`), else one line listing the presets,
the closest name first, exit 2. `drnn presets` describes them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import pythonpath_with_repo

import drnn_cli
from drnn_cli.config import load_config
from drnn_cli.errors import ConfigError
from drnn_cli.model_size import parameter_count
from drnn_cli.models import build_model, count_parameters
from drnn_cli.presets import (
    describe_presets,
    find_config,
    list_presets,
    presets_dir,
    read_preset,
    shadowed_preset_note,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PRESET_KEYS = {
    "name",
    "description",
    "cell",
    "num_layers",
    "hidden_size",
    "embedding_dim",
    "vocab_size",
    "parameters",
    "measured",
    "path",
}
# nn.LSTM parameters per layer: 4 gates × H × (input + H) weights and 2 × 4H biases; the decoder H·V + V.
# lstm2: V = 28 one-hot inputs, H = 256, 2 layers.
LSTM2_PARAMETERS = (4 * 256 * (28 + 256) + 8 * 256) + (4 * 256 * (256 + 256) + 8 * 256) + (256 * 28 + 28)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def listed_presets(stderr: str) -> list[str]:
    """The names an unknown --config lists, in their order."""
    listing = stderr.split("presets (closest first): ", 1)[1].split(" (drnn presets", 1)[0]
    return listing.split(", ")


def configs_names() -> set[str]:
    return {path.relative_to(CONFIGS).with_suffix("").as_posix() for path in CONFIGS.rglob("*.yaml")}


# ---------------------------------------------------------------------------------------------
# Resolution order


def test_the_checkout_reads_its_presets_from_configs():
    assert presets_dir() == CONFIGS
    assert {preset.name for preset in list_presets()} == configs_names()
    assert {"lstm2", "quick", "d2l/ch9_3_deep_lstm"} <= configs_names()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("lstm2", "lstm2.yaml"),
        ("lstm2.yaml", "lstm2.yaml"),
        ("configs/lstm2.yaml", "lstm2.yaml"),  # the README's repository path, from any directory
        ("d2l/ch9_3_deep_lstm", "d2l/ch9_3_deep_lstm.yaml"),
        ("d2l/ch9_3_deep_lstm.yaml", "d2l/ch9_3_deep_lstm.yaml"),
    ],
)
def test_preset_names_resolve_from_any_directory(workdir: Path, value: str, expected: str):
    assert find_config(value) == CONFIGS / expected


def test_an_existing_path_wins_over_the_preset_of_the_same_name(workdir: Path):
    (workdir / "lstm2.yaml").write_text("model: {hidden_size: 7}\n")
    assert find_config("lstm2.yaml") == Path("lstm2.yaml")
    assert load_config(find_config("lstm2.yaml")).model.hidden_size == 7
    # only the path as written counts: "lstm2" names no file here, so it is the preset
    assert load_config(find_config("lstm2")).model.hidden_size == 256


def test_a_file_that_hides_a_preset_with_other_settings_is_said(workdir: Path, cli):
    """A learner's old lstm2.yaml trained 8,860 parameters where the preset has 826,396, into runs/lstm2
    either way, and nothing said which one ran (learner34); a copy of the preset as it is says nothing."""
    (workdir / "lstm2.yaml").write_text("model: {hidden_size: 7}\n")
    said = (
        "--config lstm2.yaml reads the file lstm2.yaml, not the preset lstm2, whose settings differ "
        "(--config configs/lstm2.yaml names the preset)"
    )
    assert shadowed_preset_note("lstm2.yaml", find_config("lstm2.yaml")) == said
    code, out, _ = cli("data", "--config", "lstm2.yaml")
    assert code == 0 and f"note: {said}" in out.splitlines(), out  # with the table it describes
    assert shadowed_preset_note("lstm2", find_config("lstm2")) is None  # the preset itself
    (workdir / "lstm2.yaml").write_bytes((CONFIGS / "lstm2.yaml").read_bytes())
    assert shadowed_preset_note("lstm2.yaml", find_config("lstm2.yaml")) is None  # the same settings
    (workdir / "lstm2.yaml").write_bytes(b"# my copy\n" + (CONFIGS / "lstm2.yaml").read_bytes())
    assert shadowed_preset_note("lstm2.yaml", find_config("lstm2.yaml")) is None  # a comment changes none
    assert shadowed_preset_note("mine.yaml", workdir / "lstm2.yaml") is None  # no preset of that name


def test_drnn_data_without_a_config_says_it_describes_the_defaults_no_preset_keeps(workdir: Path, cli):
    """A bare drnn data showed 170,580 tokens in 152 minibatches where every d2l preset reads 10,000 in 8
    (learner34): it says what it describes."""
    code, out, err = cli("data")
    assert (
        code == 0
        and (
            "note: no --config: this describes the settings' defaults (all of the corpus, minibatches of 32 × 35), "
            "which the presets change; drnn data --config PRESET describes what a preset trains on"
        )
        in out.splitlines()
    ), err
    code, out, _ = cli("data", "--config", "quick")
    assert code == 0 and "no --config" not in out


def test_a_file_that_is_no_config_but_hides_a_preset_says_how_to_name_the_preset(workdir: Path):
    (workdir / "quick").write_text("It was a quick brown fox.\n")  # a text, named like the preset
    with pytest.raises(ConfigError) as refused:
        find_config("quick")
    assert str(refused.value) == (
        "config file quick must be a mapping with sections data, model, train (--config quick read the file "
        "quick, not the preset quick; --config configs/quick.yaml names the preset)"
    )
    assert find_config("configs/quick.yaml") == CONFIGS / "quick.yaml"


def test_a_directory_is_not_a_preset(workdir: Path):
    (workdir / "quick.yaml").mkdir()  # a directory in the way is no config file: the preset is meant
    assert find_config("quick.yaml") == CONFIGS / "quick.yaml"
    for value in ("d2l", "d2l/", "configs/d2l"):
        with pytest.raises(ConfigError, match="no such file and no such preset"):
            find_config(value)
    with pytest.raises(ConfigError, match=r"--config \.: a directory, not a config file, and no such preset"):
        find_config(".")
    for blank in ("", "  "):  # Path("") is the current directory, which is no reason to name a directory
        with pytest.raises(ConfigError) as refused:
            find_config(blank)
        assert (
            str(refused.value)
            == "--config is empty; give a config file or a preset name (drnn presets lists them)"
        )
    os.mkfifo(workdir / "fifo.yaml")  # a FIFO is handed on: reading the config refuses it by name
    with pytest.raises(ConfigError, match="config file fifo.yaml is a FIFO, not a regular file"):
        load_config(find_config("fifo.yaml"))


def test_a_name_with_dotdot_cannot_escape_the_presets_directory(tmp_path: Path, monkeypatch):
    root = tmp_path / "presets"
    (root / "d2l").mkdir(parents=True)
    (root / "a.yaml").write_text("{}\n")
    (root / "d2l" / "b.yaml").write_text("{}\n")
    (tmp_path / "outside.yaml").write_text("{}\n")  # what a naive root / name would reach
    monkeypatch.chdir(root / "d2l")  # so that none of the values below is an existing path
    assert find_config("a", root) == root / "a.yaml"
    assert find_config("d2l/b", root) == root / "d2l" / "b.yaml"
    for value in ("../outside", "../outside.yaml", "d2l/../a", "d2l/../../outside", "/a", "./../a"):
        with pytest.raises(ConfigError, match="no such preset"):
            find_config(value, root)


def test_a_near_miss_that_can_only_mean_one_preset_finds_it(tmp_path: Path, monkeypatch):
    """A learner typed the run directory's name (ch9_3_deep_lstm for d2l/ch9_3_deep_lstm), LSTM2 and
    lstm2.yml, and was refused each time, the preset meant listed first."""
    root = tmp_path / "presets"
    for name in ("lstm2", "d2l/ch9_3_deep_lstm", "d2l/gru", "other/gru"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("ch9_3_deep_lstm", root) == root / "d2l" / "ch9_3_deep_lstm.yaml"
    assert find_config("LSTM2", root) == find_config("lstm2.yml", root) == root / "lstm2.yaml"
    assert find_config("LSTM2.YAML", root) == find_config("Lstm2.YML", root) == root / "lstm2.yaml"
    assert find_config("D2L/CH9_3_Deep_LSTM.yaml", root) == root / "d2l" / "ch9_3_deep_lstm.yaml"
    for ambiguous_or_partial in ("gru", "3_deep_lstm", "x/ch9_3_deep_lstm"):
        with pytest.raises(ConfigError, match="no such preset"):
            find_config(ambiguous_or_partial, root)
    (tmp_path / "ch9_3_deep_lstm").mkdir()  # a folder is no config: the preset is meant (a run's name)
    assert find_config("ch9_3_deep_lstm", root) == root / "d2l" / "ch9_3_deep_lstm.yaml"
    (tmp_path / "LSTM2").write_text("{}\n")  # a file of that name is what was meant
    assert find_config("LSTM2", root) == Path("LSTM2")


def test_an_unknown_name_is_one_line_listing_the_presets_closest_first_exit_2(workdir: Path, cli):
    code, out, err = cli("train", "--config", "no-such-preset")
    assert code == 2 and out == ""
    assert err.startswith("drnn: error: --config no-such-preset: no such file and no such preset")
    assert len(err.strip().splitlines()) == 1
    assert sorted(listed_presets(err)) == sorted(configs_names())
    assert not (workdir / "runs").exists()

    code, _, err = cli("train", "--config", "lstm3")
    assert code == 2 and listed_presets(err)[0] == "lstm2"
    code, _, err = cli("data", "--config", "lstm_ful.yaml")
    assert code == 2 and listed_presets(err)[:2] == ["lstm_full", "lstm_full_cpu"]
    code, _, err = cli("data", "--config", "QUIK")  # the listing ignores case (QUICK itself is found)
    assert code == 2 and listed_presets(err)[0] == "quick"
    code, _, err = cli("data", "--config", "D2L/CH9_3_DEP_LSTM")
    assert code == 2 and listed_presets(err)[0] == "d2l/ch9_3_deep_lstm"


def test_drnn_presets_name_shows_the_preset_file_as_written_and_its_whole_settings(workdir: Path, cli):
    """A learner reads a recipe beside d2l's code (learner41: `drnn presets lstm2` was refused, the file's
    path only in --json): the file where it lies, comments and all; --json adds every setting, the
    defaults the file leaves out too. Names resolve as --config resolves them; another is one line."""
    path = REPO / "configs" / "lstm2.yaml"
    for name in ("lstm2", "configs/lstm2.yaml", "LSTM2", "ch9_3_deep_lstm"):
        code, out, err = cli("presets", name)
        shown = REPO / "configs" / ("d2l/ch9_3_deep_lstm.yaml" if name == "ch9_3_deep_lstm" else "lstm2.yaml")
        assert (code, err) == (0, "") and out == f"# {shown}\n" + shown.read_text(encoding="utf-8"), name
    code, out, _ = cli("presets", "lstm2", "--json")
    shown = json.loads(out)
    assert (shown["name"], shown["path"], shown["text"]) == (
        "lstm2",
        str(path),
        path.read_text(encoding="utf-8"),
    )
    assert shown["config"] == load_config(path).to_dict() and shown["config"]["train"]["clip"] == 1.0
    assert shown["config"]["data"]["val_fraction"] == 0.0  # a default the file does not write
    code, out, err = cli("presets", "lstmm")
    assert (
        code == 2 and out == "" and err.startswith("drnn: error: no preset 'lstmm'; presets (closest first):")
    )
    assert len(err.strip().splitlines()) == 1 and listed_presets(err)[0] == "lstm2"


# ---------------------------------------------------------------------------------------------
# Descriptions


def test_a_preset_header_gives_its_description_and_measured_figure(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "\n#   A tiny recipe.  \n# more about it\n# measured: perplexity 1.5 (somewhere)\n"
        "data: {max_tokens: 100}\n# measured: not in the leading block\n"
    )
    preset = read_preset("p", path)
    assert (preset.description, preset.measured) == ("A tiny recipe.", "perplexity 1.5 (somewhere)")
    path.write_text("data: {}\n")
    assert (read_preset("p", path).description, read_preset("p", path).measured) == ("", None)


def test_every_preset_has_a_description_and_a_measured_line():
    for preset in list_presets():
        assert preset.description and not preset.description.lower().startswith("measured"), preset.name
        assert preset.measured, f"{preset.name}: add a '# measured: ...' comment line"
        assert len(preset.description) <= 110, preset.name  # one line in a table


def test_presets_json_lists_every_preset_with_its_size(workdir: Path, cli):
    code, out, _ = cli("presets", "--json")
    assert code == 0
    presets = {entry["name"]: entry for entry in last_json(out)["presets"]}
    assert set(presets) == configs_names()
    assert all(set(entry) == PRESET_KEYS for entry in presets.values())
    lstm2 = presets["lstm2"]
    assert (lstm2["cell"], lstm2["num_layers"], lstm2["hidden_size"], lstm2["embedding_dim"]) == (
        "lstm",
        2,
        256,
        0,
    )
    assert lstm2["vocab_size"] == 28 and lstm2["parameters"] == LSTM2_PARAMETERS == 826_396
    assert presets["d2l/ch9_3_deep_lstm"]["parameters"] == LSTM2_PARAMETERS
    assert presets["quick"]["parameters"] == 216_604  # what `drnn train --config quick` reports
    assert lstm2["description"].startswith("The seed recipe") and "6,078 tokens/s" in lstm2["measured"]
    assert Path(lstm2["path"]) == CONFIGS / "lstm2.yaml"

    code, out, _ = cli("presets")
    assert code == 0 and "lstm2" in out and "826,396" in out


def test_the_presets_table_leaves_the_figures_to_json_on_a_narrow_terminal(
    cli, monkeypatch: pytest.MonkeyPatch
):
    """In 80 columns each description and figure wrapped into a dozen lines, 156 in all (learner trial)."""
    monkeypatch.setenv("COLUMNS", "80")
    code, narrow, _ = cli("presets")
    assert code == 0 and "measured:" not in narrow and len(narrow.splitlines()) < 5 * 14
    # the model above its text (with its parameters where the corpus is on disk to count them)
    assert re.search(r"│ lstm2 +│ lstm 2×256(, 826,396 parameters)? +│\n│ +│ The seed recipe", narrow), narrow
    assert "the figure measured with each: drnn presets --json, or a terminal 120 columns wide" in narrow
    monkeypatch.setenv("COLUMNS", "140")
    code, wide, _ = cli("presets")
    assert code == 0 and "measured: train perplexity 1.02 after 500 epochs" in " ".join(wide.split())


def test_drnn_presets_counts_vocabularies_and_parameters_without_importing_torch(workdir: Path):
    """It built each preset's model to count its parameters, and encoded the corpus with tensors for
    its vocabulary: importing torch was 2 s of a command that lists a dozen lines."""
    environment = {**os.environ, "PYTHONPATH": pythonpath_with_repo()}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "drnn_cli", "presets", "--json"],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lstm2 = next(entry for entry in last_json(done.stdout)["presets"] if entry["name"] == "lstm2")
    assert (lstm2["vocab_size"], lstm2["parameters"]) == (28, LSTM2_PARAMETERS)  # the corpus was read
    imported = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "import time:" in line]
    assert "drnn_cli.text_vocab" in imported and "drnn_cli.model_size" in imported
    # nor requests (60 ms), which only a download needs: the corpus is found on disk
    assert [name for name in imported if name.partition(".")[0] in ("torch", "requests")] == []


def test_presets_never_download_the_parameters_wait_for_the_corpus(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DRNN_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("DRNN_DATA_URL", "http://127.0.0.1:9/unreachable")
    reports = {report.preset.name: report.summary() for report in describe_presets()}
    assert reports["lstm2"]["vocab_size"] is None and reports["lstm2"]["parameters"] is None
    assert reports["lstm2"]["hidden_size"] == 256
    assert not (tmp_path / "empty").exists()


def test_every_presets_parameter_count_is_its_built_models_without_building_it():
    """drnn presets counts each preset's parameters in closed form (no torch): the count of the model
    that `drnn train --config NAME` builds on the Time Machine's 28 characters."""
    for preset in list_presets():
        model = load_config(preset.path).model
        assert parameter_count(28, model) == count_parameters(build_model(28, model)), preset.name


def test_presets_has_help_with_an_example(cli):
    code, out, _ = cli("presets", "--help")
    assert code == 0 and "Example: drnn presets" in out


# ---------------------------------------------------------------------------------------------
# Commands with preset names


def test_train_resume_data_predict_eval_with_preset_names(workdir: Path, cli):
    small = ("--set", "model.hidden_size=8", "--set", "data.max_tokens=2000", "--set", "train.sample_every=0")
    code, out, err = cli(
        "train", "--config", "d2l/ch9_3_deep_lstm", "--set", "train.epochs=1", *small, "--json"
    )
    assert code == 0, err
    first = last_json(out)
    assert first["run_dir"] == str(workdir / "runs" / "ch9_3_deep_lstm") and first["epochs"] == 1
    assert load_config(workdir / "runs" / "ch9_3_deep_lstm" / "config.yaml").model.hidden_size == 8

    spelled = "configs/d2l/ch9_3_deep_lstm.yaml"  # another spelling of the same preset: the same run
    code, out, err = cli(
        "train", "--config", spelled, "--set", "train.epochs=2", *small, "--resume", "--json"
    )
    assert code == 0, err
    resumed = last_json(out)
    assert (resumed["run_dir"], resumed["start_epoch"], resumed["epochs"]) == (first["run_dir"], 1, 2)

    code, out, err = cli("predict", "time traveller", "-n", "5", "--json")
    assert code == 0 and len(last_json(out)["text"]) == len("time traveller") + 5, err
    code, out, err = cli("eval", "--json")
    assert code == 0, err
    assert (last_json(out)["epoch"], last_json(out)["tokens"]) == (2, 1999)  # every target of 2,000 tokens

    code, out, err = cli("data", "--config", "lstm2", "--json")
    assert code == 0 and last_json(out)["corpus_tokens"] == 10_000, err


# ---------------------------------------------------------------------------------------------
# The wheel, installed outside the checkout


BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "drnn_cli", "configs")  # what setuptools reads


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _dependency_dirs() -> list[str]:
    """The site directories holding drnn's dependencies (and pip) in this interpreter, not drnn itself."""
    import pip
    import pydantic
    import requests
    import rich
    import safetensors
    import torch
    import typer
    import yaml

    modules = (torch, typer, rich, yaml, requests, pydantic, safetensors, pip)
    return sorted({str(Path(module.__file__).resolve().parents[1]) for module in modules})


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_runs_the_readme_commands_from_an_empty_directory(
    tmp_path: Path, corpus_path: Path
):
    setuptools = importlib.metadata.version("setuptools")  # not imported: it would patch distutils here
    assert int(setuptools.split(".")[0]) >= 77, f"setuptools {setuptools}: the test extra installs >=77"
    # Build from a copy of the build inputs, so the checkout gets no build/ directory.
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source)]
    )
    (wheel,) = dist.glob("drnn-*.whl")

    # The wheel ships exactly configs/, byte for byte.
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            name.removeprefix("drnn_cli/presets/"): archive.read(name)
            for name in archive.namelist()
            if name.startswith("drnn_cli/presets/")
        }
    assert shipped == {
        path.relative_to(CONFIGS).as_posix(): path.read_bytes() for path in CONFIGS.rglob("*.yaml")
    }
    # ... its version is the one drnn --version prints, and its license text travels with it (MIT's terms)
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = (name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        headers = archive.read(metadata).decode()
        (license_file,) = (name for name in archive.namelist() if name.endswith("/LICENSE"))
        assert archive.read(license_file) == (REPO / "LICENSE").read_bytes()
    assert f"\nVersion: {drnn_cli.__version__}\n" in headers and "\nLicense-File: LICENSE\n" in headers

    # A fresh venv that sees this interpreter's dependencies through a .pth of plain path lines: those
    # directories' own .pth files (the editable install of the checkout) are not executed.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (purelib / "drnn-test-dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    # --ignore-installed: the checkout's editable drnn is visible through the .pth; never touch it
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ]
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy2(corpus_path, cache / "timemachine.txt")
    hidden = ("PYTHONPATH", "VIRTUAL_ENV", "DRNN_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    env |= {
        "PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        "DRNN_DATA_DIR": str(cache),
        "DRNN_DATA_URL": "http://127.0.0.1:9/unreachable",
        "OMP_NUM_THREADS": "1",
    }
    where = _run(
        [
            str(python),
            "-c",
            "import drnn_cli, drnn_cli.presets as p; print(drnn_cli.__file__); print(p.presets_dir())",
        ],
        cwd=empty,
        env=env,
    ).stdout.split()
    assert all(Path(path).is_relative_to(purelib) for path in where), where
    assert Path(where[1]) == purelib / "drnn_cli" / "presets"

    drnn = str(python.parent / "drnn")

    def run(*args: str) -> dict:
        return last_json(_run([drnn, *args], cwd=empty, env=env).stdout)

    # the commands that do not depend on each other run side by side
    with ThreadPoolExecutor(2) as pool:
        training = pool.submit(run, "train", "--config", "lstm2.yaml", "--set", "train.epochs=1", "--json")
        listing = pool.submit(run, "presets", "--json")
        trained = training.result()
    with ThreadPoolExecutor(2) as pool:
        predicting, evaluating = (
            pool.submit(run, "predict", "time traveller", "--json"),
            pool.submit(run, "eval", "--json"),
        )
    assert trained["run_dir"] == str(empty / "runs" / "lstm2") and trained["epochs"] == 1
    assert trained["parameters"] == LSTM2_PARAMETERS
    predicted = predicting.result()
    assert (
        set(predicted) == {"prefix", "text", "continuation", "checkpoint"}
        and len(predicted["text"]) == len("time traveller") + 50
    )
    # found from the empty directory through runs/latest; no validation split: the last checkpoint
    assert predicted["checkpoint"] == str(empty / "runs" / "lstm2" / "last.safetensors")
    evaluated = evaluating.result()
    assert set(evaluated) == {
        "split",
        "epoch",
        "step_in_epoch",
        "step",
        "perplexity",
        "bits_per_token",
        "tokens",
        "unknown",
        "known_perplexity",
        "unseen_in_training",
        "seen_perplexity",
        "source",
        "checkpoint",
        "rows",
    }
    assert evaluated["known_perplexity"] == evaluated["perplexity"]  # nothing scored as <unk>
    assert evaluated["checkpoint"] == predicted["checkpoint"]  # the same run's same file
    assert (evaluated["split"], evaluated["epoch"], evaluated["step"], evaluated["tokens"]) == (
        "train",
        1,
        8,
        9_999,
    )
    listed = listing.result()["presets"]
    assert {entry["name"] for entry in listed} == configs_names()
    assert all(set(entry) == PRESET_KEYS for entry in listed)
    assert all(Path(entry["path"]).is_relative_to(purelib) for entry in listed)
    assert sorted(path.name for path in empty.iterdir()) == ["runs"]  # nothing downloaded, nothing else


def test_the_held_out_presets_step_cap_is_exactly_its_epochs_on_the_time_machine(corpus_path: Path):
    """docs/own-text.md (README "Your own text"): ``lstm_full_cpu``'s ``max_steps`` ends a larger text
    after as many updates as the Time Machine's whole schedule, so on the Time Machine itself it must
    change nothing."""
    from drnn_cli.batches import epoch_generator, training_batches
    from drnn_cli.data import load_dataset

    config = load_config(CONFIGS / "lstm_full_cpu.yaml", (f"data.path={corpus_path}",))
    data, train = config.data, config.train
    tokens = load_dataset(data).splits.train
    steps = [
        len(training_batches(tokens, data.sampling, data.batch_size, data.num_steps, epoch_generator(0, e)))
        for e in range(train.epochs)
    ]
    assert steps == [149] * train.epochs  # sequential offsets could change the count by one: they do not
    assert train.max_steps == sum(steps) == 7450


# What an import names → the distribution that provides it, where the two differ
DISTRIBUTION_OF = {"yaml": "pyyaml"}
# Imported where present, provided by no requirement of drnn's: Triton ships with CUDA builds of torch
# (model.impl fused; README "Using a GPU")
BROUGHT_BY_TORCH = {"triton"}


def test_every_package_drnn_imports_is_a_declared_dependency_or_extra():
    """download.py used urllib3 directly while only requests was declared, and requests < 2.30 pins the
    urllib3 1.26 whose responses lack the read1 it calls: every download failed in an environment pip
    called consistent. Each third-party import is now a requirement (or an optional extra's)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    declared = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}
    imported = set()
    for module in (REPO / "drnn_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "drnn_cli"}
    assert {"torch", "urllib3", "matplotlib"} <= third_party  # the scan sees what drnn imports
    undeclared = {
        name for name in third_party - BROUGHT_BY_TORCH if DISTRIBUTION_OF.get(name, name) not in declared
    }
    assert not undeclared, f"imported but not in pyproject's dependencies or extras: {sorted(undeclared)}"


def test_the_sdist_manifest_ships_every_python_file_the_tests_import():
    """The sdist "holds the tests too" (README): a helper module left out (lock_contender.py was)
    stops pytest's collection of the unpacked sdist with a ModuleNotFoundError."""
    import fnmatch

    repo = Path(__file__).resolve().parent.parent
    included = [
        line.split()[1:]
        for line in (repo / "MANIFEST.in").read_text().splitlines()
        if line.startswith("include ")
    ]
    patterns = [pattern for line in included for pattern in line]
    helpers = sorted(path.name for path in (repo / "tests").glob("*.py") if not path.name.startswith("test_"))
    assert helpers and "lock_contender.py" in helpers
    for name in helpers:  # test_*.py files are in every sdist setuptools makes
        assert any(fnmatch.fnmatch(f"tests/{name}", pattern) for pattern in patterns), name
