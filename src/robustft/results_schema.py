"""The two files every report is built from, described in one place: ``results.json`` and ``leaderboard.json``.

``results.json`` is what one run writes (``runner.fit``) and what ``robustft report`` merges; ``leaderboard.json``
is what ``robustft compare`` writes: the same numbers as mean and standard deviation over seeds. Both carry
``schema_version``. Version 1 is the layout before the field existed (no ``schema_version`` key); version 2
adds ``schema_version`` and, per method entry, ``report_sections`` and ``report_columns``: the names of the
extra report sections and table columns the method contributes (``robustft.report.sections``), so a report
renders them from the file alone. A version 1 file is read by inferring those names once, here, from the keys
the methods of that time wrote. A file from a newer robustft is refused with one line naming it. The
confidence intervals (``ci``) and paired tests (``significance``) are optional additions within version 2:
files without them stay valid, and the reports show the plain numbers for them.

The TypedDicts below are the documentation of every key (``docs/results.md`` is the same for users); readers
check only what a report cannot do without, so files with extra keys (a method's own diagnostics) stay valid.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from robustft.errors import DataError

SCHEMA_VERSION = 2
"""The version this robustft writes; it reads this one and every older one."""
LEGACY_VERSION = 1


class Stat(TypedDict):
    """One number over seeds: mean and population standard deviation (0 for one seed)."""

    mean: float
    std: float


class Intervals(TypedDict, total=False):
    """95% bootstrap confidence intervals ``[lo, hi]`` of accuracy (percent), ``robustft.statistics``."""

    id: list[float]
    ood: dict[str, list[float]]
    ood_avg: list[float]


class PairedTest(TypedDict):
    """One method against one baseline on the same images and seeds (paired bootstrap)."""

    difference: float  # mean accuracy of the method minus the baseline's, points
    interval: list[float]  # its 95% interval
    p_value: float  # one-sided: the method is not above the baseline
    above: bool  # interval above 0: the leaderboard's mark
    below: bool


class ResultsEntry(TypedDict, total=False):
    """One method's results in ``results.json`` (accuracies and ECE in percent, NLL in nats).

    Required: ``id`` and ``ood``. Method-specific keys (``alpha``, ``curve``, ``ingredients``,
    ``active_params``, ...) sit beside these; ``report_sections`` / ``report_columns`` name which of them
    the report renders.
    """

    id: float  # id_test accuracy
    ood: dict[str, float]  # accuracy per OOD split, keys start with "ood_"
    ood_avg: float  # unweighted mean over the OOD splits
    id_val: float
    macro_f1: dict[str, float]  # per split
    ece: dict[str, float]  # per split; nll, ece_ts, nll_ts alike
    nll: dict[str, float]
    ece_ts: dict[str, float]
    nll_ts: dict[str, float]
    temperature: float  # fitted on id_val
    effective_robustness: float  # added by the report (robustft.robustness), never by a run
    train_seconds: float
    trainable_params: int
    steps: int
    report_sections: list[str]  # e.g. ["alpha_curve"]; version 2
    report_columns: list[str]  # e.g. ["active_params"]; version 2
    ci: Intervals  # over the run's test images; absent in files written before intervals existed


class ResultsFile(TypedDict, total=False):
    """``results.json``: one run (one method), or several merged by ``robustft report``."""

    schema_version: int
    benchmark: str
    seed: int | None
    methods: dict[str, ResultsEntry]


class LeaderboardEntry(TypedDict, total=False):
    """One method of ``leaderboard.json``: every statistic over the comparison's seeds."""

    kind: str  # zeroshot, trained or posthoc
    id: Stat
    ood_avg: Stat
    effective_robustness: Stat | None  # None without both reference methods
    ood: dict[str, Stat]
    ece_id: Stat
    ece_ood_avg: Stat
    train_seconds: Stat
    peak_memory_mb: float | None  # CUDA peak allocated over the run; None on the CPU
    trainable_params: int
    inference_cost: float | None  # forward time over the zero-shot model's on one batch
    runs: list[str]  # the run directory of each seed
    report_sections: list[str]  # version 2
    report_columns: list[str]  # version 2; each named column's value is a Stat under the same key
    ci: Intervals  # over the seeds and the test images (hierarchical bootstrap); absent without predictions
    significance: dict[str, dict[str, PairedTest]]  # {baseline: {"id": test, "ood_avg": test}}


class Leaderboard(TypedDict, total=False):
    """``leaderboard.json``, written by ``robustft compare``."""

    schema_version: int
    benchmark: str
    seeds: list[int]
    config: str  # the run config the comparison started from
    reference: dict[str, str]  # {"zero_shot": method, "finetuned": method}: the trade-off line's two ends
    statistics: dict[str, Any]  # how ci and significance were computed (robustft.statistics.settings)
    methods: dict[str, LeaderboardEntry]


