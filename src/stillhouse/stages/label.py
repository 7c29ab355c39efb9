"""label: run the teacher once and keep what the student needs from it.

1. Sequence-level labels: for train records without a response (unlabeled internal data), the teacher writes
   `label.responses_per_prompt` of them: greedy (`label.generation_temperature: 0`) or sampled (temperature, top_p).
   Each response draws from its own generator seeded by (label.seed, record id, sample index), so a resumed or
   re-sharded run draws the same tokens (batches are fixed per shard; another label.batch_size changes the padding,
   and bf16 rounding of the logits could then, rarely, flip a draw). `labels/generated.jsonl` keeps them with provenance (teacher, source record,
   sample index, decoding parameters); with n > 1 their ids are `ID-sampleK`.
2. Token-level soft labels (when teacher and student share a tokenizer): for every response token, the teacher's
   top-k log-probabilities at temperature T (softmax over the full vocabulary first), in compact shards
   `labels/shard-NNNNN.safetensors` (format: `stillhouse.softlabels`). `labels/sequences.jsonl` keeps the exact
   token ids that were labeled, so the student trains on the same ids (re-tokenizing text can shift them).

Work unit = shard. Shard s holds the records `train.jsonl[s * records_per_shard : (s + 1) * records_per_shard]`;
for each, the teacher first writes the missing responses (kept in the hidden `.shard-NNNNN.part.json`, so a crash
during labeling does not redo them), then labels them; `shard-NNNNN.done` is written last. Every marker and part
carries the stage's fingerprint (inputs + settings): one left by other settings is not "done". Nothing written
depends on the clock or on which process did the work, so a run killed at any point and run again gives the same
bytes as one that never stopped.

Many processes: `stillhouse label --shard i/n` (or `accelerate launch -m stillhouse label`, which sets RANK and
WORLD_SIZE) labels shards s with s % n == i. Any invocation that finds every shard done merges: it writes
`sequences.jsonl`, `generated.jsonl`, `stats.json` and the manifest; the others say what is left and exit 0.

Engines: transformers is the one here (and the reference). A vLLM engine (GPU machines, not built: none to test on)
would have to produce the same shards, and mind that: `SamplingParams(prompt_logprobs=k)` needs the engine started
with `max_logprobs >= k` (default 20, below our default k = 32); prompt log-probabilities are taken at T = 1 whatever
the sampling temperature, so either request processed logprobs at T or get them at T = 1 and cannot renormalize
(a top-k at T = 1 is not the top-k at T, and its tail is unknown): the clean way is raw logits from the model runner;
logprobs of *sampled* tokens are log-softmax at T only for the tokens sampled; and token ids must be kept as ids,
never re-encoded from the returned strings.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.models import load_model, load_tokenizer, resolve_model, teacher_source, tokenizer_fingerprint
from stillhouse.records import Encoded, encode, encode_prompt, generate, response_text, sample_seed, with_response
from stillhouse.ui import console, progress_bar
from stillhouse.workspace import StageRun, atomic_write_json, load_manifest, read_json_or_none, read_jsonl, write_jsonl

RECON_SAMPLE_RECORDS = 8  # records whose full distribution the merge compares with what the shards hold


def _student_tokenizer(cfg: Config, teacher_tok):
    if cfg.student.model is None:
        return teacher_tok  # derived from the teacher: same tokenizer by construction
    return load_tokenizer(resolve_model(cfg.student.model, cfg.workspace), cfg.student.trust_remote_code)


def decide_mode(cfg: Config, teacher_tok) -> tuple[str, str]:
    """token | sequence, and why."""
    check = load_manifest(cfg.workspace, "check")
    same = tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(_student_tokenizer(cfg, teacher_tok))
    gate = (check or {}).get("tokenizer", {}).get("mode")
    if cfg.label.mode == "token" and not same and gate != "token-sliced":
        raise StillhouseError("label.mode=token but the teacher and student tokenizers differ; set label.mode=sequence (or auto)")
    if cfg.label.mode == "sequence":
        return "sequence", "label.mode=sequence"
    if same or gate == "token-sliced":
        return "token", "teacher and student share the tokenizer"
    return "sequence", "tokenizers differ: the student learns from teacher-written text"


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`--shard i/n` -> (i, n). Without it: the rank under `accelerate launch` / torchrun (RANK, WORLD_SIZE), else (0, 1)."""
    if spec is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise StillhouseError(f"--shard {spec}: expected i/n with 0 <= i < n, e.g. --shard 0/2 and --shard 1/2")
    return i, n


