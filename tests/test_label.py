"""The label stage on a tiny random teacher: kill -9 and resume is byte-identical, `--shard i/n` in two processes
then a merge equals one process, bad input (too long, empty, a teacher that does not load), and the stored top-k
equals a direct forward pass of the same model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stillhouse.config import load_config
from stillhouse.errors import StillhouseError
from stillhouse.stages import label
from stillhouse.stages.label import parse_shard

LABEL = {"records_per_shard": 3, "batch_size": 2, "topk": 8, "temperature": 2.0, "max_seq_len": 96, "max_new_tokens": 3}


def _records(n_labeled: int = 14, n_unlabeled: int = 4) -> list[dict]:
    """Chat records of varying length (so batches need padding), a few without a response (the teacher writes
    one), one with an empty response and one longer than max_seq_len."""
    out = []
    for i in range(n_labeled):
        user = f"turn on the light in room {i}" + " please" * (i % 5)
        out.append({"id": f"intents-{i:05d}", "task": "classification",
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"HassTurnOn room {i}"}]})
    for i in range(n_unlabeled):
        out.append({"id": f"pool-{i:05d}", "task": "classification",
                    "messages": [{"role": "user", "content": f"what is the temperature in the hall {i}"}]})
    out.append({"id": "empty-00000", "task": "qa", "messages": [{"role": "user", "content": "say nothing"},
                                                              {"role": "assistant", "content": "  "}]})
    out.append({"id": "long-00000", "task": "qa", "messages": [
        {"role": "user", "content": "policy text " * 120 + "what is the policy?"},
        {"role": "assistant", "content": "read the policy"}]})
    return out


def _workspace(root: Path, teacher: Path, records: list[dict] | None = None, **label_cfg) -> Path:
    root.mkdir(parents=True)
    (root / "data").mkdir()
    rows = _records() if records is None else records
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"project": "label-test", "teacher": {"model": str(teacher)}, "student": {"derive_layers": 2},
              "label": {**LABEL, **label_cfg}}
    (root / "stillhouse.yaml").write_text(yaml.safe_dump(config))
    return root


def _cli(ws: Path, *args: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "stillhouse", "-w", str(ws), "label", *args]


def _run_cli(ws: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(_cli(ws, *args), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "STILLHOUSE_QUIET": "1", **(env or {})})
    return p


def _artifacts(ws: Path) -> dict[str, bytes]:
    """Every file of labels/ except the manifest (it holds timings): shards, markers, sequences, stats."""
    return {p.name: p.read_bytes() for p in sorted((ws / "labels").iterdir())
            if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with an untied, larger LM head: a tied random model only repeats
    the last prompt token (a newline: empty responses), and its distribution is nearly flat. This one writes text
    and has a peaked, LM-like distribution."""
    from stillhouse.models import save_pretrained, tiny_random_model

    model = tiny_random_model(tokenizer, num_layers=2, hidden_size=64, seed=1)
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g) * 0.5)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher) -> Path:
    """One uninterrupted run in one process: what every other way of running must reproduce byte for byte."""
    ws = _workspace(tmp_path_factory.mktemp("label") / "reference", teacher)
    p = _run_cli(ws)
    assert p.returncode == 0, p.stderr[-3000:]
    return ws


def test_reference_run_file_tree_and_manifest(reference):
    labels = reference / "labels"
    manifest = json.loads((labels / "manifest.json").read_text())
    m = manifest["metrics"]
    n_shards = -(-len(_records()) // LABEL["records_per_shard"])
    assert m["shards"] == n_shards == len(list(labels.glob("shard-*.safetensors"))) == len(list(labels.glob("shard-*.done")))
    assert m["empty_responses_skipped"] == 1 and m["truncated"] == 1
    assert m["generated"] == 4 and m["unlabeled_skipped"] == 0
    generated = [json.loads(line) for line in (labels / "generated.jsonl").read_text().splitlines()]
    assert [g["id"] for g in generated] == [f"pool-{i:05d}" for i in range(4)]
    assert all(g["provenance"]["generated_by"] == "teacher" and g["messages"][-1]["content"].strip() for g in generated)
    rows = [json.loads(line) for line in (labels / "sequences.jsonl").read_text().splitlines()]
    assert m["records"] == len(rows) == 14 + 1 + m["generated"]  # labeled + the long one + what the teacher wrote
    assert len({r["id"] for r in rows}) == len(rows) and "empty-00000" not in {r["id"] for r in rows}
    assert all(len(r["input_ids"]) <= LABEL["max_seq_len"] for r in rows)
    assert manifest["topk"] == 8 and manifest["temperature"] == 2.0 and manifest["mode"] == "token"
    assert 0 < m["reconstruction_kl"] < 5 and m["bytes_per_token"] > 0
    assert json.loads((labels / "stats.json").read_text()) == m  # stats.json has no timestamps: reproducible
    # a second run with unchanged inputs is skipped
    p = _run_cli(reference)
    assert p.returncode == 0 and "up to date" in p.stdout + p.stderr


def test_kill_9_after_the_first_shard_then_resume_is_byte_identical(reference, tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher)
    # 7 shards of 3 records: the process is still busy when the first marker appears (checked below)
    proc = subprocess.Popen(_cli(ws), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "STILLHOUSE_QUIET": "1"})
    first = ws / "labels" / "shard-00000.done"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read()[-3000:]
    assert not (ws / "labels" / "manifest.json").exists(), "the run finished before the kill; the test needs more shards"
    done_before = sorted(p.name for p in (ws / "labels").glob("shard-*.done"))
    assert len(done_before) < len(list((reference / "labels").glob("shard-*.done")))

    p = _run_cli(ws)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _artifacts(ws) == _artifacts(reference)


