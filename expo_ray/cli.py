"""The `expo-ray` command: parses options, calls the library, prints results. Nothing else."""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .demo.pipeline import DEMO_ALPHAS
from .errors import ExpoError

DEFAULT_ALPHAS = "0.1,0.2,0.3,0.4,0.5"
ALPHA_RULE = "Every alpha >= 0 (0 is the aligned model; negative values are refused, here and in sweeps)."
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


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
        # -v/-q may come anywhere (also after the subcommand): move them in front of it.
        before, rest = (args[:args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
        flags = [a for a in before if a in GLOBAL_FLAGS]
        return super().parse_args(ctx, flags + [a for a in before if a not in GLOBAL_FLAGS] + rest)


@click.group(cls=ExpoGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="expo-ray")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and the engines' own logs live (they always go to files). Anywhere on the line.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only. Anywhere on the line.")
def main(verbose: bool, quiet: bool) -> None:
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


def _plan_options(f):
    options = [
        click.option("--scale", "scales", multiple=True, metavar="PATTERN=FACTOR",
                     help="Scale alpha for tensors whose name matches PATTERN (a glob, or re:REGEX). "
                          "Repeatable; the first match wins."),
        click.option("--layer-scales", metavar="EARLY,MIDDLE,LATE",
                     help="Scale alpha per third of the decoder layers, e.g. 0.5,1,1.5."),
        click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Copy tensors matching PATTERN unchanged from the aligned model. Repeatable."),
        click.option("--copy-unmatched", is_flag=True,
                     help="Copy tensors that only the aligned model has (default: error)."),
        click.option("--allow-added-rows", is_flag=True,
                     help="Aligned embeddings/lm_head may have extra vocabulary rows: extrapolate the shared rows, "
                          "copy the new ones (default: error)."),
        click.option("--allow-nonfinite", is_flag=True,
                     help="Inputs may hold NaN/Inf; they stay non-finite in the outputs (default: error). An alpha "
                          "that overflows finite weights into Inf is always an error."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.option("--sft", required=True, metavar="SRC", help="The SFT checkpoint the aligned model was trained from.")
@click.option("--aligned", required=True, metavar="SRC", help="The aligned (DPO/RLHF) checkpoint.")
@click.option("--alpha", "alphas", default=DEFAULT_ALPHAS, show_default=True, metavar="LIST",
              help="Comma-separated alphas; all are computed from one read of the inputs. " + ALPHA_RULE)
@click.option("--out", required=True, metavar="DST", help="Destination root; one folder per alpha (alpha_0.3/ ...).")
@_plan_options
@click.option("--chunk-mib", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Working-memory budget per task in MiB (bounds memory whatever the tensor sizes).")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray instance).")
@click.option("--sha256", is_flag=True,
              help="Also record every file's sha256 (what Hub LFS pointers hold); BLAKE3 is always recorded.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; write nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extrapolate(sft, aligned, alphas, out, scales, layer_scales, exclude, copy_unmatched, allow_added_rows,
                allow_nonfinite, chunk_mib, address, sha256, dry_run, no_progress):
    """Write one complete model folder per alpha under DST, each committed with a manifest."""
    from .api import make_plan
    from .extrapolate import run_plan
    from .plan import parse_alphas, plan_summary

    plan = make_plan(sft, aligned, parse_alphas(alphas), scales=scales, layer_scales=layer_scales, exclude=exclude,
                     copy_unmatched=copy_unmatched, allow_added_rows=allow_added_rows, allow_nonfinite=allow_nonfinite)
    summary = plan_summary(plan)
    click.echo(f"plan: {summary['shards']} shard(s), {summary['bytes_per_variant'] / 1e9:.3f} GB per variant, "
               f"tensors {summary['tensors']}, alphas {summary['alphas']}", err=True)
    if dry_run:
        click.echo(json.dumps(summary, indent=2))
        return
    result = run_plan(plan, out, chunk_mib=chunk_mib, address=address, show_progress=_progress(no_progress),
                      sha256=sha256)
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

    from .checkpoint import Checkpoint

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
        info["tensor_list"] = [{"name": n, "dtype": l.info.dtype, "shape": list(l.info.shape), "shard": l.shard}
                               for n, l in ckpt.tensors.items()]
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
    from .api import make_plan
    from .lineage import lineage as compute, lineage_warnings

    plan = make_plan(sft, aligned, (1.0,), copy_unmatched=True, allow_added_rows=True)
    groups, overall = compute(plan, address)
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
    from .manifest import MANIFEST_FILE, find_variants, verify_variant
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


def _eval_options(f, skip: tuple[str, ...] = ()):
    """The prompt, reward, engine and sampling options; `skip` leaves out the named ones."""
    options = [
        click.option("--prompts", "prompt_spec", required=True, metavar="SET|FILE",
                     help="ultrafeedback (the paper's 1,000 test_gen prompts), alpaca_eval (805), or a JSON/JSONL/"
                          "Parquet file (local, s3://, hf://datasets/org/name/path)."),
        click.option("--prompt-field", default=None, help="Field holding the prompt (default: prompt, instruction, "
                                                          "question, or the first user turn of messages)."),
        click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts."),
        click.option("--sample", type=click.IntRange(1), default=None, help="Use a random sample of N prompts."),
        click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of --sample."),
        click.option("--reward-model", required=True, metavar="SRC",
                     help="A sequence-classification reward model (the paper used weqweasdas/RM-Mistral-7B)."),
        click.option("-tp", "--tp", "--tensor-parallel-size", "tp", type=click.IntRange(1), default=1, show_default=True,
                     help="Tensor-parallel size of each generation engine (8 for 70B)."),
        click.option("--reward-tp", type=click.IntRange(1), default=1, show_default=True,
                     help="Tensor-parallel size of the reward engine."),
        click.option("--gpu/--cpu", "use_gpu", default=None,
                     help="Run the engines on GPUs or on CPUs (default: GPUs, unless the installed vLLM is a "
                          "CPU build). On an autoscaling cluster GPU nodes are started on demand."),
        click.option("--max-engines", type=click.IntRange(1), default=None,
                     help="Generation engines in parallel (default: as many as the cluster can grow to, from "
                          "the autoscaler's node types; one per node for CPU engines)."),
        click.option("--swap/--no-swap", default=None,
                     help="An engine serves model after model, loading each one's weights in place "
                          "instead of restarting (models of another shape get their own engine). Default: on "
                          "when the installed vLLM is a version swapping was tested with."),
        click.option("--include-sft", is_flag=True, help="Also evaluate the SFT model."),
        click.option("--temperature", type=float, default=0.7, show_default=True, help="Sampling temperature."),
        click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus sampling threshold."),
        click.option("--top-k", type=int, default=50, show_default=True, help="Sample from the K likeliest tokens."),
        click.option("--presence-penalty", type=float, default=0.1, show_default=True, help="vLLM presence penalty."),
        click.option("--frequency-penalty", type=float, default=0.1, show_default=True, help="vLLM frequency penalty."),
        click.option("--max-tokens", type=click.IntRange(1), default=2048, show_default=True,
                     help="Longest answer, in tokens."),
        click.option("--seed", type=int, default=42, show_default=True, help="Sampling seed."),
        click.option("--max-model-len", type=click.IntRange(16), default=None, help="vLLM max_model_len."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "bfloat16", "float16", "float32"]), help="vLLM dtype of the engines."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow model code from the checkpoints to run (off by default)."),
        click.option("--model-cache", envvar="EXPO_RAY_MODEL_CACHE", default=None, metavar="DIR",
                     help="Folder on each node for local copies of remote models (an NVMe volume on clusters; "
                          "default: $TMPDIR/expo-ray-models)."),
        click.option("--model-cache-gb", envvar="EXPO_RAY_MODEL_CACHE_GB", type=click.FloatRange(0, min_open=True),
                     default=None, help="Cap of that folder in GiB; least recently used models no engine uses are "
                                        "evicted (default: the cache plus the disk's free space, less a reserve)."),
        click.option("--chat-template", "chat_template_file", default=None, metavar="FILE",
                     type=click.Path(exists=True, dir_okay=False),
                     help="A Jinja chat template for the generation models (for tokenizers that have none)."),
        click.option("--fail-on-long-prompts", is_flag=True,
                     help="Refuse prompts longer than the model's context (default: skip them, counted in the report)."),
        click.option("--eval-out", default=None, metavar="DST",
                     help="Where responses, rewards and the report go (default: VARIANTS/eval/<set>-<id>)."),
    ]
    for option in reversed(options):
        f = option(f)
    f.__click_params__ = [p for p in f.__click_params__ if p.name not in skip]
    return f


def _eval_inputs(o):
    """Prompts, sampling and engine settings from the evaluation options."""
    _needs("vllm", "transformers", "vllm")
    import os

    from .evaluate.pipeline import EngineSettings
    from .evaluate.prompts import load_prompts

    # Engines read these where they run: Ray actors get the driver's EXPO_RAY_* settings.
    for key, value in (("EXPO_RAY_MODEL_CACHE", o["model_cache"]), ("EXPO_RAY_MODEL_CACHE_GB", o["model_cache_gb"])):
        if value is not None:
            os.environ[key] = str(value)

    prompts = load_prompts(o["prompt_spec"], field=o["prompt_field"], limit=o["limit"], sample=o["sample"],
                           seed=o["sample_seed"])
    sampling = {k: o[k] for k in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                                  "max_tokens", "seed")}
    settings = EngineSettings(tp=o["tp"], reward_tp=o["reward_tp"], max_model_len=o["max_model_len"],
                              trust_remote_code=o["trust_remote_code"], max_engines=o.get("max_engines"), dtype=o["dtype"],
                              swap=o.get("swap"), use_gpu=o["use_gpu"],
                              chat_template=_read_text(o["chat_template_file"]),
                              long_prompts="error" if o["fail_on_long_prompts"] else "skip")
    return prompts, sampling, settings


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExpoError(f"{path}: cannot read the chat template ({exc})") from None


def _run_evaluation(variants, o, address):
    from .evaluate.pipeline import evaluate_variants

    prompts, sampling, settings = _eval_inputs(o)
    report = evaluate_variants(variants, prompts, o["reward_model"], sampling=sampling, settings=settings,
                               out_uri=o["eval_out"], include_sft=o["include_sft"], address=address)
    click.echo(f"| {'model':<14} | {'alpha':>6} | {'mean reward':>11} | {'95% CI':>19} | {'tokens':>7} | {'win vs 0':>8} |")
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
@_eval_options
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
@_plan_options
@_eval_options
@click.option("--chunk-mib", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Working-memory budget per extrapolation task in MiB.")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
def run(sft, aligned, alphas, out, scales, layer_scales, exclude, copy_unmatched, allow_added_rows, allow_nonfinite,
        chunk_mib, address, **o):
    """Extrapolate one pair, then evaluate every variant: the whole ExPO alpha search in one command."""
    from .api import make_plan
    from .extrapolate import run_plan
    from .plan import parse_alphas

    plan = make_plan(sft, aligned, parse_alphas(alphas), scales=scales, layer_scales=layer_scales, exclude=exclude,
                     copy_unmatched=copy_unmatched, allow_added_rows=allow_added_rows, allow_nonfinite=allow_nonfinite)
    run_plan(plan, out, chunk_mib=chunk_mib, address=address, show_progress=_progress(False))
    _run_evaluation(out, o, address)


@main.command()
@click.option("--sft", required=True, metavar="SRC", help="The SFT checkpoint.")
@click.option("--aligned", required=True, metavar="SRC", help="The aligned checkpoint.")
@click.option("--out", required=True, metavar="DST",
              help="Where the search report (DST/search/) and the chosen variant (DST/alpha_X/) go.")
@click.option("--alpha", "alphas", default="0,0.1,0.2,0.3,0.5,1", show_default=True, metavar="LIST",
              help="The coarse grid the search starts from (it may refine between and beyond these). " + ALPHA_RULE)
@click.option("--budget", type=click.IntRange(1), default=None,
              help="Generations the search may spend (default: half of what the full grid would take).")
@click.option("--initial-prompts", type=click.IntRange(2), default=None,
              help="Prompts per alpha in the first round (default: an eighth of the prompts).")
@click.option("--runner-up", is_flag=True, help="Also materialize the second-best alpha.")
@click.option("--no-materialize", is_flag=True, help="Only search; write no variant.")
@_plan_options
@functools.partial(_eval_options, skip=("swap", "include_sft", "eval_out", "max_engines"))  # one swapping engine; DST/search/
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
def search(sft, aligned, out, alphas, budget, initial_prompts, runner_up, no_materialize, scales, layer_scales,
           exclude, copy_unmatched, allow_added_rows, allow_nonfinite, address, **o):
    """Adaptive alpha search with one engine that swaps weights in place; materialize only the winner."""
    from .destination import check_destination
    from .evaluate.search import SearchSettings, materialize, search_alpha
    from .plan import parse_alphas

    check_destination(out, {"sft": sft, "aligned": aligned})  # before the search writes its report there
    prompts, sampling, settings = _eval_inputs(o)
    plan_options = dict(scales=scales, layer_scales=layer_scales, exclude=exclude, copy_unmatched=copy_unmatched,
                        allow_added_rows=allow_added_rows, allow_nonfinite=allow_nonfinite)
    try:
        report = search_alpha(sft, aligned, prompts, o["reward_model"], out_uri=out, sampling=sampling,
                              settings=settings, plan_options=plan_options, address=address,
                              search=SearchSettings(grid=parse_alphas(alphas), budget=budget,
                                                    initial_prompts=initial_prompts))
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
    chosen = [report["best"]["alpha"]] + ([report["runner_up"]] if runner_up and report["runner_up"] is not None else [])
    for uri in materialize(sft, aligned, chosen, out, plan_options=plan_options, address=address):
        click.echo(f"materialized and verified: {uri}")


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address.")
@click.option("--check", is_flag=True, help="Validate the spec and the models it names; run nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def sweep(spec_path, address, check, no_progress):
    """Extrapolate and evaluate every model pair of a sweep spec (YAML); finished work is skipped."""
    from .sweep import run_sweep
    from .sweep_spec import load_spec

    spec = load_spec(spec_path)
    if check:
        from .sweep import check_sweep

        check_sweep(spec)
        click.echo(f"{spec_path}: valid; {len(spec.pairs)} pair(s), destination {spec.destination}")
        return
    board = run_sweep(spec, address=address, show_progress=_progress(no_progress))
    for row in board["pairs"]:
        gain = row.get("gain")
        click.echo(f"{row['pair']}: " + (f"best alpha {row['best_alpha']:g}, gain {gain:+.4f}"
                                         f"{'' if row.get('significant_gain') else ' (not significant)'} ({row['prompts']})"
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
    from .plan import parse_alphas

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
    summary = run_demo_seeds(workdir, seed_list, grid, scale=scale, storage=storage, show_progress=_progress(no_progress))
    click.echo("")
    for line in seeds_table(summary):
        click.echo(line)
    root = Path(summary["workdir"])
    click.echo(f"\nplot: {root / 'seeds.png'}\nreport: {root / 'seeds-report.md'} (per seed: {root}/seed-N/)\n"
               f"done in {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
