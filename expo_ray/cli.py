"""The `expo-ray` command: parses options, calls the library, prints results. Nothing else."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from ._version import __version__
from .demo.pipeline import DEMO_ALPHAS
from .errors import ExpoError
from .options import (
    ALPHA_RULE,
    DEFAULT_ALPHAS as DEFAULT_ALPHA_GRID,
    EngineOptions,
    PlanOptions,
    PromptOptions,
    SamplingOptions,
    SearchOptions,
    WriteOptions,
    click_options,
)

DEFAULT_ALPHAS = ",".join(f"{a:g}" for a in DEFAULT_ALPHA_GRID)
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")
GLOBAL_OPTIONS = ("--s3-timeout",)  # global options that take a value


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s expo-ray %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "urllib3", "botocore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ExpoGroup(click.Group):
    """Turns ExpoError into one clear line on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ExpoError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:  # a file-system failure no layer below turned into a message
            if ctx.params.get("verbose"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc} (expo-ray -v shows where)", err=True)
            sys.exit(1)

    def parse_args(self, ctx, args):
        # Global options may come anywhere (also after the subcommand): move them in front of it.
        before, rest = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
        front, others = [], []
        i = 0
        while i < len(before):
            a = before[i]
            if a in GLOBAL_FLAGS or ("=" in a and a.split("=", 1)[0] in GLOBAL_OPTIONS):
                front.append(a)
            elif a in GLOBAL_OPTIONS and i + 1 < len(before):
                front += before[i:i + 2]
                i += 1
            else:
                others.append(a)
            i += 1
        return super().parse_args(ctx, front + others + rest)


@click.group(cls=ExpoGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="expo-ray")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and the engines' own logs live (they always go to files). Anywhere on the line.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only. Anywhere on the line.")
@click.option("--s3-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS",
              envvar="EXPO_RAY_S3_TIMEOUT", show_envvar=True,
              help="How long one S3 operation may go unanswered or keep failing before it is reported (default "
                   "120; each request waits a quarter of it). Anywhere on the line.")
def main(verbose: bool, quiet: bool, s3_timeout: float | None) -> None:
    """ExPO weight extrapolation on Ray: theta = aligned + alpha * (aligned - sft).

    SRC is a model folder (safetensors shards, index, config, tokenizer): a local path,
    s3://bucket/prefix or hf://org/name[@revision]. DST is a local path or s3://bucket/prefix.
    """
    for stream in (sys.stdout, sys.stderr):  # paths that are not UTF-8 are printed escaped, not as a crash
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    _setup_logging(verbose, quiet)
    if not sys.stderr.isatty():  # nor the Hugging Face libraries' bars (download, save_pretrained)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbose:
        os.environ["EXPO_RAY_ENGINE_LOGS"] = "live"  # Ray workers inherit the driver's environment
    if s3_timeout is not None:
        os.environ["EXPO_RAY_S3_TIMEOUT"] = f"{s3_timeout:g}"  # EXPO_RAY_* travel to the Ray tasks


def _progress(no_progress: bool) -> bool:
    """Progress bars only on a terminal (a job log or a pipe gets none)."""
    return not no_progress and sys.stderr.isatty()


