"""The presets: drnn's ready-made configs, found by name from any directory and from an installed wheel.

In a checkout they are the files of ``configs/``; a wheel ships the same files as ``drnn_cli/presets/``
(pyproject.toml maps one onto the other at build time, so there is one copy). A preset's name is its
path below that directory without ``.yaml``: ``lstm2``, ``d2l/ch9_3_deep_lstm``. Its first comment line
describes it, and a ``# measured: ...`` comment line in the same leading block gives the figure drnn
measured with it. ``drnn presets`` sizes their models without importing torch (3.6 s with it, 0.5 s
without, on 2 busy cores): the vocabulary is counted (text_vocab.py), the parameters are computed in
closed form (model_size.py).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from drnn_cli.config import Config, load_config, read_yaml
from drnn_cli.errors import ConfigError, DrnnError
from drnn_cli.model_size import parameter_count

PRESET_SUFFIX = ".yaml"
MEASURED_TAG = "measured:"
# How the repository names a preset (configs/lstm2.yaml): accepted as the preset from any directory.
CHECKOUT_PREFIX = "configs/"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    measured: str | None


def presets_dir() -> Path:
    """The installed package's ``presets/`` (a wheel), else the checkout's ``configs/`` (editable install)."""
    packaged = resources.files("drnn_cli") / "presets"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    raise DrnnError(
        f"drnn's presets are missing ({packaged} and {checkout} do not exist); reinstall drnn, "
        f"or pass the path of a YAML file to --config"
    )


def preset_files(root: Path | None = None) -> dict[str, Path]:
    """Every preset name → its file, top-level presets first, then by name. Names come from the files that exist, so a name
    given by the user is only ever looked up, never joined onto a path (``..`` cannot escape)."""
    root = root or presets_dir()
    files = {
        path.relative_to(root).with_suffix("").as_posix(): path
        for path in root.rglob(f"*{PRESET_SUFFIX}")
        if path.is_file()
    }
    return {name: files[name] for name in sorted(files, key=lambda name: (name.count("/"), name))}


def read_preset(name: str, path: Path) -> Preset:
    """A preset with the description and measured figure from its leading comment lines."""
    description, measured = "", None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break  # the leading comment block ends at the first YAML line
        text = stripped.lstrip("#").strip()
        if text.lower().startswith(MEASURED_TAG):
            measured = measured or text[len(MEASURED_TAG) :].strip()
        elif text and not description:
            description = text
    return Preset(name, path, description, measured)


def list_presets(root: Path | None = None) -> list[Preset]:
    return [read_preset(name, path) for name, path in preset_files(root).items()]


@dataclass(frozen=True)
class PresetReport:
    """A preset with its model size: the vocabulary (and so the parameter count) is known only when
    the preset's corpus is already on disk, because describing presets never downloads."""

    preset: Preset
    config: Config
    vocab_size: int | None
    parameters: int | None

    def summary(self) -> dict:
        model = self.config.model
        return {
            "name": self.preset.name,
            "description": self.preset.description,
            "cell": model.cell,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "embedding_dim": model.embedding_dim,
            "vocab_size": self.vocab_size,
            "parameters": self.parameters,
            "measured": self.preset.measured,
            "path": str(self.preset.path),
        }


def describe_presets(root: Path | None = None) -> list[PresetReport]:
    """``drnn presets``: each preset with its vocabulary's size and its model's parameters."""
    # the corpus readers (and requests, through download.py): `drnn presets` needs them, not every command
    from drnn_cli.text_vocab import local_vocab_size

    reports = []
    vocab_sizes: dict[tuple, int | None] = {}  # the presets mostly share one corpus: read it once
    for preset in list_presets(root):
        config = load_config(preset.path)
        data = config.data
        key = (data.path, data.corpus, data.preprocess, data.token, data.min_freq)
        if key not in vocab_sizes:
            vocab_sizes[key] = local_vocab_size(data)
        vocab_size = vocab_sizes[key]
        parameters = None if vocab_size is None else parameter_count(vocab_size, config.model)
        reports.append(PresetReport(preset, config, vocab_size, parameters))
    return reports


def preset_name(value: str) -> str:
    """``lstm2.yaml``, ``configs/lstm2.yaml`` → ``lstm2``: the spellings a user may give for a preset."""
    name = value.strip().replace("\\", "/").removeprefix("./").removeprefix(CHECKOUT_PREFIX)
    return name.removesuffix(PRESET_SUFFIX)


def closest_first(name: str, names: list[str]) -> list[str]:
    """All ``names``, the most similar to ``name`` first (difflib's ratio, ignoring case: ``QUICK`` or
    ``LSTM2`` from a caps-lock or a Windows habit means ``quick``, ``lstm2``; ties keep their order)."""
    wanted = name.lower()
    return sorted(
        names, key=lambda candidate: -difflib.SequenceMatcher(None, wanted, candidate.lower()).ratio()
    )


