"""Find and mask personal data (PII) in text, offline, with no model: validated patterns plus context words.

    find_pii("Mail anna@corp.example or call +1 415-555-0134")
    -> [Span(5, 22, 'EMAIL', 'anna@corp.example'), Span(31, 46, 'PHONE', '+1 415-555-0134')]
    mask("call +1 415-555-0134")                -> ("call [PHONE]", [...])
    mask("call +1 415-555-0134", "pseudonymize", key=b"...")  -> ("call +1 803-209-6671", [...])

Kinds (each masks to `[KIND]`): EMAIL, PHONE (international, US, Japanese, Thai and other national formats),
CARD (Luhn-checked), IBAN (mod-97 and country length checked), SSN (US), MY_NUMBER (Japan, check digit),
THAI_ID (Thai national ID, mod-11 checksum), IP (v4/v6), URL (only URLs that name a person: /users/jsmith,
/~jsmith, ?email=...), DOB (a date after "born on", "DOB", ...), ADDRESS (house number + street suffix, European
street words, post boxes, words + number after "address:" / "lives on" / "at", "56 rue La Boétie", an "Address:"
form field, "A and <street>", "at <number> <unknown words>", a street without a number after "on" / "at"
("lives on Baker Street"), any words after "address is" / "lives at", Italian, Polish, Hungarian, Romanian,
Spanish, Mexican and Portuguese street types, a unit first ("Flat 9\nSingh Loaf"), "31/06 Lawson Walk"; not "Switch
to Zigbee 3" (a release), "on Monday 5", "at Gate 12", then the unit, town, state, postcode (US, EU, Dutch,
Polish, Canadian, UK, Irish, "H-7317") and country lines after it, across bullets;
Japanese 丁目 and Thai ถนน/ซอย forms), PERSON (after titles and context words like "Name:",
"contact", "employee"; or capitalized words holding a given or family name from Faker's lists for ~80 locales
(data/pii/, read at the first call), a middle initial, or a Slavic/Nordic/Georgian/... family-name ending; a
name's words again later in the text; lowercase given + family name pairs; any name-like words in a strong
position: dialogue speaker labels "Ubul: ...", a list after "founders:", before "lives on" / "was born", the first
line of a contact block, a possessive, "X, can you ...", after a letter's closing line, a greeting or a relative
("my wife X"), before a verb only people take ("X grew up"), before "and I", "told me", "is my sister" (also a given
name that is a city), or "and" next to a name; not an imperative ("Mark the invoice");
capitalized words that are no English word (SmolLM2's vocabulary as the lexicon, data/pii/english_words.txt) in
a person's slot; all-lowercase text searched with its initials capitalized; Japanese and Thai forms).
Bench: `bench/pii.py` (precision/recall/F2 on presidio-research's set and on our en/ja/th gold set).

Why no NER model or Presidio: Presidio downloads a spaCy model at start and exits offline (Presidio #1447), and
its e-mail recognizer fetches a list from the web (#1205). Everything here is `re` + checksums, so `serve` can
mask every request log line in microseconds. Checksums (Luhn, mod-97) and context words are what keep numbers
from being flagged at random; names are never taken from ALL-CAPS words, numbers or product-like tokens (the
PERSON false positives of Presidio #786/#1173 and scrubadub #22).

Import-light on purpose: only the standard library at import time; the word lists are read on the first call
and Faker is imported on the first pseudonym.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import random
import re
from importlib import resources
from typing import NamedTuple

KINDS = ["EMAIL", "PHONE", "CARD", "IBAN", "SSN", "MY_NUMBER", "THAI_ID", "IP", "URL", "DOB", "ADDRESS", "PERSON"]


class Span(NamedTuple):
    """One piece of PII: text[start:end] == value."""

    start: int
    end: int
    kind: str  # one of KINDS
    value: str


# --------------------------------------------------------------------------------------------- checksums


def luhn_ok(digits: str) -> bool:
    """The Luhn check every payment card number satisfies (catches any single-digit typo)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length per country (ISO 13616 registry). A string that passes mod-97 but has the wrong length for its
# country, or names a country without IBANs ("KR9092546565US" is a parcel number), is not an IBAN.
_IBAN_LENGTHS = dict(
    (c[:2], int(c[2:]))
    for c in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DK18 DO28 EE20 EG29 "
        "ES24 FI18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 "
        "LB28 LC32 LI21 LT20 LU20 LV21 MC27 MD24 ME22 MK19 MR27 MT31 MU30 NL18 NO15 PK24 PL28 PS29 PT25 QA29 "
        "RO24 RS22 SA24 SC31 SE24 SI19 SK24 SM27 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20"
    ).split()
)


def iban_ok(iban: str) -> bool:
    """ISO 13616: right length for the country and mod-97 of the rearranged number equals 1."""
    iban = re.sub(r"[\s-]", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", iban):
        return False
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):  # unknown country or wrong length: a tracking number, a code
        return False
    return _iban_mod97(iban[4:] + iban[:4]) == 1


def _iban_mod97(s: str) -> int:
    return int("".join(str(int(ch, 36)) for ch in s)) % 97


def my_number_ok(digits: str) -> bool:
    """Japan's Individual Number (マイナンバー): 12 digits, the last a check digit over the other 11 (weights
    2..7, 2..6 from the right, mod 11; ordinance of the Ministry of Internal Affairs, art. 5)."""
    if not re.fullmatch(r"\d{12}", digits):
        return False
    total = sum(int(d) * (n + 1 if n <= 6 else n - 5) for n, d in enumerate(reversed(digits[:11]), start=1))
    return int(digits[11]) == (0 if total % 11 <= 1 else 11 - total % 11)


def thai_id_ok(digits: str) -> bool:
    """Thai national ID: 13 digits, the first 1-8 (person category), the last (11 - sum(d_i * (13 - i)) mod 11)
    mod 10 over the first 12."""
    if not re.fullmatch(r"[1-8]\d{12}", digits):
        return False
    return int(digits[12]) == (11 - sum(int(d) * (13 - i) for i, d in enumerate(digits[:12])) % 11) % 10


# ---------------------------------------------------------------------------------------------- patterns

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")

# Runs of digit groups joined by single separators; which sub-run is a card or a phone is decided in code,
# so "card 4111 1111 1111 1111 2 times" still finds the card inside the longer run.
_CARD_RUN = re.compile(r"(?<![A-Za-z0-9_+.\-/])\d+(?:[ \-]\d+)*(?![A-Za-z0-9_/]|-\d)")  # ASCII edges: "番号は090-...です"
_CARD_CONTEXT = re.compile(r"(?i)\b(?:card|cc|credit|debit|visa|mastercard|amex|maestro)\b[^\n]{0,20}$")
_PHONE_SEP = r"[ \t.\-‐－()]"
_PHONE_RUN = re.compile(rf"(?<![A-Za-z0-9_+.\-/@])(?:\+|\()?\d+(?:{_PHONE_SEP}{{1,3}}\d+)*(?:\s?(?:x|ext\.?|#)\s?\d{{1,6}})?(?![A-Za-z0-9_/@]|-\d)")
_PHONE_EXT = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$")
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:phone|\btel\b|telephone|call|mobile|cell|fax|whatsapp|contact|reach|\bdesk\b|landline|☎|電話|携帯|โทร|เบอร์)"
    r"[^\n]{0,24}$"
)
# the label after the number, as signature blocks write it: "781 1704 office", "3660170548-Fax"
_PHONE_LABEL_AFTER = re.compile(r"(?i)^[ \t]*[\-–(]?[ \t]*(?:office|fax|mobile|cell|home|work|desk|tel|phone)\b")
_CURRENCY_BEFORE = re.compile(r"[$€£¥₹฿]\s*$|(?i:\b(?:usd|eur|gbp|jpy|thb|chf|amount|total|price|invoice)\b[^\n]{0,12})$")
_CURRENCY_AFTER = re.compile(r"^\s*(?:[$€£¥₹฿%]|(?i:usd|eur|gbp|jpy|yen|thb|baht|chf|dollars?|euros?|units?|items?|km|kg|m\b))")

_IBAN = re.compile(
    r"(?<![\w])(?:[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)"
    r"|[a-z]{2}\d{2}(?:[a-z0-9]{11,30}|(?: [a-z0-9]{4}){2,7}(?: [a-z0-9]{1,4})?))(?![\w])"
)
# My Number / Thai ID: the checksum alone passes 1 random number in 10 or 11, so a bare digit string counts only
# next to its name; the printed groupings (4-4-4; 1-4-5-2-1) count on their own.
_MY_NUMBER = re.compile(r"(?<![A-Za-z0-9_\-])(?<!\d[ \-])(?P<n>\d{4}([ \-])\d{4}\2\d{4}|\d{12})(?![A-Za-z0-9_]|[ \-]\d)")
_MY_NUMBER_CONTEXT = re.compile(r"(?i:マイナンバー|個人番号|my ?number|individual number)[^\n]{0,16}$")
_THAI_ID = re.compile(r"(?<![A-Za-z0-9_\-])(?<!\d[ \-])(?P<n>\d([ \-])\d{4}\2\d{5}\2\d{2}\2\d|\d{13})(?![A-Za-z0-9_]|[ \-]\d)")
_THAI_ID_CONTEXT = re.compile(r"(?i:เลขประจำตัวประชาชน|บัตรประชาชน|เลขบัตร|national id|citizen id|thai id|id card)[^\n]{0,20}$")
# URLs that name a person: /users/jsmith, /~jsmith, /home/jsmith, /profile/..., ?email=..., ?user=...
_URL = re.compile(r"(?i)\b(?:https?://|www\.)[^\s<>\"'`]+")
_URL_PERSONAL = re.compile(
    r"(?i)/(?:~[\w.\-]+|(?:users?|home|people|person|profiles?|members?|staff|employees?|u|author|@)/[\w.\-%@]+)"
    r"|[?&](?:e-?mail|mail|user(?:name)?|login|uid|name|first_?name|last_?name|phone|tel)=[^&#\s]+"
)
_SSN = re.compile(r"(?<![\w\-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w\-])")
_SSN_BARE = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\s*(?:#|no\.?|number)?\s*[:=]?\s*(\d{9})\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")

_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
    r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DATE = (
    rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}|\d{{4}}年\d{{1,2}}月\d{{1,2}}日"
    rf"|{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}\.?,?\s+\d{{4}})"
)
_DOB = re.compile(
    r"(?i:\b(?:born(?:\s+on)?|date\s+of\s+birth|d\.?o\.?b\.?|birth\s?date|birthday)|生年月日|วันเกิด)"
    rf"\s*(?:[:：=\-–]\s*)?(?:(?i:is|was|on)\s+)?(?P<date>{_DATE})"
)

