"""Optional model backend for PII detection (`prep.pii_model`): a local NER model whose spans are added to the
rule-based finder's (stillhouse.pii), for names and places the rules miss.

    prep:
      pii_model: {kind: transformers, path: models/ner, labels: {PER: PERSON, LOC: ADDRESS}, min_score: 0.5}
      pii_model: {kind: spacy, path: models/spacy-ner}          # or an installed pipeline package's name

kind=transformers: a Hugging Face token-classification folder (config.json + *.safetensors + a fast tokenizer),
loaded with AutoModelForTokenClassification, local files only, safetensors only, no remote code. Long texts
are read in overlapping windows. kind=spacy: any spaCy pipeline with entities (`ner`, `entity_ruler`), when
spaCy is installed (`pip install spacy`); GiNZA works the same way. Nothing is ever downloaded.

Model labels (B-/I- prefixes dropped) map to PII kinds through `labels`; other labels are ignored. `merge`
joins the model's spans with the rules': the union, and where two overlap, the longer one.
"""

from __future__ import annotations

from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.pii import Span

WINDOW_STRIDE = 32  # tokens two windows of a long text share, so an entity at a window's edge is seen whole


def merge(rule_spans: list[Span], model_spans: list[Span]) -> list[Span]:
    """The union of two span lists, no two overlapping: of overlapping spans the longer wins (at equal length,
    the rules' -- their kinds are checked by checksums and context). Sorted by position."""
    ranked = sorted([(s, 0) for s in rule_spans] + [(s, 1) for s in model_spans],
                    key=lambda x: (-(x[0].end - x[0].start), x[1], x[0].start))
    taken: list[Span] = []
    for s, _ in ranked:
        if s.end > s.start and all(s.end <= t.start or s.start >= t.end for t in taken):
            taken.append(s)
    return sorted(taken)


def load(mc, workspace: Path):
    """The detector for `mc` (a config.PiiModelConfig): an object whose `find(texts)` returns one span list per
    text. Errors name the key to fix (prep.pii_model.path / .labels / .kind)."""
    return _Transformers(mc, workspace) if mc.kind == "transformers" else _Spacy(mc, workspace)


def fingerprint(mc, workspace: Path) -> dict[str, str]:
    """What identifies the model for prep's up-to-date check: size and mtime of its files (a spaCy package:
    its version), so a retrained model in the same folder makes prep run again."""
    folder = _folder(mc.path, workspace)
    if folder.is_dir():
        return {str(p.relative_to(folder)): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
                for p in sorted(folder.rglob("*")) if p.is_file()}
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {mc.path: version(mc.path)}
    except PackageNotFoundError:
        return {}  # load() says what is wrong