def _needs(extra: str, *modules: str) -> None:
    """One clear error when an optional dependency is missing (the core installs without them)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExpoError(f"this command needs {', '.join(missing)} (not installed): pip install "
                        f"'expo-ray[{extra}]' (on a machine without a GPU, vLLM comes from scripts/install_vllm.sh)")


@main.command()
@click.option("--sft", required=True, metavar="SRC", help="The SFT checkpoint the aligned model was trained from.")
@click.option("--aligned", required=True, metavar="SRC", help="The aligned (DPO/RLHF) checkpoint.")
@click.option("--alpha", "alphas", default=DEFAULT_ALPHAS, show_default=True, metavar="LIST",
              help="Comma-separated alphas; all are computed from one read of the inputs. " + ALPHA_RULE)
@click.option("--out", required=True, metavar="DST", help="Destination root; one folder per alpha (alpha_0.3/ ...).")
@click_options(PlanOptions, WriteOptions)
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray instance).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; write nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extrapolate(sft, aligned, alphas, out, address, dry_run, no_progress, **options):
    """Write one complete model folder per alpha under DST, each committed with a manifest (ALIGNED
    may be a PEFT LoRA adapter: one adapter per alpha, or model folders with --merge)."""
    from .lora.plan import make_plan, plan_summary
    from .options import parse_alphas
    from .publish.run import run_plan

    plan = make_plan(sft, aligned, parse_alphas(alphas), PlanOptions.from_params(options))
    write = WriteOptions.from_params(options)
    summary = plan_summary(plan)
    click.echo(f"plan: {summary['shards']} shard(s), {summary['bytes_per_variant'] / 1e9:.3f} GB per variant, "
               f"tensors {summary['tensors']}, alphas {summary['alphas']}", err=True)
    if dry_run:
        click.echo(json.dumps(summary, indent=2))
        return
    result = run_plan(plan, out, write=write, address=address, show_progress=_progress(no_progress))
    for name, state in result.variants.items():
        click.echo(f"{result.out_uri.rstrip('/')}/{name}: {state}")
    if result.seconds:
        click.echo(f"wrote {result.bytes_written / 1e9:.3f} GB from {result.bytes_read / 1e9:.3f} GB read "
                   f"in {result.seconds:.1f} s", err=True)


@main.command()
@click.argument("src")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(src, show_tensors, as_json):
    """Shards, tensors, dtypes and sizes of a checkpoint (reads headers only)."""
    from collections import Counter

    from .checkpoint.folder import Checkpoint

    ckpt = Checkpoint.open(src, require_config=False)
    dtypes = Counter()
    for loc in ckpt.tensors.values():
        dtypes[loc.info.dtype] += loc.info.numel
    config = ckpt.config or {}
    info = {
        "source": ckpt.uri,
        "architectures": config.get("architectures"),
        "layers": config.get("num_hidden_layers"),
        "shards": [{"file": s, "tensors": len(h.tensors), "bytes": h.file_size} for s, h in ckpt.headers.items()],
        "tensors": len(ckpt.tensors),
        "parameters": sum(dtypes.values()),
        "dtypes": dict(dtypes),
        "bytes": ckpt.total_bytes,
        "files": ckpt.aux_files(),
    }
    if show_tensors:
        info["tensor_list"] = [{"name": n, "dtype": loc.info.dtype, "shape": list(loc.info.shape), "shard": loc.shard}
                               for n, loc in ckpt.tensors.items()]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['source']}: {info['architectures']} with {info['layers']} layers")
    click.echo(f"  {info['tensors']} tensors, {info['parameters']:,} parameters, {info['bytes'] / 1e9:.3f} GB")
    click.echo("  dtypes: " + ", ".join(f"{d} ({n:,} params)" for d, n in dtypes.items()))
    click.echo("  files: " + (", ".join(info["files"]) or "(no config/tokenizer files)"))
    for s in info["shards"]:
        click.echo(f"  {s['file']}: {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB")
    for t in info.get("tensor_list", []):
        click.echo(f"    {t['name']}  {t['dtype']}  {t['shape']}  ({t['shard']})")


@main.command()
@click.argument("sft")
@click.argument("aligned")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lineage(sft, aligned, address, as_json):
    """Per-layer relative change ||aligned - sft|| / ||sft||; warns if ALIGNED does not descend from SFT."""
    from .extrapolation.lineage import lineage as compute, lineage_warnings
    from .extrapolation.plan import make_plan
    from .lora.adapter import is_adapter

    if is_adapter(aligned):  # a LoRA adapter: ||s * B @ A|| / ||theta_sft||
        from .lora.lineage import adapter_lineage

        groups, overall = adapter_lineage(sft, aligned, address)
    else:
        groups, overall = compute(make_plan(sft, aligned, (1.0,), PlanOptions(copy_unmatched=True,
                                                                              allow_added_rows=True)), address)
    warnings = lineage_warnings(groups, overall)
    if as_json:
        click.echo(json.dumps({"groups": [{"group": g.group, "relative_change": g.relative, "tensors": g.tensors}
                                          for g in groups],
                               "overall": overall.relative, "warnings": warnings}, indent=2))
    else:
        click.echo(f"{'part':<14} {'tensors':>7}  relative change")
        for g in groups + [overall]:
            click.echo(f"{g.group:<14} {g.tensors:>7}  {g.relative:.3e}")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@main.command()
@click.argument("dst")
@click.option("--quick", is_flag=True, help="Check presence, sizes and headers only (no content hashes).")
def verify(dst, quick):
    """Check a variant (or every variant under DST) against its manifest. Exit 1 on any problem."""
    from .checkpoint.folder import MANIFEST_FILE
    from .publish.manifest import find_variants, verify_variant
    from .storage import open_storage

    root = open_storage(dst)
    if root.exists(MANIFEST_FILE) or any(k.endswith(".safetensors") for k in root.list() if "/" not in k):
        folders = [""]
    else:
        folders = find_variants(root)
    if not folders:
        raise ExpoError(f"{root.describe()}: no variants found (no manifest.json or shards)")
    failed = 0
    for folder in folders:
        result = verify_variant(root.child(folder) if folder else root, deep=not quick)
        if result.ok:
            click.echo(f"ok      {result.location} ({result.files} files, {result.bytes / 1e9:.3f} GB)")
        else:
            failed += 1
            click.echo(f"FAILED  {result.location}")
            for p in result.problems:
                click.echo(f"  - {p}")
    if failed:
        click.echo(f"{failed} of {len(folders)} variant(s) failed verification", err=True)
        sys.exit(1)


_REWARD_OPTIONS = {  # evaluation options of no options object: what is scored, and where results go
    "reward_model": click.option("--reward-model", required=True, metavar="SRC",
                                 help="A sequence-classification reward model (the paper used "
                                      "weqweasdas/RM-Mistral-7B)."),
    "include_sft": click.option("--include-sft", is_flag=True, help="Also evaluate the SFT model."),
    "eval_out": click.option("--eval-out", default=None, metavar="DST",
                             help="Where responses, rewards and the report go (default: VARIANTS/eval/<set>-<id>)."),
}


def _evaluation_options(skip: tuple[str, ...] = ()):
    """The prompt, reward model, engine and sampling options of evaluate, run and search."""
    def decorate(f):
        f = click_options(EngineOptions, SamplingOptions, skip=skip)(f)
        for name, option in reversed(_REWARD_OPTIONS.items()):
            if name not in skip:
                f = option(f)
        return click_options(PromptOptions)(f)
    return decorate


def _evaluation_inputs(o: dict):
    """Prompts, sampling and engine options from a command's parameters (removed from `o`)."""
    _needs("vllm", "transformers", "vllm")
    from .evaluation.prompts import prompts_from_options

    prompts = prompts_from_options(PromptOptions.from_params(o))
    return prompts, SamplingOptions.from_params(o), EngineOptions.from_params(o)


