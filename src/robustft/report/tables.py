"""The one table builder: columns of a results file or a leaderboard, as (header, rows of formatted cells).

Every view (report.md, report.html, leaderboard.md, the terminal) builds its tables here, so one number is
formatted one way everywhere: accuracies with two decimals, effective robustness signed, parameter counts as
a reader says them (1.2M), and a statistic over seeds as ``mean ± std`` only when there are several seeds
(one seed shows the value alone). Where the entry holds a 95% confidence interval (``ci``, from
:mod:`robustft.statistics`), an accuracy reads ``mean [lo, hi]`` instead, the interval holding the spread over
seeds too, and a leaderboard's ID and OOD average carry significance marks (``▲ft``: significantly above
fine-tuning). A :class:`Column` reads one value from an entry; the value may be a plain number (a results.json
entry) or ``{"mean", "std"}`` (a leaderboard entry), so the same columns serve both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from robustft.robustness import add_effective_robustness, ood_average

# Baselines first, in the order a reader compares them; everything else follows alphabetically.
METHOD_ORDER = ("zeroshot", "linear_probe", "finetune", "lp_ft")
MISSING = "-"


class Table(NamedTuple):
    """Header cells and rows of cells; unpacks as ``header, rows``. The first cell of a row is the method."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Column:
    """One table column: its header, its machine name (CSV) and how its value is read and formatted.

    ``style``: ``number`` (``decimals`` places, ``signed`` shows ``+``), ``count`` (:func:`human_count`),
    ``alpha`` (``%g``), ``ratio`` (two decimals, no statistic), ``text`` (as is).
    """

    header: str
    key: str
    value: Callable[[Mapping[str, Any]], Any]
    style: str = "number"
    decimals: int = 2
    signed: bool = False
    interval: Callable[[Mapping[str, Any]], Any] | None = None  # the entry's 95% interval [lo, hi], if any
    marks: Callable[[Mapping[str, Any]], str] | None = None  # significance marks appended to the cell

    def cell(self, entry: Mapping[str, Any], several_seeds: bool = False) -> str:
        value = self.value(entry)
        mean = value.get("mean") if isinstance(value, Mapping) else value
        bounds = self.interval(entry) if self.interval is not None else None
        if is_interval(bounds) and format_number(mean) != MISSING:
            text = format_interval(mean, bounds, self.decimals)  # the interval holds the spread over seeds too
        else:
            text = format_cell(value, self.style, self.decimals, self.signed, several_seeds)
        suffix = self.marks(entry) if self.marks is not None else ""
        return f"{text} {suffix}" if suffix else text


def is_interval(bounds: Any) -> bool:
    """Whether ``bounds`` is a finite ``[lo, hi]`` pair (a ``ci`` value of a results or leaderboard entry)."""
    return (
        isinstance(bounds, Sequence)
        and not isinstance(bounds, str)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and math.isfinite(b) for b in bounds)
    )


def format_interval(value: float | None, bounds: Sequence[float], decimals: int = 2) -> str:
    """``value [lo, hi]``: a number with its 95% confidence interval (``robustft.statistics``)."""
    lo, hi = (format_number(bound, decimals) for bound in bounds)
    return f"{format_number(value, decimals)} [{lo}, {hi}]"


