"""`stillhouse train --sweep`: short trainings over KD temperature x alpha x learning rate (x LoRA rank x LoRA alpha
when train.lora is on), ranked by the validation task metric (not the KD loss: it does not predict accuracy,
PITFALLS.md). `train.sweep.method` picks the settings: `grid` (every combination of train.sweep's lists) or `optuna`
(train.sweep.optuna.n_trials settings that optuna's TPE sampler draws within train.sweep.optuna's ranges, optionally
stopping poor trials early with a median pruner).

Every trial is the train stage's loop (`training.fit`) on the same data, labels and initial student as `stillhouse
train`, with `train.sweep.steps` steps and the trial's settings; everything else comes from `train`. It writes

    sweep/trial-NNN/    trial.json (settings) first, metrics.jsonl + samples.jsonl, result.json last
    sweep/labels-T<T>/  soft labels at a temperature other than labels/' (the teacher runs once per T)
    sweep/results.json  every trial, best first; results.md: the same as a markdown table

A trial with a result.json for the same settings and inputs is skipped, so an interrupted or widened sweep
continues where it stopped (an unfinished trial resumes from its own resume/ checkpoint); trials are found by
their settings, not their number. The trial folders are also optuna's record: a re-run rebuilds the study from
them (settings, score, the score at each evaluation for the pruner), finishes an interrupted trial first and asks
for new ones until n_trials; no database. A trial's weights are deleted once it is scored (a 6-layer student is
~200 MB a checkpoint): the sweep picks settings, and `stillhouse train` with the printed `--set` flags trains the
student for real.

alpha = 0 is cross-entropy only, where the temperature plays no part: the grid holds it once, as the baseline.
Temperatures are a list in both methods (optuna chooses among them): each one costs a pass of the teacher.
Sequence-level labels (tokenizers differ) have no soft labels: only the learning rate (and LoRA) is swept.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import fields
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.ui import console
from stillhouse.workspace import atomic_write_json, atomic_write_text, digest, read_json_or_none, read_jsonl, require_manifest


def grid(cfg: Config, label_mode: str) -> list[dict]:
    """The trials' settings, in a fixed order: [{"temperature", "alpha", "learning_rate"}] (+ "lora_r", "lora_alpha"
    when train.lora is on), temperature None where it plays no part (alpha = 0, or sequence-level labels)."""
    sw = cfg.train.sweep
    if label_mode != "token":
        out = [{"temperature": None, "alpha": 0.0, "learning_rate": float(lr)} for lr in dict.fromkeys(sw.learning_rate)]
    else:
        out = []
        for alpha, lr, t in itertools.product(dict.fromkeys(sw.alpha), dict.fromkeys(sw.learning_rate),
                                              dict.fromkeys(sw.temperature)):
            point = {"temperature": float(t) if alpha > 0 else None, "alpha": float(alpha), "learning_rate": float(lr)}
            if point not in out:
                out.append(point)
    lora = cfg.train.lora
    if not lora.enabled:
        return out
    return [{**p, "lora_r": r, "lora_alpha": a} for p in out
            for r, a in itertools.product(dict.fromkeys(sw.lora_r or [lora.r]), dict.fromkeys(sw.lora_alpha or [lora.alpha]))]


def set_flags(point: dict) -> str:
    """The `--set` flags that make `stillhouse train` use these settings."""
    flags = [f"--set train.alpha={point['alpha']:g}", f"--set train.learning_rate={point['learning_rate']:g}"]
    if point["temperature"] is not None:
        flags.append(f"--set label.temperature={point['temperature']:g}")
    if "lora_r" in point:
        flags += [f"--set train.lora.r={point['lora_r']}", f"--set train.lora.alpha={point['lora_alpha']}"]
    return " ".join(flags)


class _Pruned(Exception):
    """Raised from `fit`'s on_eval when the pruner stops a trial (after that evaluation's checkpoint)."""


def _require_optuna():
    try:
        import optuna
    except ImportError:
        raise StillhouseError("train.sweep.method=optuna needs optuna: pip install 'stillhouse[sweep]' "
                              "(or use --set train.sweep.method=grid)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial does
    return optuna


def run(cfg: Config) -> dict:
    """Run (or continue) the sweep; write and print the results table; return {"best", "trials", ...}."""
    from stillhouse.models import load_model, resolve_model
    from stillhouse.stages.train import _kd_examples, _student, check_labels, with_lora
    from stillhouse.training import FitParams, fit, labeled_examples

    ws, tc, sw = cfg.workspace, cfg.train, cfg.train.sweep
    if sw.method == "optuna":
        _require_optuna()  # before anything slow
    lora_keys = [k for k, v in (("train.sweep.lora_r", sw.lora_r), ("train.sweep.lora_alpha", sw.lora_alpha),
                                ("train.sweep.optuna.lora_r", sw.optuna.lora_r),
                                ("train.sweep.optuna.lora_alpha", sw.optuna.lora_alpha)) if v]
    if lora_keys and not tc.lora.enabled:
        raise StillhouseError(f"{', '.join(lora_keys)}: LoRA settings to sweep, but train.lora.enabled is false; add "
                              f"--set train.lora.enabled=true, or leave them empty")
    labels = require_manifest(ws, "label", "train --sweep")
    val_path = ws / "data" / "val.jsonl"
    out = ws / "sweep"
    init_dir = ws / "student" / "init"
    _, tok, _ = _student(cfg, init_dir)  # derives and saves student/init once, as `train` does
    lineage = read_json_or_none(init_dir / "stillhouse.json")  # the same on every run (what _student returns is not)
    check_labels(cfg, labels, tok)
    val = labeled_examples(tok, read_jsonl(val_path), cfg.label.max_seq_len) if val_path.exists() else []
    if not val:
        raise StillhouseError(f"train --sweep ranks trials by the validation task metric, but {val_path} has no labeled "
                              "records; set prep.val_fraction > 0 (e.g. --set prep.val_fraction=0.1) and re-run prep")
    rows = read_jsonl(ws / "labels" / "sequences.jsonl")
    if not rows:
        raise StillhouseError("labels/sequences.jsonl is empty: nothing to train on; check data/train.jsonl and re-run label")
    mode = labels.get("mode")
    if mode != "token":
        console.print("train --sweep: sequence-level labels (no soft labels): sweeping the learning rate only")

    # what a finished trial's result depends on besides its settings: the inputs and every other train setting
    # (with LoRA on, every trial's settings carry its rank and alpha, so train.lora's are not part of it)
    swept = {"sweep", "alpha", "learning_rate", "steps", "eval_every_steps"}
    base = {"labels": labels["fingerprint"], "student": lineage, "val": digest(read_jsonl(val_path)),
            "train": tc.model_dump(exclude={*swept, "lora"} if tc.lora.enabled else swept),
            "steps": sw.steps, "evals": sw.evals, "max_seq_len": cfg.label.max_seq_len}
    if tc.lora.enabled:
        base["lora"] = tc.lora.model_dump(exclude={"r", "alpha"})
    examples: dict = {}  # temperature -> training examples (loaded once per temperature)

    def train_examples(point: dict):
        t = point["temperature"]
        if mode != "token":  # sequence-level: teacher-written responses, tokenized by the student, as `train` does
            t = "sequence"
            examples[t] = examples.get(t) or labeled_examples(tok, [{**r, "provenance": {}} for r in rows],
                                                              cfg.label.max_seq_len)
        elif t is None or t == labels["temperature"]:  # alpha = 0 ignores the soft labels; any set will do
            t = labels["temperature"]
            examples[t] = examples.get(t) or _kd_examples(ws / "labels", rows)
        elif t not in examples:
            examples[t] = _kd_examples(relabel(cfg, tok, rows, t, out / f"labels-T{t:g}"), rows)
        return examples[t]

    # a trial folder is found by its settings' key, not by its number: a grid edited or reordered later reuses
    # every trial it still holds, and new points get new numbers
    found = {(read_json_or_none(d / "trial.json") or {}).get("key"): d for d in sorted(out.glob("trial-*"))}
    numbers = [int(d.name.split("-")[1]) for d in out.glob("trial-*") if d.name.split("-")[1].isdigit()]
    next_number = max(numbers, default=-1) + 1
    trial_keys = {f.name for f in fields(FitParams)}

    def key_of(point: dict) -> str:
        return digest({**base, "point": point})

    def run_trial(point: dict, label: str, spec: dict | None = None, on_eval=None) -> dict:
        """Train one trial (or read its result when it is done) -> its result.json. `spec`: more for trial.json."""
        nonlocal next_number
        key = key_of(point)
        trial = found.get(key)
        if trial is None:
            trial, next_number = out / f"trial-{next_number:03d}", next_number + 1
            shutil.rmtree(trial, ignore_errors=True)
            trial.mkdir(parents=True)
            atomic_write_json(trial / "trial.json", {"key": key, **point, **(spec or {})})
            found[key] = trial
        done = read_json_or_none(trial / "result.json")
        if done and done.get("key") == key:
            return done
        console.print(f"train --sweep: {label}: {set_flags(point)}", soft_wrap=True)
        params = FitParams(**{
            **{k: v for k, v in tc.model_dump().items() if k in trial_keys},
            "steps": sw.steps, "eval_every_steps": max(1, sw.steps // sw.evals), "keep_checkpoints": 1,
            "alpha": point["alpha"], "temperature": point["temperature"] or 1.0, "learning_rate": point["learning_rate"],
            "warmup_steps": min(tc.warmup_steps, sw.steps // 5), "lr_setting": "train.sweep.learning_rate",
        })
        model = load_model(resolve_model(str(init_dir)))
        if "lora_r" in point:  # adapters as `stillhouse train` adds them, with this trial's rank and alpha
            model = with_lora(model, tc, point["lora_r"], point["lora_alpha"])
        result = {"trial": trial.name, **point, "val_score": None, "val_loss": None, "best_step": None,
                  "steps": None, "train_seconds": None, "pruned": False, "error": None, "key": key,
                  "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad)}
        train = train_examples(point)  # (relabels at a new temperature: not part of the trial's time)
        t0 = time.time()
        try:
            fit(model, tok, train, val, params, trial, label=f"sweep {label}",
                meta={"made_by": "stillhouse train --sweep", **point}, on_eval=on_eval)
        except StillhouseError as e:  # a diverging trial (too high a learning rate, say) is a result too
            console.print(f"[yellow]train --sweep: {label} failed: {e}[/]")
            result["error"] = str(e)
        except _Pruned:
            result["pruned"] = True
        if result["error"] is None:
            evals = _evals(trial)
            best = max(evals, key=lambda r: r["val_score"])  # the first of equal scores, as fit's best/ is
            result.update(val_score=round(best["val_score"], 4), val_loss=round(best["val_loss"], 4),
                          best_step=best["step"], steps=evals[-1]["step"], train_seconds=round(time.time() - t0, 1))
        for d in [*trial.glob("step-*"), trial / "best", trial / "final", trial / "resume", trial / ".resume.tmp"]:
            shutil.rmtree(d, ignore_errors=True)  # the weights are not needed
        atomic_write_json(trial / "result.json", result)
        return result

    if sw.method == "optuna":
        results = _optuna_search(cfg, mode, out, key_of, run_trial)
    else:
        points = grid(cfg, mode)
        results = [run_trial(p, f"trial {i + 1}/{len(points)}") for i, p in enumerate(points)]

    results = list({r["trial"]: r for r in results}.values())  # optuna may propose settings it tried before
    if all(r["error"] for r in results):
        raise StillhouseError(f"train --sweep: every trial failed; the first: {results[0]['error']}")
    # best first: finished before pruned, the task metric, then the validation loss (lower) to break ties among
    # equal accuracies; failed last
    results.sort(key=lambda r: (r["error"] is not None, bool(r.get("pruned")), -(r["val_score"] or 0), r["val_loss"] or 0))
    best = results[0]
    report = {"metric": "val_score (validation task metric: exact match for classification, token accuracy otherwise)",
              "method": sw.method, "steps_per_trial": sw.steps, "best": best, "set_flags": set_flags(best),
              "trials": results}
    if sw.method == "optuna":
        report["optuna"] = sw.optuna.model_dump(mode="json")
    atomic_write_json(out / "results.json", report)
    table = results_table(results)
    how = (f"optuna TPE search, {sw.optuna.n_trials} trials" + (", median pruner" if sw.optuna.pruner == "median" else "")
           if sw.method == "optuna" else "grid")
    atomic_write_text(out / "results.md", f"# stillhouse train --sweep\n\n{how}; {sw.steps} steps per trial; best "
                                          f"first.\n\n{table}\n")
    console.print(table, soft_wrap=True)  # (no wrapping: the table and the flags must stay copyable)
    relabel_note = ("" if best["temperature"] in (None, labels["temperature"]) else
                    f" (temperature {best['temperature']:g} differs from labels/: `train` asks to relabel first)")
    console.print(f"train --sweep: best val_score {best['val_score']:.3f} ({best['trial']}); train with:\n"
                  f"  stillhouse -w {ws} train {set_flags(best)}{relabel_note}", soft_wrap=True)
    return report


def _evals(trial: Path) -> list[dict]:
    """The trial's validation rows ({"step", "val_score", "val_loss", ...}) in step order, from its metrics.jsonl."""
    rows = read_jsonl(trial / "metrics.jsonl") if (trial / "metrics.jsonl").exists() else []
    return [r for r in rows if "val_score" in r]


