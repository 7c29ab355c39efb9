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



# ------------------------------------------------------------------------------------ sampled responses, n per prompt


def _generated(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "labels" / "generated.jsonl").read_text().splitlines()]


def test_row_sampler_follows_temperature_and_top_p():
    """The sampler draws from softmax(scores / T) restricted to the top-p nucleus, one generator per row."""
    from stillhouse.records import _RowSampler

    probs = torch.tensor([0.6, 0.3, 0.1])
    scores = (probs.log() * 0.5).unsqueeze(0)  # at T = 0.5 these are the logits of `probs`
    def freqs(top_p: float, draws: int = 4000) -> torch.Tensor:
        sampler = _RowSampler([7], temperature=0.5, top_p=top_p)
        picks = [int(sampler(None, scores.clone()).argmax()) for _ in range(draws)]
        return torch.bincount(torch.tensor(picks), minlength=3).float() / draws

    assert torch.allclose(freqs(1.0), probs, atol=0.03)
    assert torch.allclose(freqs(0.8), torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.03)  # 0.6 + 0.3 reaches 0.8
    assert freqs(0.5, 200).tolist() == [1.0, 0.0, 0.0]  # the top token alone reaches 0.5
    out = _RowSampler([1, 2], 1.0, 1.0)(None, torch.zeros(2, 5))
    assert (out.isfinite().sum(-1) == 1).all()  # exactly one token left per row: greedy picks the draw


def test_sampled_responses_n_per_prompt_are_deterministic_per_record(tmp_path, teacher):
    sampling = {"mode": "sequence", "generation_temperature": 1.0, "top_p": 0.95, "responses_per_prompt": 3,
                "max_new_tokens": 6}
    ws = _workspace(tmp_path / "a", teacher, records=_records(2, 3), **sampling)
    m = label.run(load_config(ws))
    gen = _generated(ws)
    assert m["metrics"]["generated"] == len(gen) == 9
    assert [g["id"] for g in gen] == [f"pool-{i:05d}-sample{k}" for i in range(3) for k in range(3)]
    prov = gen[4]["provenance"]
    assert prov["source_id"] == "pool-00001" and prov["sample"] == 1 and prov["samples"] == 3
    assert prov["decoding"]["strategy"] == "sample" and prov["decoding"]["temperature"] == 1.0
    assert prov["decoding"]["top_p"] == 0.95 and prov["decoding"]["max_new_tokens"] == 6
    texts = [g["messages"][-1]["content"] for g in gen]
    assert all(len({texts[3 * i + k] for k in range(3)}) > 1 for i in range(3))  # n samples, not n copies
    rows = [json.loads(line)["id"] for line in (ws / "labels" / "sequences.jsonl").read_text().splitlines()]
    assert set(g["id"] for g in gen) <= set(rows)

    # other batching and sharding: the same draws for the same records (each has its own seeded generator)
    ws2 = _workspace(tmp_path / "b", teacher, records=_records(0, 3)[::-1], **sampling, batch_size=1,
                     records_per_shard=1)
    label.run(load_config(ws2))
    assert sorted((g["id"], g["messages"][-1]["content"]) for g in _generated(ws2)) == \
        sorted((g["id"], g["messages"][-1]["content"]) for g in gen)
    # another seed: other draws
    ws3 = _workspace(tmp_path / "c", teacher, records=_records(2, 3), **sampling, seed=1)
    label.run(load_config(ws3))
    assert [g["messages"][-1]["content"] for g in _generated(ws3)] != texts


def test_n_greedy_copies_are_refused(tmp_path, teacher):
    ws = _workspace(tmp_path / "ws", teacher, responses_per_prompt=2)
    with pytest.raises(StillhouseError, match=r"responses_per_prompt=2 with greedy.*generation_temperature"):
        label.run(load_config(ws))


# ------------------------------------------------------------------------------------------------ a full disk


def test_a_write_that_fails_stops_cleanly_and_the_rerun_resumes(tmp_path, teacher):
    """A real failed write, not a mock: the label process runs under RLIMIT_FSIZE, so the kernel refuses (EFBIG, the
    same path as ENOSPC: a failed write() inside our atomic writers) any file larger than the limit. The records
    are ordered so the first shards' files fit and the last shard's do not. Proves: one clear line naming the shard,
    exit 2, no half-written file, the finished shards kept (not redone), and a re-run without the limit gives the
    bytes of a run that never failed."""
    import resource

    records = _records(6, 0)[:6] + [
        {"id": f"verbose-{i:05d}", "task": "qa", "messages": [
            {"role": "user", "content": f"explain the policy {i}"},
            {"role": "assistant", "content": " ".join(f"clause {j} applies" for j in range(8))}]} for i in range(3)]
    reference = _workspace(tmp_path / "reference", teacher, records=records)
    label.run(load_config(reference))
    labels = reference / "labels"
    small = max(p.stat().st_size for s in (0, 1) for p in labels.glob(f"*shard-0000{s}*"))
    big = min(p.stat().st_size for p in labels.glob("*shard-00002.*") if p.suffix != ".done")
    assert small < big, "the last shard must need the largest files"
    limit = (small + big) // 2

    ws = _workspace(tmp_path / "ws", teacher, records=records)
    p = subprocess.run(_cli(ws), capture_output=True, text=True, timeout=300, env={**os.environ, "STILLHOUSE_QUIET": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "shard-00002" in p.stderr and "free space and re-run" in p.stderr and "finished shards are kept" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    out = ws / "labels"
    assert sorted(q.name for q in out.glob("shard-*.done")) == ["shard-00000.done", "shard-00001.done"]
    assert not list(out.glob("*.tmp")) and not (out / "shard-00002.safetensors").exists()
    kept = {q.name: q.stat().st_mtime_ns for q in out.glob("shard-0000[01].*")}

    p = _run_cli(ws)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {q.name: q.stat().st_mtime_ns for q in out.glob("shard-0000[01].*")} == kept  # not redone
    assert _artifacts(ws) == _artifacts(reference)


def test_out_of_memory_message_carries_the_check_plan(tmp_path):
    """The message a teacher too big for memory gets (at load or in a forward pass) quotes check/manifest.json: the
    planned peak and the check stage's own suggestions; without a check run it says to run one."""
    from stillhouse.config import Config
    from stillhouse.workspace import atomic_write_json

    cfg = Config()
    cfg.workspace = tmp_path
    assert "run `stillhouse check` for a memory plan" in str(label._out_of_memory(cfg, "teacher.gguf: too big"))
    atomic_write_json(tmp_path / "check" / "manifest.json", {"stage": "check", "metrics": {"peak_label_gb": 41.5},
                      "hardware": {"suggestions": ["label_teacher needs 41.5 GB: --set label.batch_size=4 fits"]}})
    msg = str(label._out_of_memory(cfg, "teacher.gguf: too big"))
    assert msg.startswith("teacher.gguf: too big") and "planned 41.5 GB" in msg and "label.batch_size=4 fits" in msg
    assert label._is_oom(MemoryError()) and label._is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not label._is_oom(RuntimeError("shape mismatch"))