def _folder(path: str, workspace: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workspace / p


def _kinds(mc, model_labels: list[str]) -> dict[str, str]:
    """{model label: PII kind} for the labels `mc.labels` maps; an error if it maps none of them."""
    entity = {lab: lab[2:] if lab[:2] in ("B-", "I-", "E-", "S-") else lab for lab in model_labels}
    out = {lab: mc.labels[e] for lab, e in entity.items() if e in mc.labels}
    if not out:
        names = sorted({e for e in entity.values() if e != "O"})
        raise StillhouseError(f"prep.pii_model.labels maps none of the model's labels ({', '.join(names) or 'none'}); "
                              f"map them to PII kinds, e.g. labels: {{{(names or ['PER'])[0]}: PERSON}}")
    return out


class _Transformers:
    """A token-classification model folder."""

    def __init__(self, mc, workspace: Path):
        import torch
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        self.mc = mc
        folder = _folder(mc.path, workspace)
        where = f"prep.pii_model.path: {folder}"
        if not folder.is_dir():
            raise StillhouseError(f"{where} is not a folder; point it at a local token-classification model folder")
        if not (folder / "config.json").exists() or not list(folder.glob("*.safetensors")):
            raise StillhouseError(f"{where} needs config.json and *.safetensors weights (pickled .bin weights are "
                                  f"refused); save the model with save_pretrained(safe_serialization=True)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise StillhouseError(f"{where}: unreadable config.json ({str(e).splitlines()[0]})") from None
        archs = config.architectures or []
        if not any(a.endswith("ForTokenClassification") for a in archs):
            raise StillhouseError(f"{where} holds a {', '.join(archs) or 'model of unknown type'}, not a "
                                  f"token-classification (NER) model (architectures: *ForTokenClassification)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            model, info = AutoModelForTokenClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
        except Exception as e:  # corrupt weights or tokenizer files raise the readers' own types
            raise StillhouseError(f"{where} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if info.get("missing_keys"):  # a head initialized at random would tag noise
            raise StillhouseError(f"{where}: the weights lack {len(info['missing_keys'])} tensors of the model "
                                  f"(e.g. {info['missing_keys'][0]}); it is not a trained token-classification model")
        if not self.tokenizer.is_fast:
            raise StillhouseError(f"{where}: the tokenizer has no tokenizer.json (a fast tokenizer is needed for "
                                  f"character offsets)")
        self.model = model.eval()
        labels = [config.id2label[i] for i in range(config.num_labels)]
        kinds = _kinds(mc, labels)
        self.kind_of = [kinds.get(lab) for lab in labels]  # label id -> PII kind or None
        self.begins = [lab[:2] in ("B-", "S-") for lab in labels]  # label id -> starts a new entity
        limit = getattr(config, "max_position_embeddings", 512) or 512
        self.max_length = min(512, limit, self.tokenizer.model_max_length or 512)
        self.torch = torch

    def find(self, texts: list[str]) -> list[list[Span]]:
        out: list[list[Span]] = [[] for _ in texts]
        bs = self.mc.batch_size
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batched: less padding
        for b in range(0, len(texts), bs):
            idx = order[b : b + bs]
            batch = [texts[i] for i in idx]
            enc = self.tokenizer(batch, truncation=True, max_length=self.max_length, padding=True,
                                 stride=min(WINDOW_STRIDE, self.max_length // 4), return_overflowing_tokens=True,
                                 return_offsets_mapping=True, return_tensors="pt")
            text_of = enc.pop("overflow_to_sample_mapping").tolist()  # window -> text in the batch
            offsets = enc.pop("offset_mapping").tolist()  # (windows, tokens, 2) character offsets
            with self.torch.inference_mode():
                probs = self.model(**enc).logits.float().softmax(-1)  # (windows, tokens, labels)
            score, label = probs.max(-1)
            special = [self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                       for ids in enc["input_ids"].tolist()]
            for w, t in enumerate(text_of):
                out[idx[t]] += self._spans(batch[t], offsets[w], label[w].tolist(), score[w].tolist(), special[w])
        return [merge([], spans) for spans in out]  # windows overlap: the same entity may come twice

    def _spans(self, text: str, offsets, labels, scores, special) -> list[Span]:
        spans, cur = [], None  # cur: [start, end, kind]
        for (s, e), lab, sc, sp in zip(offsets, labels, scores, special):
            if sp or e <= s:
                continue  # [CLS], [SEP], padding
            kind = self.kind_of[lab] if sc >= self.mc.min_score else None
            if kind and cur and cur[2] == kind and (not self.begins[lab] or s == cur[1]):  # I- tag, or a word piece
                cur[1] = e
                continue
            if cur:
                spans.append(cur)
            cur = [s, e, kind] if kind else None
        if cur:
            spans.append(cur)
        return [Span(s, e, k, text[s:e]) for s, e, k in (_whole_words(text, s, e) + (k,) for s, e, k in spans)]


def _whole_words(text: str, start: int, end: int) -> tuple[int, int]:
    """A span widened to whole words where a tag covered only a word piece ("Zor" of "Zorbulax"); only across
    letters of scripts that separate words by spaces (CJK and Thai run words together)."""
    def inside(c: str) -> bool:
        return c.isalnum() and not ("\u0e00" <= c <= "\u0e7f" or c >= "\u2e80")

    while start > 0 and inside(text[start - 1]) and inside(text[start]):
        start -= 1
    while end < len(text) and inside(text[end]) and inside(text[end - 1]):
        end += 1
    return start, end


class _Spacy:
    """A spaCy pipeline folder or installed package; its entities become spans."""

    def __init__(self, mc, workspace: Path):
        try:
            import spacy
        except ImportError:
            raise StillhouseError("prep.pii_model.kind=spacy needs spaCy, which is not installed: pip install spacy "
                                  "(or pip install 'stillhouse[pii-model]'), or set prep.pii_model.kind=transformers") from None

        self.mc = mc
        folder = _folder(mc.path, workspace)
        try:
            if folder.is_dir():
                self.nlp = spacy.load(folder)
            elif spacy.util.is_package(mc.path):
                self.nlp = spacy.load(mc.path)
            else:
                raise StillhouseError(f"prep.pii_model.path: {folder} is not a folder and {mc.path!r} no installed "
                                      f"spaCy package; point it at a pipeline saved with nlp.to_disk (never downloaded)")
        except (OSError, ValueError, KeyError) as e:  # no config.cfg / meta.json, unknown components
            raise StillhouseError(f"prep.pii_model.path: {folder} is not a spaCy pipeline ({str(e).splitlines()[0]})") from None
        labels = sorted({lab for name in self.nlp.pipe_names
                         for lab in getattr(self.nlp.get_pipe(name), "labels", ()) if isinstance(lab, str)})
        self.kinds = _kinds(mc, labels)  # a pipeline without ner / entity_ruler has no labels: an error here

    def find(self, texts: list[str]) -> list[list[Span]]:
        return [merge([], [Span(e.start_char, e.end_char, self.kinds[e.label_], e.text) for e in doc.ents
                           if e.label_ in self.kinds])
                for doc in self.nlp.pipe(texts, batch_size=self.mc.batch_size)]