# USPS street suffixes. Strong ones are almost always streets; weak ones ("Center", "Hills", ...) are ordinary
# nouns too, so they count only after a house number of 3+ digits or before a unit/city tail.
_STRONG_SUFFIX = (
    "Street|St|Avenue|Ave|Av|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|Parkway|Pkwy|"
    "Highway|Hwy|Way|Circle|Cir|Trail|Trl|Alley|Aly|Crescent|Close|Plaza|Plz|Square|Sq|Route|Rte|Expressway|"
    "Expy|Freeway|Fwy|Turnpike|Tpke|Pike|Causeway|Cswy|Avenida|Calle|Strasse|Straße|Weg|Gasse|Allee|Platz|"
    "Rue|Via|Straat|Laan|Gatan|Vej|Vei"
)
_WEAK_SUFFIX = (
    "Bay|Beach|Bend|Bluff|Bluffs|Bottom|Branch|Bridge|Brook|Brooks|Burg|Burgs|Bypass|Camp|Canyon|Cape|Center|"
    "Centers|Club|Common|Commons|Corner|Corners|Course|Courts|Cove|Coves|Creek|Crest|Crossing|Crossroad|Curve|"
    "Dale|Dam|Divide|Drives|Estate|Estates|Extension|Extensions|Fall|Falls|Ferry|Field|Fields|Flat|Flats|Ford|"
    "Fords|Forest|Forge|Forges|Fork|Forks|Fort|Freeway|Garden|Gardens|Gateway|Glen|Glens|Green|Greens|Grove|"
    "Groves|Harbor|Harbors|Haven|Heights|Hill|Hills|Hollow|Inlet|Island|Islands|Isle|Junction|Junctions|Key|"
    "Keys|Knoll|Knolls|Lake|Lakes|Land|Landing|Light|Lights|Loaf|Lock|Locks|Lodge|Loop|Mall|Manor|Manors|"
    "Meadow|Meadows|Mews|Mill|Mills|Mission|Motorway|Mount|Mountain|Mountains|Neck|Orchard|Oval|Overpass|Park|"
    "Parks|Parkways|Pass|Passage|Path|Pine|Pines|Plain|Plains|Point|Points|Port|Ports|Prairie|Radial|Ramp|"
    "Ranch|Rapid|Rapids|Rest|Ridge|Ridges|River|Roads|Row|Rue|Run|Shoal|Shoals|Shore|Shores|Skyway|Spring|"
    "Springs|Spur|Spurs|Squares|Station|Stravenue|Stream|Streets|Summit|Throughway|Trace|Track|Trafficway|"
    "Tunnel|Underpass|Union|Unions|Valley|Valleys|Viaduct|View|Views|Village|Villages|Ville|Vista|Walk|Walks|"
    "Wall|Ways|Well|Wells|Strip|Trailer|Quad|Deviation|Broadway|Parade|Esplanade|Promenade|Rise|Glade|Grange|"
    "Ride|Sound|Firetrail|Parklands|Steps|Outlook|Retreat|Chase"
)
_ADDR_WORD = r"(?:[A-ZÀ-ÖØ-ÞĀ-ɏ][A-Za-zÀ-ÖØ-öø-ÿĀ-ɏ'.\-]*|\d{1,3}(?:st|nd|rd|th))"  # also "Avotiņš", "İhsanoğlu"
_UNIT = r"(?:,?[ \t]*\n?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Floor|Fl\.?|Room|Rm\.?|#)[ \t]*#?[\w\-]{1,6})"
_CITY_TAIL = r"(?:,?[ \t]*\n?[ \t]*[A-Z][A-Za-z .'\-]{1,40},[ \t]*[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?)"
_ADDRESS_US = re.compile(
    rf"(?<![\w\-/.])(?P<num>\d{{1,6}}[A-Za-z]?(?:/\d{{1,5}}[A-Za-z]?)?)(?:[ \t]+\d{{1,5}})?(?:[ \t]+{_ADDR_WORD}){{1,4}}[ \t]+"
    rf"(?:(?P<strong>(?:{_STRONG_SUFFIX})\b\.?)|(?P<weak>(?:{_WEAK_SUFFIX})\b))(?:[ \t]+(?:N|S|E|W|NE|NW|SE|SW)\b\.?)?"
    rf"(?P<unit>{_UNIT})?(?P<tail>{_CITY_TAIL})?"
)
# European: "Augsburger Strasse 36", "Snellmaninkatu 55", "Rue de Tanger 29", "Avenida Pedro Ulisses 888".
# a house number, also with a building or flat after it: "47-26", "08/37", "9a/0"
_HOUSE_NUMBER = r"\d{1,5}[a-zA-Z]?(?:[/\-]\d{1,4}[a-zA-Z]?)?(?![\w\-/])"
_ADDRESS_EU = re.compile(
    r"(?<![\w\-/.])(?:\d{1,6}[ \t]+)?(?:[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ\-]*(?:strasse|straße|str\.|gasse|weg|allee|platz|katu|tie|kuja|gatan|vägen|"
    r"väg|vej|vegen|veien|gate|gata|gade|stræti|vegur|straat|laan|plein|utca|ulica|tér|braut)|[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ\-]*[ \t\-](?:Strasse|Straße|Str\.|"
    r"Gasse|Weg|Allee|Platz|Ring|Damm|Ufer|Straat|Laan|Vej|[Tt]errasse|[Vv]ei|[Gg]ate|ulica|cesta)|(?:[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ\-]*[ \t]){1,2}(?:u\.|(?:[a-zà-ÿ]+[ \t])?(?:utca|útja|út|körút|tér|köz|sor)(?![\w\-]))|(?:Rue|Avenue|Avenida|Rua|Calle|Carrer|Via|Viale|"
    r"Piazza|Piazzale|Largo|Vicolo|Strada|Borgo|Contrada|Corso|Travessa|Avinguda|Passeig|Paseo|Camino|ul\.|pl\.|al\.|Plac|"
    r"plac|Aleja|Boulevard|ulica|aleja|Av\.?|Praça|Alameda|Rodovia|Rambla|Pasaje|Glorieta|Urbanización|"
    r"Incrocio|Canale|Stretto|Rotonda|Intrarea|Drumul|Aleea|Bulevardul|Calea|Splaiul|Piața|Șoseaua|Retorno|Periférico|"
    r"Andador|Viaducto|Circuito|Continuación|Prolongación|Cerrada|Privada|Callejón|rue|avenue|boulevard|chemin|allée|"
    r"impasse|quai)"
    r"(?:[ \t]+(?:de|du|da|do|dos|das|del|della|di|des|la|le|d'))?(?:[ \t]+(?:(?:de|da|do|dos|das|del|della|di)[ \t]+)?"
    # the house number, also "47-26", "08/37" (building / flat), after a comma ("Strada Taliercio, 47") or "Nr."
    r"[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*){1,4}),?[ \t]+(?:Nr\.?[ \t]*)?" + _HOUSE_NUMBER +
    rf"(?P<unit>{_UNIT})?"
)
# Post boxes and US military mail: "P.O. Box 287", "PSC 0413, Box 8144\nAPO AA 42323", "Unit 4719 Box 7394".
_ADDRESS_BOX = re.compile(
    r"(?<![\w\-])(?:(?:PSC|CMR|Unit)[ \t]+\d{1,5},?[ \t]+Box[ \t]+\d{1,5}(?:[ \t]*\n?[ \t]*(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)"
    r"[ \t]+\d{5})?|(?:USNS|USNV|USS|USCGC)[ \t]+[A-Z][\w\-]+(?:[ \t]+[A-Z][\w\-]+)?[ \t]*\n?[ \t]*(?:APO|FPO|DPO)[ \t]+"
    r"(?:AA|AE|AP)[ \t]+\d{5}|(?:\d{1,6}[ \t]+)?P\.?[ \t]?O\.?[ \t]?Box[ \t]+\d{1,6})(?![\w\-])"
)
# After "address:", "lives on", "send it to", ...: words and a house number are an address even without a
# street suffix ("Dalmatinova 68", "Příční 1429"); cut at a lowercase word, as "Ombù 9091 today" ends at 9091.
_ADDRESS_CONTEXT = re.compile(
    r"(?i:\baddress(?:es)?\b(?:[ \t]+(?:is|was|here))?[ \t]*[:=\-]?|\baddress\?[ \t]*(?:it(?:'s|[ \t]+is)|here)?|\b(?:lives?|living|located|situated|moved|"
    r"ship(?:ped)?|send|sent|deliver(?:ed)?|mail(?:ed)?|meet(?:[ \t]+(?:me|you|us))?)[ \t]+(?:(?:it|this|them|one|a[ \t]new[ \t]one)"
    r"[ \t]+)?(?:at|on|to|in)(?:[ \t]+the[ \t]+\w+[ \t]+(?:side[ \t]+)?of)?)[ \t\n]*"
    # also a Greek street and a building or flat after the number ("Kurelčeva 4b/0", "Λιμνών 577-104")
    r"(?P<addr>(?:\d{1,6}[ \t]+)?[A-ZÀ-ÞĀ-ɏͰ-Ͽ][\wÀ-ɏ'.\-]*(?:[ \t]+[\wÀ-ɏ'.\-]+){0,3}?[ \t]+" + _HOUSE_NUMBER + ")"
)
# Street name then house number, often after a postcode or building number: "20789 Allika 46", "Hoge Wei 32",
# "518 Árpád fejedelem útja 62.", "Rua Vinte e Cinco de Setembro 1257". Kept only with more evidence (see
# _find_addresses): an address tail, a street word after it, or (with the leading number) "at" / "to" before it.
# Two patterns, searched separately, so that "Off At 74678" cannot take the number of "74678 Midtvollen 130".
_ADDRESS_NUMBERED = re.compile(
    r"(?<![\w\-/.,])\d{1,6}[ \t]+[A-ZÀ-ÞĀ-ɏͰ-Ͽ][\wÀ-ɏ'\-]*\.?(?:[ \t]+[^\W\d_][\w'\-]*\.?){0,5}?[ \t]+" + _HOUSE_NUMBER
)
_ADDRESS_NAME_NUMBER = re.compile(  # also Greek ("Πλατεία Συντάγματος 204") and Spanish "C/ Señores Curas 88"
    r"(?<![\w\-/.,])(?:C/[ \t]*)?[A-ZÀ-ÞĀ-ɏͰ-Ͽ][\w'\-]*\.?(?:[ \t]+(?:[A-ZÀ-ÞĀ-ɏͰ-Ͽ][\w'\-]*\.?|de|del|la|le|da|do|di|e|u|van|von)){0,3}?"
    r"[ \t]+" + _HOUSE_NUMBER
)
# House number, then the street type, then its name, as French, Spanish, Italian and Portuguese write it:
# "56 rue La Boétie", "33 avenue de Provence", "12 Calle Mayor" (the type may be lowercase)
_ADDRESS_TYPE_FIRST = re.compile(  # (a postcode or building number may come first: "143 31 rue de la Hulotais")
    r"(?<![\w\-/.])(?:\d{1,6}[ \t]+)?\d{1,5},?[ \t]+(?i:rue|avenue|av\.|avenida|avda\.|rua|calle|c/|carrer|via|viale|piazza|"
    r"corso|boulevard|bd\.?|chemin|place|all[ée]e|impasse|quai)[ \t]+(?:(?:de|du|da|do|dos|das|del|della|di|des|la|le|d')[ \t]+)*"
    r"(?!(?:Apt|Suite|Unit)\b)[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*(?:[ \t]+(?:(?!(?:Apt|Suite|Unit)\b)[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*|de|du|da|do|del|la|le)){0,3}"
    r"(?<![ \t])"
)
# A house number (and a building or postcode number before it) then a street name with no street word, ending the
# clause or before a lowercase "street": "The restaurant is at 9816 214 Pavlou Drandaki." Only after "at" / "to" /
# "on" and only words that are no English word (see _find_addresses_cased), so "at 5 Guys" or "to 3 Kids Club" stay.
_ADDRESS_NUMBER_NAME = re.compile(
    r"(?<![\w\-/.,])\d{1,6}(?:[ \t]+\d{1,5})?(?P<words>(?:[ \t]+[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*){1,3})(?![\w\-])"
)
# A street without a house number after "on" / "at": "she lives on Baker Street", "the shop on Alder Lane" (a strong
# street word only; not "on Wall Street" or "on Marina Fort Street", whose name already holds a street word).
_ADDRESS_STREET_ONLY = re.compile(
    rf"\b(?:on|at)[ \t]+(?P<addr>(?:[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*[ \t]+){{1,3}}(?:{_STRONG_SUFFIX})\b\.?)"
)
_STREET_AFTER = re.compile(r"\.?[ \t]+(?:St|Street|Rd|Road|Ave|Avenue)\b")
_AFTER_HOUSE_NUMBER = re.compile(r"[ \t]*(?:[,;!?\n]|\.(?!\d)|$)|[ \t]+(?:in|on|for|and|or|by|before|after|if|when|please)\b")
_STREET_AFTER_LOWER = re.compile(r"[ \t]+(?:street|road|avenue)\b")  # "lives on 69 Av Sidi Lakhmi street"
_ADDRESS_CUE_BEFORE = re.compile(r"(?i:\b(?:at|to|on|into)[ \t]+(?:[A-Z][\w\-]*,[ \t]+)?)$")  # "at Locavore, 641 ..."
# a cue that says an address follows, whatever its words: "My address is 806 Tanya Triangle", "I live at 4 Julia Trailer"
_ADDRESS_STRONG_CUE_BEFORE = re.compile(
    r"(?i:\baddress(?:es)?(?:[ \t]+(?:is|was))?[ \t]*[:=\-]?|\b(?:live|lives|living|located|situated|ship(?:ped)?|send|sent|"
    r"deliver(?:ed)?|mail(?:ed)?)[ \t]+(?:(?:it|this|them)[ \t]+)?(?:at|to|on))[ \t]+$"
)
# "Switch to Zigbee 3.", "upgrade the hub to Grafana 10": after a verb of software versions, "to" names a release
_VERSION_CUE_BEFORE = re.compile(
    r"(?i:\b(?:switch(?:es|ed|ing)?|(?:up|down)grad(?:e|es|ed|ing)|updat(?:e|es|ed|ing)|migrat(?:e|es|ed|ing)|"
    r"(?:revert|port|convert|install)(?:s|ed|ing)?|roll(?:s|ed|ing)?[ \t]+back|pin(?:s|ned)?)"
    r"(?:[ \t]+[\w\-]+){0,3}?[ \t]+(?:to|on)[ \t]+)$"
)
# A form field: "Address:" and the address on the same or the next line, to the end of that line.
_ADDRESS_LABEL = re.compile(
    r"(?im)^[ \t]*(?:(?:home|postal|mailing|street|billing|shipping|business|work|office)[ \t]+)?address[ \t]*:[ \t]*\n?[ \t]*"
    r"(?P<addr>[^\n]*?\d[^\n]*?)[ \t.]*$"
)
# What may follow a street: a unit, a postcode (US, EU, "840 24", Canadian, UK), a state code before a postcode,
# or a town / country of 1-4 words ("Colorado Springs", "Mora de Rubielos", "LONDON").
_NOT_PLACE = frozenset(
    "I The A An This That It Is Please Call Email E-mail Phone Mobile Desk Fax Tel And Or But If When For From To In "
    "On At By With Of As We You He She They My Our Your Thanks Regards Best Dear Hi Hello Today Tomorrow Tonight "
    "Yesterday Monday Tuesday Wednesday Thursday Friday Saturday Sunday Then Now Soon".split()
)
# where a clause ends: a town there closes the address ("..., Marshland", "... Suite 980 Reichenbach.")
_CLAUSE_END = re.compile(r"[ \t]*(?:[.?!;]?[ \t]*(?:\n|$)|[.?!;][ \t]+[A-Z])")
# "Wesselényi u. 94.\n Suite 741", "Victor Hugo u. 49. Suite 638", "Muel\n, Z\n 16518" (the comma starts the next line), and list bullets at line
# starts ("\n• Apt. 050", "\n??? Broomfield": "???" is how a bullet reads after a lossy encoding)
_TAIL_SEP = re.compile(
    r"\.?[ \t]*(?:,[ \t]*\n?|\n(?:[ \t]*,)?)[ \t\n]*(?:[?•·*▪►][?•·*▪►]*[ \t]+)?|[ \t]+|\.[ \t]+(?=(?i:Apt|Apartment|Suite|Ste|Unit)\b)"
)
_PLACE_WORD = r"[A-ZÀ-ÖØ-ÞĀ-ɏͰ-Ͽ∆][\wÀ-ɏͰ-Ͽ∆'.\-]*"  # Latin and Greek capitals ("ΑΓΙΟΣ ∆ΟΜΕΤΙΟΣ" uses U+2206)
_TAIL_PART = re.compile(
    r"(?P<unit>(?i:Apt\.?|Apartment|Appartamento|Piano|Interno|Suite|Ste\.?|Unit|Floor|Fl\.?|Room|Rm\.?|#|Piso|Puerta|"
    r"Interior|Depto\.|Dpto\.|Edif\.|Ap\.|Bl\.|Sc\.|Et\.|RD)[ \t]*#?\d[\w\-]{0,5})(?![\w\-])"
    r"|(?P<zip>(?:[A-Z]{1,2}-)?\d{4,6}(?:-\d{3,4})?|\d{4}[ ]?[A-Z]{2}|\d{2}-\d{3}|\d{3}[ ]\d{2}|[A-Z]\d[A-Z][ ]?\d[A-Z]\d|[A-Z]{1,2}\d[A-Z\d]?[ ]\d[A-Z]{2}|[A-Z]\d[\dW][ ]?[A-Z\d]{4})(?![\w\-])"  # ... Eircode
    # a region code of 1-3 letters ("CO", "VWV", "Z") counts only with a postcode after it
    r"|(?P<state>[A-Z]{1,3})(?=,?[ \t]*\n?[ \t]+(?:\d{4,6}|[A-Z]\d[A-Z][ ]?\d[A-Z]\d)(?![\w\-]))"
    rf"|(?P<place>{_PLACE_WORD}(?:[ \t]+(?:(?:de|del|la|le|di|da|du|van|von|nad|na|u)(?![\w'])|{_PLACE_WORD})){{0,3}}"
    r"(?:[ \t]+\([^()\n]{1,30}\))?)"  # "Cyprus (Greek)", "ΑΓΛΑΝΤΖΙΑ (ΑΓΛΑΓΓΙΑ)"
)
# A unit before the street (UK, Australia, New Zealand): "Flat 9\nSingh Loaf", "Apt. 704 9 Holland Crossing"
_UNIT_FIRST = r"(?:Flat|Studio|Apt\.?|Apartment|Suite|Unit|Level)[ \t]+\d{1,5}[A-Za-z]?,?[ \t]*\n?[ \t]*"
_UNIT_BEFORE = re.compile(_UNIT_FIRST + "$")
_ADDRESS_UNIT_FIRST = re.compile(
    rf"(?<![\w\-])(?P<unit>{_UNIT_FIRST})(?:\d{{1,6}}[ \t]+)?(?:{_ADDR_WORD}[ \t]+){{1,3}}(?:{_STRONG_SUFFIX}|{_WEAK_SUFFIX})\b\.?"
)
# An intersection: "the corner of Dalbraut 99 and Frederikke Coves" (capitalized words or numbers on both sides).
_ADDRESS_CORNER = re.compile(
    r"(?:\b[Tt]he[ \t]+)?\b[Cc]orner[ \t]+of[ \t]+(?:(?:[A-ZÀ-ÞĀ-ɏ\d][\wÀ-ɏ'.\-]*|ul\.)[ \t]+){1,5}?(?:and|&)[ \t]+"
    r"(?:[A-ZÀ-ÞĀ-ɏ\d][\wÀ-ɏ'\-]*|ul\.)(?:[ \t]+(?:[A-ZÀ-ÞĀ-ɏ\d][\wÀ-ɏ'\-]*|(?:St|Str|Ave|Rd)\.))*"
)
# Japanese: prefecture ... N丁目N番(地)N号 (the form Faker ja_JP and real addresses use).
_ADDRESS_JA = re.compile(
    r"(?:〒?\d{3}-\d{4}[ \t　]*)?(?:東京都|北海道|(?:大阪|京都)府|[\u4e00-\u9fff]{2,3}県)[\u30a0-\u30ff\u4e00-\u9fff々ヶ]{1,24}?"
    r"\d{1,4}丁目(?:\d{1,4}番(?:地)?(?:\d{1,4}号?)?)?(?:[ \t　][\u30a0-\u30ff\u4e00-\u9fff]{1,16}\d{1,4})?"
)
# Thai: house number (with /) + road/soi/village/district words (ถนน, ถ., ซอย, ซ., หมู่, ตำบล, ต., ...) and more
# Thai or numeric tokens, ending with the postcode when there is one.
_ADDRESS_TH = re.compile(
    r"\d{1,5}(?:/\d{1,4})?[ \t]+(?:ถนน|ถ\.|ซอย|ซ\.|หมู่|ม\.|ตำบล|ต\.|แขวง|อำเภอ|อ\.|เขต)[\u0e00-\u0e7f\d./]*"
    r"(?:[ \t]+[\u0e00-\u0e7f\d./]+){0,8}"
)

