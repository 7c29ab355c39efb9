"""Generated PII gold data for bench/pii.py and tests/test_pii.py: a multilingual gold set (en/ja/th) and hard
negatives. Values come from Faker's locales (shipped in the wheel, offline), sentences from the templates below;
seeded, so every run builds the same set.

    multilingual_gold() -> [{"text", "spans": [(start, end, kind)], "lang"}]
    hard_negatives()    -> [text, ...]   (no PII at all)
"""

from __future__ import annotations

import random
import re

# Templates: {KIND} or {KIND:variant} is replaced by a generated value whose span is recorded. Some put the value
# after a context word, some not (a name at the start of a sentence, an address alone on a line), so the set
# measures more than the context rules.
TEMPLATES = {
    "en": [
        "Please ask {PERSON} to call me back at {PHONE}.",
        "{PERSON} will join the team on Monday.",
        "Hi {PERSON:first}, your order shipped to {ADDRESS}.",
        "Contact: {PERSON}, {EMAIL}, {PHONE}",
        "The customer {PERSON} (born on {DOB}) asked for a refund.",
        "Card {CARD} was charged twice; the holder is {PERSON}.",
        "SSN {SSN} belongs to the applicant, {PERSON}.",
        "Login from {IP} by {EMAIL} failed 3 times.",
        "Profile: {URL}",
        "Thanks, {PERSON:first}! I moved to {ADDRESS} last week.",
        "Meeting notes: {PERSON} and {PERSON} agreed on the budget.",
        "Wire the deposit to {IBAN} before Friday.",
        "I talked to {PERSON} yesterday about the server outage.",
        "Send the contract to {PERSON} at {ADDRESS}.",
        "Regards,\n{PERSON}\n{PHONE}",
        "Date of birth: {DOB}",
        "See the shared folder {URL} for the scans.",
    ],
    "ja": [
        "担当者は{PERSON}です。電話番号は{PHONE}です。",
        "{PERSON}様、ご注文の商品を{ADDRESS}へ発送しました。",
        "氏名：{PERSON}\n住所：{ADDRESS}\n電話：{PHONE}",
        "個人番号 {MY_NUMBER} を確認しました。",
        "マイナンバー：{MY_NUMBER}",
        "{PERSON}さんからメール（{EMAIL}）が届きました。",
        "生年月日：{DOB}",
        "approved by {PERSON} (Tokyo office)",
        "{PERSON}さんは来週から出張です。",
    ],
    "th": [
        "ติดต่อคุณ{PERSON:first} ที่เบอร์ {PHONE}",
        "นาย{PERSON:male} อาศัยอยู่ที่ {ADDRESS}",
        "เลขประจำตัวประชาชน {THAI_ID}",
        "บัตรประชาชนเลขที่ {THAI_ID} ของลูกค้า",
        "ชื่อ {PERSON} อีเมล {EMAIL}",
        "โทร {PHONE} ได้ตลอด 24 ชั่วโมง",
        "Bangkok office: {PERSON}, {PHONE}",
        "วันเกิด {DOB}",
    ],
}
LOCALES = {"en": "en_US", "ja": "ja_JP", "th": "th_TH"}
_SLOT = re.compile(r"\{([A-Z_]+)(?::(\w+))?\}")


def my_number(rng: random.Random) -> str:
    """A random 12-digit Japanese Individual Number with a valid check digit (the last digit)."""
    body = "".join(str(rng.randrange(10)) for _ in range(11))
    return body + str(my_number_check_digit(body))


def my_number_check_digit(body: str) -> int:
    """The check digit of an 11-digit My Number body (Cabinet Office ordinance, art. 5), written out here so
    the generator does not share code with the detector it tests."""
    total = sum(int(d) * (n + 1 if n <= 6 else n - 5) for n, d in enumerate(reversed(body), start=1))
    return 0 if total % 11 <= 1 else 11 - total % 11


