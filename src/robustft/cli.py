"""The ``robustft`` command: thin wrappers over runner / demo / report functions."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from robustft.errors import RobustftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Robust fine-tuning of vision foundation models.")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get the whole table

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: KEY=VALUE (repeatable)")]

# The launcher options compare / sweep / domainbed share (robustft.launchers; docs/distributed.md).
_LAUNCH = "Launcher (one job per run)"
LauncherOption = Annotated[
    str, typer.Option(help="local: runs one after another here; submitit: one job per run", rich_help_panel=_LAUNCH)
]
ClusterOption = Annotated[
    str, typer.Option(help="submitit executor: slurm (sbatch) or local (subprocesses)", rich_help_panel=_LAUNCH)
]
PartitionOption = Annotated[str | None, typer.Option(help="SLURM partition", rich_help_panel=_LAUNCH)]
AccountOption = Annotated[str | None, typer.Option(help="SLURM account", rich_help_panel=_LAUNCH)]
GpusOption = Annotated[
    int, typer.Option(help="GPUs per job (several: torchrun inside the job)", rich_help_panel=_LAUNCH)
]
TimeOption = Annotated[
    int, typer.Option("--time", help="minutes per job before it is requeued and resumes", rich_help_panel=_LAUNCH)
]
ParallelOption = Annotated[int, typer.Option(help="at most this many jobs at once", rich_help_panel=_LAUNCH)]
RetriesOption = Annotated[
    int, typer.Option(help="resubmissions of a job that died without requeueing", rich_help_panel=_LAUNCH)
]
SeedWorkersOption = Annotated[
    int,
    typer.Option(
        help="run the seeds side by side in this many local processes, the threads (or GPUs) split between them"
    ),
]


def _launcher(launcher: str, cluster: str, partition, account, gpus_per_job: int, time_minutes: int, parallel, retries):
    """The launcher the options describe; submitit is imported only when asked for."""
    if launcher == "local":
        return None
    from robustft.launchers import ClusterOptions, make_launcher

    options = ClusterOptions(cluster, partition, account, gpus_per_job, None, time_minutes, parallel, retries)
    return make_launcher(launcher, options)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of methods")] = None,
    epochs: Annotated[int | None, typer.Option(help="shorter budget (default: the recipe's)")] = None,
    seeds: Annotated[str | None, typer.Option(help="several seeds, e.g. 0,1,2 (runs in <out>/seed<k>/)")] = None,
    model: Annotated[
        str, typer.Option(help="built-in model: glyph_clip (tiny CLIP, glyphs-shift) or digits_vit (digits-shift)")
    ] = "glyph_clip",
    seed_workers: SeedWorkersOption = 1,
) -> None:
    """Every registered method on a built-in benchmark (default: the tiny CLIP): leaderboard, report and plot."""
    from robustft.compare import parse_methods_option, parse_seeds_option, print_leaderboard
    from robustft.demo import run_demo

    start = time.perf_counter()
    chosen = parse_methods_option(methods)
    results = run_demo(
        out,
        seed=seed,
        methods=chosen,
        epochs=epochs,
        log=console.print,
        seeds=parse_seeds_option(seeds) if seeds else None,
        model=model,
        seed_workers=seed_workers,
    )
    print_leaderboard(results["leaderboard"], console)
    console.print(f"total time: {time.perf_counter() - start:.1f}s; report: {out / 'report.md'}")


@app.command("fit")
def fit_command(
    config: Annotated[Path, typer.Argument(help="run config (YAML)")],
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a finished run of this name (refused without)")] = False,
    devices: Annotated[
        int, typer.Option(min=1, help="data-parallel processes on this machine (relaunches under torchrun)")
    ] = 1,
) -> None:
    """Train one method from a config; writes the run directory (config, metrics, checkpoints, results)."""
    from robustft.config import load_config
    from robustft.methods import checked

    run_config = checked(load_config(config, overrides), str(config))
    from robustft import distributed
    from robustft.report import print_table
    from robustft.runner import fit

    if devices > 1 and distributed.launched_world_size() == 1:
        distributed.check_batch_size(run_config.data.batch_size, devices)
        arguments = ["fit", str(config), *(f"--set={item}" for item in overrides or []), *(["--resume"] * resume)]
        arguments += ["--overwrite"] * overwrite
        raise typer.Exit(distributed.relaunch(devices, arguments))
    results = fit(run_config, resume=resume, log=console.print, overwrite=overwrite)
    if results and distributed.is_main_process():
        print_table(results, console)
        console.print(f"run directory: {run_config.run_dir}")


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Re-evaluate a finished run on every split of its config."""
    from robustft.report import print_table
    from robustft.runner import evaluate_run

    print_table(evaluate_run(run_dir, log=console.print), console)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="run config (YAML) every point starts from")],
    grid: Annotated[list[str], typer.Option("--grid", help="KEY=V1,V2,... (repeatable; all combinations)")],
    overrides: SetOption = None,
    launcher: LauncherOption = "local",
    cluster: ClusterOption = "slurm",
    partition: PartitionOption = None,
    account: AccountOption = None,
    gpus_per_job: GpusOption = 0,
    time_minutes: TimeOption = 60,
    array_parallelism: ParallelOption = 8,
    max_retries: RetriesOption = 1,
) -> None:
    """Fit every point of a hyper-parameter grid into <output_dir>/<name>/<point>/; finished points are skipped."""
    from rich.table import Table

    from robustft.sweep import parse_grid_option, run_sweep

    chosen = _launcher(
        launcher, cluster, partition, account, gpus_per_job, time_minutes, array_parallelism, max_retries
    )
    result = run_sweep(config, [parse_grid_option(g) for g in grid], overrides, log=console.print, launcher=chosen)
    table = Table("point", "status", "ID", "OOD avg", title=f"sweep: {result.directory}")
    for point in result.points:
        entry = next(iter((point.results or {}).get("methods", {}).values()), {})
        table.add_row(point.name, point.status, _number(entry.get("id")), _number(entry.get("ood_avg")))
    console.print(table)
    failed = [point.name for point in result.points if point.status == "failed"]
    if failed:
        console.print(f"failed points (re-run the command to retry them): {', '.join(failed)}")
        raise typer.Exit(1)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