# --- PERSON -------------------------------------------------------------------------------------------------
_NAME_WORD = r"[A-ZÀ-ÖØ-ÞĀ-ɏ][A-Za-zÀ-ÖØ-öø-ÿĀ-ɏ'\-]*(?!\w)"
_TITLE_BEFORE = re.compile(  # "ms. Quinzia", "Professor Ulbrecht", "Aunt Zdenka"
    r"\b(?:[Mm]r|[Mm]rs|[Mm]s|Miss|Mx|Dr|Prof|Sir|Madam|Mme|Mlle|Herr|Frau|Sr|Sra|Professor|Capt|Captain|Col|Colonel|Gen|"
    r"Lt|Sgt|Rev|Reverend|Uncle|Aunt|Auntie|Grandma|Grandpa|Coach|Judge|Senator|Governor|Mayor|Detective|Nurse|Doctor)"
    r"\b\.?[ \t]+$"
)
# Form labels and self-introductions: whatever capitalized words follow are a name.
_LABEL_BEFORE = re.compile(
    r"(?i:\b(?:(?:full |first |last |customer |contact |employee |patient |client )?name|customer|contact|employee|"
    r"patient|client|requester|requested by|reported by|submitted by|assigned to|assignee|reporter|approved by|"
    r"prepared by|author|attn|attention|signed|owner)[ \t]*:[ \t]*$|\b(?:my|his|her|their|maiden|full|legal) name is[ \t]+$|"
    r"\bwhat(?:'s| is) (?:your|his|her|their) name\?[ \t\n]*$)"
)
# Person-ish context words: the next words are a name if they are two capitalized words or start with a
# gazetteer first name ("contact Maria Lopez", "employee Kim Ito"; but "contact Support" stays).
_PERSON_CONTEXT_BEFORE = re.compile(
    r"(?i:\b(?:contact|contacted|employee|staff member|customer|client|patient|agent|manager|supervisor|colleague|"
    r"coworker|technician|hi|hello|hey|dear|cc|thanks|regards|sincerely|i am|i'm|this is|spoke with|spoke to|"
    r"talked to|ask|tell|said|named|called|calls me|assistant to|married|met with|directed by|written by|sung by|"
    r"signed by|follow up with|speak to|speak with|meet with|on behalf of|introduced (?:himself|herself|themselves|myself) as|"
    r"(?:letter|message|note|postcard|gift) from)\b[ \t]*[,:\-]?[ \t\n]*"
    r"|\b(?:best|cheers|warmly|cordially|yours),[ \t]*\n[ \t]*)$"  # the closing line of a letter, then the name
)
# Greetings and the people closest to someone, the same way: "Congratulations Dzhambek", "my wife Quionia". A set of
# the last one or two words before the name, not more alternatives in the regex above, which runs for every
# capitalized word (this keeps find_pii's speed).
_PERSON_NOUNS = frozenset(
    """congratulations congrats goodbye bye greetings friend wife husband son daughter mother father mom mum dad brother
    sister cousin nephew niece grandson granddaughter grandmother grandfather boyfriend girlfriend fiance fiancee fiancé
    fiancée boss neighbor neighbour roommate classmate teammate landlord landlady tenant mentor""".split()
) | {"happy birthday", "good morning", "good afternoon", "good evening", "good night", "good luck"}


def _person_noun_before(before: str) -> bool:
    words = before.rstrip(" \t\n,:-").lower().split()[-2:]
    return bool(words) and (words[-1] in _PERSON_NOUNS or " ".join(words) in _PERSON_NOUNS)


