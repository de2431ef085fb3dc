"""The `edgesmith` command. It only parses arguments and calls the Python API (`edgesmith.*`); no pipeline logic
lives here."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgesmith.errors import EdgesmithError

# Plain help (click's): no `<bool>` / `<list[Path]>` type tags, and it reads the same in a terminal and a log.
PLAIN = {"rich_markup_mode": None}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, **PLAIN,
                  help="Compress, export, compile and benchmark PyTorch models for edge devices.")
targets_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, **PLAIN,
                          help="List device profiles; `targets show NAME` prints one.")
app.add_typer(targets_app, name="targets")
bundle_app = typer.Typer(no_args_is_help=True, help="Deployment bundles: `bundle verify DIR`.", **PLAIN)
app.add_typer(bundle_app, name="bundle")
board_app = typer.Typer(no_args_is_help=True, help="Emulated boards: `board emulate aarch64 -- CMD`.", **PLAIN)
app.add_typer(board_app, name="board")
# A terminal's width on a terminal; in a log or a pipe, tables at their natural width (nothing folded or cut).
stdout = Console() if sys.stdout.isatty() else Console(width=100_000)


@contextmanager
def _user_errors(debug: bool = False):
    """Errors a user can fix become one line on stderr and exit code 2; --debug shows the traceback instead."""
    try:
        yield
    except EdgesmithError as exc:
        if debug:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.callback()
def main(profiles_dir: Optional[list[Path]] = typer.Option(
        None, "--profiles-dir", metavar="DIR", help="Extra folder(s) of device profile YAML files (also "
        "EDGESMITH_PROFILES).")):
    if profiles_dir:
        current = [p for p in os.environ.get("EDGESMITH_PROFILES", "").split(os.pathsep) if p]
        os.environ["EDGESMITH_PROFILES"] = os.pathsep.join(current + [str(p) for p in profiles_dir])


@app.command()
def run(recipe: Optional[Path] = typer.Argument(None, metavar="[RECIPE]",
                                                help="Recipe YAML; the built-in default recipe if omitted."),
        set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                 help="Override a field: key.path=value (repeatable)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
        out: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                           help="Run folder (default: runs/<recipe name>)."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", metavar="DIR", help="Stage cache (default: "
                                                 "$EDGESMITH_CACHE_DIR or ~/.cache/edgesmith)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every step, replacing cached ones."),
        targets: Optional[str] = typer.Option(None, "--targets", metavar="A,B", help="Device profiles, "
                                              "comma-separated (replaces the recipe's targets), e.g. "
                                              "x86-host,raspberry-pi-4."),
        force: bool = typer.Option(False, "--force", help="Run into a folder that holds another recipe's run "
                                   "(it is emptied first)."),
        as_json: bool = typer.Option(False, "--json", help="Print the results rows as JSON on stdout, nothing else."),
        quiet: bool = typer.Option(False, "--quiet", help="Print only errors and the final summary."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Run a recipe: model → stages → ONNX export (parity gate) → per-target compile and benchmark."""
    with _user_errors(debug):
        import json

        import edgesmith
        from edgesmith.pipeline import report

        chosen = [t.strip() for t in targets.split(",") if t.strip()] if targets is not None else None
        resolved = edgesmith.load_recipe(recipe, [*(set_ or []), *([f"targets={json.dumps(chosen)}"]
                                                                    if chosen is not None else [])])
        if dry_run:
            stdout.print(resolved.to_yaml(), highlight=False, end="")
            return
        result = edgesmith.run(resolved, out or Path("runs") / resolved.name, cache_dir, use_cache=not no_cache,
                               quiet=quiet, force=force)
        if as_json:
            print(json.dumps(result.rows, indent=2, default=str))
            return
        for table in report.tables(result.rows):
            stdout.print(table)
        stdout.print(f"run folder: {result.out_dir}  (results.csv, results.json, manifest.json)", highlight=False)
        stdout.print(f"executed: {', '.join(result.executed_labels) or 'nothing, all cached'}", highlight=False)
        for line in _latency_budget_lines(result.rows) + _ship_lines(result):
            stdout.print(line, highlight=False, soft_wrap=True)