def _run_evaluation(variants, o, address):
    from .evaluation.pipeline import evaluate_variants

    prompts, sampling, engine = _evaluation_inputs(o)
    report = evaluate_variants(variants, prompts, o["reward_model"], sampling=sampling, engine=engine,
                               out_uri=o["eval_out"], include_sft=o["include_sft"], address=address)
    click.echo(f"| {'model':<14} | {'alpha':>6} | {'mean reward':>11} | {'95% CI':>19} | {'tokens':>7} | "
               f"{'win vs 0':>8} |")
    for r in report["results"]:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        win = "-" if r["win_rate_vs_aligned"] is None else f"{r['win_rate_vs_aligned']:.3f}"
        click.echo(f"| {r['label']:<14} | {alpha:>6} | {r['mean_reward']:>11.4f} | "
                   f"[{r['ci_low']:>8.4f}, {r['ci_high']:>8.4f}] | {r['mean_tokens']:>7.1f} | {win:>8} |")
    click.echo(f"best alpha: {report['best']['alpha']}  report: {report['location']}/report.md")
    click.echo(f"selection: {report['selection']['statement']}")
    return report


@main.command()
@click.option("--variants", required=True, metavar="DST",
              help="A destination written by `expo-ray extrapolate` (or one variant folder in it).")