def format_number(value: float | None, decimals: int = 2, signed: bool = False) -> str:
    """``value`` rounded to ``decimals``; ``-`` for a missing or NaN value, never ``-0.00``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    rounded = round(float(value), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{rounded:{'+' if signed else ''}.{decimals}f}"


def format_stat(value: Any, decimals: int = 2, signed: bool = False, several_seeds: bool = True) -> str:
    """A plain number, or ``mean ± std`` of a ``{"mean", "std"}`` statistic (the mean alone for one seed)."""
    if not isinstance(value, Mapping):
        return format_number(value, decimals, signed)
    mean, std = format_number(value.get("mean"), decimals, signed), value.get("std")
    if not several_seeds or mean == MISSING or std is None or (isinstance(std, float) and math.isnan(std)):
        return mean
    return f"{mean} ± {format_number(std, decimals)}"


def human_count(n: int | float | Mapping[str, Any] | None) -> str:
    """Parameter counts as a reader says them: 950, 12.3K, 1.2M, 86.6M, 1.1B (a statistic: its mean)."""
    if isinstance(n, Mapping):
        n = n.get("mean")
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return MISSING
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.1f}{suffix}"
    return str(int(n))


def format_alpha(value: float | None) -> str:
    return MISSING if value is None else f"{float(value):g}"


def format_cell(value: Any, style: str, decimals: int = 2, signed: bool = False, several_seeds: bool = False) -> str:
    if style == "count":
        return human_count(value)
    if style == "alpha":
        return format_alpha(value)
    if style == "text":
        return MISSING if value is None else str(value)
    if style == "ratio":
        return format_number(value.get("mean") if isinstance(value, Mapping) else value, decimals)
    return format_stat(value, decimals, signed, several_seeds)


def build_table(
    columns: Sequence[Column], methods: Mapping[str, Mapping[str, Any]], order: Sequence[str], several_seeds: bool
) -> Table:
    """``method`` and ``columns`` for each method in ``order``."""
    header = ["method", *(column.header for column in columns)]
    rows = [[name, *(column.cell(methods[name], several_seeds) for column in columns)] for name in order]
    return Table(header, rows)


def ordered_methods(methods: Mapping[str, Any]) -> list[str]:
    """Baselines first (zeroshot, linear_probe, finetune, lp_ft), then the rest alphabetically.

    Renamed duplicates (``finetune@run2``) sort right after their base method.
    """

    def key(name: str) -> tuple[int, str, str]:
        base = name.split("@", 1)[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return rank, base, name

    return sorted(methods, key=key)


def ood_splits(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({split for entry in methods.values() for split in (entry.get("ood") or {})})


# ---------------------------------------------------------------------------------------------- columns


def _ood_avg(entry: Mapping[str, Any]) -> Any:
    """A leaderboard's statistic as it is; a results entry's stored average, else the mean over its splits."""
    value = entry.get("ood_avg")
    if isinstance(value, Mapping) or any(isinstance(v, Mapping) for v in (entry.get("ood") or {}).values()):
        return value
    return ood_average(dict(entry))


def split_column(split: str) -> Column:
    return Column(
        split,
        split,
        lambda entry: (entry.get("ood") or {}).get(split),
        interval=lambda entry: ((entry.get("ci") or {}).get("ood") or {}).get(split),
    )


# A leaderboard's significance marks: ▲<short name> when a method is significantly above that baseline.
MARK = "▲"
BASELINE_MARKS = {"finetune": "ft", "wise_ft": "wise"}


def significance_marks(entry: Mapping[str, Any], key: str) -> str:
    """``▲ft▲wise``: the baselines ``entry`` is significantly above on ``key`` (``id`` or ``ood_avg``)."""
    tests = entry.get("significance") or {}
    above = [baseline for baseline, test in tests.items() if ((test or {}).get(key) or {}).get("above")]
    return "".join(f"{MARK}{BASELINE_MARKS.get(baseline, baseline)}" for baseline in above)


def marks_legend(methods: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One sentence explaining the marks of a leaderboard; None when no method was tested."""
    baselines = list(dict.fromkeys(b for entry in methods.values() for b in (entry.get("significance") or {})))
    if not baselines:
        return None
    named = ", ".join(f"`{MARK}{BASELINE_MARKS.get(b, b)}`: above `{b}`" for b in baselines)
    return (
        f"Marks on ID and OOD avg ({named}): significantly above that baseline on the same test images and seeds "
        "(paired bootstrap, the 95% interval of the difference above 0). [lo, hi]: 95% bootstrap confidence "
        "interval over test images (and over seeds, with several)."
    )


def split_value(entry: Mapping[str, Any], key: str, split: str = "id_test") -> float | None:
    """A per-split metric (``ece``, ``nll``...) of one split of a results entry."""
    return (entry.get(key) or {}).get(split)


def ood_mean(entry: Mapping[str, Any], key: str) -> float | None:
    """Unweighted mean of a per-split metric (``ece``, ``nll``...) over the OOD splits of a results entry."""
    values = [value for split, value in (entry.get(key) or {}).items() if split.startswith("ood_")]
    return sum(values) / len(values) if values else None


KIND = Column("kind", "kind", lambda entry: entry.get("kind"), style="text")