AlphasOption = Annotated[str | None, typer.Option(help="comma-separated alphas to evaluate (default 0,0.1,...,1)")]
AlphaOption = Annotated[float | None, typer.Option(help="use this alpha instead of the best on id_val")]
PosthocOut = Annotated[Path | None, typer.Option(help="directory for the new run (default: RUN_DIR)")]
MethodSetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="a method option (alpha=0.5) or a config key (data.eval_batch_size=128); repeatable"),
]


@app.command()
def posthoc(
    method: Annotated[str, typer.Argument(help="a post-hoc method (wise_ft, output_ensemble, vrf, uniform_soup, ...)")],
    runs: Annotated[list[Path], typer.Argument(help="the finished run(s) it combines (soups: runs or sweep folders)")],
    overrides: MethodSetOption = None,
    out: Annotated[Path | None, typer.Option(help="directory for the new run (default: the input run)")] = None,
) -> None:
    """Any post-hoc method over finished runs, with its own options (`robustft methods` lists them);
    writes <out>/<method>/."""
    _posthoc(method, runs, overrides or [], out)


def _alpha_overrides(alphas: str | None, alpha: float | None) -> list[str]:
    from robustft.errors import ConfigError

    items = []
    if alphas:
        try:
            items.append(f"alphas=[{','.join(str(float(a)) for a in alphas.split(',') if a.strip())}]")
        except ValueError:
            raise ConfigError(f"--alphas {alphas!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if alpha is not None:
        items.append(f"alpha={alpha}")
    return items


def _posthoc(method: str, runs: list[Path], overrides: list[str], out: Path | None) -> None:
    from robustft.commands.posthoc import run_posthoc
    from robustft.report import print_table

    results = run_posthoc(method, runs, overrides, out, log=console.print)
    print_table(results, console)
    console.print(f"run directory: {(out or (runs[0] if len(runs) == 1 else runs[0].parent)) / method}")


@app.command()
def wise(
    run_dir: Annotated[Path, typer.Argument(help="a finished fine-tuning run")],
    alphas: AlphasOption = None,
    alpha: AlphaOption = None,
    overrides: MethodSetOption = None,
    out: PosthocOut = None,
) -> None:
    """WiSE-FT over a run (`robustft posthoc wise_ft RUN_DIR`); writes <out>/wise_ft/."""
    _posthoc("wise_ft", [run_dir], [*_alpha_overrides(alphas, alpha), *(overrides or [])], out)


@app.command()
def ose(
    run_dir: Annotated[Path, typer.Argument(help="a finished fine-tuning run")],
    alphas: AlphasOption = None,
    alpha: AlphaOption = None,
    overrides: MethodSetOption = None,
    out: PosthocOut = None,
) -> None:
    """Output-space ensemble over a run (`robustft posthoc output_ensemble RUN_DIR`); writes <out>/output_ensemble/."""
    _posthoc("output_ensemble", [run_dir], [*_alpha_overrides(alphas, alpha), *(overrides or [])], out)


@app.command()
def vrf(
    run_dir: Annotated[Path, typer.Argument(help="a finished fine-tuning run")],
    overrides: MethodSetOption = None,
    out: PosthocOut = None,
    a: Annotated[float | None, typer.Option(hidden=True)] = None,
    b: Annotated[float | None, typer.Option(hidden=True)] = None,
    k: Annotated[float | None, typer.Option(hidden=True)] = None,
    distance: Annotated[str | None, typer.Option(hidden=True)] = None,
    pick_on_id_val: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """VRF over a run (`robustft posthoc vrf RUN_DIR --set k=10`; options: `robustft methods`); writes <out>/vrf/.

    The older flags --a, --b, --k, --distance and --pick-on-id-val still work and mean --set a=... etc."""
    legacy = {"a": a, "b": b, "k": k, "distance": distance, "pick_on_id_val": pick_on_id_val or None}
    items = [f"{key}={value}" for key, value in legacy.items() if value is not None]
    _posthoc("vrf", [run_dir], [*items, *(overrides or [])], out)


@app.command()
def soup(
    sweep_dir: Annotated[Path, typer.Argument(help="a sweep directory (or a folder of finished runs)")],
    methods: Annotated[str, typer.Option(help="which soups")] = "uniform_soup,greedy_soup",
    out: Annotated[Path | None, typer.Option(help="directory for the soup runs (default: SWEEP_DIR)")] = None,
) -> None:
    """Model Soups over the finished runs of a sweep; writes <out>/uniform_soup/ and <out>/greedy_soup/."""
    from robustft.commands.posthoc import run_soups
    from robustft.report import print_table

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    print_table(run_soups(sweep_dir, chosen, out, log=console.print), console)


@app.command("methods")
def methods_command() -> None:
    """List every registered method with its kind, options and defaults."""
    from rich.table import Table

    from robustft.methods import get_method, list_methods, method_options_help
    from robustft.methods.base import PosthocMethod

    def kind(cls: type) -> str:
        if issubclass(cls, PosthocMethod):
            return "post-hoc, several runs" if cls.several_runs else "post-hoc, one run"
        return "trains" if cls.trains else "no training"

    table = Table("method", "kind", "option", "default", "description")
    for name in list_methods():
        cls = get_method(name)
        options = method_options_help(cls) or [("-", "", "")]
        for i, (option, default, description) in enumerate(options):
            first = i == 0
            table.add_row(
                name if first else "",
                kind(cls) if first else "",
                option,
                repr(default) if option != "-" else "",
                description,
            )
    console.print(table)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="run directories or results.json files")],
    out: Annotated[Path, typer.Option(help="where to write report.md, report.html and figures")] = Path("report"),
) -> None:
    """Merge results of several runs into one table, report.md, a self-contained report.html and figures."""
    from robustft.report import load_results, print_table, write_report

    results = load_results(paths)
    path = write_report(results, out)
    print_table(results, console)
    console.print(f"report: {path}")


