"""Training records and how they become tokens. One place, so label, train, eval and serve agree exactly.

A record (one line of `data/*.jsonl`):

    {"id": "intents-00017",
     "task": "classification",          # classification | qa | summarization | extraction | text
     "messages": [{"role": "system", "content": "..."},       # optional
                  {"role": "user", "content": "turn on the kitchen light"},
                  {"role": "assistant", "content": "HassTurnOn"}],   # absent -> unlabeled
     "source": {"file": "sources/intents.jsonl", "location": "line 18"},
     "sensitivity": "internal",          # public | internal | confidential | restricted
     "provenance": {...}}                # optional: who wrote the response (e.g. the teacher)

The prompt is every message but a final assistant turn, rendered with the tokenizer's chat template; the
response is that assistant turn followed by the template's end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

SENSITIVITY_LEVELS = ["public", "internal", "confidential", "restricted"]


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
             progress=None) -> list[str]:
    """Greedy decoding of token-id prompts, batched with left padding, KV cache on. Returns decoded text
    up to (not including) the end-of-turn token. Prompts are sorted by length to minimise padding."""
    import torch

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
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16_ok(model)):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=[eot, tokenizer.eos_token_id], pad_token_id=pad)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            if eot in new:
                new = new[: new.index(eot)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out


def _bf16_ok(model) -> bool:
    import torch

    return next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32
