"""Training records and how they become tokens. One place, so label, train, eval and serve agree exactly.

A record (one line of `data/*.jsonl`):

    {"id": "intents-00017",
     "task": "classification",          # classification | qa | summarization | extraction | text
     "messages": [{"role": "system", "content": "..."},       # optional
                  {"role": "user", "content": "turn on the kitchen light"},
                  {"role": "assistant", "content": "HassTurnOn"}],   # absent -> unlabeled
     "source": {"file": "sources/intents.jsonl", "location": "line 18"},
     "sensitivity": "internal",          # public | internal | confidential | secret
     "provenance": {...}}                # optional: who wrote the response (e.g. the teacher)

The prompt is every message but a final assistant turn, rendered with the tokenizer's chat template; the
response is that assistant turn followed by the template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass


def prompt_messages(record: dict) -> list[dict]:
    msgs = record["messages"]
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else list(msgs)


def response_text(record: dict) -> str | None:
    msgs = record.get("messages") or []
    return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None


def with_response(record: dict, response: str, provenance: dict | None = None) -> dict:
    out = dict(record)
    out["messages"] = prompt_messages(record) + [{"role": "assistant", "content": response}]
    if provenance:
        out["provenance"] = {**record.get("provenance", {}), **provenance}
    return out


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (`<|im_end|>` for ChatML templates), else EOS."""
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            return tid
    return tokenizer.eos_token_id


def encode_prompt(tokenizer, record_or_messages) -> list[int]:
    msgs = record_or_messages if isinstance(record_or_messages, list) else prompt_messages(record_or_messages)
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = "\n".join(m["content"] for m in msgs) + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Encoded:
    input_ids: list[int]  # prompt + response + end-of-turn
    prompt_len: int  # response tokens are input_ids[prompt_len:]

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def encode(tokenizer, record: dict, max_seq_len: int) -> Encoded:
    """Tokenize a labeled record. Long prompts are cut from the left so the response always fits."""
    prompt = encode_prompt(tokenizer, record)
    response = tokenizer(response_text(record) or "", add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    response = response[: max(1, max_seq_len // 2)] if len(prompt) + len(response) > max_seq_len else response
    room = max_seq_len - len(response)
    prompt = prompt[-room:] if room > 0 else prompt[:0]
    return Encoded(prompt + response, len(prompt))


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             progress=None, *, temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None) -> list[str]:
    """Decode token-id prompts, batched with left padding, KV cache on. Returns decoded text up to (not including)
    the end-of-turn token. Prompts are sorted by length to minimise padding.

    temperature 0: greedy. temperature > 0: sampled (softmax at `temperature`, nucleus `top_p`), prompt i drawing
    from its own generator seeded with `seeds[i]`, so its answer does not depend on which prompts share its batch
    or on any global RNG (see `sample_seed`)."""
    import torch
    from transformers import LogitsProcessorList

    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampled generation needs one seed per prompt")
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        # sampling rides on greedy decoding: the processor draws each row's token and leaves only it finite
        extra = LogitsProcessorList([_RowSampler([seeds[i] for i in idx], temperature, top_p)] if temperature > 0 else [])
        device = next(model.parameters()).device  # the model's device (a GPU under accelerate), ids follow it
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16_ok(model)):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=[eot, tokenizer.eos_token_id], pad_token_id=pad, logits_processor=extra)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out


def sample_seed(seed: int, record_id: str, sample: int) -> int:
    """The sampling seed of one response: a function of (seed, record id, sample index) only, so a resumed or
    re-sharded run draws exactly the same tokens for the same record."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{record_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)  # torch.Generator takes a non-negative int64


class _RowSampler:
    """A logits processor that samples every row with its own torch.Generator (temperature, then top-p) and returns
    scores in which only the drawn token is finite, so `generate`'s greedy step picks it. Per-row generators make
    a record's draw independent of its batch neighbours (a shared global RNG would not)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.generators = seeds, None
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:  # on the scores' device: a CPU generator cannot draw from a CUDA tensor
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:
            # keep the smallest set of most likely tokens whose mass reaches top_p (the top token always stays)
            sorted_p, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            probs = probs.scatter(-1, sorted_ids, sorted_p.masked_fill(drop, 0.0))
        picked = torch.stack([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, picked, 0.0)


def _bf16_ok(model) -> bool:
    import torch

    return next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32
