"""Which models one server serves, and each one's settings.

    --model PATH                      one model, named --served-model-name or by its folder
    --model NAME=PATH --model ...     several, each under its name; --task NAME=TASK where needed
    --config FILE                     TOML: a [models.NAME] table each, its keys the settings' names

Flags and PIPESERVE_* variables set every model's defaults; a model's table overrides them for
that model alone (workers, threads, dtype, batch sizes, timeouts, ...). The server's own settings
(where it listens, its key, its connection limits, its logs) are not a model's: a table that sets
one is refused. The first model declared serves the root routes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeserve.front import machine
from pipeserve.front.config import Config, ConfigError, parse_settings
from pipeserve.front.runtime import served_model_name

# What belongs to the server, not to one model.
SERVER_SETTINGS = frozenset({"host", "port", "max_connections", "header_timeout", "body_timeout",
                             "keepalive_timeout", "api_key", "api_key_file", "log_format", "log_level",
                             "allocator", "max_body_bytes", "config", "max_loaded_models"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: Config  # the server's settings with this model's own over them


@dataclass(frozen=True)
class Deployment:
    config: Config  # the server's settings (and every model's defaults)
    models: tuple[ModelEntry, ...]


def named(value: str, what: str) -> tuple[str | None, str]:
    """("NAME", "VALUE") from "NAME=VALUE", or (None, value)."""
    name, sep, rest = value.partition("=")
    if not sep or "/" in name:
        return None, value
    if not _NAME.fullmatch(name) or not rest:
        raise ConfigError(f"--{what} {value!r}: expected NAME={what.upper()} (a name of letters, digits, . _ -)")
    return name, rest


def load_deployment(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Deployment:
    """The server's settings and its models, from flags, variables and --config; ConfigError if
    they contradict each other."""
    values, repeated = parse_settings(argv, environ)
    base = Config(**values)
    declared: dict[str, dict[str, Any]] = {}
    unnamed: list[str] = []
    for value in repeated.get("model", []):
        name, path = named(value, "model")
        if name is None:
            unnamed.append(path)
        elif name in declared:
            raise ConfigError(f"model {name!r} is declared twice")
        else:
            declared[name] = {"model": path}
    if unnamed and (declared or len(unnamed) > 1):
        raise ConfigError("with several models, name each one: --model NAME=PATH")
    if base.config:
        for name, table in _read_tables(base.config).items():
            if name in declared:
                raise ConfigError(f"model {name!r} is declared twice (--model and {base.config})")
            declared[name] = table
    tasks = repeated.get("task", [])
    if not declared:  # one model, as before
        config = dataclasses.replace(base, model=unnamed[0] if unnamed else None, task=_one_task(tasks))
        return _gpus_given(Deployment(base, (ModelEntry(served_model_name(config), config),)), environ)
    for value in tasks:
        name, task = named(value, "task")
        if name is None or name not in declared:
            raise ConfigError(f"--task {value!r}: with several models, --task NAME=TASK names one of "
                              f"{', '.join(declared)}")
        declared[name].setdefault("task", task)
    entries = tuple(ModelEntry(name, dataclasses.replace(base, **settings, served_model_name=name))
                    for name, settings in declared.items())
    return _gpus_given(Deployment(dataclasses.replace(base, model=None, task=None), entries), environ)


def _gpus_given(deployment: Deployment, environ: Mapping[str, str] | None) -> Deployment:
    """The deployment, if each `--devices cuda:N` is among the GPUs this process was given."""
    for entry in deployment.models:
        for device in entry.config.devices or ():
            if device.startswith("cuda:"):
                try:
                    machine.physical_gpu(device, os.environ if environ is None else environ)
                except ValueError as exc:
                    raise ConfigError(f"--devices: {exc}") from None
    return deployment


def _one_task(tasks: list[str]) -> str | None:
    if len(tasks) > 1:
        raise ConfigError("--task is given several times for one model")
    return tasks[0] if tasks else None


def _read_tables(path: str) -> dict[str, dict[str, Any]]:
    """{model name: its settings} from a TOML file's [models.NAME] tables."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown table or key {unknown[0]!r} (models go in [models.NAME])")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    tables: dict[str, dict[str, Any]] = {}
    for name, table in (document.get("models") or {}).items():
        if not _NAME.fullmatch(name) or not isinstance(table, dict):
            raise ConfigError(f"--config {path}: [models.{name}] must be a table named with letters, digits, . _ -")
        settings: dict[str, Any] = {}
        for key, value in table.items():
            field = key.replace("-", "_")
            if field not in fields or field == "served_model_name":
                raise ConfigError(f"--config {path}: [models.{name}] {key}: no such model setting")
            if field in SERVER_SETTINGS:
                raise ConfigError(f"--config {path}: [models.{name}] {key} is the server's, not a model's: "
                                  "set it as a flag")
            text = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                settings[field] = fields[field].metadata["parse"](text)
            except ValueError as exc:
                raise ConfigError(f"--config {path}: [models.{name}] {key}: {exc}") from None
        if "model" not in settings and "pipeline" not in settings:
            raise ConfigError(f"--config {path}: [models.{name}] needs a model (or a pipeline)")
        tables[name] = settings
    return tables