def _load_teacher(cfg: Config, src):
    """The teacher on CPU, or one clear error: a folder that is not a model, a corrupt file, not enough memory."""
    try:
        return load_model(src, "fp32", cfg.teacher.trust_remote_code)
    except StillhouseError as e:  # load_model names the file and the reader's error
        raise StillhouseError(f"cannot load the teacher: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise StillhouseError(f"{src.path}: cannot load the teacher ({str(e).splitlines()[0]})") from None
        raise _out_of_memory(cfg, f"{src.path}: the teacher does not fit in memory") from None
    except Exception as e:  # a corrupt safetensors or GGUF file raises its library's own error type
        raise StillhouseError(f"{src.path}: cannot load the teacher ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "check teacher.model points at a complete model folder or GGUF file") from None


def _is_oom(e: BaseException) -> bool:
    # torch raises RuntimeError ("DefaultCPUAllocator: can't allocate memory") on CPU and torch.OutOfMemoryError
    # (a RuntimeError) on GPU; Python's own allocations raise MemoryError
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "memory" in str(e).lower())


def _out_of_memory(cfg: Config, what: str) -> StillhouseError:
    """`what`, plus the check stage's plan (its memory estimate and its suggestions) read from check/manifest.json."""
    check = load_manifest(cfg.workspace, "check") or {}
    plan = check.get("metrics", {}).get("peak_label_gb")
    tips = check.get("hardware", {}).get("suggestions") or []
    hint = (f"`stillhouse check` planned {plan} GB for labeling" if plan else "run `stillhouse check` for a memory plan")
    hint += f"; it suggests: {'; '.join(tips)}" if tips else "; try a smaller --set label.batch_size"
    return StillhouseError(f"{what} ({hint}); or use a machine with more memory or a smaller teacher")


def response_logits(model, pad_id: int, batch: list[Encoded], precision: str = "bf16"):
    """The teacher's logits at every response position: one (n_i, V) fp32 tensor per record (predicting
    input_ids[prompt_len:] from the token before each). Batched with right padding; the LM head runs in fp32 (bf16
    logits would be off by ~0.1 nats, far more than the format loses) on the response positions only, all of the
    batch in one matmul (one pass over the (V, H) weight, not one per record), so (B, T, V) logits never exist."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        head = model.get_output_embeddings().weight.float()  # (V, H)
        positions = torch.cat([hidden[row, e.prompt_len - 1 : len(e.input_ids) - 1] for row, e in enumerate(batch)])
        logits = positions.float() @ head.T  # (sum n_i, V)
        return list(logits.split([e.response_len for e in batch]))


def run(cfg: Config, shard: str | None = None) -> dict:
    """Write labels/ from data/train.jsonl and the teacher. `shard="i/n"`: only this process's share of the shards
    (see the module docstring); the invocation that finds every shard done writes the manifest."""
    from stillhouse.softlabels import FORMAT_VERSION

    lc = cfg.label
    rank, world = parse_shard(shard)
    if lc.responses_per_prompt > 1 and lc.generation_temperature == 0:
        raise StillhouseError(f"label.responses_per_prompt={lc.responses_per_prompt} with greedy decoding gives identical "
                              "copies; set label.generation_temperature > 0 (e.g. 0.7) or responses_per_prompt=1")
    data = cfg.workspace / "data"
    if not (data / "train.jsonl").exists():
        raise StillhouseError(f"{data / 'train.jsonl'} not found; run `stillhouse -w {cfg.workspace} prep` first")
    src = teacher_source(cfg)
    # the shard split is not a parameter: every process computes the same fingerprint, and so the same markers
    run_ = StageRun(cfg, "label", inputs=[data / "train.jsonl", src.path],
                    params={"label": lc.model_dump(), "student": cfg.student.model_dump(), "format": FORMAT_VERSION})
    if run_.previous:
        console.print("label: up to date, skipped")
        return run_.previous
    out, job = run_.dir, run_.fingerprint
    tok = load_tokenizer(src, cfg.teacher.trust_remote_code)
    mode, why = decide_mode(cfg, tok)
    records = read_jsonl(data / "train.jsonl")
    n_shards = max(1, -(-len(records) // lc.records_per_shard))
    slices = [records[s * lc.records_per_shard : (s + 1) * lc.records_per_shard] for s in range(n_shards)]
    todo = [s for s in range(rank, n_shards, world) if not _shard_done(out, s, job, mode)]
    model = _load_teacher(cfg, src) if todo else None
    try:
        if todo:
            with progress_bar(f"label: shards {rank}/{world}" if world > 1 else "label",
                              total=sum(len(slices[s]) for s in todo), unit="rec") as advance:
                for s in todo:
                    try:
                        _label_shard(cfg, out, job, s, slices[s], model, tok, mode, src, advance)
                    except OSError as e:  # every write is atomic (temp file, rename): finished shards stay valid
                        why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                               errno.EFBIG: "file size limit reached"}.get(e.errno, "cannot write")
                        raise StillhouseError(
                            f"{why} writing {out / _name(s)} ({e.strerror or e}); "
                            "free space and re-run `stillhouse label`: finished shards are kept") from None
                    except (MemoryError, RuntimeError) as e:
                        if not _is_oom(e):
                            raise
                        raise _out_of_memory(cfg, f"{out / _name(s)}: out of memory running the teacher") from None
        left = [s for s in range(n_shards) if not _shard_done(out, s, job, mode)]
        if left:
            console.print(f"label: this process's shards ({rank}/{world}) are done; {len(left)} of {n_shards} shards "
                          "are still to do by the other processes; once they are, any `stillhouse label` writes the manifest")
            return {"stage": "label", "partial": True, "shards_left": left}
        return _merge(cfg, run_, n_shards, mode, why, tok, src, model)
    except OSError as e:  # a full disk, mostly: every write is atomic, so what is finished stays valid
        raise StillhouseError(f"{out}: cannot write ({e.strerror or e}); free some space and run `stillhouse label` "
                              "again: finished shards are kept") from None


# ------------------------------------------------------------------------------------------------ one shard


def _name(s: int) -> str:
    return f"shard-{s:05d}"


def _shard_done(out: Path, s: int, job: str, mode: str) -> bool:
    marker = read_json_or_none(out / f"{_name(s)}.done")
    return bool(marker and marker.get("job") == job and (mode == "sequence" or (out / f"{_name(s)}.safetensors").exists()))


def _too_long(cfg: Config, record: dict, n_tokens: int, limit: int) -> None:
    if cfg.label.on_too_long == "refuse":
        raise StillhouseError(
            f"data/train.jsonl record {record['id']}: {n_tokens} tokens, longer than label.max_seq_len={limit}; "
            "raise label.max_seq_len, shorten the record, or set label.on_too_long=truncate")


def _prepare(cfg: Config, out: Path, job: str, s: int, records: list[dict], model, tok, mode: str, src) -> dict:
    """Shard s's records ready to label: responses written by the teacher where missing, encoded, counted.
    Kept in `.shard-NNNNN.part.json` (hidden: resume state, not an output) so a crash during labeling does not
    redo the generation."""
    lc = cfg.label
    part_path = out / f".{_name(s)}.part.json"
    part = read_json_or_none(part_path)
    if part and part.get("job") == job:
        return part
    counts = {"generated": 0, "unlabeled_skipped": 0, "empty_responses_skipped": 0, "truncated": 0}
    unlabeled = [r for r in records if response_text(r) is None]
    generated: dict[str, list[dict]] = {}  # unlabeled record id -> the teacher's (non-empty) responses to it
    if unlabeled and lc.generate_unlabeled:
        prompt_room = max(1, lc.max_seq_len - lc.max_new_tokens)  # prompt + response must fit max_seq_len
        prompts, cut = [], set()
        for r in unlabeled:
            p = encode_prompt(tok, r)
            if len(p) > prompt_room:
                _too_long(cfg, r, len(p) + lc.max_new_tokens, lc.max_seq_len)
                p = p[-prompt_room:]  # keep the end of the prompt (the question), as `encode` does
                cut.add(r["id"])
            prompts.append(p)
        n = lc.responses_per_prompt
        jobs = [(r, k) for r in unlabeled for k in range(n)]  # (record, sample index), n per record
        sampled = lc.generation_temperature > 0
        texts = generate(model, tok, [p for p in prompts for _ in range(n)], lc.max_new_tokens,
                         batch_size=max(lc.batch_size, 32), temperature=lc.generation_temperature, top_p=lc.top_p,
                         seeds=[sample_seed(lc.seed, r["id"], k) for r, k in jobs] if sampled else None)
        for (r, k), text in zip(jobs, texts):
            if not text.strip():
                continue  # the teacher wrote nothing: counted below as unlabeled
            decoding = ({"strategy": "sample", "temperature": lc.generation_temperature, "top_p": lc.top_p,
                         "seed": lc.seed, "sample_seed": sample_seed(lc.seed, r["id"], k)} if sampled
                        else {"strategy": "greedy"})
            g = with_response(r, text, {"generated_by": "teacher", "teacher": str(src.path), "source_id": r["id"],
                                        "sample": k, "samples": n,
                                        "decoding": {**decoding, "max_new_tokens": lc.max_new_tokens}})
            if n > 1:
                g["id"] = f"{r['id']}-sample{k}"  # ids stay unique: train and the shards key on them
            generated.setdefault(r["id"], []).append(g)
        counts["generated"] = sum(len(v) for v in generated.values())
        counts["truncated"] += len(cut)
    rows, written = [], {g["id"] for gs in generated.values() for g in gs}
    for r in (g for rec in records for g in generated.get(rec["id"], [rec])):
        text = response_text(r)
        if text is None:
            counts["unlabeled_skipped"] += 1  # not generated, or the teacher wrote nothing
        elif not text.strip():
            counts["empty_responses_skipped"] += 1  # nothing to learn from an empty answer
        elif mode == "sequence":
            rows.append({"id": r["id"], "task": r["task"], "messages": r["messages"]})
        else:
            e = encode(tok, r, sys.maxsize)
            if len(e.input_ids) > lc.max_seq_len:
                _too_long(cfg, r, len(e.input_ids), lc.max_seq_len)
                counts["truncated"] += r["id"] not in written  # a cut generation prompt is counted already
                e = encode(tok, r, lc.max_seq_len)
            rows.append({"id": r["id"], "task": r["task"], "input_ids": e.input_ids, "prompt_len": e.prompt_len,
                         "shard": f"{_name(s)}.safetensors",
                         "teacher_written": bool(r.get("provenance", {}).get("generated_by"))})
    part = {"job": job, "rows": rows, "generated": [g for gs in generated.values() for g in gs], "counts": counts}
    atomic_write_json(part_path, part)
    return part


def _label_shard(cfg: Config, out: Path, job: str, s: int, records: list[dict], model, tok, mode: str, src, advance) -> None:
    """Generate, encode and label shard s; its `.done` marker last."""
    from stillhouse.softlabels import topk_logprobs, write_shard

    lc = cfg.label
    part = _prepare(cfg, out, job, s, records, model, tok, mode, src)
    info = {"job": job}
    if mode == "token":
        batch = [Encoded(r["input_ids"], r["prompt_len"]) for r in part["rows"]]
        entries = [None] * len(batch)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i].input_ids))  # length-sorted: less padding
        for b in range(0, len(order), lc.batch_size):
            idx = order[b : b + lc.batch_size]
            logits = response_logits(model, tok.pad_token_id, [batch[i] for i in idx], lc.precision)
            for i, lg in zip(idx, logits):
                entries[i] = (part["rows"][i]["id"], *topk_logprobs(lg, lc.topk, lc.temperature))
        written = write_shard(out / f"{_name(s)}.safetensors", entries, vocab_size=_vocab_rows(model),
                              topk=lc.topk, temperature=lc.temperature)
        info.update(tokens=written["tokens"], bytes=written["bytes"])
    atomic_write_json(out / f"{_name(s)}.done", info)
    advance(len(records))


def _vocab_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


# ------------------------------------------------------------------------------------------------ the merge


def _merge(cfg: Config, run_: StageRun, n_shards: int, mode: str, why: str, tok, src, model) -> dict:
    """Every shard is done: the files that list them all, the reconstruction error, the manifest."""
    import torch

    from stillhouse.softlabels import FORMAT_VERSION, ShardReader, reconstruction_kl

    lc, out = cfg.label, run_.dir
    rows, generated = [], []
    counts = {"generated": 0, "unlabeled_skipped": 0, "empty_responses_skipped": 0, "truncated": 0}
    tokens = n_bytes = 0
    for s in range(n_shards):
        part = read_json_or_none(out / f".{_name(s)}.part.json")
        if not part or part.get("job") != run_.fingerprint:
            raise StillhouseError(f"{out / f'.{_name(s)}.part.json'} is missing or stale although {_name(s)}.done "
                                  f"exists; delete {out / f'{_name(s)}.done'} and re-run `stillhouse label`")
        rows += part["rows"]
        generated += part["generated"]
        counts = {k: counts[k] + part["counts"][k] for k in counts}
        marker = read_json_or_none(out / f"{_name(s)}.done")
        tokens, n_bytes = tokens + marker.get("tokens", 0), n_bytes + marker.get("bytes", 0)
    _remove_stale(out, n_shards, mode)
    write_jsonl(out / "generated.jsonl", generated)
    write_jsonl(out / "sequences.jsonl", rows)
    stats = {"mode": mode, "mode_reason": why, "records": len(rows), **counts, "shards": n_shards}
    teacher_fp = {"path": str(src.path), "tokenizer": tokenizer_fingerprint(tok), "chat_template": tok.chat_template}
    if mode == "sequence":
        atomic_write_json(out / "stats.json", stats)
        console.print(f"label: {len(rows)} records ({counts['generated']} written by the teacher)")
        return run_.finish(metrics=stats, teacher=teacher_fp, mode=mode)

    # reconstruction error: the teacher's full distribution on a fixed sample against what the shards hold. The
    # sample is the same whoever merges, so stats.json is too.
    recon = None
    sample = rows[:: max(1, len(rows) // RECON_SAMPLE_RECORDS)][:RECON_SAMPLE_RECORDS]
    if sample:
        model = model if model is not None else _load_teacher(cfg, src)
        full, stored_ids, stored_lps = [], [], []
        for r in sample:
            (logits,) = response_logits(model, tok.pad_token_id, [Encoded(r["input_ids"], r["prompt_len"])], lc.precision)
            full.append(torch.log_softmax(logits / lc.temperature, dim=-1))
            ids, lps = ShardReader(out / r["shard"]).get(r["id"])
            stored_ids.append(ids)
            stored_lps.append(lps)
        recon = reconstruction_kl(torch.cat(full), torch.cat(stored_ids), torch.cat(stored_lps))
    vocab_rows = _vocab_rows(model) if model is not None else len(tok)
    stats.update({"tokens": tokens, "bytes": n_bytes, "bytes_per_token": round(n_bytes / max(1, tokens), 2),
                  "reconstruction_kl": recon})
    atomic_write_json(out / "stats.json", stats)
    console.print(f"label: {tokens} tokens in {n_shards} shards, {stats['bytes_per_token']} bytes/token, "
                  f"reconstruction KL {recon if recon is None else round(recon, 5)}, {counts['truncated']} truncated")
    return run_.finish(metrics=stats, teacher=teacher_fp, mode=mode, topk=lc.topk, temperature=lc.temperature,
                       vocab_rows=vocab_rows, format_version=FORMAT_VERSION)


def _remove_stale(out: Path, n_shards: int, mode: str) -> None:
    """Shard files another run left (more shards, or token-mode shards in sequence mode) must not pass as outputs."""
    keep = {f"{_name(s)}.done" for s in range(n_shards)}
    if mode == "token":
        keep |= {f"{_name(s)}.safetensors" for s in range(n_shards)}
    for p in out.glob("shard-*"):
        if p.name not in keep:
            p.unlink(missing_ok=True)
