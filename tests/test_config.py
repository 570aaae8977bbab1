"""The config schema: every key validated with its dotted path, YAML files, and --set overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drnn_cli.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_config,
    load_config,
    parse_override,
)
from drnn_cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# One invalid value for every key of every section, and a word the error must contain.
INVALID = {
    "data.corpus": (5, "string"),
    "data.path": (7, "string"),
    "data.preprocess": ("stem", "'d2l', 'letters', 'lower' or 'none'"),
    "data.token": ("byte", "'char' or 'word'"),
    "data.max_tokens": (0, "-1"),
    "data.min_freq": (-1, "greater than or equal to 0"),
    "data.val_fraction": (1.0, "less than 1"),
    "data.test_fraction": (-0.1, "greater than or equal to 0"),
    "data.batch_size": (0, "greater than or equal to 1"),
    "data.num_steps": ("many", "integer"),
    "data.sampling": ("shuffled", "'sequential' or 'random'"),
    "model.cell": ("transformer", "'rnn', 'gru' or 'lstm'"),
    "model.hidden_size": (0, "greater than or equal to 1"),
    "model.num_layers": (0, "greater than or equal to 1"),
    "model.dropout": (1.0, "less than 1"),
    "model.input_dropout": (1.0, "less than 1"),
    "model.output_dropout": (-0.5, "greater than or equal to 0"),
    "model.dropout_kind": ("variational", "'standard' or 'locked'"),
    "model.embedding_dropout": (-0.1, "greater than or equal to 0"),
    "model.weight_drop": (1.5, "less than 1"),
    "model.bidirectional": (True, "predict"),
    "model.impl": ("cudnn", "'torch', 'scratch' or 'fused'"),
    "model.layer_calls": ("per-layer", "'stack' or 'each'"),
    "model.embedding_dim": (-1, "greater than or equal to 0"),
    "model.nonlinearity": ("sigmoid", "'tanh' or 'relu'"),
    "model.init": ("xavier", "'torch' or 'd2l'"),
    "model.tie_weights": ("maybe", "boolean"),
    "model.cell_form": ("cudnn", "'torch' or 'd2l'"),
    "train.epochs": (0, "greater than or equal to 1"),
    "train.optimizer": ("rmsprop", "'sgd', 'adam' or 'adamw'"),
    "train.lr": (0, "greater than 0"),
    "train.momentum": (1.0, "less than 1"),
    "train.weight_decay": (-1, "greater than or equal to 0"),
    "train.decay_biases": ("sometimes", "valid boolean"),
    "train.clip": (-1, "greater than or equal to 0"),
    "train.reset_state": ("often", "valid boolean"),
    "train.schedule": ("linear", "'constant', 'step' or 'cosine'"),
    "train.warmup_epochs": (-1, "greater than or equal to 0"),
    "train.step_size": (0, "greater than or equal to 1"),
    "train.gamma": (0, "greater than 0"),
    "train.min_lr": (-1, "greater than or equal to 0"),
    "train.ar": (-1, "greater than or equal to 0"),
    "train.tar": ("lots", "number"),
    "train.average": ("polyak", "'none', 'ema' or 'swa'"),
    "train.average_decay": (1.0, "less than 1"),
    "train.average_start": (-1, "must be an integer number of epochs (≥ 0) or 'N steps'"),
    "train.seed": (-1, "greater than or equal to 0"),
    "train.device": ("tpu", "'auto', 'cpu' or 'cuda'"),
    "train.precision": ("fp8", "'fp32', 'bf16' or 'fp16'"),
    "train.cuda_graph": ("sometimes", "'auto', 'on' or 'off'"),
    "train.compile": ("sometimes", "'on' or 'off'"),
    "train.sample_every": (-1, "integer number of epochs (≥ 0) or 'N steps'"),
    "train.sample_prefixes": ([""], "non-empty"),
    "train.sample_chars": (-1, "greater than or equal to 0"),
    "train.eval_every": (0, "integer number of epochs (≥ 1) or 'N steps'"),
    "train.patience": (-1, "greater than or equal to 0"),
    "train.checkpoint_every": ("0 steps", "at least 1 step"),
    "train.log_every": ("5 minutes", "integer number of epochs (≥ 0) or 'N steps'"),
    "train.keep_every": ("0 steps", "at least 1 step"),
    "train.max_steps": (-1, "greater than or equal to 0"),
    "train.max_time": ("soon", "a duration such as 90s, 10m, 2h or 1h30m"),
    "train.eval_tokens": (-1, "greater than or equal to 0"),
    "train.tensorboard": ("maybe", "valid boolean"),
}


def _tree(dotted: str, value: object) -> dict:
    section, key = dotted.split(".")
    return {section: {key: value}}


def test_every_config_key_has_an_invalid_value_case():
    keys = {
        f"{name}.{key}"
        for name, section in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))
        for key in section.model_fields
    }
    assert keys == set(INVALID)


@pytest.mark.parametrize("dotted", sorted(INVALID))
def test_invalid_value_is_refused_with_its_dotted_path_and_what_is_allowed(dotted: str):
    value, allowed = INVALID[dotted]
    with pytest.raises(ConfigError) as error:
        build_config(_tree(dotted, value))
    message = str(error.value)
    assert message.startswith(f"config error: {dotted}: ")
    assert allowed in message
    assert message.endswith(f" (got {value!r})")  # the value the user wrote, echoed


# data.path's --set value is a file name as written (7 is the file "7"), not YAML: see below
@pytest.mark.parametrize("dotted", sorted(INVALID.keys() - {"data.path"}))
def test_invalid_value_through_set_gets_the_same_answer(dotted: str):
    value, _ = INVALID[dotted]
    text = json.dumps(value)  # JSON is YAML: what a user would type, quoted where needed
    with pytest.raises(ConfigError) as from_set:
        build_config({}, [f"{dotted}={text}"])
    with pytest.raises(ConfigError) as from_file:
        build_config(_tree(dotted, value))
    assert str(from_set.value) == str(from_file.value)  # the whole line, the echoed value included


def test_unknown_key_names_the_key_and_lists_what_the_section_allows():
    with pytest.raises(ConfigError) as error:
        build_config({"data": {"bach_size": 4}})
    message = str(error.value)
    assert message.startswith(
        "config error: unknown key 'data.bach_size'; did you mean 'data.batch_size'? data allows: "
    )
    assert "batch_size" in message and "num_steps" in message
    # the same name in another section first (train.num_steps is data's, not the near train.max_steps,
    # which would stop training), then the one key that contains it, then a near spelling; none else
    cases = {
        ("train", "num_steps"): "data.num_steps",
        ("train", "batch_size"): "data.batch_size",
        ("model", "lr"): "train.lr",
        ("data", "epochs"): "train.epochs",
        ("model", "hidden"): "model.hidden_size",
        ("model", "layers"): "model.num_layers",
        ("train", "epoch"): "train.epochs",
        ("train", "colour"): None,
        ("train", "step"): None,  # in max_steps, step_size, …: no one guess
    }
    for (section, given), guess in cases.items():
        with pytest.raises(ConfigError) as error:
            build_config({section: {given: 4}})
        said = str(error.value)
        assert (f"did you mean '{guess}'?" in said) if guess else "did you mean" not in said, said
    # a section's key at the top level (--set epochs=3): the section that holds it
    # and d2l's names for them, as a learner types them from the book (train_ch8(net, ..., num_epochs, ...))
    top_level = {"epochs": "train.epochs", "dropout": "model.dropout", "colour": None}
    top_level |= {"num_epochs": "train.epochs", "num_hiddens": "model.hidden_size", "theta": "train.clip"}
    # and char-rnn's and AWD-LSTM's, in a section or not (train.learning_rate listed the keys: learner34)
    top_level |= {"learning_rate": "train.lr", "seq_length": "data.num_steps", "bptt": "data.num_steps"}
    top_level |= {"rnn_size": "model.hidden_size", "nlayers": "model.num_layers", "grad_clip": "train.clip"}
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'; did you mean 'train.lr'\?"):
        build_config({"train": {"learning_rate": 0.1}})
    for given, guess in top_level.items():
        with pytest.raises(ConfigError) as error:
            build_config({given: 4})
        said = str(error.value)
        assert (f"did you mean '{guess}'?" in said) if guess else "did you mean" not in said, said


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'optim'"):
        build_config({"optim": {"lr": 1}})


def test_cross_field_rules_name_the_keys():
    with pytest.raises(ConfigError, match=r"val_fraction \+ data.test_fraction must be below 1"):
        build_config({"data": {"val_fraction": 0.6, "test_fraction": 0.4}})
    with pytest.raises(ConfigError, match="tie_weights needs model.embedding_dim"):
        build_config({"model": {"tie_weights": True, "embedding_dim": 8, "hidden_size": 16}})
    with pytest.raises(ConfigError, match="embedding_dropout needs a learned embedding"):
        build_config({"model": {"embedding_dropout": 0.2}})
    with pytest.raises(ConfigError, match="model.layer_calls each applies to model.impl torch"):
        build_config({"model": {"layer_calls": "each", "impl": "scratch"}})


def test_set_overrides_nested_keys_with_yaml_typed_values():
    config = build_config(
        {"model": {"num_layers": 2}},
        [
            "model.num_layers=3",
            "train.lr=0.5",
            "model.cell=gru",
            "data.path=null",
            "train.sample_prefixes=[the, time]",
        ],
    )
    assert config.model.num_layers == 3 and isinstance(config.model.num_layers, int)
    assert config.train.lr == 0.5 and isinstance(config.train.lr, float)
    assert config.model.cell == "gru"
    assert config.data.path is None
    assert config.train.sample_prefixes == ["the", "time"]
    # one prefix needs no brackets (YAML's scalar), and keeps its spaces
    assert load_config(None, ["train.sample_prefixes=time traveller"]).train.sample_prefixes == [
        "time traveller"
    ]


def test_a_sample_prefix_listed_twice_is_sampled_once():
    """train --json keys its samples by prefix: the second sample of a prefix listed twice vanished. Kept
    once, in order; not refused, as a checkpoint written before may hold such a list (a review)."""
    assert load_config(None, ["train.sample_prefixes=[the, time, the]"]).train.sample_prefixes == [
        "the",
        "time",
    ]


def test_later_set_wins_and_file_values_are_kept_otherwise(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 8\n  num_steps: 7\ntrain:\n  lr: 0.1\n")
    config = load_config(path, ["data.batch_size=16", "data.batch_size=4"])
    assert (config.data.batch_size, config.data.num_steps, config.train.lr) == (4, 7, 0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model.num_layers",
            "--set expects KEY=VALUE with a dotted key, e.g. --set model.num_layers=3 (got 'model.num_layers')",
        ),
        ("=3", "--set expects KEY=VALUE with a dotted key, e.g. --set model.num_layers=3 (got '=3')"),
        ("model..cell=gru", "--set key 'model..cell' has an empty part; use dotted keys like train.lr=0.5"),
        ("data.batch_size.rows=3", "--set data.batch_size.rows: data.batch_size is a value, not a section"),
        (  # data.path is null by default: it was taken for an empty section, then refused as "a valid string"
            "data.path.x=3",
            "--set data.path.x: data.path is not a section; keys are SECTION.NAME, e.g. data.path",
        ),
        (
            "train.lr=[1, 2",
            "--set train.lr: '[1, 2' is not a valid YAML value (expected ',' or ']', but got '<stream end>' at line 1, column 6)",
        ),
    ],
)
def test_malformed_set_is_refused_with_one_line(text: str, message: str):
    with pytest.raises(ConfigError) as error:
        build_config({"data": {"batch_size": 2}}, [text])
    assert str(error.value) == message


def test_set_value_keeps_an_equals_sign():
    parts, value = parse_override("train.sample_prefixes=[a=b]")
    assert parts == ["train", "sample_prefixes"] and value == ["a=b"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("data: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("data:\n  batch_size: 0\n", "data.batch_size"),
        (
            "train:\n  sample_prefixes: " + "[" * 2000 + "]" * 2000 + "\n",
            "nests lists or mappings too deeply",
        ),
        ("train: {[a]: 1}\n", "a key must be a plain name, not a list at line 1, column 9"),
        ("train: {epochs: 2, epochs: 3}\n", "duplicate key 'epochs'"),
        ("data:\n  path: yes\n", "data.path: Input should be a valid string; put it in quotes"),
    ],
)
def test_bad_yaml_files_get_one_line(tmp_path: Path, content: str, problem: str):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert problem in str(error.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            "data: {max_tokens: 3000}\n".encode("utf-16"),  # what Windows PowerShell's > writes
            "is UTF-16 (it starts with that byte order mark), not UTF-8; convert it, e.g. iconv -f utf-16 -t utf-8",
        ),
        (
            "data: {path: café.txt}\n".encode("latin-1"),
            "is not UTF-8 (undecodable byte at offset 16); convert it, e.g. iconv -f latin1 -t utf-8",
        ),
        (
            b"\x18\x02\x00\x00\x00\x00\x00\x00{\xff",  # a checkpoint given to --config
            "is not text: it holds NUL bytes and an undecodable byte at offset 9, as a binary file (an "
            "image, a checkpoint) does; name a text file (a UTF-16 text without a byte order mark converts "
            "with iconv -f utf-16le -t utf-8)",
        ),
    ],
    ids=["utf-16", "latin-1", "binary"],
)
def test_a_config_file_that_is_not_utf8_is_named_with_the_conversion(
    tmp_path: Path, payload: bytes, message: str
):
    path = tmp_path / "windows.yaml"
    path.write_bytes(payload)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"config file {path} {message}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            "data: {max_tokens: 3,000}\n",  # flow style: a second key 000 with no value
            "key '000' is read as a number, not a name; inside {…} a comma starts a new key "
            "(write 3,000 as 3000) at line 1, column 22",
        ),
        (
            "train:\n  yes: 3\n",
            "key 'yes' is read as true, not a name; quote it if it is meant as a name at line 2, column 3",
        ),
        (
            "1: 3\n",
            "key '1' is read as a number, not a name; quote it if it is meant as a name at line 1, column 1",
        ),
        (
            "2020-01-01: 3\n",
            "key '2020-01-01' is read as a date, not a name; quote it if it is meant as a name at line 1, column 1",
        ),
    ],
    ids=["comma-in-braces", "yes", "number", "date"],
)
def test_a_key_yaml_reads_as_no_name_is_named_as_written_with_its_line(
    tmp_path: Path, content: str, problem: str
):
    """Every key of a config is a name; pydantic's "1: Keys should be strings (got True)" named neither
    the key as written nor its line."""
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"config file {path} is not valid YAML: {problem}"


def test_a_set_value_with_a_key_yaml_reads_as_no_name_is_refused_in_the_same_words():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data={max_tokens: 1,500}"])
    assert str(error.value) == (
        "--set data: '{max_tokens: 1,500}' is not a valid YAML value (key '500' is read as a number, not a "
        "name; inside {…} a comma starts a new key (write 1,500 as 1500) at line 1, column 16)"
    )


def test_missing_config_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("a #1.txt", "a #1.txt"),  # YAML would cut it at its comment, and train on a file named "a"
        ("[draft].txt", "[draft].txt"),  # YAML: a flow sequence, refused
        ("*.txt", "*.txt"),  # YAML: an alias
        ("t\udcff.txt", "t\udcff.txt"),  # a name that is not UTF-8, as Python passes it on
        ("123", "123"),
        (" a.txt ", "a.txt"),  # spaces around the value go, as for every key
        ('"quoted name.txt"', "quoted name.txt"),  # quoted: YAML, as before
        ("null", None),  # the documented way back to data.corpus
        ("~", None),
    ],
)
def test_set_data_path_takes_the_file_name_as_written(given: str, path: str | None):
    """``--set data.path=NAME`` is a file name, not YAML (found by a red team: names with ``#``, ``[``,
    ``*`` or bytes that are not UTF-8 were cut, refused or misread); null puts back the default."""
    parts, value = parse_override(f"data.path={given}")
    assert parts == ["data", "path"] and value == path
    assert build_config({"data": {"path": value}}).data.path == path


def test_yaml_merge_keys_merge_and_written_keys_override(tmp_path: Path):
    path = tmp_path / "merged.yaml"
    path.write_text("model:\n  <<: {hidden_size: 8, num_layers: 1}\n  num_layers: 3\n")
    model = load_config(path).model
    assert (model.hidden_size, model.num_layers) == (8, 3)


def test_leading_zeros_are_decimal_and_an_empty_section_is_the_defaults(tmp_path: Path):
    """YAML 1.1 reads ``010`` as octal 8; a config means ten. ``train:`` with every key commented out
    is an empty section, in the file and under ``--set``."""
    path = tmp_path / "commented.yaml"
    path.write_text("train:\n  # epochs: 5\nmodel:\n  hidden_size: 8\n")
    config = load_config(path, ["train.epochs=010", "model.num_layers=0_3"])
    assert (config.train.epochs, config.model.num_layers, config.model.hidden_size) == (10, 3, 8)
    assert load_config(path, ["train=", "train.epochs=2"]).train.epochs == 2  # `--set train=` empties it too


def test_colon_numbers_are_text_not_yaml_1_1_base_60(tmp_path: Path):
    """YAML 1.1 reads ``1:30`` as 90 and ``10:00`` as 600: a time meant as 1 h 30 min would train for
    90 s, and a batch of 600 would go unnoticed. As in YAML 1.2 they are text, refused by name."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"train\.max_time"):
        load_config(path, ["train.max_time=1:30"])
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(path, ["data.batch_size=10:00"])
    path.write_text("train:\n  max_time: 1:30.5\n")
    with pytest.raises(ConfigError, match=r"train\.max_time"):
        load_config(path)
    assert load_config(path, ["train.max_time=90"]).train.max_time == 90.0