@app.command()
def cam(
    target: Annotated[str, typer.Argument(help="an image file, or a split of the run's data (e.g. id_test)")],
    run: Annotated[Path, typer.Option("--run", help="a finished run directory")],
    out: Annotated[Path, typer.Option(help="where to write the PNGs")] = Path("cam"),
    count: Annotated[int, typer.Option(help="images taken from a split")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the mask and the refill donors")] = 0,
) -> None:
    """PNG overlays of the CAM and of the masked and refilled images (masked-counterfactual method)."""
    from robustft.commands.cam import run_cam_figures

    paths = run_cam_figures(target, run, out, count=count, seed=seed)
    console.print(f"wrote {len(paths)} figures to {out}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a finished run directory")],
    out: Annotated[Path, typer.Argument(help="a new (or empty) folder for the export")],
    to: Annotated[str, typer.Option("--to", help="timm | open_clip | peft")],
) -> None:
    """A run as a timm model, an OpenCLIP checkpoint or a peft LoRA adapter (docs/export.md)."""
    from robustft.commands.export import run_export

    files = run_export(run, to, out)
    console.print(f"wrote {len(files)} files to {out}: {', '.join(str(path.relative_to(out)) for path in files)}")


@app.command("pretrain-digits")
def pretrain_digits(
    out: Annotated[Path, typer.Option(help="where to write the checkpoint")] = Path("digits_vit.safetensors"),
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 3000,
) -> None:
    """Re-create the built-in benchmark's pretrained tiny ViT (deterministic on CPU)."""
    from robustft.pretrain import pretrain_digits_vit

    pretrain_digits_vit(out, steps=steps, log=console.print)
    console.print(f"wrote {out}")