_PERSON_THINGS = _PERSON_NOUNS | {"phone", "mobile", "cell", "email", "e-mail", "birthday"}


def _person_thing_after(text: str, pos: int) -> bool:
    """What follows a possessive belongs only to a person: "Victoria's phone", "Austin's wife"."""
    m = re.match(r"[ \t]+([a-z\-]+)", text[pos : pos + 20])
    return bool(m) and m.group(1) in _PERSON_THINGS


# ... and after it: "Trivo lives on ...", "Maslin said", "Gerth had given"
_PERSON_VERB_AFTER = re.compile(
    r"[ \t]+(?:said|says|told|asked|wrote|replied|added|explained|lives|lived|works|worked|moved|joined|left|"
    r"called|emailed|phoned|(?:has|had|was|is)[ \t]+(?:given|born|married|told|asked|from))\b"
)
# At the start of a line any capitalized word stands ("Nginx said", "Kubernetes is from Google"): there only
# verbs that a product or a firm cannot take count ("Trivo lives on ...").
_PERSON_VERB_AT_START = re.compile(r"[ \t]+(?:lives|lived|(?:has|had|was|is)[ \t]+(?:given|born|married))\b")
# Verbs of feeling, thinking and life events: only people take them, but a product name may be an English word
# ("Docker wants more memory"), so they count for a name that is no English word: "Quionia grew up in Oslo".
_PERSON_ONLY_VERB_AFTER = re.compile(
    r"[ \t]+(?:thinks|thought|feels|felt|grew[ \t]+up|studied|graduated|loves|loved|hates|hated|likes|liked|wants|"
    r"wanted|hopes|hoped|wishes|wished|smiled|laughed|cried|died|divorced|(?:is|was)[ \t]+(?:married|engaged|pregnant)"
    r")\b"
)
# What only a person is to someone or does with someone; these count for a given name that is also a place
# ("Victoria is my sister") and for a name in no list: "Zorvana and I", "Ilvetta told me", "... is my best friend".
_PERSON_RELATION_AFTER = re.compile(
    r"[ \t]+(?:(?:and|&)[ \t]+(?:I|me)\b(?!')|(?:told|asked|thanked|invited|hugged|kissed|married|hired|taught|"
    r"introduced)[ \t]+(?:me|us|him|her|them)\b|(?:is|was)[ \t]+(?:my|our|his|her|their)[ \t]+(?:[a-z\-]+[ \t]+)?"
    r"(?P<noun>[a-z]+)\b)"
)
# An imperative at the start of a sentence: "Roll back to 2.3", "Mark the invoice as paid" (a given name somewhere)
_IMPERATIVE_AFTER = re.compile(r"[ \t]+(?:the|a|an|back|up|out|down|off|it|this|that|these|those|all|your|our)\b")
# Chat transcripts: "Ubul: What a wife.\nNicole: Really?": a line that starts with one or two name-like words and
# a colon and a capitalized utterance is a speaker label when another line of the text starts the same way (one
# "Note: ..." line is not); the usual log and form labels ("Warning: Disk full") never are.
_SPEAKER = re.compile(r"(?m)^[ \t]*([A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ'\-]+(?:[ \t][A-ZÀ-ÖØ-Þ][a-zà-öø-ÿ'\-]+)?):[ \t]+[\"'“(]?[A-ZÀ-ÖØ-Þ]")
_NOT_SPEAKER = frozenset(
    "Warning Warn Error Info Debug Trace Fatal Critical Notice Status State Result Results Output Input Note Tip "
    "Hint Example Answer Question Source Reason Cause Fix Solution Step Total Type Category Tags Title Description "
    "Comment Comments Response Request Reply Level Priority Severity Version Build Host Path File Line Message".split()
)
# People named as a list after a plural person noun: "our 3 founders: Kónya, Becker and Vasquez" (a firm name
# has the same shape, "Barnett, Melton and Garcia", so the noun before the colon decides).
_PEOPLE_LIST = re.compile(
    r"(?i:\b(?:co-?)?(?:founders|authors|speakers|attendees|guests|participants|members|witnesses|children|"
    r"siblings|parents|friends|candidates|winners|recipients)\b)[ \t]*:[ \t]*"
    rf"(?P<names>{_NAME_WORD}(?:[ \t]+{_NAME_WORD})?(?:(?:,[ \t]*|,?[ \t]+(?:and|&)[ \t]+){_NAME_WORD}(?:[ \t]+{_NAME_WORD})?)+)"
)
_WORD_START = re.compile(r"(?<![\w@.'\-])[A-ZÀ-ÖØ-ÞĀ-ɏ]")
_PARTICLES = r"(?:(?:van|von|de|der|den|da|di|du|del|della|la|le|ter|ten|bin|al)[ \t]+){0,2}"  # "Maika van de Noort"
_CAP_WORDS = re.compile(rf"({_NAME_WORD})(?:[ \t]+(?:[A-Z]\.?[ \t]+)?{_PARTICLES}({_NAME_WORD}))?(?:[ \t]+({_NAME_WORD}))?")
_LOWER_NAME = re.compile(r"(?i:\bmy name is|\bname[ \t]*:)[ \t]*([a-z][a-z'\-]+)(?:[ \t]+([a-z][a-z'\-]+))?")
_CJK_NAME = re.compile(r"([\u4e00-\u9fff]{1,3}[ \u3000]?[\u4e00-\u9fff]{1,3})(?:様|さん|氏|殿|先生|君)")
# "担当者は中村 聡太郎です": family name in kanji, given name in kanji or kana, up to the particle or copula after it
_CJK_NAME_CTX = re.compile(r"(?:氏名|名前|担当者?|お客様名)(?:[ \t　]*[:：][ \t　]*|は|が)?([\u4e00-\u9fff々]{1,4}(?:[ \u3000]?[\u4e00-\u9fff々\u3040-\u30ff]{1,4}?)?)(?=です|でした|で|さん|様|氏|殿|[、。，,\s]|$)")
# Japanese names are written family name, space, given name; two short kanji runs with one space between them,
# outside Japanese prose (no kana or kanji around), are a name in mixed-language text ("approved by 高橋 裕美子").
_CJK_SPACED_NAME = re.compile(r"(?<![\u3040-\u30ff\u4e00-\u9fff\w])[\u4e00-\u9fff]{1,3}[ \u3000][\u4e00-\u9fff]{1,3}[\u3040-\u309f]{0,2}(?![\u3040-\u30ff\u4e00-\u9fff\w])")
# The same for Thai: exactly two Thai words (given name, family name) standing alone in non-Thai text.
_THAI_ISOLATED_NAME = re.compile(r"(?<![\u0e00-\u0e7f][ \t])(?<![\u0e00-\u0e7f\w])[\u0e00-\u0e7f]{2,}[ \t][\u0e00-\u0e7f]{2,}(?![\u0e00-\u0e7f\w]|[ \t][\u0e00-\u0e7f])")
_THAI_NAME = re.compile(r"(?:(?P<formal>นางสาว|นาย|นาง|ด\.ช\.|ด\.ญ\.|ชื่อ(?:คือ)?)|คุณ)[ \t]?(?P<first>[\u0e00-\u0e7f]{2,})(?:[ \t](?P<last>[\u0e00-\u0e7f]{2,}))?")

# A small gazetteer of common given names (US SSA top names plus frequent European, Indian, Latin American
# and romanized Asian ones). Names that are also ordinary words (May, Will, Grace, Jordan...) are left out:
# those are caught only after a title or a context word.
FIRST_NAMES = frozenset(
    """
    James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel Matthew Anthony
    Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Edward Jason Jeffrey Ryan Jacob
    Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel Gregory Alexander Patrick
    Jack Dennis Jerry Tyler Aaron Jose Adam Nathan Henry Douglas Zachary Peter Kyle Noah Ethan Jeremy Walter
    Keith Roger Terry Austin Sean Gerald Carl Harold Dylan Arthur Lawrence Jesse Bryan Joe Bruce Gabriel
    Logan Albert Willie Alan Eugene Russell Vincent Philip Bobby Johnny Bradley Roy Ralph Randy Louis Liam
    Lucas Mason Oliver Elijah Aiden Sebastian Mateo Leo Owen Isaac Luke Julian Levi Isaiah Caleb Nolan Craig
    Travis Shawn Chad Derek Corey Cody Curtis Dustin Todd Troy Marcus Shane Brett Darren Clayton Trevor Spencer
    Colin Calvin Howard Phillip Victor Martin Stanley Leonard Frederick Norman Glenn Francis Allen Wayne Harry
    Jimmy Antonio Danny Tony Mario Ricardo Alex Eddie Jon Ronnie Tommy Micheal Darrell Darryl Derrick
    Jeffery Joel Erik Edwin Clarence Alfred Herbert Bernard Leroy Marvin Barry Gordon Wesley Johnathan
    Kristopher Mitchell Garrett Gavin Jared Evan Ian Connor Cameron Blake Devin Brendan Jake
    Cole Wyatt Jayden Grayson Easton Jaxon Landon Dominic Xavier Adrian
    Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Margaret Sandra
    Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia
    Kathleen Amy Angela Shirley Anna Brenda Pamela Emma Nicole Helen Samantha Katherine Christine Debra Rachel
    Carolyn Janet Catherine Maria Heather Diane Julie Joyce Kelly Christina Lauren Joan Evelyn Olivia Judith
    Megan Cheryl Martha Andrea Hannah Jacqueline Ann Gloria Teresa Kathryn Sara Janice Jean Alice Madison
    Doris Abigail Julia Judy Sophia Marie Denise Danielle Beverly Isabella Theresa Diana Natalie Brittany
    Charlotte Kayla Alexis Lori Ava Mia Harper Amelia Chloe Ella Zoe Aria Nora Hazel Scarlett Kaitlyn Katelyn
    Caitlin Kathy Karla Tiffany Erin Erica Monica Veronica Vanessa Valerie Vickie Wendy Tracy Tina
    Tammy Tara Stacy Stacey Sheila Shannon Sherry Rhonda Regina Paula Patty Peggy Phyllis Norma Natasha Molly
    Mindy Melanie Meredith Marilyn Lydia Leslie Kristen Kristin Kristina Krista Kendra Kelsey Kate
    Katie Kara Jill Jenna Jodi Jamie Haley Gina Felicia Erika Emma Dana Colleen Claudia
    Carrie Candace Brooke Bonnie Bethany Alicia Allison Alexandra Adriana Yvonne Yolanda Whitney
    Sabrina Renee Priscilla Miranda Melinda Mckenzie Mariah Lindsey Lindsay Jocelyn Gabriela
    Frances Ellen Eileen Courtney Connie Cindy Carla Anne Annette Angelica Alyssa Audrey Brianna Madeline
    Claire Sophie Lucy Ines Elena Sofia Lucia Carmen Isabel Ana Marta Rosa Pilar Beatriz Paola Daniela Valeria
    Juan Carlos Luis Miguel Javier Alejandro Diego Pablo Sergio Fernando Jorge Manuel Francisco Rafael Andres
    Eduardo Roberto Ramon Raul Ruben Enrique Hector Oscar Pedro Alberto Armando Arturo Cesar Felipe Gustavo
    Hans Klaus Jürgen Stefan Andreas Markus Tobias Lukas Felix Florian Katrin Sabine Ursula Petra Monika
    Birgit Jana Lena Leonie Pierre Jacques Philippe Nicolas Julien Mathieu Camille Manon Chloé Léa Giulia
    Francesca Chiara Alessandro Giuseppe Giovanni Marco Luca Matteo Lorenzo Anders Lars Erik Nils Sven Ingrid
    Astrid Sigrid Priya Rahul Amit Anil Sunil Ravi Arjun Vikram Rohan Deepak Sanjay Pooja Anjali Neha Kavya
    Aditya Ananya Mohammed Muhammad Ahmed Ali Omar Hassan Fatima Aisha Yusuf Ibrahim Mustafa Wei Jing Ming
    Hiroshi Takashi Kenji Yuki Haruto Sota Yuto Akira Naoko Keiko Yoko Sakura Aiko Yumi Yumiko Kenta Daiki
    Somchai Somsak Malee Siriporn Nattapong Kittisak Arthit Pimchanok Dmitri Sergei Ivan Olga Natalia Tatiana
    Anastasia Piotr Tomasz Katarzyna Agnieszka Magdalena Jakub Eva Zsofia Minh Thanh
    """.split()
)

