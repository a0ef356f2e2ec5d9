"""The `linconvert` command: parse, call the library, render.

Exit codes are mapped here and nowhere else. Click runs with standalone_mode=False so that
every outcome goes through `main`'s one handler. Nothing heavy is imported at module level, so
`linconvert --help` is instant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ConvertError, Terminated


class Settings:
    """How much to say, for one run of the command line (the context's `obj`)."""

    def __init__(self) -> None:
        self.verbose = 0
        self.quiet = False


def _settings() -> Settings:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Settings) if ctx is not None else None
    return obj if obj is not None else Settings()


def _set_verbose(ctx: click.Context, param: click.Parameter, value: int) -> int:
    settings = ctx.find_object(Settings)
    if settings is not None:
        settings.verbose = max(settings.verbose, value or 0)
        if settings.verbose:  # libraries' own loggers (the ONNX exporter's) may speak too
            import logging

            logging.getLogger("linconvert").setLevel(logging.DEBUG)
    return value


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    settings = ctx.find_object(Settings)
    if settings is not None:
        settings.quiet = settings.quiet or bool(value)
    return value


def options(*decorators: Callable[..., Any]) -> Callable[..., Any]:
    """Apply option decorators in the order written (the order --help lists them)."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def verbosity(f: Callable[..., Any]) -> Callable[..., Any]:
    return options(
        click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbose,
                     is_eager=True, help="Say more; -v also shows tracebacks of internal errors."),
        click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                     is_eager=True, help="Print no warnings or summaries on stderr."),
    )(f)


def source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return options(
        click.option("--state-dict-key", metavar="A.B",
                     help="Dotted path of the state dict inside a .pt training checkpoint."),
        click.option("--allow-global", "allow_global", multiple=True, metavar="MODULE.NAME",
                     help="Trust this pickle global when loading .pt files (repeatable)."),
    )(f)


def selection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """SELECTION: which keys are transposed, dropped, renamed (to-*, verify, batch)."""
    return options(
        click.option("--layers", multiple=True, metavar="GLOB",
                     help="Source keys that are linear weights to transpose (glob, or re:REGEX; "
                          "repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Source keys never to transpose (repeatable)."),
        click.option("--drop", multiple=True, metavar="GLOB",
                     help="Source keys to leave out of the output (repeatable)."),
        click.option("--rename", multiple=True, nargs=2, metavar="FROM TO",
                     help="Regex substitution on every key, applied in order (repeatable)."),
        click.option("--stack", multiple=True, nargs=2, metavar="FROM TO",
                     help="Stack per-expert tensors FROM (with {e}, e.g. 'experts.{e}.w1."
                          "weight') into one TO ('experts.w1'), or unstack TO into them "
                          "(repeatable)."),
        click.option("--split", multiple=True, nargs=2, metavar="FROM TO[,TO...]",
                     help="Split a fused tensor FROM into its parts TO along the output dim, or "
                          "merge the parts into it (repeatable; sizes and heads: [[split]])."),
        click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML rules file: layers, exclude, drop, [[rename]], [[stack]]."),
        click.option("--preset", metavar="NAME",
                     help="A shipped rules preset (see `linconvert presets`)."),
        click.option("--model", metavar="MODULE:FACTORY",
                     help="Reference model in the target layout, built on the meta device."),
        source_options,
    )(f)


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where and how outputs are written (to-*, batch)."""
    return options(
        click.option("--format", "fmt", type=click.Choice(["safetensors", "pt", "onnx"]),
                     help="Output format when the destination does not say it by its suffix."),
        click.option("--max-shard-size", metavar="SIZE",
                     help="Write sharded safetensors with shards of at most SIZE (e.g. 5GB)."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Verify each written file, read back from disk, before publishing "
                          "it."),
    )(f)


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
                        help="Where verification runs its forward passes.")(f)


def report_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--report", "report_path",
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="Write the plan and outcome (or the report) as JSON to this file.")(f)


def html_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--html", type=click.Path(dir_okay=False, path_type=Path),
                        help="Write a self-contained verdict page (HTML, no network) to this "
                             "file, also when verification fails.")(f)