def find_config(value: str, root: Path | None = None) -> Path:
    """What ``--config VALUE`` names: an existing file (it wins), else a preset, else a ConfigError
    that lists the presets, the closest name first."""
    if not value.strip():  # Path("") is the current directory
        raise ConfigError("--config is empty; give a config file or a preset name (drnn presets lists them)")
    given = Path(value).expanduser()
    files = preset_files(root)
    name = preset_name(value)
    if given.is_file():
        if name in files:
            _check_not_shadowing(given, value, name)
        return given
    if name in files:
        return files[name]
    meant = _meant_preset(name, files)
    if meant is not None and (not given.exists() or given.is_dir()):  # a folder is no config: as for a name
        return files[meant]
    if given.exists() and not given.is_dir():
        return given  # a FIFO, a device: read_yaml says which, and refuses it
    listed = ", ".join(closest_first(name, list(files)))
    what = "a directory, not a config file," if given.is_dir() else "no such file"
    raise ConfigError(
        f"--config {value}: {what} and no such preset; presets (closest first): {listed} "
        f"(drnn presets describes them)"
    )


def find_preset(value: str, root: Path | None = None) -> Preset:
    """The preset ``drnn presets NAME`` shows: a name as ``--config`` takes it (``lstm2``, ``configs/lstm2.yaml``,
    a near miss that can mean one preset only); never a file, which the user can read already."""
    files = preset_files(root)
    name = preset_name(value)
    meant = name if name in files else _meant_preset(name, files)
    if meant is None:
        listed = ", ".join(closest_first(name, list(files)))
        raise ConfigError(f"no preset {value!r}; presets (closest first): {listed}")
    return read_preset(meant, files[meant])


def config_source_note(value: str | None, found: Path | None) -> str | None:
    """What ``--config VALUE`` (resolved to ``found``) reads, where the user may take it for something
    else: no ``--config`` at all (a bare ``drnn data``: the settings' defaults, the whole corpus, where
    every d2l preset reads 10,000 characters: learner34), or a file that hides a preset
    (:func:`shadowed_preset_note`)."""
    if value is None or found is None:
        default = Config().data
        return (
            f"no --config: this describes the settings' defaults (all of the corpus, minibatches of "
            f"{default.batch_size} × {default.num_steps}), which the presets change; drnn data --config "
            "PRESET describes what a preset trains on"
        )
    return shadowed_preset_note(value, found)


def shadowed_preset_note(value: str, found: Path, root: Path | None = None) -> str | None:
    """The note for a file that ``--config VALUE`` read where a preset has that name and other settings:
    the run directory is named alike either way (``runs/lstm2``), and nothing else showed which one
    trained (a learner's old ``lstm2.yaml`` trained 8,860 parameters where the preset has 826,396)."""
    name = preset_name(value)
    preset = preset_files(root).get(name)
    if preset is None or not found.is_file() or found.resolve() == preset.resolve():
        return None
    try:  # the settings, not the bytes: a copy with a comment of one's own is the preset still
        if load_config(found) == load_config(preset):
            return None
    except (DrnnError, OSError):
        return None  # read as the run reads it, which says what is wrong with it
    spelled = Path(
        f"{CHECKOUT_PREFIX}{name}{PRESET_SUFFIX}"
    )  # names the preset, unless another file is there
    names_it = not spelled.exists() or spelled.resolve() == preset.resolve()
    other = f" (--config {spelled} names the preset)" if names_it else ""
    return f"--config {value} reads the file {found}, not the preset {name}, whose settings differ{other}"


def _meant_preset(name: str, files: dict[str, Path]) -> str | None:
    """The one preset a near miss can only mean: another case (``LSTM2``, a caps-lock), ``.yml``, or a
    name without its folder (``ch9_3_deep_lstm``, as its run directory is named) where one preset ends so;
    None where none or several do. A name with a folder in it is only ever matched whole."""
    wanted = name.lower().removesuffix(PRESET_SUFFIX).removesuffix(".yml")  # LSTM2.YAML too
    matches = [preset for preset in files if preset.lower() == wanted]
    if not matches and "/" not in wanted:
        matches = [preset for preset in files if preset.lower().rsplit("/", 1)[-1] == wanted]
    return matches[0] if len(matches) == 1 else None


def _check_not_shadowing(given: Path, value: str, name: str) -> None:
    """A file named like a preset wins (a user's edited copy, say); one that is no config at all, such
    as a text named ``quick``, would otherwise be refused without a word about the preset it hid."""
    try:
        read_yaml(given)
    except ConfigError as refused:
        raise ConfigError(
            f"{refused} (--config {value} read the file {given}, not the preset {name}; "
            f"--config {CHECKOUT_PREFIX}{name}{PRESET_SUFFIX} names the preset)"
        ) from None