@app.command("pretrain-clip")
def pretrain_clip(
    out: Annotated[Path, typer.Option(help="where to write the checkpoint")] = Path("glyph-clip.safetensors"),
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 160,
) -> None:
    """Re-create the built-in tiny CLIP (glyph-clip) by contrastive pretraining on captioned renderings (CPU)."""
    from robustft.pretrain import pretrain_glyph_clip

    pretrain_glyph_clip(out, steps=steps, log=console.print)
    console.print(f"wrote {out}")


@app.command()
def domainbed(
    config: Annotated[Path, typer.Argument(help="run config (YAML) with a domainbed: section (methods, trials, ...)")],
    overrides: SetOption = None,
    methods: Annotated[str | None, typer.Option(help="methods, e.g. finetune,lora(rank=8) (domainbed.methods)")] = None,
    trials: Annotated[int | None, typer.Option(help="trials per held-out domain (domainbed.trials)")] = None,
    test_domains: Annotated[str | None, typer.Option(help="held-out domains, comma-separated (default all)")] = None,
    launcher: LauncherOption = "local",
    cluster: ClusterOption = "slurm",
    partition: PartitionOption = None,
    account: AccountOption = None,
    gpus_per_job: GpusOption = 0,
    time_minutes: TimeOption = 60,
    array_parallelism: ParallelOption = 8,
    max_retries: RetriesOption = 1,
) -> None:
    """DomainBed protocol: every held-out domain x trial x method into <output_dir>/<name>/; resumable.

    Trains on all other domains, selects by training-domain validation (id_val), and writes the
    per-domain and average accuracy table (mean ± standard error over trials) to domainbed.md/json.
    data defaults to the built-in digits_domains benchmark; data.root takes root/<domain>/<class>/ folders.
    """
    from rich.table import Table

    from robustft.config import set_key
    from robustft.domainbed import failed_runs, format_cell, load_domainbed_config, plan_domainbed, run_domainbed
    from robustft.sweep import split_values

    raw = load_domainbed_config(config, overrides)
    flags = {
        "methods": [m.strip() for m in split_values(methods) if m.strip()] if methods else None,
        "trials": trials,
        "test_domains": [d.strip() for d in test_domains.split(",") if d.strip()] if test_domains else None,
    }
    for key, value in flags.items():
        if value is not None:
            set_key(raw, f"domainbed.{key}", value, option=f"--{key.replace('_', '-')}")
    plan = plan_domainbed(raw, source=str(config))
    chosen = _launcher(
        launcher, cluster, partition, account, gpus_per_job, time_minutes, array_parallelism, max_retries
    )
    summary = run_domainbed(plan, log=console.print, launcher=chosen)
    table = Table("method", *plan.test_domains, "Avg", title=f"DomainBed: {plan.directory} (held-out accuracy %)")
    for method, row in summary["table"].items():
        table.add_row(method, *(format_cell(row[d]) for d in [*plan.test_domains, "avg"]))
    console.print(table)
    console.print(f"table: {plan.directory / 'domainbed.md'}")
    failed = failed_runs(summary)
    if failed:
        console.print(f"failed runs (re-run the command to retry them): {', '.join(failed)}")
        raise typer.Exit(1)


