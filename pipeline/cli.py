"""The `edgesmith` command. It only parses arguments and calls the Python API (`edgesmith.*`); no pipeline logic
lives here."""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgesmith.errors import EdgesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress, export, compile and benchmark PyTorch models for edge devices.")
targets_app = typer.Typer(invoke_without_command=True, no_args_is_help=False,
                          help="List device profiles; `targets show NAME` prints one.")
app.add_typer(targets_app, name="targets")
bundle_app = typer.Typer(no_args_is_help=True, help="Deployment bundles: `bundle verify DIR`.")
app.add_typer(bundle_app, name="bundle")
board_app = typer.Typer(no_args_is_help=True, help="Emulated boards: `board emulate aarch64 -- CMD`.")
app.add_typer(board_app, name="board")
# Piped output keeps full-width tables rather than rich's 80-column fallback.
stdout = Console(width=max(shutil.get_terminal_size((120, 24)).columns, 120))


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
        None, "--profiles-dir", help="Extra folder(s) of device profile YAML files (also EDGESMITH_PROFILES).")):
    if profiles_dir:
        current = [p for p in os.environ.get("EDGESMITH_PROFILES", "").split(os.pathsep) if p]
        os.environ["EDGESMITH_PROFILES"] = os.pathsep.join(current + [str(p) for p in profiles_dir])


@app.command()
def run(recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML; the built-in default recipe if omitted."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a field: key.path=value (repeatable)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<recipe name>)."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Stage cache (default: "
                                                 "$EDGESMITH_CACHE_DIR or ~/.cache/edgesmith)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every step, replacing cached ones."),
        targets: Optional[str] = typer.Option(None, "--targets", help="Device profiles, comma-separated (replaces "
                                              "the recipe's targets), e.g. x86-host,raspberry-pi-4."),
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
        result = edgesmith.run(resolved, out or Path("runs") / resolved.name, cache_dir, use_cache=not no_cache)
        for table in report.tables(result.rows):
            stdout.print(table)
        stdout.print(f"run folder: {result.out_dir}  (executed: {', '.join(result.executed) or 'nothing, all cached'})")


@app.command()
def batch(matrix: Path = typer.Argument(..., help="Matrix YAML: recipe(s), models, targets, set, executor."),
          out: Optional[Path] = typer.Option(None, "--out", help="Batch folder (default: runs/<matrix name>)."),
          cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Stage cache shared by every job "
                                                   "(default: $EDGESMITH_CACHE_DIR or ~/.cache/edgesmith)."),
          executor: Optional[str] = typer.Option(None, "--executor", help="local (a process pool) or ray; "
                                                 "replaces the matrix's executor.kind."),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (auto, "
                                                    "ray://head:10001); default: a local Ray instance."),
          max_parallel: Optional[int] = typer.Option(None, "--max-parallel", min=1, help="Jobs at once (default: "
                                                     "as many as cores and memory allow)."),
          only: Optional[str] = typer.Option(None, "--only", help="Run only the jobs whose label matches this "
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
    with _user_errors(debug):
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


@app.command()
def report(folders: list[Path] = typer.Argument(..., help="Run folders and/or batch folders."),
           out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
           debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """One self-contained HTML page comparing run and batch folders: latency vs metric per device, what ships."""
    with _user_errors(debug):
        import edgesmith

        stdout.print(f"report: {edgesmith.report(folders, out)}", highlight=False)


@app.command()
def evaluate(onnx_file: Path = typer.Argument(..., help="An ONNX file taking the recipe model's inputs."),
             recipe: Optional[Path] = typer.Argument(None, help="Recipe whose data and model define the inputs."),
             set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe field (repeatable)."),
             debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Top-1 accuracy of any ONNX file on the recipe's validation split (the split every stage is scored on)."""
    with _user_errors(debug):
        import json

        import edgesmith

        stdout.print(json.dumps(edgesmith.evaluate(onnx_file, edgesmith.load_recipe(recipe, set_ or []))),
                     highlight=False)


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
def targets_show(name: str = typer.Argument(..., help="Profile name (see `edgesmith targets`).")):
    """Print one device profile, with host facts filled in where it asks for them."""
    with _user_errors():
        from edgesmith import load_profile

        stdout.print(yaml.safe_dump(load_profile(name).model_dump(mode="json"), sort_keys=False, allow_unicode=True,
                                     width=110), highlight=False, end="")   # "4× Cortex-A57", not an escape


@bundle_app.command("verify")
def bundle_verify(folder: Path = typer.Argument(..., help="A bundle folder, e.g. runs/<name>/bundles/<profile>."),
                  debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    """Re-check every file's sha256 and run parity on this machine wherever the bundle's backend runs here."""
    with _user_errors(debug):
        import json

        from edgesmith.pipeline.bundle import verify

        stdout.print(json.dumps(verify(folder), indent=2), highlight=False)


@board_app.command("emulate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def board_emulate(ctx: typer.Context,
                  arch: str = typer.Argument("aarch64", help="Board architecture (aarch64)."),
                  prepare_only: bool = typer.Option(False, "--prepare", help="Only build the board's sysroot."),
                  rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker",
                                                            help="HOST:PORT: run a TVM RPC server on the board."),
                  rpc_key: str = typer.Option("emulated-aarch64", "--rpc-key", help="Key the RPC server registers."),
                  root: Optional[Path] = typer.Option(None, "--root", help="Board folder (default: "
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
    sys.exit(app())