# Version 1 had no declarations; these keys are what its methods wrote for each section / column.
_LEGACY_SECTIONS = {"alpha_curve": "curve", "ingredients": "ingredients"}
_LEGACY_COLUMNS = ("active_params",)
_LEGACY_CURVE_FILES = "*_curve.json"


def declared_by(method: Any) -> dict[str, list[str]]:
    """The ``report_sections`` / ``report_columns`` entry keys of a method (class or instance)."""
    return {
        "report_sections": list(getattr(method, "report_sections", ())),
        "report_columns": list(getattr(method, "report_columns", ())),
    }


def results_document(benchmark: str, seed: int | None, methods: Mapping[str, Any]) -> dict[str, Any]:
    """A ``results.json`` body in the current version."""
    return {"schema_version": SCHEMA_VERSION, "benchmark": benchmark, "seed": seed, "methods": dict(methods)}


def stamped(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with ``schema_version`` first (the current one): what every writer puts on disk."""
    return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in document.items() if k != "schema_version"}}


def schema_version(document: Mapping[str, Any], source: str | Path) -> int:
    """The document's version (1 when absent); a DataError naming ``source`` for a newer or malformed one."""
    version = document.get("schema_version", LEGACY_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < LEGACY_VERSION:
        raise DataError(f"{source}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise DataError(
            f"{source}: schema_version {version} is newer than this robustft reads (up to {SCHEMA_VERSION}); "
            "upgrade robustft to read it"
        )
    return version


def upgrade_results(document: Mapping[str, Any], source: str | Path = "results") -> dict[str, Any]:
    """A checked copy of a ``results.json`` body in the current version (version 1 gets its declarations).

    Raises:
        DataError: a newer version, or a body without ``benchmark`` / ``methods`` / an ``id`` per method.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("methods"), Mapping):
        raise DataError(f"not a robustft results file (needs 'benchmark' and 'methods'): {source}")
    if "benchmark" not in document:
        raise DataError(f"not a robustft results file (needs 'benchmark' and 'methods'): {source}")
    version = schema_version(document, source)
    methods = {}
    for name, entry in document["methods"].items():
        if not isinstance(entry, Mapping) or "id" not in entry or not isinstance(entry.get("ood", {}), Mapping):
            raise DataError(f"method {name!r} in {source} needs an 'id' accuracy and an 'ood' mapping")
        entry = copy.deepcopy(dict(entry))
        if version == LEGACY_VERSION:
            entry = {**_legacy_results_declarations(entry), **entry}
        else:
            entry.setdefault("report_sections", [])
            entry.setdefault("report_columns", [])
        methods[name] = entry
    return stamped({**document, "methods": methods})


def _legacy_results_declarations(entry: Mapping[str, Any]) -> dict[str, list[str]]:
    return {
        "report_sections": [name for name, key in _LEGACY_SECTIONS.items() if isinstance(entry.get(key), list)],
        "report_columns": [key for key in _LEGACY_COLUMNS if key in entry],
    }


def leaderboard_declarations(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """A leaderboard row's sections and columns: those of its first seed's results entry (inferred for a
    version 1 entry, as :func:`upgrade_results` does)."""
    first = entries[0]
    declared = {key: list(first[key]) for key in ("report_sections", "report_columns") if key in first}
    return {**_legacy_results_declarations(first), **declared}


def upgrade_leaderboard(document: Mapping[str, Any], source: str | Path = "leaderboard") -> dict[str, Any]:
    """A checked copy of a ``leaderboard.json`` body in the current version.

    A version 1 leaderboard held no declarations: a method whose run directories hold a sweep file
    (``<method>_curve.json``) gets ``alpha_curve``, as the comparison report of that version looked for them.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("methods"), Mapping):
        raise DataError(f"not a robustft leaderboard (needs 'benchmark', 'seeds' and 'methods'): {source}")
    version = schema_version(document, source)
    methods = {}
    for name, entry in document["methods"].items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("ood", {}), Mapping):
            raise DataError(f"method {name!r} in {source} needs an 'ood' mapping of statistics")
        entry = copy.deepcopy(dict(entry))
        if version == LEGACY_VERSION:
            swept = any(any(Path(run).glob(_LEGACY_CURVE_FILES)) for run in entry.get("runs") or [])
            entry = {"report_sections": ["alpha_curve"] if swept else [], "report_columns": [], **entry}
        else:
            entry.setdefault("report_sections", [])
            entry.setdefault("report_columns", [])
        methods[name] = entry
    return stamped({"seeds": [], **document, "methods": methods})


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {what} {path}: {error}") from None


def read_results(path: Path) -> dict[str, Any]:
    """One ``results.json``, checked and in the current version."""
    return upgrade_results(_read_json(path, "results file"), path)


def read_leaderboard(path: Path) -> dict[str, Any]:
    """One ``leaderboard.json``, checked and in the current version."""
    return upgrade_leaderboard(_read_json(path, "leaderboard"), path)