def input_options(mode: str) -> Callable[..., Any]:
    """The example inputs of a whole model (ONNX export with --model; whole-model verify)."""
    return options(
        click.option("--input-shape", multiple=True, callback=_input_shape, metavar="4,784",
                     help=f"{mode}: the shape of one input (repeatable, in order)."),
        click.option("--input-dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "float64", "float16", "bfloat16", "int64",
                                        "int32"]),
                     help=f"{mode}: the inputs' dtype (int64 for token ids)."),
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _warn(message: str) -> None:
    if not _settings().quiet:
        click.echo(f"linconvert: warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="linconvert")
@verbosity
def cli() -> None:
    """Migrate checkpoints between nn.Parameter (in x out, x @ W + b) and nn.Linear (out x in)
    weight layouts.

    Exit codes: 0 done (and equivalent where verified), 1 verification found a difference,
    2 usage or a selection the tool will not guess, 3 unsafe input, 4 unreadable or corrupt
    input, 5 output not written, 70 internal error, 130/143 interrupted.
    """


def _input_shape(ctx: click.Context, param: click.Parameter,
                 value: tuple[str, ...]) -> list[tuple[int, ...]]:
    shapes = []
    for text in value:
        try:
            shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
        except ValueError:
            shape = ()
        if not shape or any(d < 0 for d in shape):
            raise click.BadParameter(f"'{text}' is not a shape; write e.g. 4,784.")
        shapes.append(shape)
    return shapes


def _conversion_command(name: str, layout_name: str | None, doc: str) -> None:
    if layout_name is None:  # export: DST required, the layout kept
        destination = click.option(
            "-o", "--output", "dst", type=click.Path(path_type=str), required=True,
            help="Where to write (.safetensors, .pt/.pth/.bin, .onnx, or a folder: a path "
                 "ending in /).")
        layout = click.option(
            "--layout", type=click.Choice(["linear", "param"]),
            help="The layout SRC holds, to record (default: its provenance, else the evidence).")
    else:
        # a str, not a Path: a trailing "/" says "a folder" and Path would drop it
        destination = click.option(
            "-o", "--output", "dst", type=click.Path(path_type=str),
            help="Where to write (.safetensors, .pt/.pth/.bin, .onnx, or a folder: a path "
                 f"ending in /). Default: NAME.{layout_name}.EXT beside SRC.")

        def layout(f: Callable[..., Any]) -> Callable[..., Any]:
            return f

    @cli.command(name, help=doc)
    @click.argument("src", type=click.Path(exists=True, path_type=Path))
    @destination
    @layout
    @output_options
    @selection_options
    @click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
    @device_option
    @click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
    @report_option
    @html_option
    @click.option("--opset", type=click.IntRange(min=13),
                  help="ONNX opset (default 18).")
    @click.option("--external-data", is_flag=True,
                  help="ONNX: put the weights in DST.data beside DST (automatic past 2 GB).")
    @input_options("ONNX with --model (exports the whole model)")
    @verbosity
    def command(src: Path, dst: str | None, fmt: str | None, max_shard_size: str | None,
                dry_run: bool, verify: bool, device: str, overwrite: bool,
                report_path: Path | None, **selection: Any) -> None:
        if not dry_run:  # the source's hash starts now, while the rest is imported
            from .digest import start_early

            start_early(src)
        from .api import convert
        from .errors import NotEquivalentError
        from .layout import Layout
        from .report import render_plan, render_verify, write_json

        bar = None if dry_run else _progress_bar("B", scale=True)

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.n = done
                bar.refresh()

        from .command import VERIFY_ELSEWHERE

        token = VERIFY_ELSEWHERE.set(True)  # one conversion: verify in a second process
        try:
            target = Layout(layout_name) if layout_name else None
            report = convert(src, dst, target=target, dry_run=dry_run,
                             overwrite=overwrite, format=fmt, max_shard_size=max_shard_size,
                             verify=verify, device=device, progress=progress, **selection)
        except NotEquivalentError as e:
            if e.report is not None:
                click.echo(render_verify(e.report))
                if report_path is not None:
                    write_json(report_path, e.report.to_dict())
            raise
        finally:
            VERIFY_ELSEWHERE.reset(token)
            if bar is not None:
                bar.close()
        for w in report.warnings:
            _warn(w)
        if _settings().verbose:
            for note in report.plan.notes:
                click.echo(f"linconvert: note: {note}", err=True)
        if report_path is not None:
            write_json(report_path, report.to_dict())
        if dry_run:
            click.echo(render_plan(report.plan))
            return
        click.echo(report.destination)
        if not _settings().quiet:
            plan = report.plan
            checked = report.verification
            verdict = (f", verified equivalent ({_count(len(checked.results), 'check')})"
                       if checked else ", not verified")
            click.echo(f"linconvert: wrote '{report.destination}': "
                       f"{_count(report.keys_written, 'tensor')} "
                       f"({len(plan.transposed)} transposed, {len(plan.dropped)} dropped), "
                       f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.2f} s{verdict}.",
                       err=True)