# Capitalized words that start sentences, name things or fill forms but are not people.
_NOT_NAME = frozenset(
    """
    The A An This That These Those There Here It Its We Our You Your They Their He She His Her I My Me Us
    All Any Each Every Some No Not None Yes Please Thanks Thank Hello Hi Dear Regards Best Sincerely Cheers
    And Or But If When Where What Which Who Why How Then Also For From To In On At By With Of As Is Are Was
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
    August September October November December Today Tomorrow Yesterday
    Team Support Service Services Customer Customers Client Clients User Users Admin Administrator Account
    Accounts Sales Marketing Finance Legal Security Operations Department Dept Office Desk Helpdesk Center
    Centre Group Inc Ltd LLC Corp Corporation Company Co GmbH AG Bank University Hospital Clinic School
    Manager Director Officer Engineer Agent Employee Employees Staff Patient Owner Contact Name Handbook
    Policy Policies Procedure Guide Manual Portal System Systems Server Network Product Products Order Orders
    Ticket Tickets Invoice Report Section Chapter Page Table Figure Appendix Note Notes Summary Overview
    Introduction Conclusion Board Committee Council Project Program Programme Plan Team Unit Division
    Street Avenue Road Lane Drive Court Place Way Boulevard North South East West New Old Great Saint St
    Rua Rue Calle Carrer Via Viale Avenida Piazza Plac Aleja Corso Strada Ulica Utca Alaska Nebraska Casanova
    Internal Confidential Public Restricted Private Personal General Human Resources HR IT Information
    Technology Data Email Phone Address Date Time Number Id Code Key Password Login Help Question Answer
    Yours Everyone Team Folks Colleagues Sir Madam Mr Mrs Ms Dr Prof Miss Subject Re Fwd Cc Attn
    United States Kingdom Republic Union Emirates Federation Island Islands City County State Province
    Research Investments Capital Solutions Partners Associates Holdings Technologies Labs Consulting Sons
    Kitchen Living Bedroom Bathroom Garage Garden Room Light Lights Home House Smart Hub App Cloud
    Prince Princess Royal Queen Duke Duchess Lord Lady Majesty Highness PLC
    Professor Captain Colonel Uncle Aunt Auntie Grandma Grandpa Coach Judge Senator Governor Mayor Detective Nurse
    Doctor Reverend
    """.split()
)


# ------------------------------------------------------------------------------------------------ finders


def _best_subruns(text: str, m: re.Match, accept) -> list[tuple[int, int]]:
    """Split a run of digit groups into the longest sub-runs that `accept(start, end, groups)` takes, left to
    right: "in 2023 call 415-555-0134 2 times" finds the phone inside the longer run."""
    base = m.start()
    groups = [(base + g.start(), base + g.end()) for g in re.finditer(r"\d+", m.group())]
    found, i = [], 0
    while i < len(groups):
        for j in range(len(groups) - 1, i - 1, -1):  # longest first
            s, e = groups[i][0], groups[j][1]
            while s > base and text[s - 1] in "+(":  # a leading "+" or "(" belongs to the number
                s -= 1
            whole = i == 0 and j == len(groups) - 1
            if text.count("(", s, e) == text.count(")", s, e) and accept(s, e, groups[i : j + 1], whole):
                found.append((s, e))
                i = j + 1
                break
        else:
            i += 1
    return found


def _find_cards(text: str) -> list[Span]:
    out = []

    def accept(s, e, groups, whole):
        digits = "".join(text[a:b] for a, b in groups)
        seps = {text[groups[k][1] : groups[k + 1][0]] for k in range(len(groups) - 1)}
        shortest = 12 if _CARD_CONTEXT.search(text[max(0, s - 30) : s]) else 13  # 12-digit Maestro only next to "card"
        return (shortest <= len(digits) <= 19 and len(seps) <= 1 and text[s] != "+" and (digits[0] != "0" or shortest == 12) and luhn_ok(digits)
                and len(set(digits)) > 1 and (len(groups) == 1 or min(b - a for a, b in groups) >= 3))

    for m in _CARD_RUN.finditer(text):
        out += [Span(s, e, "CARD", text[s:e]) for s, e in _best_subruns(text, m, accept)]
    return out


def _looks_like_date(sizes: list[int], digits: list[str]) -> bool:
    sizes, digits = sizes[:3], digits[:3]  # "2007-01-17 23:08:55": the date, then a time
    if sizes in ([4, 2, 2], [2, 2, 4], [1, 2, 4], [2, 1, 4], [1, 1, 4], [4, 1, 1], [4, 1, 2], [4, 2, 1]):
        day_month = digits[1:] if sizes[0] == 4 else digits[:2]
        return all(1 <= int(x) <= 31 for x in day_month)
    return False


def _find_phones(text: str) -> list[Span]:
    out = []

    def accept(s, e, groups, whole):
        value = text[s:e]
        ext = _PHONE_EXT.search(value)
        core_groups = [g for g in groups if not ext or g[0] < s + ext.start()]
        digits = [text[a:b] for a, b in core_groups]
        n_digits = sum(map(len, digits))
        before, after = text[max(0, s - 40) : s], text[e : e + 12]
        if value.startswith("+"):
            return 8 <= n_digits <= 15
        context = bool(_PHONE_CONTEXT.search(before) or _PHONE_LABEL_AFTER.match(after))
        if not whole and not context:  # never cut a phone out of a longer number (a Luhn-failing card, an IBAN)
            return False
        if value.startswith("00"):
            return 10 <= n_digits <= 15
        if not 7 <= n_digits <= 12 or _looks_like_date([len(d) for d in digits], digits):
            return False
        if _CURRENCY_BEFORE.search(before) or _CURRENCY_AFTER.search(after):
            return False
        if len(digits) == 1:  # bare digit strings only next to "phone", "call", "電話", "โทร", ...
            return context and n_digits >= 9
        if context:
            return all(len(d) >= 2 for d in digits[1:])  # "call 415-555-0134 2 times" stops before the "2"
        if value.startswith("("):
            return n_digits >= 8
        if digits[0].startswith("0") and n_digits >= 9:  # national trunk prefix: JP 03-/090-, TH 02-/08x-, UK 0xxxx
            return all(len(d) <= 8 for d in digits)
        return len(digits) >= 3 and n_digits >= 8 and all(2 <= len(d) <= 4 for d in digits[1:]) and len(digits[0]) <= 4

    for m in _PHONE_RUN.finditer(text):
        out += [Span(s, e, "PHONE", text[s:e]) for s, e in _best_subruns(text, m, accept)]
    return out


def _find_ibans(text: str) -> list[Span]:
    out = []
    for m in _IBAN.finditer(text):
        # the run may swallow a following word ("... 3000 IS"): try ending it at each space, longest first
        ends = [m.end()] + [m.start() + k for k, ch in enumerate(m.group()) if ch == " "]
        for end in sorted(ends, reverse=True):
            if iban_ok(text[m.start() : end]):
                out.append(Span(m.start(), end, "IBAN", text[m.start() : end]))
                break
    return out


def _find_ssns(text: str) -> list[Span]:
    out = []
    for m in _SSN.finditer(text):
        area, group, serial = m.group(1), m.group(3), m.group(4)
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue  # never issued
        out.append(Span(m.start(), m.end(), "SSN", m.group()))
    out += [Span(m.start(1), m.end(1), "SSN", m.group(1)) for m in _SSN_BARE.finditer(text)]
    return out


def _find_checked_ids(text: str, rx: re.Pattern, context: re.Pattern, ok, kind: str) -> list[Span]:
    out = []
    for m in rx.finditer(text):
        grouped = m.group(2) is not None
        if ok(re.sub(r"\D", "", m.group())) and (grouped or context.search(text[max(0, m.start() - 40) : m.start()])):
            out.append(Span(m.start(), m.end(), kind, m.group()))
    return out


def _find_urls(text: str) -> list[Span]:
    out = []
    for m in _URL.finditer(text):
        value = m.group().rstrip(".,;:!?)]}")
        if _URL_PERSONAL.search(value):
            out.append(Span(m.start(), m.start() + len(value), "URL", value))
    return out


def _find_ips(text: str) -> list[Span]:
    out = [Span(m.start(), m.end(), "IP", m.group()) for m in _IPV4.finditer(text)]
    for m in _IPV6.finditer(text):
        value = m.group()
        if value.count(":") >= 2 and re.search(r"[0-9A-Fa-f]", value) and not re.fullmatch(r"[\d:]{1,8}", value):
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                continue
            out.append(Span(m.start(), m.end(), "IP", value))
    return out


def _find_addresses(text: str) -> list[Span]:
    """Postal addresses; an all-lowercase text is searched capitalized."""
    cased = _capitalized(text)
    if cased is None:
        return _find_addresses_cased(text)
    # words our capitalizing made look like a street ("12 Times On The Way") hold a sentence word: not an address
    return [s for s in _on_original(text, _find_addresses_cased(cased))
            if not any(w.capitalize() in _NOT_PLACE for w in re.findall(r"[^\W\d_]+", s.value))]


# "the corner of" left out: "Please return to Leon and Eyrarodda 66", "User: Hanne and ul. Stefana 28"
_INTERSECTION_BEFORE = re.compile(r"(?:\b(?:at|to|on|is)[ \t]+|[:\n][ \t]*)([A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*[ \t]+(?:and|&)[ \t]+)$")