def test_an_empty_set_value_is_refused_and_a_section_mapping_sets_only_its_keys(tmp_path: Path):
    """``--set data.path=$TEXT`` with TEXT unset trained on the default corpus without a word; and
    ``--set 'data={path: x}'`` dropped the file's batch size, splits and preprocessing."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 4\n  preprocess: none\n")
    with pytest.raises(ConfigError, match=r"--set data\.path= has no value; give one, or data\.path=null"):
        load_config(path, ["data.path="])
    assert load_config(path, ["data.path=null"]).data.path is None
    data = load_config(path, ["data={path: mine.txt, num_steps: 7}"]).data
    assert (data.path, data.num_steps, data.batch_size, data.preprocess) == ("mine.txt", 7, 4, "none")
    assert load_config(path, ["data="]).data.batch_size == 32  # an empty section: its defaults
    with pytest.raises(ConfigError, match=r"data\.path: is empty: name a text file"):
        load_config(path, ["data.path=' '"])


@pytest.mark.parametrize("written", ["max_tokens: null", "max_tokens:", "max_tokens: ~"])
def test_a_key_without_a_value_in_a_file_says_to_leave_it_out(tmp_path: Path, written: str):
    """It read "Input should be a valid integer (got None)", which says nothing of the fix (rev43b);
    a section without keys is all of its defaults."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  {written}\nmodel:\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == (
        "config error: data.max_tokens: no value (null); give one, or leave data.max_tokens out for drnn's default"
    )
    path.write_text("data:\n  num_steps: 7\nmodel:\n")
    assert load_config(path).model == Config().model