def _optuna_space(cfg: Config, mode: str) -> dict:
    """optuna's distributions: learning rate (log), temperature (the list's values) and alpha with soft labels,
    LoRA rank (log) and alpha when they have ranges."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    oc = cfg.train.sweep.optuna
    space = {"learning_rate": FloatDistribution(*oc.learning_rate, log=True)}
    if mode == "token":
        space["temperature"] = CategoricalDistribution(sorted(set(cfg.train.sweep.temperature)))
        space["alpha"] = FloatDistribution(*oc.alpha)
    if cfg.train.lora.enabled and oc.lora_r:
        space["lora_r"] = IntDistribution(*oc.lora_r, log=True)
    if cfg.train.lora.enabled and oc.lora_alpha:
        space["lora_alpha"] = IntDistribution(*oc.lora_alpha)
    return space


def _optuna_point(cfg: Config, params: dict) -> dict:
    """A trial's settings from optuna's parameters, in the grid's form. Floats keep 3 significant digits: the
    printed `--set` flags then train exactly what the trial trained."""
    alpha = float(f"{params.get('alpha', 0.0):.3g}")
    point = {"temperature": float(params["temperature"]) if alpha > 0 else None, "alpha": alpha,
             "learning_rate": float(f"{params['learning_rate']:.3g}")}
    if cfg.train.lora.enabled:
        point.update(lora_r=params.get("lora_r", cfg.train.lora.r), lora_alpha=params.get("lora_alpha", cfg.train.lora.alpha))
    return point


def _optuna_search(cfg: Config, mode: str, out: Path, key_of, run_trial) -> list[dict]:
    """train.sweep.optuna.n_trials trials drawn by TPE (the first max(2, n_trials // 4) at random); the study is
    rebuilt from the trial folders, so a re-run continues it. Returns the study's trials' results."""
    optuna = _require_optuna()
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    oc, seed = cfg.train.sweep.optuna, cfg.train.seed
    space = _optuna_space(cfg, mode)
    startup = max(2, oc.n_trials // 4)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0) if oc.pruner == "median"
              else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", pruner=pruner)  # in memory: the trial folders are the record

    def fits(params: dict) -> bool:  # a trial of this search space (the ranges may have changed since)
        return set(params) == set(space) and all(
            params[k] in d.choices if isinstance(d, CategoricalDistribution) else d.low <= params[k] <= d.high
            for k, d in space.items())

    results, unfinished = [], []
    for d in sorted(out.glob("trial-*")):
        spec = read_json_or_none(d / "trial.json") or {}
        params = spec.get("params")  # grid trials have none
        if params is None or not fits(params) or spec.get("key") != key_of(_optuna_point(cfg, params)):
            continue  # another method, search space, or inputs and settings
        done = read_json_or_none(d / "result.json")
        if not (done and done.get("key") == spec["key"]):
            unfinished.append(params)  # killed mid-trial: asked for again first, it resumes from its checkpoint
            continue
        state = (TrialState.FAIL if done["error"] else TrialState.PRUNED if done.get("pruned") else TrialState.COMPLETE)
        study.add_trial(create_trial(params=params, distributions=space, state=state,
                                     value=done["val_score"] if state == TrialState.COMPLETE else None,
                                     intermediate_values={r["step"]: r["val_score"] for r in _evals(d)}))
        results.append(done)
    for params in unfinished:
        study.enqueue_trial(params)
    for number in range(len(results), oc.n_trials):
        # seeded by the trial's number: a resumed study draws what an uninterrupted one would have drawn next
        study.sampler = optuna.samplers.TPESampler(seed=seed + number, n_startup_trials=startup)
        trial = study.ask(space)
        point = _optuna_point(cfg, trial.params)

        def on_eval(step: int, ev: dict, trial=trial) -> None:
            trial.report(ev["val_score"], step)
            if step < cfg.train.sweep.steps and trial.should_prune():  # (a trial at its last step is finished)
                console.print(f"train --sweep: trial {number + 1} pruned at step {step} (val_score {ev['val_score']:.3f} "
                              f"is below the median of the finished trials' at that step)", soft_wrap=True)
                raise _Pruned()

        result = run_trial(point, f"trial {number + 1}/{oc.n_trials}", {"params": trial.params},
                           on_eval if oc.pruner == "median" else None)
        if result["error"]:
            study.tell(trial, state=TrialState.FAIL)
        elif result.get("pruned"):
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, result["val_score"])
        results.append(result)
    return results


def results_table(results: list[dict]) -> str:
    """A markdown table of the trials, in the given order."""
    lora = any("lora_r" in r for r in results)
    lines = ["| trial | temperature | alpha | learning rate |" + (" LoRA r | LoRA alpha |" if lora else "")
             + " val score | val loss | best step | steps | seconds |",
             "|---|---|---|---|" + ("---|---|" if lora else "") + "---|---|---|---|---|"]
    for r in results:
        t = "-" if r["temperature"] is None else f"{r['temperature']:g}"
        lora_cells = f" {r.get('lora_r', '-')} | {r.get('lora_alpha', '-')} |" if lora else ""
        steps = f"{r['steps']} (pruned)" if r.get("pruned") else f"{r['steps']}"
        scores = ("failed (see result.json) | - | - | - | -" if r["error"] else
                  f"{r['val_score']:.3f} | {r['val_loss']:.4f} | {r['best_step']} | {steps} | {r['train_seconds']:.0f}")
        lines.append(f"| {r['trial']} | {t} | {r['alpha']:g} | {r['learning_rate']:g} |{lora_cells} {scores} |")
    return "\n".join(lines)


def relabel(cfg: Config, tok, rows: list[dict], temperature: float, out: Path) -> Path:
    """Soft labels at another temperature for the same sequences as labels/, in `out` (one shard, written once).

    Stored top-k log-probabilities cannot be re-tempered exactly (the tail's shape is unknown), so the teacher runs
    again: log-softmax over the full vocabulary at `temperature`, then top-k, as `stillhouse label` does."""
    from stillhouse.models import load_model, teacher_source
    from stillhouse.records import Encoded
    from stillhouse.softlabels import topk_logprobs, write_shard
    from stillhouse.stages.label import response_logits
    from stillhouse.ui import progress_bar

    lc = cfg.label
    src = teacher_source(cfg)
    key = digest({"teacher": str(src.path), "rows": digest(rows), "topk": lc.topk, "temperature": temperature,
                  "precision": lc.precision})
    marker = read_json_or_none(out / "labels.done")
    if marker and marker.get("key") == key:
        return out
    model = load_model(src, "fp32", cfg.teacher.trust_remote_code)
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # length-sorted: less padding
    by_shard: dict[str, list] = {name: [] for name in sorted({r["shard"] for r in rows})}
    with progress_bar(f"sweep: relabel at T={temperature:g}", total=len(rows), unit="rec") as advance:
        for b in range(0, len(order), lc.batch_size):
            idx = order[b : b + lc.batch_size]
            logits = response_logits(model, tok.pad_token_id, [Encoded(rows[i]["input_ids"], rows[i]["prompt_len"]) for i in idx],
                                     lc.precision)
            for i, lg in zip(idx, logits):
                by_shard[rows[i]["shard"]].append((rows[i]["id"], *topk_logprobs(lg, lc.topk, temperature)))
            advance(len(idx))
    vocab = model.get_output_embeddings().weight.shape[0]
    for name, entries in by_shard.items():  # the same shard names as labels/, so `_kd_examples` reads them alike
        write_shard(out / name, entries, vocab_size=vocab, topk=lc.topk, temperature=temperature)
    atomic_write_json(out / "labels.done", {"key": key, "temperature": temperature})
    return out