def _find_addresses_cased(text: str) -> list[Span]:
    out = []
    for m in _ADDRESS_US.finditer(text):
        num, end = m.group("num"), _address_tail(text, m.end())
        if (m.group("weak") and not (m.group("unit") or m.group("tail")) and end == m.end()
                and (len(num) < 3 or re.fullmatch(r"(?:19|20)\d\d", num))):
            continue  # "3 Data Centers", "in 2023 Acme Park": a weak suffix needs a real-looking house number or a tail
        words = m.group()[len(m.group("num")) :].split()
        if any(w.isupper() and len(w) > 3 for w in words):  # "12 MONTHS FREE Way" is a heading, not an address
            continue
        out.append(Span(m.start(), end, "ADDRESS", text[m.start() : end]))
    for rx in (_ADDRESS_EU, _ADDRESS_BOX, _ADDRESS_TYPE_FIRST):
        for m in rx.finditer(text):
            end = _address_tail(text, m.end())
            out.append(Span(m.start(), end, "ADDRESS", text[m.start() : end]))
    gaz = _gazetteers()
    for m in _ADDRESS_CONTEXT.finditer(text):
        if _no_street(m.group("addr"), text, m.end("addr"), gaz):
            continue
        end = _address_tail(text, m.end("addr"))
        out.append(Span(m.start("addr"), end, "ADDRESS", text[m.start("addr") : end]))
    for rx in (_ADDRESS_NUMBERED, _ADDRESS_NAME_NUMBER):  # "20789 Allika 46": an address only with more evidence
        for m in rx.finditer(text):
            if re.search(r"\d[/\-]\d+$", m.group()) and re.search(r"[A-Z]{4}", m.group()):
                continue  # "INCUBATE 24/7 NETWORKS": a heading with a time span, not "Rustring 14-78"
            if _no_street(m.group(), text, m.end(), gaz):
                continue
            end = _address_tail(text, m.end())
            ok = end > m.end() or bool(_STREET_AFTER.match(text, m.end()))
            if not ok:
                cue = _ADDRESS_CUE_BEFORE.search(text, max(0, m.start() - 40), m.start())
                # without a leading number, "at" / "to" count for a name of no English words and a house number
                # that ends a clause or comes before a preposition: "return to Leon and Eyrarodda 66 in case" (not
                # "go to Chapter 5", "Python 3.12", "Zigbee 3 mode", "moved to Gdańsk 2 years ago")
                ok = bool(cue) if rx is _ADDRESS_NUMBERED else bool(
                    (cue or _INTERSECTION_BEFORE.search(text, max(0, m.start() - 40), m.start()))
                    and _AFTER_HOUSE_NUMBER.match(text, m.end())
                    and not _VERSION_CUE_BEFORE.search(text, max(0, m.start() - 60), m.start())
                    and all(_unknown_word(w, gaz) for w in re.findall(r"[^\W\d_][\w'\-]*", m.group())))
            if ok:
                out.append(Span(m.start(), end, "ADDRESS", text[m.start() : end]))
    for m in _ADDRESS_NUMBER_NAME.finditer(text):
        words = m.group("words").split()
        # after "address is" / "lives at" two or more words need not be unknown ones (no frequent English word, though)
        strong = len(words) >= 2 and bool(_ADDRESS_STRONG_CUE_BEFORE.search(text, max(0, m.start() - 40), m.start()))
        if (_ADDRESS_CUE_BEFORE.search(text, max(0, m.start() - 40), m.start()) or strong) and (
                (_CLAUSE_END.match(text, m.end()) or _STREET_AFTER_LOWER.match(text, m.end())
                 or (strong and _AFTER_HOUSE_NUMBER.match(text, m.end())))
                and all((_unknown_word(w, gaz) or w in _STREET_WORDS or (strong and w.lower() not in gaz.common))
                        and w not in _NOT_PLACE for w in words)):
            out.append(Span(m.start(), m.end(), "ADDRESS", m.group()))
    for m in _ADDRESS_LABEL.finditer(text):
        out.append(Span(m.start("addr"), m.end("addr"), "ADDRESS", m.group("addr")))
    for rx in (_ADDRESS_JA, _ADDRESS_TH, _ADDRESS_CORNER):
        for m in rx.finditer(text):
            value = m.group().rstrip(". ")  # a Thai address at the end of a sentence keeps its full stop
            out.append(Span(m.start(), m.start() + len(value), "ADDRESS", value))
    for m in _ADDRESS_UNIT_FIRST.finditer(text):
        end = _address_tail(text, m.end())
        out.append(Span(m.start(), end, "ADDRESS", text[m.start() : end]))
    for i, s in enumerate(out):  # a unit before the street belongs to it: "Suite 585 781 Abigail Link"
        m = _UNIT_BEFORE.search(text, max(0, s.start - 20), s.start)
        if m and not any(o.start <= m.start() < o.end for o in out):  # not the unit that ends the address before
            out[i] = s = Span(m.start(), s.end, "ADDRESS", text[m.start() : s.end])
    for i, s in enumerate(out):  # an intersection: "<street> and <address>"
        m = _INTERSECTION_BEFORE.search(text, max(0, s.start - 40), s.start)
        if m:
            out[i] = Span(m.start(1), s.end, "ADDRESS", text[m.start(1) : s.end])
    return out


_SENTENCE_WORDS = frozenset("in on at by for to of and or the an from with than per is are was were".split())
_MONTH_WORD = re.compile(_MONTHS)
_MONTH_AFTER = re.compile(rf"[ \t]+{_MONTHS}\b")


def _no_street(value: str, text: str, end: int, gaz: "_Gazetteers") -> bool:
    """Words + number that are no street however they are cued: an English sentence word inside ("3 Goals in 2",
    "Berlin by 5"), a weekday or month ("on Monday 5", "Friday 12 June"), or one English word that is no street
    word ("Gate 12", "Level 3", "Floor 3"). A Roman "I" is no sentence word there: "Jihovýchodní I 38"."""
    words = re.findall(r"[^\W\d_][\w'\-]*", value)
    return (any(w in _SENTENCE_WORDS or (w in _NOT_PLACE and w != "I") or _MONTH_WORD.fullmatch(w) for w in words)
            or bool(_MONTH_AFTER.match(text, end))
            or (len(words) == 1 and words[0].lower() in gaz.english and words[0] not in _STREET_WORDS))


def _find_streets(text: str) -> list[Span]:
    """Streets named without a house number ("lives on Baker Street"); searched in texts without digits too."""
    out = []
    for m in _ADDRESS_STREET_ONLY.finditer(text):
        words = m.group("addr").split()
        if not any(w in _NOT_PLACE or w in _NOT_NAME or w in _STREET_WORDS for w in words[:-1]):
            value = m.group("addr").rstrip(".")
            out.append(Span(m.start("addr"), m.start("addr") + len(value), "ADDRESS", value))
    return out


def _address_tail(text: str, pos: int) -> int:
    """Where an address that ends its street part at `pos` really ends: through the unit, town, state,
    postcode and country lines that follow ("... Suite 680\n Kissousa\n Cyprus 36903"). A town or state counts
    only when a postcode, unit or country comes after it, so "at 12 Main St Paris said" stops at "St"."""
    solid, prev = pos, None
    for _ in range(8):
        sep = _TAIL_SEP.match(text, pos)
        part = _TAIL_PART.match(text, sep.end()) if sep and sep.end() > pos else None
        if not part or (part.lastgroup == "zip" and not sep.group().strip(" \t") and text[pos - 1].isdigit()):
            break  # "4111 1111": a number after a number on the same line is a longer number, not a postcode
        if part.lastgroup == "place":
            words, countries = re.sub(r"[ \t]*\(.*", "", part.group()).split(), _gazetteers().countries
            if part.group() in countries or " ".join(words[-2:]) in countries or words[-1] in countries:
                solid = part.end()  # "..., Tallinn, Estonia", "Coalville South Africa"
            elif words[0] in _NOT_PLACE:
                break  # the sentence goes on: "... Apt. 4. I am in Sutri"
            elif all(w.isupper() and len(w) > 2 for w in words):
                solid = part.end()  # post-office style town line: "LONDON", "KNIVSTA"
            elif prev == "zip" and not sep.group().strip(" \t"):
                solid = part.end()  # the town after its postcode on the same line: "28343 Kamenz", "H-7317 Mátra"
            elif _CLAUSE_END.match(text, part.end()) and (sep.group().strip(" \t") or text[solid - 1].isdigit()):
                solid = part.end()  # the town ends the sentence: "..., Marshland", "Suite 980 Reichenbach."
        elif part.lastgroup != "state":
            solid = part.end()
        pos, prev = part.end(), part.lastgroup
    return solid - (text[pos - 1] == "." and solid == pos)  # "..., Kerkrade." ends before the full stop


def _name_words(words: list[str | None]) -> list[str]:
    """The leading words that look like parts of a name: Capitalized (not ALL-CAPS), not a known non-name."""
    kept = []
    for w in words:
        possessive = bool(w) and w.endswith("'s")
        w = w[:-2] if possessive else w
        if not w or len(w) < 2 or w in _NOT_NAME or not w[0].isupper() or _CONTRACTION.search(w):
            break  # "I'm", "Don't" start sentences, not names
        if not (w[1:].islower() or re.fullmatch(r"(?:Mc|Mac|O'|D'|De|Di|La|Le|Van)[A-Z][a-z]+|[A-Z][a-z]+-[A-Z][a-z]+", w)):
            break  # "JOHN", "iPhone", "SmartHub" are not names
        kept.append(w)
        if possessive:  # "Ayna Khadzhiyev's Cautionary Tale": the name ends at the 's
            break
    return kept


_CONTRACTION = re.compile(r"'(?:m|re|ve|ll|d|t)$")
# "Warrane, can I please speak to your boss?": a word at the start of a sentence, a comma, then a request
_VOCATIVE_AFTER = re.compile(r"(?i:,[ \t]+(?:can|could|would|will|please|do|did|are|have|i|we|you|let's|thanks|thank)\b)")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n][ \t\"'“(]*|\n[ \t]*[?•·*▪►#-]+[ \t]+)$")  # also after bullets, "## "
_LINE_END = re.compile(r"[ \t]*\n")
# Where a lone unknown capitalized word is a person: as a subject or object after these words ("Why is Glyceria so
# impulsive?", "but Akifumi just has to", "ask Zdravka"), not after an article or preposition ("the Canteen",
# "a street in Highveld", "about Canteen"), and not as the first word of a compound ("Cafe FAQ", checked after).
_PERSON_SLOT_BEFORE = re.compile(
    r"(?i:\b(?:is|was|are|were|and|but|or|with|by|for|said|asked|told|thanks|thank|dear|hi|hello|hey|tell|ask|let|"
    r"call|meet|met|saw|see|like|love|loves|miss|when|if|because|so|then|while|whom|whose|did|does|do|will|would|can|"
    r"could|should|has|have|had|says|say|knows|know|invite|invited|heard|hear))[ \t]+$"
)
# ... and the narrower slots that no city takes ("with Sydney", "visit Paris", "love Rome" do)
_PERSON_ONLY_SLOT_BEFORE = re.compile(
    r"(?i:\b(?:meet|met|ask|asked|tell|told|invite|invited|thank|thanks|dear|hi|hello|hey|marry|married|hug|hugged|kiss|"
    r"kissed|congratulate|congratulated))[ \t]+$"
)
_LINE_START_BULLETS = " \t?•·*▪►-"
_ARTICLE_BEFORE = re.compile(r"(?i:\b(?:the|a|an|this|our|your|its))[ \t]+$")  # "the Jenkins job": a thing


def _capitalized(text: str) -> str | None:
    """An all-lowercase text ("meet me at 2407 tawastintie 6, sé, portugal") with every word's first letter
    upper-cased, same length, so that the capitalization rules apply; None for any other text."""
    if not re.search(r"[a-z]", text) or re.search(r"[A-ZÀ-ÖØ-ÞͰ-Ͽ]", text):
        return None
    return re.sub(r"(?<![\w'’])[^\W\d_]", lambda c: c.group().upper() if len(c.group().upper()) == 1 else c.group(), text)


def _on_original(text: str, spans: list[Span]) -> list[Span]:
    return [Span(s.start, s.end, s.kind, text[s.start : s.end]) for s in spans]


def _find_persons(text: str) -> list[Span]:
    """Person names. An all-lowercase text ("follow up with benjamin a seiler") is searched capitalized, where
    only the rules with context (titles, context words, verbs, a contact block's first line) or known given /
    family names count, never a lone unknown word."""
    cased = _capitalized(text)
    return _find_persons_cased(text) if cased is None else _on_original(text, _find_persons_cased(cased, lowered=True))