def _interval(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda entry: (entry.get("ci") or {}).get(key)


def _marks(key: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda entry: significance_marks(entry, key)


ID = Column("ID", "id", lambda entry: entry.get("id"), interval=_interval("id"), marks=_marks("id"))
OOD_AVG = Column("OOD avg", "ood_avg", _ood_avg, interval=_interval("ood_avg"), marks=_marks("ood_avg"))
EFFECTIVE_ROBUSTNESS = Column(
    "eff. robustness", "effective_robustness", lambda entry: entry.get("effective_robustness"), signed=True
)
TRAIN_SECONDS = Column("train s", "train_seconds", lambda entry: entry.get("train_seconds"), decimals=1)
TRAINABLE_PARAMS = Column("trainable params", "trainable_params", lambda e: e.get("trainable_params"), "count")
PEAK_MEMORY = Column("peak MiB", "peak_memory_mb", lambda entry: entry.get("peak_memory_mb"), "ratio", decimals=0)
INFERENCE_COST = Column("inference ×", "inference_cost", lambda entry: entry.get("inference_cost"), "ratio")
# Calibration: a results entry holds ECE per split, a leaderboard entry its ID value and OOD mean over seeds.
ECE_ID = Column("ECE ID", "ece_id", lambda entry: entry.get("ece_id", split_value(entry, "ece")))
ECE_OOD_AVG = Column("ECE OOD avg", "ece_ood_avg", lambda entry: entry.get("ece_ood_avg", ood_mean(entry, "ece")))

# CoOp's base-to-new evaluation: base-class accuracy, new-class accuracy (zero-shot rows), their harmonic mean.
BASE_TO_NEW = tuple(
    Column(header, f"base_to_new_{key}", lambda entry, key=key: (entry.get("base_to_new") or {}).get(key))
    for header, key in (("base", "base"), ("new", "new"), ("HM", "hm"))
)


def base_to_new_columns(methods: Mapping[str, Mapping[str, Any]]) -> list[Column]:
    return list(BASE_TO_NEW) if any("base_to_new" in entry for entry in methods.values()) else []


def _calibrated(methods: Mapping[str, Mapping[str, Any]]) -> bool:
    return any("ece" in entry or "ece_id" in entry or "ece_ood_avg" in entry for entry in methods.values())


def declared_columns(methods: Mapping[str, Mapping[str, Any]]) -> list[Column]:
    """The extra columns the methods declared (``report_columns``), in order of first declaration."""
    from robustft.report.sections import COLUMNS

    names = dict.fromkeys(name for entry in methods.values() for name in entry.get("report_columns") or [])
    return [COLUMNS[name] for name in names if name in COLUMNS]


# ---------------------------------------------------------------------------------------------- tables


def results_table(results: Mapping[str, Any]) -> Table:
    """The accuracy table of a results file: ID, every OOD split, OOD average, effective robustness, costs,
    then the columns the methods declared and, when recorded, ECE.

    Effective robustness is (re)computed here so every view uses the same definition; it is "-" when
    the zero-shot or fine-tune baseline is missing.
    """
    from robustft.results_schema import upgrade_results

    results = add_effective_robustness(upgrade_results(results))
    methods = results["methods"]
    columns = [ID, *map(split_column, ood_splits(methods)), OOD_AVG, EFFECTIVE_ROBUSTNESS, TRAIN_SECONDS]
    columns += [TRAINABLE_PARAMS, *declared_columns(methods), *base_to_new_columns(methods)]
    if _calibrated(methods):
        columns += [ECE_ID, ECE_OOD_AVG]
    return build_table(columns, methods, ordered_methods(methods), several_seeds=False)


def macro_f1_table(results: Mapping[str, Any]) -> Table | None:
    """Per-split macro-F1, or None when no method recorded it.

    Accuracy hides classes a method gives up on under shift; macro-F1 exposes them.
    """
    methods = results["methods"]
    with_f1 = [name for name in ordered_methods(methods) if methods[name].get("macro_f1")]
    if not with_f1:
        return None
    splits = sorted({split for name in with_f1 for split in methods[name]["macro_f1"]})
    columns = [Column(split, split, lambda entry, split=split: entry["macro_f1"].get(split)) for split in splits]
    return build_table(columns, methods, with_f1, several_seeds=False)


def several_seeds(leaderboard: Mapping[str, Any]) -> bool:
    return len(leaderboard.get("seeds") or []) > 1


def leaderboard_tables(leaderboard: Mapping[str, Any]) -> dict[str, Table]:
    """``{"leaderboard" | "cost" | "calibration": Table}`` of a leaderboard, rows in :func:`ordered_methods`
    order. The declared columns join the leaderboard table; calibration is absent when no method has ECE."""
    methods = leaderboard["methods"]
    order, several = ordered_methods(methods), several_seeds(leaderboard)
    accuracy = [KIND, ID, OOD_AVG, EFFECTIVE_ROBUSTNESS, *map(split_column, ood_splits(methods))]
    tables = {
        "leaderboard": build_table(
            [*accuracy, *declared_columns(methods), *base_to_new_columns(methods)], methods, order, several
        ),
        "cost": build_table([TRAIN_SECONDS, PEAK_MEMORY, TRAINABLE_PARAMS, INFERENCE_COST], methods, order, several),
    }
    calibrated = [name for name in order if "ece_id" in methods[name] or "ece_ood_avg" in methods[name]]
    if calibrated:
        tables["calibration"] = build_table([ECE_ID, ECE_OOD_AVG], methods, calibrated, several)
    return tables


def leaderboard_table(leaderboard: Mapping[str, Any]) -> Table:
    """The leaderboard, costs and calibration as one wide table (leaderboard.md, the terminal)."""
    tables = leaderboard_tables(leaderboard)
    header, rows = list(tables["leaderboard"].header), [list(row) for row in tables["leaderboard"].rows]
    for key in ("cost", "calibration"):
        if key not in tables:
            continue
        extra = {row[0]: row[1:] for row in tables[key].rows}
        header += tables[key].header[1:]
        width = len(tables[key].header) - 1
        for row in rows:
            row += extra.get(row[0], [MISSING] * width)
    return Table(header, rows)
