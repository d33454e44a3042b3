"""A resumed run's inputs: found from any current directory, and the very ones it started with.

A run records its dataset and model as absolute paths (:func:`fedlora_ext.data.inputs.absolute_inputs`) and,
in data.json, the data's content fingerprint and a local model folder's fingerprint. ``--resume`` reads them
from there. ``--dataset`` / ``--model`` given with ``--resume`` are the new place of an input that moved:
accepted when its fingerprint equals the recorded one, refused otherwise. A run recorded with relative paths
(before they were stored absolute) resumes from the folder it started in (and records them absolute from
then on), and elsewhere is refused in one line saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora_ext.core.config import FedConfig
from fedlora_ext.data.inputs import NAMED_DATASETS, NAMED_MODELS, local_path, relative_path
from fedlora_ext.data.sources import DATA_SUFFIXES, MODEL_SUFFIXES

#: (config key, names that are no path, path suffixes, what it is, its fingerprint's key in data.json)
INPUTS = (("dataset", NAMED_DATASETS, DATA_SUFFIXES, "data", "fingerprint"),
          ("model", NAMED_MODELS, MODEL_SUFFIXES, "model folder", "model_fingerprint"))


def relocated(config: FedConfig, run_dir: Path, moved: dict[str, str | None]) -> FedConfig:
    """``config`` (a resumed run's) with the inputs that ``moved`` names (``dataset`` / ``model``: a new
    path, or None) at their new, absolute place, after checking that every input can be found from here.

    Raises:
        ValueError, FileNotFoundError: one line naming the flag or the run folder.
    """
    changes = {}
    for key, named, suffixes, what, _ in INPUTS:
        recorded, given = getattr(config, key), moved.get(key)
        if given is not None:
            if recorded in named:
                raise ValueError(f"--{key} {given!r} with --resume gives the new place of a run's moved {what}; the "
                                 f"run in {run_dir} uses {key} {recorded!r}, which is no path: drop --{key}")
            path = local_path(given, named)
            if path is None:
                raise FileNotFoundError(f"--{key} {given!r}: no such file or folder (with --resume it is the new "
                                        f"place of the run's {what}, {recorded!r})")
            changes[key] = str(path)
        elif relative_path(recorded, named, suffixes):  # recorded before runs kept absolute paths
            if not Path(recorded).expanduser().exists():
                raise FileNotFoundError(f"--resume {run_dir}: the run's {key} {recorded!r} is a path relative to the "
                                        "folder the run was started in (recorded before runs kept absolute paths) "
                                        f"and is not in {Path.cwd()}; resume from that folder, or give --{key} PATH "
                                        "(its content is checked against the run's)")
            changes[key] = str(local_path(recorded, named))  # resumed where it started: absolute from now on
        elif Path(recorded).is_absolute() and not Path(recorded).exists():
            raise FileNotFoundError(f"--resume {run_dir}: the run's {key} {recorded!r} is not there any more; if it "
                                    f"moved, give its new path with --{key} PATH (its content is checked against "
                                    "the run's)")
    return config.replace(**changes) if changes else config


def check_same_inputs(config: FedConfig, data: dict, run_dir: Path, moved: dict[str, str | None]) -> None:
    """A resumed run reads the data and model it started with: ``data`` (the rebuilt run's description,
    with its fingerprints) against the run folder's data.json. An input edited in place is refused, and so
    is one given with ``--dataset`` / ``--model`` (``moved``) whose content differs or cannot be checked."""
    try:
        started = json.loads((run_dir / "data.json").read_text())
    except (OSError, ValueError):
        started = {}  # a run from before data.json: nothing to compare
    for key, _, _, what, field in INPUTS:
        recorded, now, given = started.get(field, ""), data.get(field, ""), moved.get(key)
        if not recorded:
            if given is not None:
                raise ValueError(f"--{key} {given!r}: {run_dir} records no fingerprint of its {what} (a run from "
                                 f"before they were recorded), so a moved {what} cannot be checked; resume from "
                                 "the folder and paths the run started with")
            continue
        if recorded == now:
            continue
        if given is not None:
            raise ValueError(f"--{key} {given!r}: its content differs from the run's {what} (fingerprint "
                             f"{now[:12] or 'none'}, the run's {recorded[:12]} in data.json); give the {what} the "
                             "run started with")
        raise ValueError(f"--resume {run_dir}: {key} {getattr(config, key)!r} has changed since the run started "
                         "(its content no longer matches data.json); start a new run instead")