def _latency_budget_lines(rows: list[dict]) -> list[str]:
    """A prune stage's latency budget: what it was measured on, and what it reached."""
    lines = []
    for row in rows:
        found = row.get("latency_budget")
        if found and "measured_p50_ms" in found:
            search = found["search"]
            lines.append(f"latency budget {found['target']} ({found['backend']}/{found['precision']}, "
                         f"{found['measured_on']}): p50 {found['measured_p50_ms']:.3f} ms ≤ {found['budget_ms']:.3f} "
                         f"ms, {found['speedup']:.2f}× the unpruned model; {len(found['layer_ratios'])} layer ratios "
                         f"from {search['candidates']} candidates and {search['measurements']} measurements in "
                         f"{search['seconds']:.0f} s (table {'cached' if search['table_cached'] else 'measured'})")
    return lines


def _ship_lines(result) -> list[str]:
    """What to ship: each target's bundle and the one line that loads it (its README.md says the rest)."""
    lines = []
    for target, folder in result.bundles.items():
        row = next(r for r in result.rows if r.get("bundle") and r["target"] == target)
        lines += [f"ship {target}: {folder}/  ({row.get('backend')}/{row['precision']}; README.md inside)",
                  f"  load: import sys; sys.path.insert(0, '{folder}'); from edgesmith_runtime import open_bundle; "
                  f"model = open_bundle('{folder}')"]
    return lines


