"""label: run the teacher once and keep what the student needs from it.

1. Sequence-level labels: for train records without a response (unlabeled internal data), the teacher writes one
   (greedy), stored with provenance in `labels/generated.jsonl`.
2. Token-level soft labels (when teacher and student share a tokenizer): for every response token, the teacher's
   top-k log-probabilities at temperature T (softmax over the full vocabulary first), in compact shards
   `labels/shard-NNNNN.safetensors`, each followed by a `.done` marker. `labels/sequences.jsonl` keeps the exact
   token ids that were labeled, so the student trains on the same ids (re-tokenizing text can shift them).

Re-running after a crash or Ctrl-C skips shards whose marker exists.
"""

from __future__ import annotations

import json
from stillhouse.config import Config
from stillhouse.errors import StillhouseError
from stillhouse.models import load_model, load_tokenizer, resolve_model, teacher_source, tokenizer_fingerprint
from stillhouse.records import encode, encode_prompt, generate, response_text, with_response
from stillhouse.ui import console, progress_bar
from stillhouse.workspace import StageRun, atomic_write_json, load_manifest, read_jsonl, write_jsonl


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


def run(cfg: Config) -> dict:
    """Write labels/ from data/train.jsonl and the teacher."""
    import torch

    from stillhouse.softlabels import FORMAT_VERSION, ShardReader, reconstruction_kl, topk_logprobs, write_shard

    lc = cfg.label
    data = cfg.workspace / "data"
    if not (data / "train.jsonl").exists():
        raise StillhouseError(f"{data / 'train.jsonl'} not found; run `stillhouse -w {cfg.workspace} prep` first")
    src = teacher_source(cfg)
    run_ = StageRun(cfg, "label", inputs=[data / "train.jsonl", src.path],
                    params={"label": lc.model_dump(), "student": cfg.student.model_dump(), "format": FORMAT_VERSION})
    if run_.previous:
        console.print("label: up to date, skipped")
        return run_.previous
    out = run_.dir
    tok = load_tokenizer(src, cfg.teacher.trust_remote_code)
    mode, why = decide_mode(cfg, tok)
    model = load_model(src, "fp32", cfg.teacher.trust_remote_code)
    records = read_jsonl(data / "train.jsonl")
    teacher_fp = {"path": str(src.path), "tokenizer": tokenizer_fingerprint(tok), "chat_template": tok.chat_template}

    # -- 1. the teacher writes responses for unlabeled records (sequence-level KD) --------------------------------
    gen_path, gen_done = out / "generated.jsonl", out / "generated.done"
    unlabeled = [r for r in records if response_text(r) is None]
    if gen_done.exists():
        generated = read_jsonl(gen_path)
    elif unlabeled and lc.generate_unlabeled:
        with progress_bar("label: teacher writes responses", total=len(unlabeled), unit="rec") as advance:
            texts = generate(model, tok, [encode_prompt(tok, r) for r in unlabeled], lc.max_new_tokens,
                             batch_size=max(lc.batch_size, 32), progress=advance)
        generated = [with_response(r, t, {"generated_by": "teacher", "teacher": str(src.path)})
                     for r, t in zip(unlabeled, texts) if t.strip()]
        write_jsonl(gen_path, generated)
        gen_done.touch()
    else:
        generated = []
    by_id = {r["id"]: r for r in generated}
    labeled = [by_id.get(r["id"], r) for r in records if response_text(by_id.get(r["id"], r)) is not None]

    stats = {"mode": mode, "mode_reason": why, "records": len(labeled), "generated": len(generated),
             "unlabeled_skipped": len(unlabeled) - len(generated)}
    if mode == "sequence":
        write_jsonl(out / "sequences.jsonl", [{"id": r["id"], "task": r["task"], "messages": r["messages"]} for r in labeled])
        return run_.finish(metrics=stats, teacher=teacher_fp, mode=mode)

    # -- 2. token-level soft labels, shard by shard ----------------------------------------------------------------
    encoded = [(r, encode(tok, r, lc.max_seq_len)) for r in labeled]
    shards = [encoded[i : i + lc.records_per_shard] for i in range(0, len(encoded), lc.records_per_shard)]
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    sample_full, sample_ids = None, []  # the teacher's full distribution on a sample, for the reconstruction error
    totals = {"tokens": 0, "bytes": 0}
    n_tokens = sum(e.response_len for _, e in encoded)
    with progress_bar("label: teacher soft labels", total=n_tokens, unit="tok") as advance:
        for s, shard in enumerate(shards):
            path = out / f"shard-{s:05d}.safetensors"
            done = path.with_suffix(".done")
            if done.exists():
                info = json.loads(done.read_text())
                totals["tokens"] += info["tokens"]
                totals["bytes"] += info["bytes"]
                advance(info["tokens"])
                continue
            entries = []
            order = sorted(range(len(shard)), key=lambda i: len(shard[i][1].input_ids))  # length-sorted: less padding
            for b in range(0, len(order), lc.batch_size):
                chunk = [shard[i] for i in order[b : b + lc.batch_size]]
                width = max(len(e.input_ids) for _, e in chunk)
                ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, (_, e) in enumerate(chunk):
                    ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                    mask[row, : len(e.input_ids)] = 1
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                head = model.get_output_embeddings().weight
                for row, (r, e) in enumerate(chunk):
                    pos = torch.arange(e.prompt_len - 1, len(e.input_ids) - 1)
                    logits = hidden[row, pos].float() @ head.float().T  # (n, V), one record at a time
                    t_ids, t_lps = topk_logprobs(logits, lc.topk, lc.temperature)
                    entries.append((r["id"], t_ids, t_lps))
                    if sample_full is None:
                        sample_full = torch.log_softmax(logits / lc.temperature, dim=-1)
                        sample_ids.append(r["id"])
                    advance(len(pos))
            info = write_shard(path, entries, vocab_size=vocab_rows, topk=lc.topk, temperature=lc.temperature)
            done.write_text(json.dumps({"tokens": info["tokens"], "bytes": info["bytes"]}))
            totals["tokens"] += info["tokens"]
            totals["bytes"] += info["bytes"]

    # sequences.jsonl: the exact ids labeled, and where their soft labels live
    seq_rows = []
    for s, shard in enumerate(shards):
        for r, e in shard:
            seq_rows.append({"id": r["id"], "task": r["task"], "input_ids": e.input_ids, "prompt_len": e.prompt_len,
                             "shard": f"shard-{s:05d}.safetensors", "teacher_written": bool(r.get("provenance", {}).get("generated_by"))})
    write_jsonl(out / "sequences.jsonl", seq_rows)

    recon = None
    if sample_full is not None:  # re-read what was stored and compare with the full distribution
        reader = None
        for s, shard in enumerate(shards):
            if any(r["id"] == sample_ids[0] for r, _ in shard):
                reader = ShardReader(out / f"shard-{s:05d}.safetensors")
        stored_ids, stored_lps = reader.get(sample_ids[0])
        recon = reconstruction_kl(sample_full, stored_ids, stored_lps)
    stats.update({"tokens": totals["tokens"], "bytes": totals["bytes"],
                  "bytes_per_token": round(totals["bytes"] / max(1, totals["tokens"]), 2),
                  "reconstruction_kl": recon, "shards": len(shards)})
    atomic_write_json(out / "stats.json", stats)
    console.print(f"label: {stats['tokens']} tokens, {stats['bytes_per_token']} bytes/token, "
                  f"reconstruction KL {recon if recon is None else round(recon, 5)}")
    return run_.finish(metrics=stats, teacher=teacher_fp, mode=mode, topk=lc.topk, temperature=lc.temperature,
                       vocab_rows=vocab_rows, format_version=FORMAT_VERSION)