def test_a_key_set_to_null_is_no_longer_given():
    """What the command line gives (the keys a checkpoint's values may not replace under --init-from):
    a key reset to null, or a section, is as if never set."""
    from drnn_cli.start_point import given_values

    assert given_values(["model.hidden_size=64", "model.hidden_size=null"]) == {}
    assert given_values(["model={dropout: 0.3, hidden_size: ~}"]) == {"model.dropout": 0.3}
    assert given_values(["model.dropout=0.3", "data.num_steps=7", "model=null"]) == {"data.num_steps": 7}
    assert given_values(["model.hidden_size=null", "model.hidden_size=64"]) == {"model.hidden_size": 64}


@pytest.mark.parametrize("null", ["null", "~", "Null", "NULL"])
def test_set_key_null_puts_any_key_back_to_drnns_default_not_the_files(tmp_path: Path, null: str):
    """The empty-value refusal advises ``KEY=null``, which pydantic refused for every key but data.path
    ("data.max_tokens: Input should be a valid integer (got None)"): it is the key as if never set."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  max_tokens: 10000\n  num_steps: 7\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    config = load_config(path, [f"data.max_tokens={null}", f"train.lr={null}", f"data.path={null}"])
    defaults = Config()
    assert (config.data.max_tokens, config.train.lr, config.data.path) == (
        defaults.data.max_tokens,
        defaults.train.lr,
        None,
    )
    assert (config.data.num_steps, config.train.epochs) == (7, 3)  # the file's others stay
    assert defaults.data.max_tokens != 10000 and defaults.train.lr != 0.5  # so the reset is seen
    # a name that is no key is refused as any value of it is, with the key it is closest to
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(path, [f"train.lrr={null}"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.num_epochs'; did you mean 'train\.epochs'\?"):
        load_config(path, [f"train.num_epochs={null}"])  # d2l's name
    # a null inside a section's mapping resets that key, and the mapping's others are set
    data = load_config(path, [f"data={{max_tokens: {null}, batch_size: 4}}"]).data
    assert (data.max_tokens, data.batch_size, data.num_steps) == (defaults.data.max_tokens, 4, 7)
    # the last --set wins, a reset included
    assert load_config(path, ["train.lr=0.1", f"train.lr={null}"]).train.lr == defaults.train.lr
    assert load_config(path, [f"train.lr={null}", "train.lr=0.1"]).train.lr == 0.1


def test_empty_file_gives_the_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_seed_recipe_is_d2l_section_9_3():
    config = load_config(REPO / "configs" / "lstm2.yaml")
    data, model, train = config.data, config.model, config.train
    assert (data.corpus, data.preprocess, data.token, data.max_tokens) == (
        "timemachine",
        "d2l",
        "char",
        10000,
    )
    assert (data.batch_size, data.num_steps, data.sampling) == (32, 35, "sequential")
    assert (model.cell, model.hidden_size, model.num_layers, model.impl) == ("lstm", 256, 2, "torch")
    assert (train.optimizer, train.lr, train.clip, train.epochs) == ("sgd", 2.0, 1.0, 500)


def test_every_shipped_config_is_valid():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        load_config(path)
    assert load_config(REPO / "configs" / "rnn2.yaml").train.lr == 1.0
    assert load_config(REPO / "configs" / "gru2.yaml").model.cell == "gru"


# d2l v0.17.6's recipes, from its chapter sources: batch_size, num_steps = 32, 35 and
# load_data_time_machine's max_tokens=10000 (every section); num_hiddens / num_layers / lr / num_epochs
# from rnn-scratch.md (512, lr 1), rnn-concise.md (256, lr 1), gru.md and lstm.md (256, lr 1),
# deep-rnn.md (256 × 2, lr 2), all 500 epochs; train_ch8 uses SGD and grad_clipping(net, 1).
D2L_RECIPES = {
    "ch8_5_rnn_scratch": ("rnn", 512, 1, "scratch", "d2l", 1.0),
    "ch8_6_rnn_concise": ("rnn", 256, 1, "torch", "torch", 1.0),
    "ch9_1_gru": ("gru", 256, 1, "scratch", "d2l", 1.0),
    "ch9_2_lstm": ("lstm", 256, 1, "scratch", "d2l", 1.0),
    "ch9_3_deep_lstm": ("lstm", 256, 2, "torch", "torch", 2.0),
}
# The from-scratch recipes (§8.5, §9.1, §9.2) train d2l's scratch cells: one bias per gate, the GRU's
# reset gate before its product (tests/test_models.py proves them equal to d2l's code).


@pytest.mark.parametrize("name", sorted(D2L_RECIPES))
def test_d2l_recipes_are_d2l_0_17_6s_hyperparameters(name):
    config = load_config(REPO / "configs" / "d2l" / f"{name}.yaml")
    data, model, train = config.data, config.model, config.train
    cell, hidden, layers, impl, init, lr = D2L_RECIPES[name]
    assert (data.corpus, data.preprocess, data.token, data.max_tokens, data.min_freq) == (
        "timemachine",
        "d2l",
        "char",
        10000,
        0,
    )
    assert (data.batch_size, data.num_steps, data.sampling) == (32, 35, "sequential")
    assert (data.val_fraction, data.test_fraction) == (0.0, 0.0)
    assert (model.cell, model.hidden_size, model.num_layers, model.impl, model.init) == (
        cell,
        hidden,
        layers,
        impl,
        init,
    )
    assert (model.embedding_dim, model.dropout, model.nonlinearity) == (0, 0.0, "tanh")  # one-hot, tanh
    assert model.cell_form == ("d2l" if impl == "scratch" else "torch")
    assert not train.reset_state  # §8.5's second run adds it
    assert (train.optimizer, train.lr, train.momentum, train.weight_decay) == ("sgd", lr, 0.0, 0.0)
    assert (train.clip, train.epochs, train.schedule) == (1.0, 500, "constant")
    # train_ch8: predict_ch8(prefix, 50, …) every 10 epochs, then 'time traveller' and 'traveller'
    assert (train.sample_every, train.sample_chars) == (10, 50)
    assert train.sample_prefixes == ["time traveller", "traveller"]


def test_d2l_deep_lstm_recipe_is_the_seed_recipe():
    d2l = load_config(REPO / "configs" / "d2l" / "ch9_3_deep_lstm.yaml")
    seed = load_config(REPO / "configs" / "lstm2.yaml")
    assert d2l.data == seed.data and d2l.model == seed.model
    assert d2l.train.model_dump(exclude={"sample_every"}) == seed.train.model_dump(exclude={"sample_every"})


@pytest.mark.parametrize(
    "setting",
    [
        "data.max_tokens=" + "9" * 5000,
        "train.max_time=" + "9" * 5000,
        "train.eval_every=" + "9" * 5000 + " steps",
    ],
)
def test_a_number_of_thousands_of_digits_is_a_config_error_not_an_internal_one(setting: str, tmp_path: Path):
    """Python refuses to read an integer of more than 4,300 digits with a ValueError, which reached the
    user as an internal error (found by a red team); the line names the key and is no longer than a
    line should be."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, [setting])
    message = str(refused.value)
    assert setting.split("=")[0] in message and len(message) < 400
    assert "set_int_max_str_digits" not in message
    if not setting.startswith("train.eval_every"):  # the same value written in a config file
        key, value = setting.split("=")
        section, name = key.split(".")
        written = tmp_path / "big.yaml"
        written.write_text(f"{section}:\n  {name}: {value}\n")
        with pytest.raises(ConfigError, match=r"a number of 5,000 digits is longer than any setting takes"):
            load_config(written)


def test_an_error_line_quotes_a_huge_value_cut_in_the_middle(tmp_path: Path):
    """A 900 KB corpus name was echoed whole in its "one line" (found by a red team): every error line
    is now at most MAX_MESSAGE_CHARS (and a few), keeping its start, the problem, and its end, the fix."""
    from drnn_cli.errors import MAX_MESSAGE_CHARS, DrnnError

    error = DrnnError("unknown corpus '" + "x" * 900_000 + "'; one of: timemachine (or set data.path)")
    assert len(str(error)) <= MAX_MESSAGE_CHARS + 3
    assert str(error).startswith("unknown corpus 'xxx") and str(error).endswith("(or set data.path)")
    assert " … " in str(error)