@_evaluation_options()
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
def evaluate(variants, address, **o):
    """Generate with every committed variant (and alpha 0), score with a reward model, report per alpha."""
    _run_evaluation(variants, o, address)


@main.command()
@click.option("--sft", required=True, metavar="SRC", help="The SFT checkpoint.")
@click.option("--aligned", required=True, metavar="SRC", help="The aligned checkpoint.")
@click.option("--alpha", "alphas", default=DEFAULT_ALPHAS, show_default=True, metavar="LIST",
              help="Comma-separated alphas to extrapolate and evaluate (alpha 0, the aligned model, is always "
                   "evaluated). " + ALPHA_RULE)
@click.option("--out", required=True, metavar="DST", help="Destination of the variants (and the evaluation).")
@click_options(PlanOptions, WriteOptions)
@_evaluation_options()
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
def run(sft, aligned, alphas, out, address, **o):
    """Extrapolate one pair, then evaluate every variant: the whole ExPO alpha search in one command."""
    from .evaluation.adapter_generation import evaluable_plan
    from .options import parse_alphas
    from .publish.run import run_plan

    _needs("vllm", "transformers", "vllm")
    plan = evaluable_plan(sft, aligned, parse_alphas(alphas), PlanOptions.from_params(o))
    run_plan(plan, out, write=WriteOptions.from_params(o), address=address, show_progress=_progress(False))
    _run_evaluation(out, o, address)


@main.command()
@click.option("--sft", required=True, metavar="SRC", help="The SFT checkpoint.")
@click.option("--aligned", required=True, metavar="SRC", help="The aligned checkpoint.")
@click.option("--out", required=True, metavar="DST",
              help="Where the search report (DST/search/) and the chosen variant (DST/alpha_X/) go.")