def _find_persons_cased(text: str, lowered: bool = False) -> list[Span]:
    gaz = _gazetteers()
    out: list[Span] = []
    people = [m.span("names") for m in _PEOPLE_LIST.finditer(text)]
    firms = [m.span() for m in _FIRM.finditer(text)
             if not all(w in gaz.first for w in m.groups()) and not any(a <= m.start() < b for a, b in people)]
    speakers = {m.start(1) for m in _SPEAKER.finditer(text)}
    speakers = speakers if len(speakers) >= 2 else set()  # one "Note: ..." line is not a dialogue
    covered = 0
    first_word = len(text) - len(text.lstrip(_LINE_START_BULLETS + "\n"))  # where a contact block's name would start
    for w in _WORD_START.finditer(text):  # every capitalized word may start a name ("Dear Anna": skip "Dear")
        if w.start() < covered:
            continue
        m = _CAP_WORDS.match(text, w.start())
        words = _name_words([m.group(1), m.group(2), m.group(3)]) if m else []
        if lowered:  # "follow up with patricia desrosiers next week": the English word after the name is no part of it
            while len(words) > 1 and words[-1].lower() in gaz.english and words[-1] not in gaz.last:
                words.pop()
        if not words:
            continue
        end = m.start()
        for word in words:  # exact extent, with a middle initial ("Vanessa P. Hertzog") inside
            end = text.index(word, end) + len(word)
        before = text[max(0, m.start() - 40) : m.start()]
        # "Router X200", "Model Pro 3": a capitalized word followed by a code or number is a product
        after = text[end : end + 20]
        product_like = bool(re.match(r"[ \t]+[A-Za-z\-]*\d", after) or _THING_AFTER.match(after))
        org_like = bool(_ORG_AFTER.match(after))  # "Russell Investments", "Thomas and Sons", "Gradiant Research LLC"
        # "Barnett, Melton and Garcia" is a firm; "Anna, Maria and Sofia" are three people
        org_like = org_like or any(a <= m.start() < b for a, b in firms)
        # "Elisabeth Parks" is a person, "Marina Fort" and "King Forges" are streets
        street_like = words[-1] in _STREET_WORDS and words[-1] not in gaz.last
        # no word of a name is a frequent English word ("Will Power", "Grant Program" are not people)
        name_like = not any(word.lower() in gaz.common or (word.endswith("ly") and word not in gaz.first) for word in words)
        known = any(w in gaz.first or w in gaz.last or _surname_shaped(w) for w in words)  # "Csenger Gábor"
        # no word is an English word or a place: "Hijacinta Godina", "Glyceria" (not "Secretly Love", "Berlin")
        unknown = name_like and all(_unknown_word(w, gaz) for w in words)
        # two or more words that are no English word stand for a known name even in all-lowercase text ("nijito asano")
        sure = known or (len(words) >= 2 and unknown)
        at_start = bool(_SENTENCE_START.search(text, max(0, m.start() - 8), m.start()))
        # the last word of a longer proper noun: "Apache Tomcat", "(But Secretly Love)"; not "Ask Maciej"
        prev = re.search(r"[A-Z][\w\-]*[ \t]+$", before)
        after_cap = bool(prev) and not _SENTENCE_START.search(text, max(0, m.start() - len(before) + prev.start() - 8),
                                                              m.start() - len(before) + prev.start())
        # "69 Av Sidi Lakhmi", "214 Pavlou Drandaki": words after a house number are a street
        street_like = street_like or bool(re.search(r"\d[ \t]+$", before))
        # a title, a form label or a list of people says person even over a street word ("Dr. Lodge"); so does a
        # given name with a middle initial ("Brad L Isle"); a house number before the words still says street
        if street_like and not re.search(r"\d[ \t]+$", before) and (
                (words[0] in gaz.first and _MIDDLE_INITIAL.search(text, m.start(), end)) or _TITLE_BEFORE.search(before)
                or _LABEL_BEFORE.search(before) or any(a <= m.start() < b for a, b in people)):
            street_like = False
        if product_like or org_like or street_like:
            ok = False
        elif (len(words) >= 2 and name_like and (sure or not lowered) and _LINE_END.match(text, end)
              and m.start() == first_word and _HAS_DIGIT_OR_AT.search(text, end)):
            ok = True  # the first line of a contact block or signature: "Julcsa Kárpáthy\nMhealthcoach\n50668 ..."
        elif at_start and name_like and len(words) <= 2 and _VOCATIVE_AFTER.match(text, end) and words[0] not in gaz.places:
            ok = not lowered or sure
        elif (text.startswith("'s", end) and name_like and (len(words) >= 2 or known or unknown)
              and (words[0] not in gaz.places or _person_thing_after(text, end + 2))  # "Victoria's phone", not "Sydney's"
              and not re.search(r"(?i:\b(?:the|a|an|this|that|our|your|its))[ \t]+$", before)):
            ok = not lowered or sure  # a possessive: "Meza's song", "Pinabel Marcil's Cautionary Tales" (not "the Canteen's")
        elif _TITLE_BEFORE.search(before) or _LABEL_BEFORE.search(before) or any(a <= m.start() < b for a, b in people):
            ok = True
        elif m.start() in speakers and name_like and text.startswith(":", end) and words[0] not in _NOT_SPEAKER:
            ok = True  # a speaker label of a dialogue ("Ubul: What a wife.")
        elif _PERSON_CONTEXT_BEFORE.search(before) or _person_noun_before(before):
            # "said Maslin", "follow up with Benjamin A Seiler": after a person context any name-like words
            ok = words[0] in FIRST_NAMES or words[0] in gaz.first or (
                (len(words) >= 2 or unknown or (words[0] in gaz.last and name_like)) and (not lowered or sure))
        elif name_like and (_PERSON_VERB_AT_START if m.start() == 0 or text[m.start() - 1] == "\n"
                            else _PERSON_VERB_AFTER).match(text, end):
            ok = not lowered or sure
        elif (known or unknown) and words[0] not in gaz.places and _PERSON_ONLY_VERB_AFTER.match(text, end):
            ok = not lowered or sure
        elif (name_like and (known or unknown) and not after_cap and (rel := _PERSON_RELATION_AFTER.match(text, end))
              and (not rel.group("noun") or rel.group("noun") in _PERSON_NOUNS)):
            ok = not lowered or sure
        elif (at_start and len(words) == 1 and words[0] not in FIRST_NAMES and words[0].lower() in gaz.english
              and _IMPERATIVE_AFTER.match(text, end)):
            ok = False
        elif len(words) >= 2 and name_like:
            # "Maciej Borkowski", "Elita B Desaulniers", "Hijacinta Godina": a known given or family name, a middle
            # initial, or no English word at all
            ok = known or (not lowered and (unknown or bool(_MIDDLE_INITIAL.search(text, m.start(), end)))) or (
                sure and bool(_PERSON_SLOT_BEFORE.search(before)))  # lowercase: "have you heard nijito asano speak"
        elif (unknown and not lowered and not at_start and not after_cap
              and _PERSON_SLOT_BEFORE.search(before) and not re.match(r"[ \t]+[A-Z]", after)):
            ok = True  # one name-shaped word in a person's slot: "Why is Glyceria so impulsive?"
        elif (len(words) == 1 and words[0] in gaz.first and not lowered and not after_cap
              and _PERSON_ONLY_SLOT_BEFORE.search(before) and not re.match(r"[ \t]+[A-Z]", after)):
            ok = True  # a given name that is also a city, where no city goes: "Meet Austin", "I told Florence"
        elif lowered:
            ok = False  # a lone capitalized-by-us word: too many English words are somebody's name somewhere
        else:
            # a lone word needs no place of the same spelling ("Berlin | 180" is a city in a table, not a person)
            ok = (len(words) > 1 or (words[0] not in gaz.places and not after_cap)) and (
                words[0] in FIRST_NAMES
                or (len(words) == 1 and name_like and (words[0] in gaz.first or _surname_shaped(words[0])
                                                       or (words[0] in gaz.last and unknown and not at_start
                                                           and not _ARTICLE_BEFORE.search(before)))))
        if ok:
            out.append(Span(m.start(), end, "PERSON", text[m.start() : end]))
            covered = end
    taken = bytearray(len(text))  # 1 where a name was found: overlap tests in O(1), long documents stay linear
    for s in out:
        taken[s.start : s.end] = b"\1" * (s.end - s.start)
    for s in list(out):  # "Anna and Zdenka", "Maslin and Antonio": a name-shaped word joined to a name by "and"
        for m in (_AND_NAME_AFTER.match(text, s.end), _AND_NAME_BEFORE.search(text, max(0, s.start - 40), s.start)):
            if m and not taken[m.start(1) : m.end(1)].count(1):
                words = m.group(1).split()
                if all(w not in _NOT_NAME and w not in gaz.places and w.lower() not in gaz.common
                       and (w in gaz.first or w in gaz.last or _unknown_word(w, gaz)) for w in words):
                    out.append(Span(m.start(1), m.end(1), "PERSON", m.group(1)))
                    taken[m.start(1) : m.end(1)] = b"\1" * (m.end(1) - m.start(1))
    if out:  # "Ask Maciej Borkowski. Borkowski knows.": a word of a name found above is that name again
        known = {w for s in out for w in re.findall(r"\w{3,}", s.value) if w.lower() not in gaz.common}
        for w in _CAP_WORD.finditer(text):
            if w.group(1) in known and not taken[w.start()]:
                out.append(Span(w.start(), w.end(1), "PERSON", w.group(1)))
    # lowercase "patricia desrosiers": a known given name then a known family name, neither an English word
    for m in _LOWER_PAIR.finditer(text):
        first, last = m.group(1), m.group(2)
        if (first.capitalize() in gaz.first and last.capitalize() in gaz.last and first not in gaz.common
                and last not in gaz.common and not any(taken[m.start(1) : m.end(2)])):
            out.append(Span(m.start(1), m.end(2), "PERSON", text[m.start(1) : m.end(2)]))
    # lowercase names after an unmistakable context ("my name is john smith"; scrubadub #19)
    for m in _LOWER_NAME.finditer(text):
        first, last = m.group(1), m.group(2)
        if first.capitalize() in FIRST_NAMES or first.capitalize() in gaz.first or first not in gaz.english:
            end = m.end(2) if last and last.capitalize() not in _NOT_NAME and last not in _LOWER_STOP else m.end(1)
            out.append(Span(m.start(1), end, "PERSON", text[m.start(1) : end]))
    out += [Span(m.start(1), m.end(1), "PERSON", m.group(1)) for rx in (_CJK_NAME, _CJK_NAME_CTX) for m in rx.finditer(text)]
    for m in _THAI_NAME.finditer(text):  # a formal title or ชื่อ (name) is followed by the full name; คุณ by the given name only
        end = m.end("last") if m.group("formal") and m.group("last") else m.end("first")
        out.append(Span(m.start("first"), end, "PERSON", text[m.start("first") : end]))
    for rx in (_CJK_SPACED_NAME, _THAI_ISOLATED_NAME):  # the weakest rules: only where nothing else matched
        for m in rx.finditer(text):
            if not any(m.start() < s.end and s.start < m.end() for s in out):
                out.append(Span(m.start(), m.end(), "PERSON", m.group()))
    return out


# "Jenkins Agent", "Apache Server": a name followed by the kind of software or thing it names
_THING_AFTER = re.compile(
    r"[ \t]+(?:Agent|Server|Service|Services|System|Systems|Platform|Engine|Cloud|App|Portal|Hub|Framework|Library|"
    r"Database|Plugin|Module|Driver|Console|Studio|Toolkit|SDK|API|CLI)\b"
)
_ORG_AFTER = re.compile(
    r"[ \t]+(?:(?:and|&)[ \t]+(?:Sons|Co|Partners|Associates)\b|(?:LLC|LLP|Inc|Ltd|Corp|GmbH|AG|SA|plc|PLC|Co|Group|Holdings|"
    r"Partners|Associates|Investments|Capital|Research|Solutions|Systems|Technologies|Labs|Consulting|Bank|Foundation|"
    r"Institute|University|Hospital|Motors|Industries|Enterprises|Media|Software|Services)\b)"
)
_FIRM = re.compile(r"(?<![\w\-])([A-Z][\w\-]+),[ \t]+([A-Z][\w\-]+),?[ \t]+(?:and|&)[ \t]+([A-Z][\w\-]+)(?![\w\-]|[ \t]+[A-Z])")
_STREET_WORDS = frozenset(f"{_STRONG_SUFFIX}|{_WEAK_SUFFIX}".split("|"))
# Family-name endings of Slavic, Baltic, Nordic, Georgian, Armenian, Greek, Romanian and Turkish names:
# "Khadzhiyev", "Szczepańska", "Bergsveinsson", "Shervashidze". Only on capitalized, non-English words of 6+ letters.
_SURNAME_ENDING = re.compile(
    r"(?:ova|eva|ovna|evna|ovich|evich|vić|vič|vic|ić|ski|ska|sky|skaya|skiy|cki|cka|enko|chuk|yan|dze|shvili|sson|"
    r"dóttir|poulos|akis|escu|oglu|oğlu|yev|yeva|ov|ev)$"
)


