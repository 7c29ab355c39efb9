"""The sample data behind `stillhouse demo`, generated here (deterministically, from a seed) instead of shipped.

Two kinds of sources land in one folder:

- an intent-classification task: smart-home commands expanded from the `home-assistant-intents` templates
  with `hassil`'s parser, slots filled from a small fictional home (`intents.jsonl` labeled,
  `intents-unlabeled.jsonl` for the teacher to label);
- the internal documents of a fictional company, with fake PII planted the way it leaks in real life
  (Faker, seeded): two policies as PDF (repeating header/footer and page numbers, for prep to strip), an
  expense policy as DOCX (with tables), an onboarding wiki page as HTML (nav/footer boilerplate), a FAQ as
  Markdown, support tickets as CSV (with exact and near duplicates), and one corrupt PDF for quarantine.

Every file is byte-identical for a given seed (PDF and DOCX timestamps are pinned), so a workspace built
twice hashes the same and prep's skip logic works. Prose is ASCII where it goes into a PDF: fpdf2's core fonts
only cover Latin-1, so Japanese and Thai values go into the DOCX, HTML, Markdown and CSV files.
"""

from __future__ import annotations

import csv
import html
import io
import random
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from stillhouse.workspace import atomic_write_bytes, atomic_write_text, write_jsonl

COMPANY = "Kestrel Ridge Logistics"
COMPANY_DOMAIN = "kestrelridge.example"  # the reserved .example TLD: no planted address can reach a real inbox

# 17 intents that expand into hundreds of distinct utterances each and are not near-synonyms of one another
# (HassListAddItem vs HassShoppingListAddItem would be a coin flip for any model, so only one of them is here).
INTENTS = [
    "HassClimateGetTemperature", "HassClimateSetTemperature", "HassGetState", "HassGetWeather",
    "HassLightSet", "HassMediaNext", "HassMediaPause", "HassMediaSearchAndPlay", "HassSetPosition",
    "HassSetVolume", "HassShoppingListAddItem", "HassStartTimer", "HassCancelTimer", "HassTimerStatus",
    "HassTurnOff", "HassTurnOn", "HassVacuumCleanArea",
]

# Short on purpose: every training example carries the system prompt, and its length sets the step time.
INTENT_SYSTEM_PROMPT = "Classify the smart-home command. Answer with the intent name only."
TICKETS_SYSTEM_PROMPT = f"You are the support desk of {COMPANY}. Answer the customer."

# Pinned timestamps inside PDF and DOCX files, so the bytes depend on the seed only.
_FILE_TIME = datetime(2024, 3, 1, 9, 0, 0, tzinfo=timezone.utc)


def demo_table_mappings() -> list[dict]:
    """The `prep.tables` entries (see `config.TableMapping`) that turn the demo's JSONL/CSV files into records."""
    return [
        {"pattern": "intents*.jsonl", "task": "classification", "input": "text", "output": "label",
         "system_prompt": INTENT_SYSTEM_PROMPT},
        {"pattern": "tickets.csv", "task": "qa", "input": "body", "output": "resolution",
         "system_prompt": TICKETS_SYSTEM_PROMPT},
    ]