def _value(fake, rng: random.Random, lang: str, kind: str, variant: str | None) -> str:
    if kind == "PERSON":
        if variant == "first":
            return fake.first_name()
        if variant == "male" and lang == "th":
            return f"{fake.first_name_male()} {fake.last_name()}"
        return f"{fake.last_name()} {fake.first_name()}" if lang == "ja" else f"{fake.first_name()} {fake.last_name()}"
    if kind == "ADDRESS":
        return fake.street_address() if lang == "en" else fake.address().replace("\n", " ")
    if kind == "DOB":
        d = fake.date_of_birth(minimum_age=18, maximum_age=90)
        if lang == "ja":
            return f"{d.year}年{d.month}月{d.day}日"
        return rng.choice([d.strftime("%B %-d, %Y"), d.isoformat(), d.strftime("%m/%d/%Y")])
    if kind == "URL":
        user = fake.user_name()
        return rng.choice([f"https://intranet.example.com/users/{user}", f"https://files.example.org/~{user}/scans/",
                           f"https://crm.example.com/contact?email={user}%40example.com"])
    if kind == "MY_NUMBER":
        n = my_number(rng)
        return n if rng.random() < 0.5 else f"{n[:4]} {n[4:8]} {n[8:]}"
    return {"PHONE": fake.phone_number, "EMAIL": fake.email, "CARD": fake.credit_card_number, "SSN": fake.ssn,
            "IP": fake.ipv4_public, "IBAN": fake.iban, "THAI_ID": fake.ssn}[kind]()


def multilingual_gold(per_lang: int = 120, seed: int = 7) -> list[dict]:
    """`per_lang` filled-in templates per language, with the exact span of every value put in."""
    from faker import Faker

    docs = []
    for lang, templates in TEMPLATES.items():
        fake, rng = Faker(LOCALES[lang]), random.Random(seed)
        fake.seed_instance(seed)
        for i in range(per_lang):
            template = templates[i % len(templates)]
            text, spans, pos = "", [], 0
            for m in _SLOT.finditer(template):
                text += template[pos : m.start()]
                value = _value(fake, rng, lang, m.group(1), m.group(2))
                spans.append((len(text), len(text) + len(value), m.group(1)))
                text += value
                pos = m.end()
            docs.append({"text": text + template[pos:], "spans": spans, "lang": lang})
    return docs


def hard_negatives(seed: int = 7) -> list[str]:
    """Text with no PII that trips name and number detectors: log lines, product codes, ALL-CAPS headings,
    version strings, company names and slogans (Faker's, which are built from surnames: "Smith, Ortiz and Lee")."""
    from faker import Faker

    fake, rng = Faker("en_US"), random.Random(seed)
    fake.seed_instance(seed)
    levels, services = ["INFO", "WARN", "ERROR", "DEBUG"], ["AuthService", "OrderWorker", "Kafka Consumer", "Redis Cache",
                                                            "Spring Boot", "Apache Tomcat", "Jenkins Agent"]
    out = []
    for i in range(40):
        ts = f"2024-0{rng.randint(1, 9)}-{rng.randint(10, 28)} {rng.randint(10, 23)}:{rng.randint(10, 59)}:{rng.randint(10, 59)}"
        out.append(f"{ts} {rng.choice(levels)} [{rng.choice(services)}] request {rng.randint(1000, 99999)} took "
                   f"{rng.randint(1, 900)} ms (pool={rng.randint(1, 64)})")
        out.append(f"SKU {fake.bothify('??-####-??').upper()} ships in {rng.randint(2, 9)} days; model "
                   f"{fake.bothify('X###').upper()} Pro v{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}")
        out.append(f"{fake.catch_phrase().upper()}: {fake.bs().upper()}")
        out.append(f"Release {rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)} of {rng.choice(services)} "
                   f"fixes build {rng.randint(20240101, 20241231)}")
        out.append(f"{fake.company()} signed the {fake.catch_phrase()} agreement.")
    out += [
        "QUARTERLY SALES REPORT - EMEA REGION", "INTERNAL USE ONLY", "Getting Started With The Smart Hub",
        "Chapter 3: Configuring Network Storage", "Error Handling Guide For Windows Server", "Table 4: Monthly Revenue",
        "Kitchen Light turned on at 18:03", "Living Room Thermostat set to 21 degrees",
    ]
    return out