data_app = typer.Typer(no_args_is_help=True, help="Check a run config's data: counts, hashes, unreadable files.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    config: Annotated[Path, typer.Argument(help="run config (YAML) whose data: section is checked")],
    overrides: SetOption = None,
    write_manifests: Annotated[
        Path | None, typer.Option(help="write <split>.sha256 manifests (sha256sum format) into this folder")
    ] = None,
) -> None:
    """Count images and classes, hash every file, decode every image; compare with data.expected (exit 1 on any
    difference, naming the split and file)."""
    import yaml
    from rich.table import Table

    from robustft.config import load_config
    from robustft.data.integrity import check_data, expected_section

    result = check_data(load_config(config, overrides).data, write_manifests)
    table = Table("split", "images", "classes", "unreadable", "manifest sha256", title=f"data check: {config}")
    for split in result.splits:
        table.add_row(split.name, str(split.images), str(split.classes), str(len(split.unreadable)), split.sha256)
    console.print(table)
    if write_manifests is not None:
        console.print(f"manifests written to {write_manifests}")
    if result.problems:
        for problem in result.problems:
            print(f"robustft: error: {problem}", file=sys.stderr)
        raise typer.Exit(1)
    console.print("to declare this data, add under data: in the config:")
    console.print(yaml.safe_dump({"expected": expected_section(result.splits)}, sort_keys=False), markup=False)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="run config (YAML): model, data, optim and train shared by all")],
    methods: Annotated[str | None, typer.Option(help="all, or comma-separated methods (compare.methods)")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds, e.g. 0,1,2 (compare.seeds)")] = None,
    out: Annotated[Path | None, typer.Option(help="comparison directory (default: <output_dir>/<name>)")] = None,
    overrides: SetOption = None,
    launcher: LauncherOption = "local",
    cluster: ClusterOption = "slurm",
    partition: PartitionOption = None,
    account: AccountOption = None,
    gpus_per_job: GpusOption = 0,
    time_minutes: TimeOption = 60,
    array_parallelism: ParallelOption = 8,
    max_retries: RetriesOption = 1,
    seed_workers: SeedWorkersOption = 1,
) -> None:
    """Every chosen method on the config's data, each seed, into one leaderboard; finished runs are reused.

    One zero-shot and one fine-tuning run per seed serve every method (WiSE-FT, OSE and VRF combine that
    fine-tune); writes <out>/seed<k>/<method>/, leaderboard.json/.md/.csv and report.md.
    """
    from robustft.compare import (
        execute_comparison,
        load_compare_config,
        parse_methods_option,
        parse_seeds_option,
        print_leaderboard,
        seed_workers_launcher,
    )

    side_by_side = seed_workers_launcher(seed_workers, launcher)  # bad options fail before the config is read
    base, settings = load_compare_config(config, overrides)
    chosen = parse_methods_option(methods) if methods else parse_methods_option(",".join(settings.methods or []))
    chosen_seeds = parse_seeds_option(seeds) if seeds else settings.seeds or [base.seed]
    directory = out or base.output_dir / base.name
    comparison = execute_comparison(
        base,
        chosen,
        chosen_seeds,
        directory,
        log=console.print,
        progress=base.train.progress,
        settings=settings,
        source=str(config),
        launcher=side_by_side
        or _launcher(launcher, cluster, partition, account, gpus_per_job, time_minutes, array_parallelism, max_retries),
    )
    if comparison.leaderboard is None:
        raise typer.Exit(1)
    print_leaderboard(comparison.leaderboard, console)
    console.print(f"leaderboard: {directory / 'leaderboard.md'}; report: {directory / 'report.md'}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except RobustftError as error:
        from robustft.preflight import PreflightError

        lines = [problem.line() for problem in error.problems] if isinstance(error, PreflightError) else []
        for line in lines or [_one_line(error)]:  # preflight: every problem found, one line each
            print(f"robustft: error: {line}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a write robustft does not wrap itself: full disk, read-only or missing folder
        if error.errno not in _USER_ERRNOS:
            raise
        print(f"robustft: error: {error.filename or 'a file'}: {os.strerror(error.errno)}", file=sys.stderr)
        sys.exit(2)


# A full disk or quota, a file-size limit, a read-only filesystem, no permission, a folder that is a file.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EEXIST}


def _one_line(error: RobustftError) -> str:
    """The error's own message. A DataLoader worker re-raises an error as the same class with the worker's
    traceback in its message ("Caught DataError in DataLoader worker ..."); its last line is the original."""
    message = str(error)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.partition(f"{type(error).__name__}: ")[2] or last