_conversion_command("to-linear", "linear",
                    "Rewrite SRC so its linear weights are nn.Linear's out x in.")
_conversion_command("to-param", "param",
                    "Rewrite SRC so its linear weights are the param layout's in x out.")
_conversion_command("export", None,
                    "Write SRC in another format (safetensors, .pt, ONNX) with its layout "
                    "unchanged, verified the same way.")


@cli.command("verify")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(exists=True, path_type=Path))
@selection_options
@device_option
@click.option("--atol", type=click.FloatRange(min=0),
              help="Absolute tolerance (scaled by sqrt(in) per layer).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Random input rows per layer.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the inputs.")
@click.option("--source-model", metavar="MODULE:FACTORY",
              help="Whole-model mode: the model SRC loads into.")
@click.option("--target-model", metavar="MODULE:FACTORY",
              help="Whole-model mode: the model DST loads into.")
@input_options("Whole-model mode")
@click.option("--input-high", type=click.IntRange(min=1),
              help="Whole-model mode: integer inputs are drawn from [0, N).")
@click.option("--logits", metavar="NAME",
              help="Whole-model mode: the output that is logits, by name or position (e.g. 0), "
                   "where none is named 'logits'.")
@click.option("--min-cosine", type=float, metavar="X",
              help="Whole-model mode: fail an output whose cosine similarity is below X "
                   "(instead of the element-wise tolerance).")
@click.option("--max-kl", type=click.FloatRange(min=0), metavar="X",
              help="Whole-model mode: fail logits whose KL(softmax src || softmax dst), mean over "
                   "rows, exceeds X.")
@click.option("--min-top1", type=click.FloatRange(0, 1), metavar="X",
              help="Whole-model mode: fail logits whose top-1 agreement (fraction of rows) is "
                   "below X.")
@click.option("--reference", type=click.Choice(["float32", "float64"]),
              help="Also run the source side in this dtype and report each side's distance "
                   "from it.")
@report_option
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report as JUnit XML (one test case per layer).")
@html_option
@verbosity
def verify_cmd(src: Path, dst: Path, report_path: Path | None, junit_path: Path | None,
               **options: Any) -> None:
    """Check that DST computes what SRC computes (exit 0) or name what differs (exit 1)."""
    from .api import verify
    from .errors import NotEquivalentError
    from .report import render_verify, write_json, write_junit

    report = verify(src, dst, **options)
    click.echo(render_verify(report))
    for w in report.warnings:
        _warn(w)
    if report_path is not None:
        write_json(report_path, report.to_dict())
    if junit_path is not None:
        write_junit(junit_path, report)
    if not report.equivalent:
        raise NotEquivalentError(f"'{dst}' is not equivalent to '{src}': "
                                 + ", ".join(f"'{r.name}'" + (f" ({r.message})" if r.figures
                                                              and r.figures.gated else "")
                                             for r in report.failures[:10])
                                 + (" and more" if len(report.failures) > 10 else "") + ".")


@cli.command("batch")
@click.argument("sources", nargs=-1)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV (with a header) or JSON lines: source, destination, direction and "
                   "per-row options.")
@click.option("--direction", type=click.Choice(["to-linear", "to-param"]),
              help="Direction for plain inputs (manifest rows may say their own).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write outputs here, mirroring the inputs' relative paths.")
@click.option("-j", "--jobs", type=click.IntRange(min=1),
              help="Worker processes (default: the CPUs this process may use).")
@click.option("--shard", metavar="I/N",
              help="Take items k with k mod N == I (0-based, items sorted by source path).")
@click.option("--force", is_flag=True, help="Redo items the journal or provenance says are done.")
@click.option("--overwrite", is_flag=True,
              help="Replace existing outputs that no journal or provenance accounts for.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed item.")