def test_two_processes_then_a_merge_equal_one_process(reference, tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher)
    env = {**os.environ, "STILLHOUSE_QUIET": "1"}
    # rank 0 by --shard, rank 1 as `accelerate launch` would start it (RANK / WORLD_SIZE), at the same time
    procs = [subprocess.Popen(_cli(ws, "--shard", "0/2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
             subprocess.Popen(_cli(ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": "1", "WORLD_SIZE": "2"})]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = sorted(p.name for p in (ws / "labels").glob("shard-*.done"))
    assert len(done) == len(list((reference / "labels").glob("shard-*.done")))
    if not (ws / "labels" / "manifest.json").exists():  # the last to finish may already have merged
        assert any("still to do" in o for o in outs)
    p = _run_cli(ws)  # finds every shard done: merges without labeling again
    assert p.returncode == 0, p.stderr[-3000:]
    assert _artifacts(ws) == _artifacts(reference)


def test_shard_spec():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(StillhouseError, match="--shard"):
            parse_shard(bad)


def test_bad_shard_spec_and_unloadable_teacher_are_one_clear_line(tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher)
    p = _run_cli(ws, "--shard", "2/2")
    assert p.returncode == 2 and "--shard 2/2" in p.stderr and "Traceback" not in p.stderr
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    for f in teacher.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    p = _run_cli(ws, "--set", f"teacher.model={broken}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cannot load the teacher" in p.stderr and str(broken) in p.stderr and "Traceback" not in p.stderr
    assert not list((ws / "labels").glob("shard-*"))


def test_too_long_refused_when_configured(tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher, on_too_long="refuse")
    with pytest.raises(StillhouseError, match=r"long-00000: \d+ tokens, longer than label.max_seq_len=96"):
        label.run(load_config(ws))


def test_markers_of_other_settings_are_not_reused(tmp_path, teacher):
    records = _records(4, 0)
    ws = _workspace(tmp_path / "ws", teacher, records=records)
    label.run(load_config(ws))
    first = (ws / "labels" / "shard-00000.safetensors").read_bytes()
    m = label.run(load_config(ws, ["label.topk=4", "label.records_per_shard=2"]))
    from stillhouse.softlabels import ShardReader

    assert ShardReader(ws / "labels" / "shard-00000.safetensors").meta["topk"] == 4
    assert (ws / "labels" / "shard-00000.safetensors").read_bytes() != first
    assert m["metrics"]["shards"] == 3 == len(list((ws / "labels").glob("shard-*.done")))  # no stale shard-00003


def test_stored_topk_equals_a_direct_forward_pass(tmp_path, teacher):
    """What the shards hold is the teacher's own distribution: a plain `model(input_ids).logits` on each record
    alone, log-softmax at T over the full vocabulary, gives the same top-k to quantization tolerance."""
    from stillhouse.models import load_model, resolve_model
    from stillhouse.softlabels import ShardReader

    model = load_model(resolve_model(str(teacher)))
    ws = _workspace(tmp_path / "ws", teacher, records=_records(6, 0), precision="fp32", topk=16)
    manifest = label.run(load_config(ws))
    temperature = manifest["temperature"]
    rows = [json.loads(line) for line in (ws / "labels" / "sequences.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    for r in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]  # (T, V)
        full = torch.log_softmax(logits[r["prompt_len"] - 1 : -1].double() / temperature, -1)  # (n, V)
        ids, lps = ShardReader(ws / "labels" / r["shard"]).get(r["id"])  # (n, k)
        assert ids.shape == (len(r["input_ids"]) - r["prompt_len"], 16)
        direct = full.gather(1, ids)  # the direct log-probabilities of the stored ids
        assert torch.allclose(lps.double(), direct, atol=2e-2), (lps - direct).abs().max()
        kth = full.topk(16, -1).values[:, -1:]  # the stored ids are a top-k of the direct distribution
        assert (direct >= kth - 1e-4).all()
        top_mass = full.topk(16, -1).values.exp().sum(-1)
        assert torch.allclose(lps.double().exp().sum(-1), top_mass, rtol=1e-2)  # the tail mass is kept


def test_sequence_mode_keeps_the_teacher_written_text_and_no_shards(tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher, records=_records(3, 3), mode="sequence")
    m = label.run(load_config(ws))
    rows = [json.loads(line) for line in (ws / "labels" / "sequences.jsonl").read_text().splitlines()]
    assert m["mode"] == "sequence" and m["metrics"]["generated"] == 3
    assert [r["id"] for r in rows] == [f"intents-{i:05d}" for i in range(3)] + [f"pool-{i:05d}" for i in range(3)] + ["long-00000"]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert not list((ws / "labels").glob("*.safetensors")) and len(list((ws / "labels").glob("shard-*.done"))) == 3