# English derivational endings: "Ameliorated", "Upgradable" are words even where the vocabulary lacks them
_ENGLISH_ENDING = re.compile(r"(?:ed|able|ible|ing|tion|sion|ness|ment|ive|ous|ful|less|ize|ise|ity|ism|ist|ly)$")


def _unknown_word(word: str, gaz: "_Gazetteers") -> bool:
    """No English word (nor a hyphenated part of one: "Customer-focused"), no place, no English word ending, no
    part shorter than 3 letters ("Wi-Fi")."""
    return not (word in gaz.places or (len(word) >= 6 and _ENGLISH_ENDING.search(word))
                or any(len(part) < 3 or part.lower() in gaz.english or (part[-1] == "s" and part[:-1].lower() in gaz.english)
                       for part in word.split("-")))  # "Dashboards": a plural


def _surname_shaped(word: str) -> bool:
    return len(word) >= 6 and bool(_SURNAME_ENDING.search(word)) and word.lower() not in _gazetteers().common


_AND_NAME_AFTER = re.compile(rf"[ \t]+(?:and|&|or)[ \t]+({_NAME_WORD}(?:[ \t]+{_NAME_WORD})?)(?![ \t]+[A-Z])")
_AND_NAME_BEFORE = re.compile(rf"(?<![\w\-])({_NAME_WORD}(?:[ \t]+{_NAME_WORD})?)[ \t]+(?:and|&|or)[ \t]+$")
_MIDDLE_INITIAL = re.compile(r"[ \t][A-Z]\.?[ \t]")
_CAP_WORD = re.compile(r"(?<![\w@.'\-])((?:Mc|Mac|O')?[A-ZÀ-ÖØ-ÞĀ-ɏ][a-zà-öø-ÿā-ɏ'\-]{2,})(?:'s)?(?![\w@])")  # also "McDowell"
# two lowercase words, tried at every word start (the lookahead lets pairs overlap)
_LOWER_PAIR = re.compile(r"(?<![\w@./\-])(?=([a-zà-öø-ÿ][a-zà-öø-ÿ'\-]{2,})[ \t]+([a-zà-öø-ÿ][a-zà-öø-ÿ'\-]{2,})(?![\w@]))")


class _Gazetteers(NamedTuple):
    first: frozenset  # given names, any Latin-script locale of Faker (and romanized ja/zh)
    last: frozenset  # family names, the same
    common: frozenset  # frequent English words, lowercase: never a name on their own
    countries: frozenset
    places: frozenset  # one-word city/state names: never a person on their own ("Hotels in Berlin")
    english: frozenset  # ~21,000 lowercase words frequent in web text (SmolLM2's vocabulary): not name-shaped


@functools.cache
def _gazetteers() -> _Gazetteers:
    """The word lists in stillhouse/data/pii (built from Faker's locale data by build_gazetteers.py there),
    read once, at the first call (~20 ms), so that importing this module stays cheap."""
    folder = resources.files("stillhouse") / "data" / "pii"

    def read(name: str) -> frozenset:
        return frozenset(w for w in (folder / name).read_text(encoding="utf-8").split("\n") if w)

    common, countries = read("common_words.txt"), read("countries.txt")
    # names that are also frequent words, sentence openers or countries ("Will", "Can", "Jordan") only ever
    # count next to other evidence (a title, a context word, a second name word)
    drop = _NOT_NAME | countries | {w.capitalize() for w in common}
    return _Gazetteers(read("first_names.txt") - drop, read("last_names.txt") - drop, common, countries,
                       read("places.txt"), read("english_words.txt"))


_LOWER_STOP = frozenset("and or but from at in on and i im the a to is was my please".split())


# Earlier finders win overlaps: checksummed numbers before looser patterns, names last.
_FINDERS = [
    ("URL", _find_urls),  # first: a URL with "?email=a@b.c" in it is masked whole
    ("EMAIL", lambda t: [Span(m.start(), m.end(), "EMAIL", m.group()) for m in _EMAIL.finditer(t)]),
    ("IBAN", _find_ibans),
    ("CARD", _find_cards),
    ("SSN", _find_ssns),
    ("MY_NUMBER", lambda t: _find_checked_ids(t, _MY_NUMBER, _MY_NUMBER_CONTEXT, my_number_ok, "MY_NUMBER")),
    ("THAI_ID", lambda t: _find_checked_ids(t, _THAI_ID, _THAI_ID_CONTEXT, thai_id_ok, "THAI_ID")),
    ("IP", _find_ips),
    ("DOB", lambda t: [Span(m.start("date"), m.end("date"), "DOB", m.group("date")) for m in _DOB.finditer(t)]),
    ("PHONE", _find_phones),
    ("ADDRESS", _find_addresses),
    ("STREET", _find_streets),  # ADDRESS spans too, found without a digit
    ("PERSON", _find_persons),
]
_HAS_DIGIT_OR_AT = re.compile(r"[\d@]")


def find_pii(text: str) -> list[Span]:
    """Every piece of PII in `text`, sorted by position, never overlapping."""
    taken: list[Span] = []
    used = bytearray(len(text))  # 1 where a span was taken: the overlap test stays O(span length)
    has_digits = bool(_HAS_DIGIT_OR_AT.search(text))
    for kind, finder in _FINDERS:
        if not has_digits and kind not in ("PERSON", "URL", "STREET"):
            continue  # fast path: all other kinds need a digit or an @
        for span in sorted(finder(text), key=lambda s: (s.start, -(s.end - s.start))):
            if span.end > span.start and not any(used[span.start : span.end]):
                taken.append(span)
                used[span.start : span.end] = b"\1" * (span.end - span.start)
    return sorted(taken)


# ---------------------------------------------------------------------------------------------- masking


def mask(text: str, action: str = "mask", key: bytes | None = None) -> tuple[str, list[Span]]:
    """Replace the PII in `text`. Returns (new text, spans found in the ORIGINAL text).

    action: "mask" -> `[EMAIL]`, `[PHONE]`, ...; "pseudonymize" -> a fake value of the same kind, the same for
    the same original and key (HMAC-SHA256(key, kind, value) seeds the generator), so a person stays one person
    across records; "keep" -> text unchanged. Without a key, pseudonyms use a fixed public key: consistent but
    guessable, so callers that care (prep) pass a secret one.
    """
    if action not in ("mask", "pseudonymize", "keep"):
        raise ValueError(f"pii action must be mask, pseudonymize or keep, not {action!r}")
    spans = find_pii(text)
    if action == "keep" or not spans:
        return text, spans
    pieces, pos = [], 0
    for s in spans:
        pieces.append(text[pos : s.start])
        pieces.append(f"[{s.kind}]" if action == "mask" else pseudonym(s.kind, s.value, key or b"stillhouse-public-key"))
        pos = s.end
    pieces.append(text[pos:])
    return "".join(pieces), spans


def pseudonym(kind: str, value: str, key: bytes) -> str:
    """A fake `kind` value standing in for `value`, deterministic in (key, kind, value).

    Numbers keep their shape (separators, country code or trunk prefix, card network digit) and stay valid
    (Luhn, IBAN mod-97, issuable SSN), so downstream formats still parse; names, e-mails and addresses come
    from Faker in the script of the original (Latin, Japanese, Thai).
    """
    seed = int.from_bytes(hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()[:8], "big")
    rng = random.Random(seed)
    if kind == "PHONE":
        keep = re.match(r"\+?\(?\d{1,3}\)?|0\d?", value)  # country code / trunk prefix stay, the rest is random
        head = keep.group() if keep and (value.startswith("+") or value.startswith("0")) else ""
        return head + re.sub(r"\d", lambda _: str(rng.randrange(10)), value[len(head) :])
    if kind == "CARD":
        digits = [value[0]] + [str(rng.randrange(10)) for _ in re.findall(r"\d", value)[1:-1]]
        digits.append(str(next(c for c in range(10) if luhn_ok("".join(digits) + str(c)))))
        it = iter(digits)
        return re.sub(r"\d", lambda _: next(it), value)
    if kind == "IBAN":
        compact = re.sub(r"[\s-]", "", value).upper()
        bban = "".join(str(rng.randrange(10)) if c.isdigit() else chr(65 + rng.randrange(26)) for c in compact[4:])
        check = 98 - _iban_mod97(bban + compact[:2] + "00")
        new = f"{compact[:2]}{check:02d}{bban}"
        it = iter(new)
        return re.sub(r"[A-Za-z0-9]", lambda _: next(it), value)
    if kind == "SSN":
        area = rng.choice([a for a in range(1, 900) if a != 666])
        digits = f"{area:03d}{rng.randrange(1, 100):02d}{rng.randrange(1, 10000):04d}"
        it = iter(digits)
        return re.sub(r"\d", lambda _: next(it), value)
    if kind in ("MY_NUMBER", "THAI_ID"):  # same grouping, valid check digit (Thai: first digit kept, 1-8)
        body = [value[0] if kind == "THAI_ID" else str(rng.randrange(10))]
        body += [str(rng.randrange(10)) for _ in re.findall(r"\d", value)[1:-1]]
        ok = my_number_ok if kind == "MY_NUMBER" else thai_id_ok
        body.append(next(c for c in "0123456789" if ok("".join(body) + c)))
        it = iter(body)
        return re.sub(r"\d", lambda _: next(it), value)
    if kind == "IP":
        if ":" in value:  # a unique-local IPv6 address (fd00::/8): never routable, never someone's real one
            return str(ipaddress.IPv6Address((0xFD << 120) | rng.getrandbits(120)))
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind == "DOB":
        y, mth, d = rng.randrange(1945, 2006), rng.randrange(1, 13), rng.randrange(1, 29)
        if "年" in value:
            return f"{y}年{mth}月{d}日"
        if re.fullmatch(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}", value):
            sep = value[4]
            return f"{y}{sep}{mth:02d}{sep}{d:02d}"
        if re.fullmatch(r"\d{1,2}([-/.])\d{1,2}\1\d{2,4}", value):
            sep = re.search(r"[-/.]", value).group()
            return f"{mth:02d}{sep}{d:02d}{sep}{y}"
        month = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                 "October", "November", "December"][mth - 1]
        return f"{d} {month} {y}" if value[0].isdigit() else f"{month} {d}, {y}"
    fake = _faker(_locale_of(value), seed)
    if kind == "EMAIL":
        return f"{fake.user_name()}@example.{rng.choice(['com', 'org', 'net'])}"
    if kind == "URL":
        return f"https://example.{rng.choice(['com', 'org', 'net'])}/users/{fake.user_name()}"
    if kind == "PERSON":
        if _locale_of(value) == "en_US":
            n_words = len(value.split())
            return fake.first_name() if n_words == 1 else f"{fake.first_name()} {fake.last_name()}"
        sep = " " if (" " in value or "\u3000" in value) else ""
        return f"{fake.last_name()}{sep}{fake.first_name()}" if _locale_of(value) == "ja_JP" else f"{fake.first_name()}{sep}{fake.last_name()}"
    if kind == "ADDRESS":
        return fake.street_address() if _locale_of(value) == "en_US" else fake.address().replace("\n", " ")
    return f"[{kind}]"


def _locale_of(value: str) -> str:
    if re.search(r"[\u0e00-\u0e7f]", value):
        return "th_TH"
    if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", value):
        return "ja_JP"
    return "en_US"


_FAKERS: dict = {}


def _faker(locale: str, seed: int):
    from faker import Faker  # ~0.1 s; only when pseudonymizing

    fake = _FAKERS.get(locale)
    if fake is None:
        fake = _FAKERS[locale] = Faker(locale)
    fake.seed_instance(seed)
    return fake