@report_option
@html_option
@output_options
@selection_options
@verbosity
def batch_cmd(sources: tuple[str, ...], report_path: Path | None, fmt: str | None,
              **options: Any) -> None:
    """Convert many checkpoints: paths, globs, folders or a manifest, in parallel, resumable."""
    from .batching import batch
    from .errors import BatchError
    from .report import render_batch_line, render_batch_summary, write_json

    bar = _progress_bar("ckpt")

    def on_plan(n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.refresh()

    def on_result(res: Any) -> None:
        if bar is not None:
            bar.clear()
        click.echo(render_batch_line(res))
        if bar is not None:
            bar.update(1)

    try:
        report = batch(sources, format=fmt, on_result=on_result, on_plan=on_plan,
                       **{k: v for k, v in options.items() if v not in (None, ())})
    finally:
        if bar is not None:
            bar.close()
    if not _settings().quiet:  # the lines above were the data; this is the summary
        click.echo(render_batch_summary(report), err=True)
    if report_path is not None:
        write_json(report_path, report.to_dict())
    if report.exit_code:
        failed = [r for r in report.items if r.exit_code]
        raise BatchError(f"{len(failed)} of {len(report.items)} items failed (worst exit code "
                         f"{report.exit_code}): " + ", ".join(f"'{r.source}'" for r in
                                                              failed[:5])
                         + (" and more" if len(failed) > 5 else "") + ".", report.exit_code)


def _progress_bar(unit: str, scale: bool = False) -> Any:
    """A progress bar on stderr, only on a terminal."""
    if _settings().quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=None, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                file=sys.stderr, leave=False)


@cli.command("inspect")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@source_options
@verbosity
def inspect_cmd(src: Path, as_json: bool, state_dict_key: str | None,
                allow_global: tuple[str, ...]) -> None:
    """List SRC's tensors with shape, dtype and detected layout, and the evidence."""
    from .api import inspect_checkpoint
    from .report import render_inspect

    report = inspect_checkpoint(src, state_dict_key=state_dict_key, allow_global=allow_global)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_inspect(report))


@cli.command("presets")
@click.argument("name", required=False)
@verbosity
def presets_cmd(name: str | None) -> None:
    """List the shipped rules presets, or print one."""
    from .selection import list_presets, preset_text

    if name:
        click.echo(preset_text(name).rstrip())
        return
    for preset, description in list_presets().items():
        click.echo(f"{preset}\t{description}")


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code (the one handler that maps outcomes)."""
    import shlex

    from .command import COMMAND, EARLY_VERIFIER

    args = sys.argv[1:] if argv is None else argv
    # what made a verdict page: this command line, for this run only
    token = COMMAND.set(shlex.join(["linconvert", *args]))
    verifier = _early_verifier(args)
    early = EARLY_VERIFIER.set(verifier)
    try:
        return _run(argv)
    finally:
        EARLY_VERIFIER.reset(early)
        if verifier is not None:  # not taken, or taken and ended: nothing is waited for
            verifier.close(kill=True)
        if "convert.digest" in sys.modules:  # an early hash nothing took (a refusal)
            sys.modules["convert.digest"].stop_early()
        COMMAND.reset(token)


def _torch_imported() -> bool:
    """Whether this process has torch (then it verifies here: convert.api)."""
    return "torch" in sys.modules


def _early_verifier(args: list[str]) -> Any:
    """The verifying process of a conversion that will verify, started now: it imports torch
    (seconds) while this process imports the rest and plans. A guess from the words alone;
    a wrong one costs a process killed at the end, and a conversion with none starts its own."""
    command = next((a for a in args if not a.startswith("-")), None)  # past -v, -q
    if (command not in ("to-linear", "to-param", "export") or _torch_imported()
            or any(a in ("--no-verify", "--dry-run", "--help", "-h", "--version", "onnx")
                   or a.lower().endswith((".onnx", "=onnx")) for a in args)):
        return None
    from .verify.worker import VerifyProcess

    return VerifyProcess()


def _run(argv: list[str] | None) -> int:
    settings = Settings()
    if "logging" in sys.modules:  # a previous run's -v (in-process callers, tests)
        sys.modules["logging"].getLogger("linconvert").setLevel(0)
    try:
        rv = cli.main(args=argv, prog_name="linconvert", standalone_mode=False, obj=settings)
        return rv if isinstance(rv, int) else 0
    except ConvertError as e:
        click.echo(f"linconvert: error: {e}", err=True)
        if settings.verbose:
            traceback.print_exc()
        return e.exit_code
    except click.exceptions.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Abort:
        click.echo("linconvert: interrupted.", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("linconvert: interrupted.", err=True)
        return 130
    except Terminated:
        click.echo("linconvert: terminated.", err=True)
        return 143
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 - the one place a bug becomes exit 70
        click.echo(f"linconvert: internal error ({type(e).__name__}: {e}); this is a bug, "
                   "please report it with the output of the same command run with -v.", err=True)
        if settings.verbose:
            traceback.print_exc()
        return 70


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console-script entry point."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    sys.exit(code)