@click_options(SearchOptions)
@click.option("--runner-up", is_flag=True, help="Also materialize the second-best alpha.")
@click.option("--no-materialize", is_flag=True, help="Only search; write no variant.")
@click_options(PlanOptions)
@_evaluation_options(skip=("swap", "include_sft", "eval_out", "max_engines"))  # one swapping engine; DST/search/
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
def search(sft, aligned, out, runner_up, no_materialize, address, **o):
    """Adaptive alpha search with one engine that swaps weights in place; materialize only the winner."""
    from .alpha_search.driver import materialize, search_alpha
    from .publish.destination import check_destination

    check_destination(out, {"sft": sft, "aligned": aligned})  # before the search writes its report there
    settings, plan = SearchOptions.from_params(o), PlanOptions.from_params(o)
    prompts, sampling, engine = _evaluation_inputs(o)
    try:
        report = search_alpha(sft, aligned, prompts, o["reward_model"], out_uri=out, sampling=sampling,
                              engine=engine, plan=plan, address=address, search=settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"| {'alpha':>7} | {'prompts':>7} | {'mean reward':>11} | {'95% CI':>19} | {'tokens':>7} | added in")
    for p in report["points"]:
        tokens = "-" if p["mean_tokens"] is None else f"{p['mean_tokens']:.1f}"
        click.echo(f"| {p['alpha']:>7g} | {p['n']:>7} | {p['mean_reward']:>11.4f} | "
                   f"[{p['ci_low']:>8.4f}, {p['ci_high']:>8.4f}] | {tokens:>7} | {p['phase']}")
    click.echo(f"best alpha: {report['best']['alpha']:g} after {report['generations']} generations "
               f"(budget {report['budget']}, full grid {report['grid_generations']}); "
               f"report: {report['location']}/search.md")
    click.echo(f"selection: {report['selection']['statement']}")
    if no_materialize:
        return
    chosen = [report["best"]["alpha"]]
    if runner_up and report["runner_up"] is not None:
        chosen.append(report["runner_up"])
    for uri in materialize(sft, aligned, chosen, out, plan=plan, address=address):
        click.echo(f"materialized and verified: {uri}")


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
@click.option("--check", is_flag=True, help="Validate the spec and the models it names; run nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def sweep(spec_path, address, check, no_progress):
    """Extrapolate and evaluate every model pair of a sweep spec (YAML); finished work is skipped."""
    from .sweep.run import run_sweep
    from .sweep.spec import load_spec

    spec = load_spec(spec_path)
    if check:
        from .sweep.run import check_sweep

        check_sweep(spec)
        click.echo(f"{spec_path}: valid; {len(spec.pairs)} pair(s), destination {spec.destination}")
        return
    board = run_sweep(spec, address=address, show_progress=_progress(no_progress))
    for row in board["pairs"]:
        gain = row.get("gain")
        click.echo(f"{row['pair']}: " + (f"best alpha {row['best_alpha']:g}, gain {gain:+.4f}"
                                         f"{'' if row.get('significant_gain') else ' (not significant)'} "
                                         f"({row['prompts']})"
                                         if gain is not None else f"variants at {row['variants']}"))
    click.echo("nothing to do: every variant and evaluation was already complete" if not board["work_done"]
               else f"done in {board['seconds']} s; leaderboard: {spec.destination.rstrip('/')}/leaderboard.md")


@main.command()
@click.option("--workdir", default="expo-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where models, storage, reports and the summary go (models and results are reused).")
@click.option("--alpha", "alphas", default=",".join(f"{a:g}" for a in DEMO_ALPHAS), show_default=True, metavar="LIST",
              help="The alpha grid for each DPO model.")
@click.option("--scale", type=click.Choice(["full", "small"]), default="full", show_default=True,
              help="small: fewer training steps and prompts (for tests).")
@click.option("--storage", type=click.Choice(["s3", "local"]), default="s3", show_default=True,
              help="s3: an embedded SeaweedFS server started and stopped by the demo; local: a folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the task, data and training.")
@click.option("--seeds", default=None, metavar="LIST",
              help="Run the demo for each seed (e.g. 0,1,2; each in WORKDIR/seed-N) and summarise the recommended "
                   "alpha and its gain per seed in one table and one plot.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(workdir, alphas, scale, storage, seed, seeds, no_progress):
    """The ExPO paper's controlled experiment in miniature: train tiny SFT, DPO and reward models on a
    synthetic task, extrapolate, evaluate with vLLM, and show reward against alpha (CPU only, offline)."""
    _needs("demo", "torch", "transformers", "vllm")
    from .demo.pipeline import demo_table, finding_lines, run_demo
    from .options import parse_alphas

    grid = parse_alphas(alphas)
    if 0.0 not in grid or len(grid) < 2:
        raise click.UsageError("--alpha must include 0 (the DPO model itself) and at least one other alpha")
    if seeds is not None:
        _demo_seeds(workdir, seeds, grid, scale, storage, no_progress)
        return
    summary = run_demo(workdir, grid, seed=seed, scale=scale, storage=storage, show_progress=_progress(no_progress))
    click.echo("")
    for line in demo_table(summary):
        click.echo(line)
    click.echo("")
    for line in finding_lines(summary):
        click.echo(line)
    results = Path(summary["workdir"]) / "results"
    click.echo(f"\nplot: {results / 'demo.png'}\nreport: {results / 'demo-report.md'} "
               f"(per model: {results}/<model>/report.md)\ndone in {summary['seconds']:.0f} s "
               f"(models: {summary['models_seconds']:.0f} s)")


def _demo_seeds(workdir, seeds, grid, scale, storage, no_progress) -> None:
    from .demo.pipeline import run_demo_seeds, seeds_table

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--seeds {seeds!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise click.UsageError(f"--seeds {seeds!r}: give at least one seed, each once")
    summary = run_demo_seeds(workdir, seed_list, grid, scale=scale, storage=storage,
                             show_progress=_progress(no_progress))
    click.echo("")
    for line in seeds_table(summary):
        click.echo(line)
    root = Path(summary["workdir"])
    click.echo(f"\nplot: {root / 'seeds.png'}\nreport: {root / 'seeds-report.md'} (per seed: {root}/seed-N/)\n"
               f"done in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
