"""Find and mask personal data (PII) in text, offline, with no model: validated patterns plus context words.

    find_pii("Mail anna@corp.example or call +1 415-555-0134")
    -> [Span(5, 22, 'EMAIL', 'anna@corp.example'), Span(31, 46, 'PHONE', '+1 415-555-0134')]
    mask("call +1 415-555-0134")                -> ("call [PHONE]", [...])
    mask("call +1 415-555-0134", "pseudonymize", key=b"...")  -> ("call +1 803-209-6671", [...])

Kinds (each masks to `[KIND]`): EMAIL, PHONE (international, US, Japanese, Thai and other national formats),
CARD (Luhn-checked), IBAN (mod-97 and country length checked), SSN (US), IP (v4/v6), DOB (a date after "born
on", "DOB", ...), ADDRESS (house number + street suffix; Japanese 丁目 and Thai ถนน/ซอย forms), PERSON (after
titles and context words like "Name:", "contact", "employee", or a common first name from a small gazetteer).

Why no NER model or Presidio: Presidio downloads a spaCy model at start and exits offline (Presidio #1447), and
its e-mail recognizer fetches a list from the web (#1205). Everything here is `re` + checksums, so `serve` can
mask every request log line in microseconds. Checksums (Luhn, mod-97) and context words are what keep numbers
from being flagged at random; names are never taken from ALL-CAPS words, numbers or product-like tokens (the
PERSON false positives of Presidio #786/#1173 and scrubadub #22).

Import-light on purpose: only the standard library at import time; Faker is imported on the first pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
from typing import NamedTuple

KINDS = ["EMAIL", "PHONE", "CARD", "IBAN", "SSN", "IP", "DOB", "ADDRESS", "PERSON"]


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


# ---------------------------------------------------------------------------------------------- patterns

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")

# Runs of digit groups joined by single separators; which sub-run is a card or a phone is decided in code,
# so "card 4111 1111 1111 1111 2 times" still finds the card inside the longer run.
_CARD_RUN = re.compile(r"(?<![\w+.\-/])\d+(?:[ \-]\d+)*(?![\w/]|-\d)")
_CARD_CONTEXT = re.compile(r"(?i)\b(?:card|cc|credit|debit|visa|mastercard|amex|maestro)\b[^\n]{0,20}$")
_PHONE_SEP = r"[ \t.\-‐－()]"
_PHONE_RUN = re.compile(rf"(?<![\w+.\-/@])(?:\+|\()?\d+(?:{_PHONE_SEP}{{1,3}}\d+)*(?:\s?(?:x|ext\.?|#)\s?\d{{1,6}})?(?![\w/@]|-\d)")
_PHONE_EXT = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$")
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:phone|\btel\b|telephone|call|mobile|cell|fax|whatsapp|contact|reach|☎|電話|携帯|โทร|เบอร์)[^\n]{0,24}$"
)
_CURRENCY_BEFORE = re.compile(r"[$€£¥₹฿]\s*$|(?i:\b(?:usd|eur|gbp|jpy|thb|chf|amount|total|price|invoice)\b[^\n]{0,12})$")
_CURRENCY_AFTER = re.compile(r"^\s*(?:[$€£¥₹฿%]|(?i:usd|eur|gbp|jpy|yen|thb|baht|chf|dollars?|euros?|units?|items?|km|kg|m\b))")

_IBAN = re.compile(
    r"(?<![\w])(?:[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)"
    r"|[a-z]{2}\d{2}(?:[a-z0-9]{11,30}|(?: [a-z0-9]{4}){2,7}(?: [a-z0-9]{1,4})?))(?![\w])"
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
    "Wall|Ways|Well|Wells"
)
_ADDR_WORD = r"(?:[A-ZÀ-ÖØ-Þ][A-Za-zÀ-ÖØ-öø-ÿ'.\-]*|\d{1,3}(?:st|nd|rd|th))"
_UNIT = r"(?:,?[ \t]*\n?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Floor|Fl\.?|Room|Rm\.?|#)[ \t]*#?[\w\-]{1,6})"
_CITY_TAIL = r"(?:,?[ \t]*\n?[ \t]*[A-Z][A-Za-z .'\-]{1,40},[ \t]*[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?)"
_ADDRESS_US = re.compile(
    rf"(?<![\w\-/.])(?P<num>\d{{1,6}}[A-Za-z]?)(?:[ \t]+\d{{1,5}})?(?:[ \t]+{_ADDR_WORD}){{1,4}}?[ \t]+"
    rf"(?:(?P<strong>(?:{_STRONG_SUFFIX})\b\.?)|(?P<weak>(?:{_WEAK_SUFFIX})\b))(?:[ \t]+(?:N|S|E|W|NE|NW|SE|SW)\b\.?)?"
    rf"(?P<unit>{_UNIT})?(?P<tail>{_CITY_TAIL})?"
)
# European: "Augsburger Strasse 36", "Snellmaninkatu 55", "Rue de Tanger 29", "Avenida Pedro Ulisses 888".
_ADDRESS_EU = re.compile(
    r"(?<![\w\-/.])(?:\d{1,6}[ \t]+)?(?:[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ\-]*(?:strasse|straße|str\.|gasse|weg|allee|platz|katu|tie|kuja|gatan|vägen|"
    r"väg|vej|vegen|veien|gate|straat|laan|plein|utca|ulica|tér|braut)|[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ\-]*[ \t](?:Strasse|Straße|Str\.|"
    r"Gasse|Weg|Allee|Platz|Ring|Damm|Ufer|Straat|Laan|Vej)|(?:Rue|Avenue|Avenida|Rua|Calle|Carrer|Via|Viale|"
    r"Piazza|Corso|ul\.|Plac|Aleja|Boulevard)(?:[ \t]+(?:de|du|da|do|dos|das|del|della|di|des|la|le|d'))?(?:[ \t]+"
    r"[A-ZÀ-ÞĀ-ɏ][\wÀ-ɏ'\-]*){1,4})[ \t]+\d{1,5}[a-zA-Z]?(?![\w\-/])"
    rf"(?P<unit>{_UNIT})?"
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
_TITLE_BEFORE = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Mme|Mlle|Herr|Frau|Sr|Sra)\b\.?[ \t]+$")
# Form labels and self-introductions: whatever capitalized words follow are a name.
_LABEL_BEFORE = re.compile(
    r"(?i:\b(?:(?:full |first |last |customer |contact |employee |patient |client )?name|customer|contact|employee|"
    r"patient|client|requester|requested by|reported by|submitted by|assigned to|assignee|reporter|approved by|"
    r"prepared by|author|attn|attention|signed|owner)[ \t]*:[ \t]*$|\bmy name is[ \t]+$)"
)
# Person-ish context words: the next words are a name if they are two capitalized words or start with a
# gazetteer first name ("contact Maria Lopez", "employee Kim Ito"; but "contact Support" stays).
_PERSON_CONTEXT_BEFORE = re.compile(
    r"(?i:\b(?:contact|contacted|employee|staff member|customer|client|patient|agent|manager|supervisor|colleague|"
    r"coworker|technician|hi|hello|hey|dear|cc|thanks|regards|sincerely|i am|i'm|this is|spoke with|spoke to|"
    r"talked to|ask|tell)\b[ \t]*[,:\-]?[ \t\n]*)$"
)
_WORD_START = re.compile(r"(?<![\w@.'\-])[A-ZÀ-ÖØ-ÞĀ-ɏ]")
_CAP_WORDS = re.compile(rf"({_NAME_WORD})(?:[ \t]+(?:[A-Z]\.?[ \t]+)?({_NAME_WORD}))?(?:[ \t]+({_NAME_WORD}))?")
_LOWER_NAME = re.compile(r"(?i:\bmy name is|\bname[ \t]*:)[ \t]*([a-z][a-z'\-]+)(?:[ \t]+([a-z][a-z'\-]+))?")
_CJK_NAME = re.compile(r"([\u4e00-\u9fff]{1,3}[ \u3000]?[\u4e00-\u9fff]{1,3})(?:様|さん|氏|殿|先生|君)")
_CJK_NAME_CTX = re.compile(r"(?:氏名|名前|担当者?|お客様名)[ \t　]*[:：]?[ \t　]*([\u4e00-\u9fff\u3040-\u30ff]{1,4}(?:[ \u3000][\u4e00-\u9fff\u3040-\u30ff]{1,4})?)")
# Japanese names are written family name, space, given name; two short kanji runs with one space between them,
# outside Japanese prose (no kana or kanji around), are a name in mixed-language text ("approved by 高橋 裕美子").
_CJK_SPACED_NAME = re.compile(r"(?<![\u3040-\u30ff\u4e00-\u9fff\w])[\u4e00-\u9fff]{1,3}[ \u3000][\u4e00-\u9fff]{1,3}[\u3040-\u309f]{0,2}(?![\u3040-\u30ff\u4e00-\u9fff\w])")
# The same for Thai: exactly two Thai words (given name, family name) standing alone in non-Thai text.
_THAI_ISOLATED_NAME = re.compile(r"(?<![\u0e00-\u0e7f][ \t])(?<![\u0e00-\u0e7f\w])[\u0e00-\u0e7f]{2,}[ \t][\u0e00-\u0e7f]{2,}(?![\u0e00-\u0e7f\w]|[ \t][\u0e00-\u0e7f])")
_THAI_NAME = re.compile(r"(?:(?P<formal>นางสาว|นาย|นาง|ด\.ช\.|ด\.ญ\.)|คุณ|ชื่อ(?:คือ)?)[ \t]?(?P<first>[\u0e00-\u0e7f]{2,})(?:[ \t](?P<last>[\u0e00-\u0e7f]{2,}))?")

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
    Internal Confidential Public Restricted Private Personal General Human Resources HR IT Information
    Technology Data Email Phone Address Date Time Number Id Code Key Password Login Help Question Answer
    Yours Everyone Team Folks Colleagues Sir Madam Mr Mrs Ms Dr Prof Miss Subject Re Fwd Cc Attn
    United States Kingdom Republic Union Emirates Federation Island Islands City County State Province
    Research Investments Capital Solutions Partners Associates Holdings Technologies Labs Consulting Sons
    Kitchen Living Bedroom Bathroom Garage Garden Room Light Lights Home House Smart Hub App Cloud
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
        return (shortest <= len(digits) <= 19 and len(seps) <= 1 and text[s] != "+" and luhn_ok(digits)
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
        context = bool(_PHONE_CONTEXT.search(before))
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
    out = []
    for m in _ADDRESS_US.finditer(text):
        num = m.group("num")
        if m.group("weak") and not (m.group("unit") or m.group("tail")) and (len(num) < 3 or re.fullmatch(r"(?:19|20)\d\d", num)):
            continue  # "3 Data Centers", "in 2023 Acme Park": a weak suffix needs a real-looking house number
        words = m.group()[len(m.group("num")) :].split()
        if any(w.isupper() and len(w) > 3 for w in words):  # "12 MONTHS FREE Way" is a heading, not an address
            continue
        out.append(Span(m.start(), m.end(), "ADDRESS", m.group()))
    for rx in (_ADDRESS_EU, _ADDRESS_JA, _ADDRESS_TH):
        for m in rx.finditer(text):
            value = m.group().rstrip(". ")  # a Thai address at the end of a sentence keeps its full stop
            out.append(Span(m.start(), m.start() + len(value), "ADDRESS", value))
    return out


def _name_words(words: list[str | None]) -> list[str]:
    """The leading words that look like parts of a name: Capitalized (not ALL-CAPS), not a known non-name."""
    kept = []
    for w in words:
        possessive = bool(w) and w.endswith("'s")
        w = w[:-2] if possessive else w
        if not w or len(w) < 2 or w in _NOT_NAME or not w[0].isupper():
            break
        if not (w[1:].islower() or re.fullmatch(r"(?:Mc|Mac|O'|D'|De|Di|La|Le|Van)[A-Z][a-z]+|[A-Z][a-z]+-[A-Z][a-z]+", w)):
            break  # "JOHN", "iPhone", "SmartHub" are not names
        kept.append(w)
        if possessive:  # "Ayna Khadzhiyev's Cautionary Tale": the name ends at the 's
            break
    return kept


def _find_persons(text: str) -> list[Span]:
    out: list[Span] = []
    covered = 0
    for w in _WORD_START.finditer(text):  # every capitalized word may start a name ("Dear Anna": skip "Dear")
        if w.start() < covered:
            continue
        m = _CAP_WORDS.match(text, w.start())
        words = _name_words([m.group(1), m.group(2), m.group(3)]) if m else []
        if not words:
            continue
        end = m.start()
        for word in words:  # exact extent, with a middle initial ("Vanessa P. Hertzog") inside
            end = text.index(word, end) + len(word)
        before = text[max(0, m.start() - 40) : m.start()]
        # "Router X200", "Model Pro 3": a capitalized word followed by a code or number is a product
        after = text[end : end + 20]
        product_like = bool(re.match(r"[ \t]+[A-Za-z\-]*\d", after))
        org_like = bool(_ORG_AFTER.match(after))  # "Russell Investments", "Thomas and Sons", "Gradiant Research LLC"
        if product_like or org_like:
            ok = False
        elif _TITLE_BEFORE.search(before) or _LABEL_BEFORE.search(before):
            ok = True
        elif _PERSON_CONTEXT_BEFORE.search(before):
            ok = words[0] in FIRST_NAMES or len(words) >= 2
        else:
            ok = words[0] in FIRST_NAMES
        if ok:
            out.append(Span(m.start(), end, "PERSON", text[m.start() : end]))
            covered = end
    # lowercase names after an unmistakable context ("my name is john smith"; scrubadub #19)
    for m in _LOWER_NAME.finditer(text):
        first, last = m.group(1), m.group(2)
        if first.capitalize() in FIRST_NAMES:
            end = m.end(2) if last and last.capitalize() not in _NOT_NAME and last not in _LOWER_STOP else m.end(1)
            out.append(Span(m.start(1), end, "PERSON", text[m.start(1) : end]))
    out += [Span(m.start(1), m.end(1), "PERSON", m.group(1)) for rx in (_CJK_NAME, _CJK_NAME_CTX) for m in rx.finditer(text)]
    for m in _THAI_NAME.finditer(text):  # a formal title is followed by the full name; คุณ by the given name only
        end = m.end("last") if m.group("formal") and m.group("last") else m.end("first")
        out.append(Span(m.start("first"), end, "PERSON", text[m.start("first") : end]))
    for rx in (_CJK_SPACED_NAME, _THAI_ISOLATED_NAME):  # the weakest rules: only where nothing else matched
        for m in rx.finditer(text):
            if not any(m.start() < s.end and s.start < m.end() for s in out):
                out.append(Span(m.start(), m.end(), "PERSON", m.group()))
    return out


_ORG_AFTER = re.compile(
    r"[ \t]+(?:(?:and|&)[ \t]+(?:Sons|Co|Partners|Associates)\b|(?:LLC|LLP|Inc|Ltd|Corp|GmbH|AG|SA|plc|Co|Group|Holdings|"
    r"Partners|Associates|Investments|Capital|Research|Solutions|Systems|Technologies|Labs|Consulting|Bank|Foundation|"
    r"Institute|University|Hospital|Motors|Industries|Enterprises|Media|Software|Services)\b)"
)
_LOWER_STOP = frozenset("and or but from at in on and i im the a to is was my please".split())


# Earlier finders win overlaps: checksummed numbers before looser patterns, names last.
_FINDERS = [
    ("EMAIL", lambda t: [Span(m.start(), m.end(), "EMAIL", m.group()) for m in _EMAIL.finditer(t)]),
    ("IBAN", _find_ibans),
    ("CARD", _find_cards),
    ("SSN", _find_ssns),
    ("IP", _find_ips),
    ("DOB", lambda t: [Span(m.start("date"), m.end("date"), "DOB", m.group("date")) for m in _DOB.finditer(t)]),
    ("PHONE", _find_phones),
    ("ADDRESS", _find_addresses),
    ("PERSON", _find_persons),
]
_HAS_DIGIT_OR_AT = re.compile(r"[\d@]")


def find_pii(text: str) -> list[Span]:
    """Every piece of PII in `text`, sorted by position, never overlapping."""
    taken: list[Span] = []
    has_digits = bool(_HAS_DIGIT_OR_AT.search(text))
    for kind, finder in _FINDERS:
        if not has_digits and kind not in ("PERSON",):
            continue  # fast path: all other kinds need a digit or an @
        for span in sorted(finder(text), key=lambda s: (s.start, -(s.end - s.start))):
            if span.end > span.start and not any(span.start < t.end and t.start < span.end for t in taken):
                taken.append(span)
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