def write_demo_sources(dest: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Write the demo's source files into `dest` (a folder, created) and return a summary dict.

    Summary: {"intents": [sorted intent names], "labeled": N, "unlabeled": M, "documents": [file names of
    everything but the intent files], "pii_planted": K, "pii": [{"kind", "value", "files"}, ...]}, where the
    `pii` list is the ground truth of what was planted (K entries): the demo prints it, tests check masking.
    (A value in a PDF may wrap onto the next line: compare with whitespace collapsed.)
    quick: 40 labeled / 60 unlabeled utterances, 10 tickets and shorter documents (for tests).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    labeled, unlabeled = _intent_rows(40 if quick else 200, 60 if quick else 2000, seed=seed)
    write_jsonl(dest / "intents.jsonl", labeled)
    write_jsonl(dest / "intents-unlabeled.jsonl", unlabeled)

    cast = _make_cast(seed, n_customers=10 if quick else 26)
    texts: dict[str, str] = {}  # file name -> every string written into it, for the PII ground truth
    texts["hr-leave-policy.pdf"] = _write_pdf(dest / "hr-leave-policy.pdf", _hr_leave_policy(cast, quick))
    texts["it-security-policy.pdf"] = _write_pdf(dest / "it-security-policy.pdf", _it_security_policy(cast, quick))
    texts["expense-policy.docx"] = _write_docx(dest / "expense-policy.docx", _expense_policy(cast, quick))
    texts["onboarding-wiki.html"] = _write_html(dest / "onboarding-wiki.html", _onboarding_wiki(cast, quick), cast)
    texts["faq.md"] = _write_markdown(dest / "faq.md", _faq(cast, quick))
    texts["tickets.csv"] = _write_tickets(dest / "tickets.csv", cast, n_tickets=10 if quick else 30, seed=seed)
    # Not a PDF at all past its first line: prep must quarantine it and carry on.
    atomic_write_bytes(dest / "broken.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + random.Random(seed).randbytes(2048))

    pii = _planted_pii(cast, texts)
    return {
        "intents": sorted({r["label"] for r in labeled}),
        "labeled": len(labeled),
        "unlabeled": len(unlabeled),
        "documents": sorted([*texts, "broken.pdf"]),
        "pii_planted": len(pii),
        "pii": pii,
    }


# ============================================================================================ intent task

# A small fictional home. hassil's templates reference {area}, {floor}, {name} and free-text "wildcard"
# lists that Home Assistant fills from the user's own devices; these are ours.
_AREAS = ["kitchen", "living room", "bedroom", "kids room", "guest room", "office", "garage", "hallway",
          "bathroom", "dining room", "basement", "laundry room", "porch", "attic"]
_FLOORS = ["ground", "first", "second", "upstairs", "downstairs"]
_NAMES_BY_DOMAIN = {
    "light": ["desk lamp", "ceiling light", "reading lamp", "porch light", "floor lamp", "night light",
              "pendant lights", "LED strip", "bedside lamp", "chandelier"],
    "fan": ["ceiling fan", "tower fan", "bathroom extractor"],
    "switch": ["coffee maker", "kettle", "space heater", "christmas lights", "dehumidifier", "fountain pump"],
    "climate": ["thermostat", "heat pump", "air conditioner", "radiator"],
    "cover": ["garage door", "patio blinds", "bedroom curtains", "skylight", "roller shutter"],
    "valve": ["water main", "sprinkler valve"],
    "media_player": ["kitchen speaker", "living room TV", "soundbar", "office speaker", "bedroom TV"],
    "lock": ["front door lock", "back door lock", "side gate lock"],
    "scene": ["movie night", "good morning", "dinner party"],
    "script": ["bedtime routine", "leaving home"],
    "vacuum": ["robot vacuum", "Roomba", "upstairs vacuum"],
    "weather": ["Lisbon", "Osaka", "Denver", "Chiang Mai", "Boulder", "Seattle", "Hamburg", "Kyoto"],
    "person": ["Alex", "Sam", "Priya", "Kenji"],
    "sensor": ["outdoor temperature", "humidity sensor", "power meter"],
    "binary_sensor": ["motion sensor", "back door sensor", "smoke detector"],
}
_GENERIC_NAMES = _NAMES_BY_DOMAIN["light"] + _NAMES_BY_DOMAIN["switch"]  # for blocks scoped to no domain
_WILDCARDS = {
    "shopping_list_item": ["milk", "eggs", "oat milk", "paper towels", "coffee beans", "two lemons", "dish soap",
                           "bananas", "sourdough bread", "AA batteries", "olive oil", "cat food", "tomatoes",
                           "toothpaste", "rice", "butter", "orange juice", "garlic", "trash bags", "yogurt",
                           "spinach", "a birthday card", "chicken thighs", "basmati rice", "laundry detergent"],
    "search_query": ["jazz for cooking", "the Beatles", "Blue Planet", "lofi beats", "Miles Davis",
                     "the morning news", "Abbey Road", "Taylor Swift", "rainy day piano", "The Daily",
                     "Bluey", "Hans Zimmer", "classic rock", "Kind of Blue", "Radiohead"],
    "timer_command": ["turn off the oven", "turn off the porch light", "start the robot vacuum",
                      "lock the front door", "turn off the space heater"],
    "timer_name": ["pasta", "pizza", "laundry", "tea", "eggs", "bread", "nap", "homework"],
    "message": ["dinner is ready", "we leave in five minutes", "the movie is starting", "time for bed"],
    "todo_list_item": ["milk", "call the plumber"],
    "zone": ["work", "school", "the gym"],
}
# Numbers a person would say, instead of every value of the template's range (a timer for 97 hours).
_NUMBERS = {
    "temperature": [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 19.5, 20.5, 21.5],
    "brightness": list(range(5, 101, 5)),
    "volume": list(range(5, 101, 5)),
    "position": list(range(0, 101, 10)),
    "fan_speed": list(range(10, 101, 10)),
    "timer_hours": [1, 2, 3],
    "timer_minutes": [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 45],
    "timer_seconds": [10, 15, 20, 30, 45, 90],
    "color_temperature": list(range(2000, 6501, 500)),
}
_EXHAUSTED_AFTER = 300  # consecutive draws that found nothing new: the intent has no more distinct utterances


def _intent_rows(n_labeled: int, n_unlabeled: int, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distinct smart-home utterances: (labeled [{"text", "label"}], unlabeled [{"text"}]), balanced over INTENTS.

    No text appears twice, in either list or across them (compared case- and punctuation-insensitively).
    """
    from hassil.intents import Intents
    from home_assistant_intents import get_intents

    intents = Intents.from_dict(get_intents("en"))
    rng = random.Random(seed)
    samplers = [_IntentSampler(intents, name) for name in INTENTS]
    seen: set[str] = set()

    def draw(n: int) -> list[tuple[str, str]]:
        # Round-robin over intents keeps the classes balanced; an exhausted intent drops out and the others
        # make up for it, so the row counts always come out as asked.
        rows: list[tuple[str, str]] = []
        live = list(samplers)
        while len(rows) < n and live:
            for s in list(live):
                if len(rows) == n:
                    break
                text = s.new_text(rng, seen)
                if text is None:
                    live.remove(s)
                else:
                    rows.append((text, s.name))
        rng.shuffle(rows)
        return rows

    labeled = [{"text": t, "label": label} for t, label in draw(n_labeled)]
    unlabeled = [{"text": t} for t, _ in draw(n_unlabeled)]
    return labeled, unlabeled


def _dedup_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s%°]", " ", text.lower()).split())


@dataclass
class _IntentSampler:
    """Random walks through one intent's hassil templates.

    hassil's own `sample_intents` enumerates every expansion in a fixed order (millions for HassTurnOn); we want
    a seeded random sample spread over all templates, so we walk the parsed expression tree ourselves.
    """

    intents: object  # hassil.intents.Intents
    name: str
    templates: list = field(default_factory=list)  # (sentence expression, expansion rules, {name} values)

    def __post_init__(self):
        for block in self.intents.intents[self.name].data:
            rules = {**self.intents.expansion_rules, **block.expansion_rules}
            names = [n for d in sorted(block.domains) for n in _NAMES_BY_DOMAIN.get(d, [])] or _GENERIC_NAMES
            for sentence in block.sentences:
                self.templates.append((sentence.expression, rules, names))

    def new_text(self, rng: random.Random, seen: set[str]) -> str | None:
        """A text whose key is not in `seen` (and add it), or None once the intent seems exhausted."""
        for _ in range(_EXHAUSTED_AFTER):
            expr, rules, names = rng.choice(self.templates)
            text = _style(" ".join(self._walk(expr, rng, rules, names).split()), rng)
            key = _dedup_key(text)
            if key not in seen:
                seen.add(key)
                return text
        return None

    def _walk(self, expr, rng: random.Random, rules: dict, names: list[str]) -> str:
        from hassil.expression import Alternative, ListReference, Permutation, RuleReference, Sequence, TextChunk
        from hassil.intents import RangeSlotList, TextSlotList

        if isinstance(expr, TextChunk):
            return expr.original_text
        if isinstance(expr, Permutation):  # (a;b): any order; the parser already padded the items with spaces
            items = list(expr.items)
            rng.shuffle(items)
            return "".join(self._walk(e, rng, rules, names) for e in items)
        if isinstance(expr, Alternative):  # (a|b) or [optional], whose last item is the empty text
            return self._walk(rng.choice(expr.items), rng, rules, names)
        if isinstance(expr, Sequence):
            return "".join(self._walk(e, rng, rules, names) for e in expr.items)
        if isinstance(expr, RuleReference):
            return self._walk(rules[expr.rule_name].expression, rng, rules, names)
        if isinstance(expr, ListReference):
            list_name = expr.list_name
            if list_name == "area":
                return rng.choice(_AREAS)
            if list_name == "floor":
                return rng.choice(_FLOORS)
            if list_name == "name":
                return rng.choice(names)
            if list_name in _WILDCARDS:
                return rng.choice(_WILDCARDS[list_name])
            slot_list = self.intents.slot_lists[list_name]
            if isinstance(slot_list, TextSlotList):
                return self._walk(rng.choice(slot_list.values).text_in, rng, rules, names)
            if isinstance(slot_list, RangeSlotList):
                return _say_number(rng.choice(_NUMBERS.get(list_name) or list(slot_list.get_numbers())), rng)
        raise ValueError(f"hassil template element this sampler does not know: {expr!r}")


def _say_number(value: float, rng: random.Random) -> str:
    """Digits mostly, words sometimes ("twenty-five"), as a speech-to-text engine would write either."""
    if value == int(value) and rng.random() < 0.25:
        from hassil.numbers import get_rbnf_engine

        return get_rbnf_engine("en").format_number(int(value)).text_by_ruleset["spellout-cardinal"]
    return str(int(value)) if value == int(value) else str(value)


_QUESTION_START = ("what", "whats", "what's", "how", "hows", "is ", "are ", "which", "where", "tell me", "does")


def _style(text: str, rng: random.Random) -> str:
    """Typed and spoken commands mixed: a polite prefix sometimes, a capital letter and a question mark half the time."""
    r = rng.random()
    if r < 0.08:
        text = "please " + text
    elif r < 0.14:
        text = rng.choice(["can you ", "could you "]) + text
    elif r < 0.18:
        text += " please"
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
        if text.lower().startswith(_QUESTION_START):
            text += "?"
    return text


# ================================================================================== the company and its people


@dataclass
class _Person:
    name: str
    email: str
    phone: str
    dob: date | None = None
    ssn: str | None = None
    address: str | None = None
    iban: str | None = None
    card: str | None = None
    romaji: str | None = None  # Latin spelling of a Japanese name


@dataclass
class _Cast:
    hr: _Person
    security: _Person
    finance: _Person
    buddy: _Person
    editor: _Person
    employees: list[_Person]  # with DOB, SSN, address, salary IBAN
    cardholders: list[_Person]  # with corporate card numbers
    tokyo: _Person  # Japanese name, ja_JP phone and address
    bangkok: _Person  # Thai name, th_TH phone and address
    customers: list[_Person]
    helpdesk_phone: str
    oncall_phone: str
    hq_address: str
    wifi_password: str


def _make_cast(seed: int, n_customers: int) -> _Cast:
    """Everyone who appears in the documents, drawn from seeded Faker instances (one per locale)."""
    from faker import Faker

    us, jp, th = Faker("en_US"), Faker("ja_JP"), Faker("th_TH")
    for i, fake in enumerate((us, jp, th)):
        fake.seed_instance(seed * 1000 + i)

    def staff(**extra) -> _Person:
        first, last = us.first_name(), us.last_name()
        local = re.sub(r"[^a-z]", "", first.lower()) + "." + re.sub(r"[^a-z]", "", last.lower())
        return _Person(f"{first} {last}", f"{local}@{COMPANY_DOMAIN}", us.phone_number(), **extra)

    def employee() -> _Person:
        return staff(dob=us.date_of_birth(minimum_age=23, maximum_age=63), ssn=us.ssn(),
                     address=f"{us.street_address()}, {us.city()}, {us.state_abbr()} {us.zipcode()}", iban=us.iban())

    def card(kind: str) -> str:
        digits = us.credit_card_number(kind)  # Luhn-valid
        groups = (4, 6, 5) if len(digits) == 15 else (4, 4, 4, 4)
        out, i = [], 0
        for g in groups:
            out.append(digits[i:i + g])
            i += g
        return " ".join(out)

    def customer(i: int) -> _Person:
        extra = {"dob": us.date_of_birth(minimum_age=19, maximum_age=85),
                 "card": card(us.random_element(["visa", "mastercard", "amex", "discover"]))}
        if i % 9 == 4:  # a few customers of the Tokyo and Bangkok branches
            last, first = jp.last_name_pair(), jp.first_name_pair()
            return _Person(f"{last[0]} {first[0]}", f"{first[2].lower()}.{last[2].lower()}@{jp.free_email_domain()}",
                           jp.phone_number(), address=jp.address(), romaji=f"{first[2]} {last[2]}", **extra)
        if i % 9 == 7:
            return _Person(th.name(), us.free_email(), th.phone_number(), address=th.address(), **extra)
        return _Person(f"{us.first_name()} {us.last_name()}", us.free_email(), us.phone_number(),
                       address=f"{us.street_address()}, {us.city()}, {us.state_abbr()} {us.zipcode()}", **extra)

    tokyo_last, tokyo_first = jp.last_name_pair(), jp.first_name_pair()
    return _Cast(
        hr=staff(), security=staff(), finance=staff(), buddy=staff(), editor=staff(),
        employees=[employee() for _ in range(3)],
        cardholders=[staff(card=card(kind)) for kind in ("visa", "mastercard", "amex")],
        tokyo=_Person(f"{tokyo_last[0]} {tokyo_first[0]}",
                      f"{tokyo_first[2].lower()}.{tokyo_last[2].lower()}@{COMPANY_DOMAIN}", jp.phone_number(),
                      address=jp.address(), romaji=f"{tokyo_first[2]} {tokyo_last[2]}"),
        bangkok=_Person(th.name(), f"bangkok.office@{COMPANY_DOMAIN}", th.phone_number(), address=th.address()),
        customers=[customer(i) for i in range(n_customers)],
        helpdesk_phone=us.phone_number(), oncall_phone=us.phone_number(),
        hq_address=f"{us.street_address()}, Denver, CO {us.zipcode_in_state('CO')}",
        wifi_password=f"Kestrel-{us.word().capitalize()}-{us.random_int(1000, 9999)}!",
    )


def _planted_pii(cast: _Cast, texts: dict[str, str]) -> list[dict]:
    """Every PII value of the cast that really landed in a file, with the files it is in (the ground truth)."""
    people = [cast.hr, cast.security, cast.finance, cast.buddy, cast.editor, *cast.employees, *cast.cardholders,
              cast.tokyo, cast.bangkok, *cast.customers]
    candidates: list[tuple[str, str]] = [("phone", cast.helpdesk_phone), ("phone", cast.oncall_phone),
                                         ("address", cast.hq_address)]
    for p in people:
        candidates += [("person", p.name), ("email", p.email), ("phone", p.phone)]
        candidates += [(kind, v) for kind, v in (("person", p.romaji), ("ssn", p.ssn), ("address", p.address),
                                                 ("iban", p.iban), ("credit_card", p.card)) if v]
        if p.dob:
            candidates += [("date_of_birth", _long_date(p.dob)), ("date_of_birth", p.dob.isoformat()),
                           ("date_of_birth", p.dob.strftime("%m/%d/%Y"))]
    out, done = [], set()
    for kind, value in candidates:
        files = sorted(f for f, text in texts.items() if value in text)
        if files and (kind, value) not in done:
            done.add((kind, value))
            out.append({"kind": kind, "value": value, "files": files})
    return out


def _long_date(d: date) -> str:
    return f"{d.strftime('%B')} {d.day}, {d.year}"


# ========================================================================================== document content
# A document is a title, some metadata and sections; a section is a heading and blocks. A block is a
# paragraph (str), a bullet list (list[str]) or a _Table. The writers below render one structure to each format.


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class _Doc:
    title: str
    doc_id: str
    owner: str
    sections: list[tuple[str, list]]


def _hr_leave_policy(c: _Cast, quick: bool) -> _Doc:
    e1, e2 = c.employees[0], c.employees[1]
    sections = [
        ("1. Purpose and scope", [
            f"This policy explains the types of leave available to employees of {COMPANY}, how leave is "
            "requested and approved, and how it is recorded in payroll. It applies to all permanent and fixed-term "
            "employees in the United States. Employees of the Tokyo and Bangkok branches follow the local "
            "supplements to this policy, which take precedence where local law requires.",
            "Managers are responsible for applying this policy consistently within their teams. Where this policy "
            "and an individual employment contract differ, the contract applies.",
        ]),
        ("2. Annual leave", [
            "Full-time employees accrue 20 days of paid annual leave per calendar year, rising to 23 days after "
            "five years of continuous service. Part-time employees accrue leave pro rata to their contracted hours.",
            ["Up to five unused days may be carried over into the first quarter of the next year.",
             "Leave not taken by March 31 of the following year is forfeited unless HR approved an extension.",
             "During peak season (November 15 to January 10) requests for more than five consecutive working "
             "days need the approval of the regional operations director."],
        ]),
        ("3. Sick leave", [
            "Employees receive 10 days of paid sick leave per year. Please tell your manager before the start of "
            "your shift, or as soon as you reasonably can. For absences longer than three consecutive working days "
            "a note from a medical practitioner is required.",
            "Medical notes are confidential. Send them directly to HR, not to your manager, and never attach them "
            "to a ticket or a shared drive folder.",
        ]),
        ("4. Parental leave", [
            "Birth, adoptive and foster parents are entitled to 16 weeks of paid parental leave, which can be taken "
            "in up to three blocks within twelve months of the birth or placement. Notify HR at least eight weeks "
            "before the intended start date where possible.",
            "Benefits continue during parental leave, and employees return to the same or an equivalent role.",
        ]),
        ("5. Bereavement and compassionate leave", [
            "Employees may take up to five days of paid leave on the death of an immediate family member and up to "
            "two days for other relatives. Compassionate leave for serious illness of a dependant is granted at the "
            "manager's discretion, in consultation with HR.",
        ]),
        ("6. Unpaid leave and sabbaticals", [
            "After three years of service, employees may request an unpaid sabbatical of one to three months. "
            "Requests must be made at least three months in advance and are approved subject to operational needs. "
            "Health insurance continues during a sabbatical; pension contributions are paused.",
        ]),
        ("7. Requesting and approving leave", [
            "All leave is requested in the HR portal under Time Off. Managers approve or decline within five "
            "working days. If the portal is unavailable, e-mail the request to your manager and copy HR.",
            ["Annual leave: at least two weeks' notice for more than three days.",
             "Sick leave: recorded on the day of return.",
             "Parental and sabbatical leave: agreed in a meeting with HR before the request is submitted."],
        ]),
        ("8. Contacts", [
            f"HR business partner: {c.hr.name}, {c.hr.email}, phone {c.hr.phone}.",
            f"Payroll questions: {c.finance.name}, {c.finance.email}, phone {c.finance.phone}.",
            f"Tokyo branch HR contact: {c.tokyo.romaji}, {c.tokyo.email}, phone {c.tokyo.phone}.",
            f"Bangkok branch: {c.bangkok.email}, phone {c.bangkok.phone}.",
        ]),
        ("Appendix A. Worked example from the 2023 leave audit", [
            "The following case is kept here so that managers can see how a long absence is recorded. "
            "It was copied from the payroll file and should have been anonymised.",
            f"Employee {e1.name} (date of birth {_long_date(e1.dob)}, SSN {e1.ssn}), living at {e1.address}, "
            "took 12 days of sick leave followed by 16 weeks of parental leave. Because the sick leave ran into "
            "the parental leave, the first block of parental leave started on the 13th working day, and payroll "
            f"paid the statutory top-up to the salary account {e1.iban}.",
            f"A second case, {e2.name} (born {e2.dob.strftime('%m/%d/%Y')}), carried over eight days of annual "
            "leave in error; the three excess days were restored after review by HR. Reach the employee at "
            f"{e2.phone} or {e2.email} with any questions about the correction.",
        ]),
    ]
    if quick:  # shorter, but still every kind of block and the PII-bearing sections
        sections = [sections[0], sections[1], sections[7], sections[8]]
    return _Doc("HR Leave Policy", "HR-POL-004 rev 7", c.hr.name, sections)


def _it_security_policy(c: _Cast, quick: bool) -> _Doc:
    leaked = c.customers[0]
    sections = [
        ("1. Purpose", [
            f"This policy sets the minimum security rules for everyone who uses {COMPANY} systems, including "
            "contractors and temporary staff. It protects our customers' data, our partners' shipments and our own "
            "operations. Breaches of this policy may lead to disciplinary action.",
        ]),
        ("2. Information classification", [
            "Every document, data set and message belongs to one of four classes. When in doubt, choose the higher class.",
            ["Public: approved for anyone, such as published tariffs and press releases.",
             "Internal: for employees and contractors, such as this policy and the org chart.",
             "Confidential: customer data, contracts, pricing agreements and incident reports.",
             "Restricted: payment card data, government identifiers, salary and health information."],
            "Restricted information is never sent by e-mail or chat, never stored on laptops, and never pasted "
            "into tickets, wikis or AI tools.",
        ]),
        ("3. Passwords and multi-factor authentication", [
            "Passwords must be at least 14 characters long and unique to each system. Use the company password "
            "manager; do not write passwords down or share them, including with the IT helpdesk, which will never "
            "ask for them. Multi-factor authentication is mandatory for e-mail, VPN, the HR portal and the "
            "warehouse management system.",
        ]),
        ("4. Laptops, phones and removable media", [
            "Company laptops are encrypted and managed centrally. Keep them locked when unattended and report a "
            "lost or stolen device within one hour. USB storage is blocked by default; exceptions are granted "
            "by the security team for a limited time.",
            "Personal phones may be used for e-mail and chat only after enrolment in device management.",
        ]),
        ("5. Handling customer payment data", [
            "We do not store full payment card numbers. If a customer sends one in a ticket or e-mail, reply "
            "without quoting it, redact it in the ticket, and record only the last four digits. Appendix A shows "
            "what happens when this rule is ignored.",
        ]),
        ("6. Reporting a security incident", [
            "Report suspected phishing, malware, lost devices or data sent to the wrong person immediately. "
            "Early reports limit the damage; nobody is blamed for reporting in good faith.",
            [f"Security lead: {c.security.name}, {c.security.email}, phone {c.security.phone}.",
             f"IT helpdesk (business hours): {c.helpdesk_phone}.",
             f"After-hours on-call: {c.oncall_phone}.",
             f"Tokyo branch: {c.tokyo.romaji}, phone {c.tokyo.phone}."],
        ]),
        ("7. Exceptions and review", [
            "Exceptions to this policy are requested from the security team, approved by the CIO, time-limited and "
            "recorded in the risk register. The policy is reviewed every year and after every major incident.",
        ]),
        ("Appendix A. Incident INC-2291 (lessons learned)", [
            f"On a Monday in February the customer {leaked.name} ({leaked.email}) wrote to the support desk: "
            f"'please refund the card {leaked.card}, billing address {leaked.address}'. The full text was copied "
            "into three internal tickets and a shared spreadsheet before anyone noticed.",
            ["The tickets were redacted within two days and the spreadsheet was deleted from the shared drive.",
             "The payment processor was informed; the customer was offered a new card at our cost.",
             "Support macros now remove card numbers automatically before a ticket is saved."],
        ]),
    ]
    if quick:
        sections = [sections[1], sections[4], sections[5], sections[7]]
    return _Doc("Information Security Policy", "IT-SEC-001 rev 12", c.security.name, sections)


def _expense_policy(c: _Cast, quick: bool) -> _Doc:
    e3 = c.employees[2]
    limits = _Table(["Category", "Limit (USD)", "Receipt required", "Approver"], [
        ["Hotel, per night", "220 (NYC, SF: 320)", "Always", "Line manager"],
        ["Meals, per day", "75", "Above 25", "Line manager"],
        ["Client entertainment, per guest", "120", "Always", "Department head"],
        ["Economy airfare, domestic", "Lowest logical fare", "Always", "Line manager"],
        ["Mileage, personal car", "0.67 per mile", "Trip log", "Line manager"],
        ["Home office equipment, per year", "400", "Always", "Finance"],
    ])
    cards = _Table(["Cardholder", "E-mail", "Card number", "Monthly limit"], [
        [p.name, p.email, p.card, limit] for p, limit in zip(c.cardholders, ["5,000", "10,000", "25,000"])
    ])
    sections = [
        ("Scope", [
            f"This policy covers business travel and other expenses that employees of {COMPANY} pay on behalf of "
            "the company. Expenses must be necessary, reasonable and supported by itemised receipts.",
        ]),
        ("Booking travel", [
            "Book flights, trains and hotels through the travel desk so that we can locate travellers in an "
            "emergency. Economy class is standard; business class is allowed for flights over eight hours with the "
            "approval of a department head. Book at least 14 days ahead where possible.",
        ]),
        ("Limits", [
            "The following limits apply per person. Amounts above a limit are not reimbursed unless approved in "
            "advance by the approver listed.",
            limits,
        ]),
        ("Corporate cards", [
            "Corporate cards are issued to employees who travel at least monthly. Card statements are reconciled "
            "in the expense tool by the 5th of each month. The current cardholders are listed below; the finance "
            "team keeps this table up to date.",
            cards,
            "Lost or stolen cards must be reported to the bank and to finance on the same day.",
        ]),
        ("Mileage and local transport", [
            "Use of a personal car is reimbursed per mile for trips beyond the normal commute. Taxis and ride "
            "sharing are allowed when public transport is impractical, late at night, or when carrying equipment.",
        ]),
        ("Submitting claims and reimbursement", [
            "Submit claims within 30 days of the expense. Claims older than 90 days are not reimbursed. "
            "Reimbursements are paid with the next payroll to the bank account on file.",
            f"For example, the March claim of {e3.name} (employee address {e3.address}) was paid to IBAN "
            f"{e3.iban}; contact {c.finance.name} at {c.finance.email} or {c.finance.phone} if a payment is missing.",
            f"Tokyo branch claims are approved by {c.tokyo.name} ({c.tokyo.romaji}), phone {c.tokyo.phone}. "
            f"Bangkok branch claims go to {c.bangkok.name}, phone {c.bangkok.phone}.",
        ]),
    ]
    if quick:
        sections = [sections[0], sections[2], sections[3], sections[5]]
    return _Doc("Travel and Expense Policy", "FIN-POL-002 rev 3", c.finance.name, sections)


def _onboarding_wiki(c: _Cast, quick: bool) -> _Doc:
    e1 = c.employees[1]
    sections = [
        ("Your first day", [
            f"Welcome to {COMPANY}! On your first day, come to reception at {c.hq_address} at 9:00. Bring a photo "
            "ID; your badge is printed on the spot. Your manager will meet you and walk you through the week.",
        ]),
        ("Accounts and equipment", [
            "Your laptop is ready at the IT desk on the second floor. Sign in with the temporary password from your "
            "welcome e-mail, then set up multi-factor authentication before doing anything else.",
            [f"Guest Wi-Fi: KR-Guest, password {c.wifi_password} (the staff network uses your own account).",
             f"IT helpdesk: {c.helpdesk_phone}, or open a ticket in the service portal.",
             "Required trainings: security awareness, data protection, and forklift safety for warehouse visits."],
        ]),
        ("Your onboarding buddy", [
            f"Every new starter gets a buddy for the first month. This month's buddy is {c.buddy.name} "
            f"({c.buddy.email}, {c.buddy.phone}). Ask them anything, from where the coffee is to how we quote "
            "a freight rate.",
        ]),
        ("Offices", [
            [f"Denver (headquarters): {c.hq_address}.",
             f"Tokyo branch: {c.tokyo.address}. Office manager {c.tokyo.name} ({c.tokyo.romaji}), "
             f"phone {c.tokyo.phone}.",
             f"Bangkok branch: {c.bangkok.address}. Office manager {c.bangkok.name}, phone {c.bangkok.phone}."],
        ]),
        ("Payroll setup", [
            "HR needs your tax forms and bank details before your first payroll. Upload them through the secure form "
            "in the HR portal, never by e-mail.",
            f"(Note from the editor: the form below was pasted here by mistake and is pending removal.) New hire "
            f"{e1.name}, date of birth {e1.dob.isoformat()}, SSN {e1.ssn}, home address {e1.address}, "
            f"salary account {e1.iban}.",
        ]),
    ]
    if quick:
        sections = [sections[0], sections[2], sections[4]]
    return _Doc(f"Welcome to {COMPANY}", "wiki/onboarding", c.editor.name, sections)


def _faq(c: _Cast, quick: bool) -> _Doc:
    sections = [
        ("How do I reset my password?", [
            "Use the self-service page in the service portal. If you are locked out, call the IT helpdesk at "
            f"{c.helpdesk_phone}; they will verify your identity with your employee ID and your manager's name.",
        ]),
        ("Who approves my leave?", [
            "Your line manager, in the HR portal. For parental leave or sabbaticals, talk to "
            f"{c.hr.name} ({c.hr.email}) first.",
        ]),
        ("How do I change the bank account my salary is paid into?", [
            "Update it in the HR portal under Personal details. Changes made after the 20th take effect the month "
            f"after. Payroll ({c.finance.email}) will never ask for your bank details by e-mail or phone.",
        ]),
        ("I received a suspicious e-mail. What do I do?", [
            "Do not click links or open attachments. Use the Report phishing button in your mail client, or forward "
            f"the message to {c.security.email}. If you already clicked, call the on-call line at {c.oncall_phone}.",
        ]),
        ("Can I use my own phone for work e-mail?", [
            "Yes, after enrolling it in device management. Enrolment takes ten minutes and lets IT wipe company data "
            "(only company data) if the phone is lost.",
        ]),
        ("Who do I contact at the Tokyo and Bangkok branches?", [
            [f"Tokyo: {c.tokyo.name} ({c.tokyo.romaji}), {c.tokyo.email}, {c.tokyo.phone}",
             f"Bangkok: {c.bangkok.name}, {c.bangkok.email}, {c.bangkok.phone}"],
        ]),
        ("Where do I send supplier invoices?", [
            f"To accounts payable, with the purchase order number in the subject line. Questions go to {c.finance.name}.",
        ]),
    ]
    if quick:
        sections = [sections[0], sections[3], sections[5]]
    return _Doc("Employee FAQ", "wiki/faq", c.editor.name, sections)


# ================================================================================================ writers


def _plain(doc: _Doc) -> str:
    """Every string of a document, one per line: what the PII ground truth is matched against."""
    out = [doc.title, doc.doc_id, doc.owner]
    for heading, blocks in doc.sections:
        out.append(heading)
        for b in blocks:
            if isinstance(b, _Table):
                out += [" | ".join(b.header)] + [" | ".join(r) for r in b.rows]
            elif isinstance(b, list):
                out += b
            else:
                out.append(b)
    return "\n".join(out)


def _write_pdf(path: Path, doc: _Doc) -> str:
    """A multi-page PDF with a running header, a footer with page numbers, and the appendix on its own page."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    header_text = f"{COMPANY} | {doc.title} | INTERNAL"
    footer_text = f"{doc.doc_id} - Uncontrolled when printed - Page {{page}} of {{nb}}"

    class PolicyPDF(FPDF):
        def header(self):
            self.set_font("Helvetica", "B", 9)
            self.cell(0, 6, header_text, new_x=XPos.LMARGIN, new_y=YPos.NEXT, align="C")
            self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
            self.ln(4)

        def footer(self):
            self.set_y(-15)
            self.set_font("Helvetica", "I", 8)
            self.cell(0, 8, footer_text.replace("{page}", str(self.page_no())), align="C")

    pdf = PolicyPDF(format="Letter")
    pdf.set_creation_date(_FILE_TIME)
    pdf.set_title(doc.title)
    pdf.set_author(COMPANY)
    pdf.set_auto_page_break(True, margin=22)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(0, 9, doc.title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(0, 5, f"Document {doc.doc_id}. Owner: {doc.owner}. Effective March 1, 2024. "
                         "Classification: Internal.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(3)
    for heading, blocks in doc.sections:
        if heading.startswith("Appendix"):
            pdf.add_page()
        pdf.set_font("Helvetica", "B", 12)
        pdf.multi_cell(0, 7, heading, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("Helvetica", "", 10.5)
        for block in blocks:
            for line in (["- " + b for b in block] if isinstance(block, list) else [block]):
                pdf.multi_cell(0, 5.5, line, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(2)
        pdf.ln(2)
    atomic_write_bytes(path, bytes(pdf.output()))
    return "\n".join([_plain(doc), header_text, footer_text])


def _write_docx(path: Path, doc: _Doc) -> str:
    """A Word document with real headings, bullet lists and tables, and a page header."""
    import docx

    d = docx.Document()
    props = d.core_properties
    props.author = props.last_modified_by = doc.owner
    props.title = doc.title
    props.created = props.modified = _FILE_TIME.replace(tzinfo=None)
    props.revision = 3
    d.sections[0].header.paragraphs[0].text = f"{COMPANY} | Finance | INTERNAL"
    d.add_heading(doc.title, level=0)
    d.add_paragraph(f"Document {doc.doc_id}. Owner: {doc.owner}. Effective March 1, 2024.")
    for heading, blocks in doc.sections:
        d.add_heading(heading, level=1)
        for block in blocks:
            if isinstance(block, _Table):
                table = d.add_table(rows=1, cols=len(block.header))
                table.style = "Table Grid"
                for cell, text in zip(table.rows[0].cells, block.header):
                    cell.text = text
                for row in block.rows:
                    for cell, text in zip(table.add_row().cells, row):
                        cell.text = text
            elif isinstance(block, list):
                for item in block:
                    d.add_paragraph(item, style="List Bullet")
            else:
                d.add_paragraph(block)
    atomic_write_bytes(path, _docx_bytes(d))
    return _plain(doc)


def _docx_bytes(d) -> bytes:
    """The document's bytes with every zip entry's timestamp pinned: python-docx stamps the current time."""
    import zipfile

    raw, out = io.BytesIO(), io.BytesIO()
    d.save(raw)
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            info = zipfile.ZipInfo(item.filename, date_time=_FILE_TIME.timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, zin.read(item.filename))
    return out.getvalue()


def _write_html(path: Path, doc: _Doc, c: _Cast) -> str:
    """A wiki page: the article sits inside navigation, a sidebar, a cookie banner and a footer, as exported."""
    esc = html.escape
    parts = [f"<h1>{esc(doc.title)}</h1>",
             f'<p class="meta">Last edited by {esc(c.editor.name)} on March 1, 2024</p>']
    for heading, blocks in doc.sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        for block in blocks:
            if isinstance(block, list):
                parts.append("<ul>" + "".join(f"<li>{esc(b)}</li>" for b in block) + "</ul>")
            else:
                parts.append(f"<p>{esc(block)}</p>")
    article = "\n      ".join(parts)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Onboarding - {esc(COMPANY)} Wiki</title>
  <link rel="stylesheet" href="/static/wiki.css">
  <script src="/static/analytics.js"></script>
</head>
<body>
  <header class="site-header">
    <a class="logo" href="/">{esc(COMPANY)} Wiki</a>
    <nav><ul><li><a href="/">Home</a></li><li><a href="/teams">Teams</a></li><li><a href="/policies">Policies</a></li>
      <li><a href="/it">IT Help</a></li><li><a href="/search">Search</a></li></ul></nav>
  </header>
  <div class="cookie-banner">We use cookies to keep you signed in. <button>Accept</button></div>
  <aside class="sidebar">
    <h3>On this wiki</h3>
    <ul><li><a href="/onboarding">Onboarding</a></li><li><a href="/faq">FAQ</a></li>
      <li><a href="/recent">Recent changes</a></li></ul>
  </aside>
  <main>
    <article>
      {article}
    </article>
  </main>
  <footer class="site-footer">
    <p>&copy; 2024 {esc(COMPANY)}. Internal use only. <a href="/privacy">Privacy</a> | <a href="/terms">Terms</a>
      | <a href="/help">Help</a></p>
  </footer>
</body>
</html>
"""
    atomic_write_text(path, page)
    return _plain(doc) + "\n" + c.editor.name


def _write_markdown(path: Path, doc: _Doc) -> str:
    lines = [f"# {doc.title}", "", f"_Maintained by {doc.owner}. Last reviewed March 2024._", ""]
    for heading, blocks in doc.sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            lines += ([f"- {b}" for b in block] if isinstance(block, list) else [block]) + [""]
    atomic_write_text(path, "\n".join(lines))
    return _plain(doc)


# ================================================================================================ tickets

# (subject, body, resolution) with {fields} from _ticket_fields. The first ones carry card numbers, so even
# the quick demo has some to mask.
_TICKET_TYPES = [
    ("Charged twice for order {order}",
     "Hi,\n\nI was charged twice for order {order} ({amount}). Both charges are on my card {card}. Please refund "
     "the duplicate.\n\nThanks,\n{first}",
     "Sorry about that. The second charge of {amount} was a duplicate authorisation; we have refunded it to the "
     "card ending {last4}. It will appear within 3 to 5 business days."),
    ("Delivery late - order {order}",
     "Hello, my parcel {tracking} was due on {due} and still has not arrived. I need it for a client meeting. "
     "Delivery address is {address}. Can you check where it is?\n{name}\n{phone}",
     "The parcel {tracking} missed its connection at our Salt Lake City hub. It is now on the next truck and will "
     "be delivered on {due_next}. We have waived the shipping fee."),
    ("Change delivery address",
     "Hi, please deliver order {order} to my office instead: {address}. You can call me on {phone} if the driver "
     "needs directions.",
     "Done: order {order} will now go to the new address. The driver will call ahead before delivery."),
    ("Account locked",
     "I can't log in to my account, it says locked after too many attempts. My e-mail is {email} and my date of "
     "birth is {dob} if you need to verify me.",
     "We have verified your identity and unlocked the account. Please reset your password from the sign-in page; "
     "the reset link is valid for 30 minutes."),
    ("Parcel arrived damaged",
     "The box for order {order} arrived crushed and the ceramic vase inside is broken. I have photos. What do I "
     "need to do to get a replacement?\n- {name}",
     "We are sorry your order arrived damaged. A replacement has been dispatched at no cost, and you do not need "
     "to return the broken item. Your new tracking number is {tracking}."),
    ("Invoice copy for {order}",
     "Our accounts team needs a copy of the invoice for order {order}, made out to {company}. Please send it to "
     "{email}.",
     "A copy of the invoice for order {order} has been sent to the e-mail address on the account. Invoices are "
     "also available under Billing in your account."),
    ("Wrong card on file",
     "Please update the payment card for my monthly freight contract to {card}, expiry {expiry}. The old one "
     "expired last week.\nRegards, {name}",
     "For your security we cannot take card details by e-mail, and we have removed them from this ticket. Please "
     "update the card under Billing > Payment methods; the change applies to the next invoice."),
    ("Schedule a pickup",
     "Can you pick up two pallets from {address} on {due}? Loading dock is at the back, opening hours 7 to 15. "
     "Contact on site: {name}, {phone}.",
     "A pickup for two pallets is booked for {due} between 8:00 and 12:00. The driver will call the site contact "
     "30 minutes before arrival."),
    ("Shipment held at customs",
     "My shipment {tracking} to Japan has been held at customs for four days. The receiver is waiting. What "
     "documents are missing?",
     "Customs needs a commercial invoice with the value and HS code of each item. Please upload it in the "
     "shipment page; our Tokyo branch will present it to customs the same day."),
    ("Refund not received",
     "I cancelled order {order} on {due} and was told I would get a refund of {amount}, but nothing has arrived "
     "yet. Can you check?",
     "The refund of {amount} for order {order} was issued on {due_next}. Banks usually need 5 to 10 business days "
     "to show it; if it is not there by then, reply to this ticket and we will trace it."),
    ("Cancel my order",
     "Please cancel order {order}, I ordered the wrong size by mistake. Thanks, {first}",
     "Order {order} has been cancelled before dispatch and you have not been charged."),
    ("Lost tracking number",
     "I lost the e-mail with my tracking number. The order was placed by {name}, phone {phone}, around {due}.",
     "We found the shipment: its tracking number is {tracking}, and it is out for delivery today."),
]


def _write_tickets(path: Path, c: _Cast, n_tickets: int, seed: int) -> str:
    """Support tickets, including exact duplicates (a form submitted twice) and near duplicates (re-sent, edited)."""
    rng = random.Random(seed + 7)
    n_exact, n_near = (1, 1) if n_tickets <= 12 else (3, 2)
    base = []
    for i in range(n_tickets - n_exact - n_near):
        customer = c.customers[i % len(c.customers)]
        subject, body, resolution = _TICKET_TYPES[i % len(_TICKET_TYPES)]
        if customer.romaji and "customs" not in subject:  # the Japanese customers ship to Japan
            subject, body, resolution = _TICKET_TYPES[8]
        f = _ticket_fields(customer, rng)
        base.append({"customer": customer.name, "email": customer.email, "phone": customer.phone,
                     "subject": subject.format(**f), "body": body.format(**f), "resolution": resolution.format(**f)})
    dups = [dict(rng.choice(base)) for _ in range(n_exact)]
    for _ in range(n_near):
        t = dict(rng.choice(base))
        # A customer writing again: a different greeting, a follow-up line, otherwise the same text.
        t["body"] = re.sub(r"^(Hi|Hello),?", "Hello again,", t["body"]) + "\n\nI already wrote about this yesterday."
        t["subject"] = "Re: " + t["subject"]
        dups.append(t)
    rows = base + dups
    rng.shuffle(rows)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["ticket_id", "customer", "email", "phone", "subject", "body", "resolution"])
    writer.writeheader()
    for i, row in enumerate(rows):
        writer.writerow({"ticket_id": f"T-{24101 + i}", **row})
    atomic_write_text(path, buf.getvalue())
    return buf.getvalue()


def _ticket_fields(p: _Person, rng: random.Random) -> dict:
    card = p.card or ""
    due = date(2024, rng.randint(1, 11), rng.randint(1, 28))
    return {
        "name": p.romaji or p.name, "first": (p.romaji or p.name).split()[0], "email": p.email, "phone": p.phone,
        "address": p.address or "", "card": card, "last4": card.replace(" ", "")[-4:],
        "expiry": f"{rng.randint(1, 12):02d}/{rng.randint(26, 30)}",
        "dob": _long_date(p.dob) if p.dob else "",
        "order": f"KRL-{rng.randint(100000, 999999)}", "tracking": f"KR{rng.randint(10**9, 10**10 - 1)}US",
        "amount": f"${rng.randint(20, 900)}.{rng.randint(0, 99):02d}",
        "due": _long_date(due), "due_next": _long_date(date(due.year, due.month, due.day + 1)),
        "company": rng.choice(["Pinecrest Dental", "Alder & Finch LLP", "Blue Mesa Outfitters", "Harlow Bakery"]),
    }