@app.command()
def batch(matrix: Path = typer.Argument(..., metavar="MATRIX",
                                        help="Matrix YAML: recipe(s), models, targets, set, executor."),
          out: Optional[Path] = typer.Option(None, "--out", metavar="DIR",
                                             help="Batch folder (default: runs/<matrix name>)."),
          cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", metavar="DIR",
                                                   help="Stage cache shared by every job "
                                                   "(default: $EDGESMITH_CACHE_DIR or ~/.cache/edgesmith)."),
          executor: Optional[str] = typer.Option(None, "--executor", metavar="KIND",
                                                 help="local (a process pool) or ray; "
                                                 "replaces the matrix's executor.kind."),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDR",
                                                    help="Join this Ray cluster (auto, "
                                                    "ray://head:10001); default: a local Ray instance."),
          max_parallel: Optional[int] = typer.Option(None, "--max-parallel", metavar="N",
                                                     min=1, help="Jobs at once (default: "
                                                     "as many as cores and memory allow)."),
          only: Optional[str] = typer.Option(None, "--only", metavar="GLOB",
                                             help="Run only the jobs whose label matches this "
                                             "glob, e.g. 'mnist_cnn*'."),
          no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every step, replacing cached ones."),
          quiet: bool = typer.Option(False, "--quiet", help="Print only errors and the final summary."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Run every (model, recipe) job of a matrix on every target; compare them in results.csv and report.html.
    Exit code 1 when a job failed (the others finish), 130 on Ctrl-C (finished steps stay cached)."""
    if executor not in (None, "local", "ray"):
        Console(stderr=True).print(f"[bold red]error:[/] --executor {escape(executor)}: choose local or ray",
                                   highlight=False)
        raise typer.Exit(2)
    _start_executor_early(matrix, executor, ray_address)
    with _closing_early_ray(), _user_errors(debug):   # the error's line first, then Ray stops
        import edgesmith
        from edgesmith.pipeline.batch import summary_table

        try:
            result = edgesmith.batch(matrix, out, cache_dir, executor=executor, ray_address=ray_address,
                                     max_parallel=max_parallel, only=only, use_cache=not no_cache, quiet=quiet)
        except KeyboardInterrupt:
            Console(stderr=True).print("interrupted: finished steps are cached; run the same command to resume")
            raise typer.Exit(130) from None
        stdout.print(summary_table(result))
        stdout.print(f"batch folder: {result.out_dir}  (results.csv, report.html)", highlight=False)
        if result.failed:
            raise typer.Exit(1)


def _executor_read_early(matrix: Path, executor: str | None, ray_address: str | None) -> tuple[str, str | None]:
    """The executor kind and Ray address the batch will use, read before the matrix is validated (`none` for a
    file that cannot be read: the validation reports what is wrong with it, and nothing is started for it)."""
    try:
        section = yaml.safe_load(matrix.read_text(encoding="utf-8")).get("executor") or {}
        address = ray_address or section.get("address")
        return executor or ("ray" if ray_address else section.get("kind", "local")), address
    except Exception:
        return "none", None


def _start_executor_early(matrix: Path, executor: str | None, ray_address: str | None) -> None:
    """The local pool's worker server, or Ray, starts on another core while this process imports and validates."""
    kind, address = _executor_read_early(matrix, executor, ray_address)
    if kind == "local":
        from edgesmith.pipeline import worker_server

        try:
            worker_server.start()
        except OSError:
            pass   # the pool tries again when it starts, and reports what fails then
    elif kind == "ray" and isinstance(address, (str, type(None))):
        from edgesmith.pipeline import ray_instance

        ray_instance.start_early(address)


@contextmanager
def _closing_early_ray():
    """A Ray instance started early and not taken by the batch (the matrix was refused) is stopped before exit."""
    try:
        yield
    finally:
        if "edgesmith.pipeline.ray_instance" in sys.modules:
            sys.modules["edgesmith.pipeline.ray_instance"].close_early()


@app.command()
def report(folders: list[Path] = typer.Argument(..., metavar="FOLDER...", help="Run folders and/or batch folders."),
           out: Path = typer.Option(Path("report.html"), "--out", metavar="DIR", help="The HTML file to write."),
           debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """One self-contained HTML page comparing run and batch folders: latency vs metric per device, what ships."""
    with _user_errors(debug):
        import edgesmith

        stdout.print(f"report: {edgesmith.report(folders, out)}", highlight=False)


@app.command()
def evaluate(onnx_file: Path = typer.Argument(..., metavar="FILE.onnx",
                                              help="An ONNX file taking the recipe model's inputs."),
             recipe: Optional[Path] = typer.Argument(None, metavar="[RECIPE]",
                                                     help="Recipe whose data and model define the inputs."),
             set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                                 help="Override a recipe field (repeatable)."),
             debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Top-1 accuracy of any ONNX file on the recipe's validation split (the split every stage is scored on)."""
    with _user_errors(debug):
        import json

        import edgesmith

        stdout.print(json.dumps(edgesmith.evaluate(onnx_file, edgesmith.load_recipe(recipe, set_ or []))),
                     highlight=False)


@app.command()
def bench(onnx_file: Path = typer.Argument(..., metavar="FILE.onnx", help="Any ONNX file."),
          target: str = typer.Option("x86-host", "--target", metavar="NAME",
                                     help="Device profile whose backends time the file (a board needs --rpc-tracker)."),
          batch_size: int = typer.Option(1, "--batch", metavar="N", min=1, help="Batch size of the timed inputs."),
          runs: int = typer.Option(200, "--runs", metavar="N", min=1, help="Timed runs after the warm-up."),
          warmup: int = typer.Option(20, "--warmup", metavar="N", min=0, help="Untimed runs first."),
          rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", metavar="HOST:PORT",
                                                    help="Time on a board: the tracker its bundle server registers "
                                                    "with (under the profile's rpc_key)."),
          as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Latency of any ONNX file with the pipeline's statistics (p50/p90/p99): on this host with ONNX Runtime and
    TVM, or on a board over RPC (--target BOARD --rpc-tracker HOST:PORT)."""
    with _user_errors(debug):
        import json

        import edgesmith

        rows = edgesmith.bench(onnx_file, target, batch=batch_size, runs=runs, warmup=warmup,
                               rpc_tracker=rpc_tracker)
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title=f"{onnx_file} on {target}, batch {batch_size}", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("backend", "precision", "p50 ms", "p90 ms", "p99 ms", "throughput/s", "measured on", "status"):
            table.add_column(column, justify="right" if column.endswith(("ms", "/s")) else "left")
        for r in rows:
            stats = r.get("latency_ms") or {}
            cells = [f"{stats[k]:.3f}" if k in stats else "—" for k in ("p50", "p90", "p99")]
            table.add_row(r["backend"], r["precision"], *cells, f"{stats['throughput']:.1f}" if stats else "—",
                          r.get("measured_on") or "this host", r["status"])
        stdout.print(table)


@app.command("runs")
def runs_cmd(folder: Path = typer.Argument(Path("runs"), metavar="[DIR]",
                                           help="Where run folders are (searched below too)."),
             debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """List run folders, newest first: recipe, model, date, and what each ships per target."""
    with _user_errors(debug):
        import edgesmith

        table = Table(title=f"runs in {folder}", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("folder", "recipe", "model", "started", "seconds", "ships"):
            table.add_column(column, justify="right" if column == "seconds" else "left")
        for r in edgesmith.runs(folder):
            table.add_row(r["folder"], r["recipe"], r["model"], (r["started"] or "")[:19].replace("T", " "),
                          f"{r['seconds']:.0f}" if r["seconds"] is not None else "—",
                          "; ".join(f"{t}: {c}" for t, c in r["shipped"].items()) or "nothing")
        stdout.print(table)


@app.command("models")
def models_cmd():
    """List the registered models with their defaults."""
    from edgesmith import models

    table = Table(title="registered models")
    for col in ("name", "description", "arguments"):
        table.add_column(col)
    for entry in models.entries():
        args = ", ".join(f"{k}={v}" for k, v in entry.defaults().items())
        table.add_row(entry.name, entry.summary, args)
    stdout.print(table)


@targets_app.callback()
def targets_list(ctx: typer.Context):
    """List device profiles."""
    if ctx.invoked_subcommand:
        return
    with _user_errors():
        from edgesmith import list_profiles, load_profile

        table = Table(title="device profiles")
        for col in ("name", "arch", "backends", "quant scheme", "description"):
            table.add_column(col)
        for name in list_profiles():
            p = load_profile(name)
            table.add_row(p.name, p.arch, ", ".join(p.backends), p.quant_scheme, p.description)
        stdout.print(table)


@targets_app.command("show")
def targets_show(name: str = typer.Argument(..., metavar="NAME", help="Profile name (see `edgesmith targets`).")):
    """Print one device profile, with host facts filled in where it asks for them."""
    with _user_errors():
        from edgesmith import load_profile

        stdout.print(yaml.safe_dump(load_profile(name).model_dump(mode="json"), sort_keys=False, allow_unicode=True,
                                     width=110), highlight=False, end="")   # "4× Cortex-A57", not an escape


@bundle_app.command("verify")
def bundle_verify(folder: Path = typer.Argument(..., metavar="DIR",
                                                help="A bundle folder, e.g. runs/<name>/bundles/<profile>."),
                  debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Re-check every file's sha256 and run parity on this machine wherever the bundle's backend runs here."""
    with _user_errors(debug):
        import json

        from edgesmith.pipeline.bundle import verify

        stdout.print(json.dumps(verify(folder), indent=2), highlight=False)


@board_app.command("emulate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def board_emulate(ctx: typer.Context,
                  arch: str = typer.Argument("aarch64", metavar="[ARCH]", help="Board architecture (aarch64)."),
                  prepare_only: bool = typer.Option(False, "--prepare", help="Only build the board's sysroot."),
                  rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", metavar="HOST:PORT",
                                                            help="HOST:PORT: run a TVM RPC server on the board."),
                  rpc_key: str = typer.Option("emulated-aarch64", "--rpc-key", metavar="KEY",
                                              help="Key the RPC server registers."),
                  root: Optional[Path] = typer.Option(None, "--root", metavar="DIR", help="Board folder (default: "
                                                      "<cache dir>/boards/<arch>)."),
                  debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Prepare a private aarch64 sysroot (Debian arm64 Python + aarch64 TVM and ONNX Runtime wheels) and run a
    command (`-- python3 script.py`) or a TVM RPC server under qemu-user. Correctness only: never latency."""
    with _user_errors(debug):
        from edgesmith import default_cache_dir
        from edgesmith.targets import board

        folder = board.prepare(root or default_cache_dir() / "boards" / arch, arch,
                               log=lambda m: Console(stderr=True).print(f"[cyan]board[/] {m}"))
        if prepare_only:
            stdout.print(f"board ready: {folder}  (python: {board.python(folder)})")
            return
        command = board.rpc_server_command(folder, rpc_tracker, rpc_key) if rpc_tracker else list(ctx.args)
        raise typer.Exit(board.run(folder, command).returncode)


def entry() -> None:
    from edgesmith.pipeline.openmp_wait import spin_count_default
    from edgesmith.pipeline.quick_exit import skip_final_collections

    os.environ.update(spin_count_default(os.environ))   # before torch loads libgomp (openmp_wait.py)
    skip_final_collections()   # a command that ran the pipeline would spend ~1 s exiting
    sys.exit(app())
