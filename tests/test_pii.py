"""PII detection and masking: each detector on positives and on the look-alikes it must leave alone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pii_gold import hard_negatives, multilingual_gold, my_number
from stillhouse.pii import KINDS, Span, find_pii, iban_ok, luhn_ok, mask, my_number_ok, pseudonym, thai_id_ok


def kinds(text: str) -> list[tuple[str, str]]:
    return [(s.kind, s.value) for s in find_pii(text)]


def values(text: str, kind: str) -> list[str]:
    return [s.value for s in find_pii(text) if s.kind == kind]


# ------------------------------------------------------------------------------------------- detectors


def test_email():
    assert values("write to anna.smith+hr@corp.example.com today.", "EMAIL") == ["anna.smith+hr@corp.example.com"]
    assert values("see @mentions and user@localhost", "EMAIL") == []


@pytest.mark.parametrize("text,phone", [
    ("call +1 415-555-0134 today", "+1 415-555-0134"),
    ("call (415) 555-0134.", "(415) 555-0134"),
    ("desk 415.555.0134 or mobile", "415.555.0134"),
    ("ext: 706-695-0699x20575", "706-695-0699x20575"),
    ("intl 001-958-999-1394x411", "001-958-999-1394x411"),
    ("UK office +44 20 7946 0958", "+44 20 7946 0958"),
    ("東京 03-1234-5678 まで", "03-1234-5678"),  # Japanese landline
    ("携帯 090-1234-5678", "090-1234-5678"),  # Japanese mobile
    ("フリーダイヤル 0120-123-456", "0120-123-456"),
    ("โทร 081-234-5678 ครับ", "081-234-5678"),  # Thai mobile
    ("Bangkok 02-123-4567", "02-123-4567"),  # Thai landline
    ("+66 2 123 4567 (Bangkok)", "+66 2 123 4567"),
    ("+81 90 1234 5678", "+81 90 1234 5678"),
    ("phone: 4155550134", "4155550134"),  # bare digits next to "phone"
    ("Desk: 5403926876\nFax: none", "5403926876"),
    ("781 1704 office", "781 1704"),  # the label after the number
])
def test_phone_formats(text, phone):
    assert values(text, "PHONE") == [phone]


@pytest.mark.parametrize("text", [
    "released on 2024-01-15 with 12 fixes",
    "On 2007-01-17 23:08:55 the job ran",
    "we shipped 10 000 000 units",
    "the invoice total is $ 1 234 567",
    "version 2.14.4 and build 20240115",
    "order number 123456789",  # bare digits, no phone context
    "order KRL-164867 and TCK-1042-5566",
])
def test_phone_look_alikes_are_not_phones(text):
    assert values(text, "PHONE") == []


def test_luhn_and_cards():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert values("card 4111 1111 1111 1111 on file", "CARD") == ["4111 1111 1111 1111"]
    assert values("amex 3782 822463 10005.", "CARD") == ["3782 822463 10005"]
    assert values("card 4111-1111-1111-1111", "CARD") == ["4111-1111-1111-1111"]
    # one digit off: fails Luhn, so it is not a card -- and no part of it becomes a phone number either
    assert kinds("card 4111 1111 1111 1112 on file") == []
    assert kinds("ref 1234567890123456") == []  # Luhn-invalid 16 digits
    assert values("0000 0000 0000 0000", "CARD") == []  # passes Luhn trivially, never issued


def test_iban_mod97():
    assert iban_ok("DE89 3704 0044 0532 0130 00") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89 3704 0044 0532 0130 01")  # check digits do not match
    assert not iban_ok("DE89 3704 0044 0532 0130")  # too short for Germany
    assert not iban_ok("KR9092546565US")  # a parcel number: not an IBAN country
    assert values("pay to DE89 3704 0044 0532 0130 00 IS fine", "IBAN") == ["DE89 3704 0044 0532 0130 00"]
    assert values("account GB82WEST12345698765432.", "IBAN") == ["GB82WEST12345698765432"]
    assert kinds("pay to DE89 3704 0044 0532 0130 01 please") == []  # and not a phone


def test_ssn():
    assert values("SSN 123-45-6789.", "SSN") == ["123-45-6789"]
    assert values("SSN: 123456789", "SSN") == ["123456789"]
    for never_issued in ("000-12-3456", "666-12-3456", "912-12-3456", "123-00-4567", "123-45-0000"):
        assert values(f"id {never_issued}", "SSN") == []


def test_ip_addresses():
    assert values("server 192.168.1.20 is down", "IP") == ["192.168.1.20"]
    assert values("link-local fe80::1ff:fe23:4567:890a here", "IP") == ["fe80::1ff:fe23:4567:890a"]
    assert values("2001:db8::8a2e:370:7334", "IP") == ["2001:db8::8a2e:370:7334"]
    assert values("version 1.2.3.4.5 and 999.1.1.1 and 10:30:00", "IP") == []


def test_dob_needs_context():
    assert values("She was born on March 3, 1985.", "DOB") == ["March 3, 1985"]
    assert values("DOB: 1990-07-14", "DOB") == ["1990-07-14"]
    assert values("date of birth 12/23/1997", "DOB") == ["12/23/1997"]
    assert values("生年月日：1985年3月3日", "DOB") == ["1985年3月3日"]
    assert values("The policy is effective March 1, 2024.", "DOB") == []


def test_addresses():
    assert values("ship to 1600 Pennsylvania Avenue NW today", "ADDRESS") == ["1600 Pennsylvania Avenue NW"]
    assert values("at 78876 Jesse Drive Apt. 4, Figueroaland, GA 99883.", "ADDRESS") == [
        "78876 Jesse Drive Apt. 4, Figueroaland, GA 99883"]
    assert values("we moved to Augsburger Strasse 36 last year", "ADDRESS") == ["Augsburger Strasse 36"]
    assert values("住所: 北海道横浜市青葉区上野公園17丁目18番8号", "ADDRESS") == ["北海道横浜市青葉区上野公園17丁目18番8号"]
    assert values("ที่อยู่ 942/05 ถนนดาวอร่าม ตำบลบ่อก้อนแก้ว จังหวัดสระบุรี 79810", "ADDRESS") == [
        "942/05 ถนนดาวอร่าม ตำบลบ่อก้อนแก้ว จังหวัดสระบุรี 79810"]
    # "3 Data Centers", a year before a weak suffix: not addresses
    assert values("we run 3 Data Centers and in 2023 Acme Park opened", "ADDRESS") == []


@pytest.mark.parametrize("text,name", [
    ("Please ask Mr. Ferko Takáts about it.", "Ferko Takáts"),
    ("Name: Rubija", "Rubija"),
    ("please contact Maria Lopez today", "Maria Lopez"),
    ("Employee Chloe Tucker took leave.", "Chloe Tucker"),
    ("Dear Anna, thanks.", "Anna"),
    ("my name is john smith and I live here", "john smith"),  # lowercase, unmistakable context
    ("approved by Vanessa P. Hertzog yesterday", "Vanessa P. Hertzog"),
    ("東京の山田太郎様へ", "山田太郎"),
    ("approved by 高橋 裕美子 (Tokyo)", "高橋 裕美子"),
    ("ติดต่อคุณสมชาย ได้เลย", "สมชาย"),
    ("Bangkok: ไชยภพ ชำนาญวาด, 042 449390", "ไชยภพ ชำนาญวาด"),
])
def test_person_names(text, name):
    assert values(text, "PERSON") == [name]


@pytest.mark.parametrize("text", [
    "THE ACME ROUTER MANUAL SAYS JOHN SMITH IS OUT",  # ALL-CAPS is not a name
    "The Router X200 ships with Smart Hub firmware",  # products
    "Contact Support Team for help.",
    "Customer Service and Human Resources approve leave in January.",
    "Russell Investments and Thomas and Sons are vendors.",  # first names inside organization names
    "Call 555 when the Kitchen Light blinks 3 times",
])
def test_no_person_false_positives(text):
    assert values(text, "PERSON") == []


def test_my_number_check_digit():
    import random

    rng = random.Random(0)
    for _ in range(50):  # the generator computes the check digit independently (tests/pii_gold.py)
        n = my_number(rng)
        assert my_number_ok(n)
        assert not my_number_ok(n[:11] + str((int(n[11]) + 1) % 10))  # any other last digit fails
    assert not my_number_ok("12345678901") and not my_number_ok("1234567890123")
    good = my_number(rng)
    assert values(f"マイナンバー：{good}", "MY_NUMBER") == [good]
    assert values(f"番号 {good[:4]} {good[4:8]} {good[8:]} です", "MY_NUMBER") == [f"{good[:4]} {good[4:8]} {good[8:]}"]
    assert values(f"order {good} shipped", "MY_NUMBER") == []  # bare 12 digits need "マイナンバー", "個人番号"
    bad = good[:11] + str((int(good[11]) + 1) % 10)
    assert values(f"マイナンバー：{bad}", "MY_NUMBER") == []


def test_thai_national_id_checksum():
    valid = "1101700230708"
    # checksum written out from the definition: (11 - sum(d_i * (13 - i)) mod 11) mod 10
    check = (11 - sum(int(d) * (13 - i) for i, d in enumerate(valid[:12])) % 11) % 10
    valid = valid[:12] + str(check)
    assert thai_id_ok(valid)
    assert not thai_id_ok(valid[:12] + str((check + 1) % 10))
    assert not thai_id_ok("0" + valid[1:])  # category digit is 1-8
    dashed = f"{valid[0]}-{valid[1:5]}-{valid[5:10]}-{valid[10:12]}-{valid[12]}"
    assert values(f"เลขประจำตัวประชาชน {valid}", "THAI_ID") == [valid]
    assert values(f"ID: {dashed}.", "THAI_ID") == [dashed]  # the printed grouping counts on its own
    assert values(f"tracking {valid}", "THAI_ID") == []  # bare 13 digits need context


@pytest.mark.parametrize("text,url", [
    ("profile https://intranet.example.com/users/jsmith.", "https://intranet.example.com/users/jsmith"),
    ("see http://www.example.edu/~jdoe/cv.pdf", "http://www.example.edu/~jdoe/cv.pdf"),
    ("crm: https://crm.example.com/c?email=ann%40corp.example&x=1", "https://crm.example.com/c?email=ann%40corp.example&x=1"),
])
def test_personal_urls(text, url):
    assert values(text, "URL") == [url]


def test_plain_urls_are_kept():
    assert kinds("docs at https://docs.python.org/3/library/re.html and www.example.com/pricing") == []


@pytest.mark.parametrize("text,address", [
    ("send it to 41086 Kiannonkatu 98\n Suite 464\n OULU\n\n Finland 80896.", "41086 Kiannonkatu 98\n Suite 464\n OULU\n\n Finland 80896"),
    ("at 370 Fourth Avenue Suite 697, Mora de Rubielos, Spain 16200, and then", "370 Fourth Avenue Suite 697, Mora de Rubielos, Spain 16200"),
    ("Meet me at PSC 1437, Box 3833\nAPO AA 66791", "PSC 1437, Box 3833\nAPO AA 66791"),
    ("He lives on Dalmatinova 68 with his sister.", "Dalmatinova 68"),  # no street word: the context says so
    ("to 05405 Wesselényi u. 94.\n Suite 741\n Hungary 18695? I am", "05405 Wesselényi u. 94.\n Suite 741\n Hungary 18695"),
])
def test_address_tails_boxes_and_context(text, address):
    assert values(text, "ADDRESS") == [address]


def test_address_tail_needs_a_postcode_unit_or_country():
    # a town-like word after the street is not taken on its own, nor is "Chapter 12" without an address context
    assert values("I walked down 12 Main Street Yesterday Morning", "ADDRESS") == ["12 Main Street"]
    assert values("Read Chapter 12 before Monday", "ADDRESS") == []


@pytest.mark.parametrize("text,name", [
    ("Maybe it's under Elita B Desaulniers", "Elita B Desaulniers"),  # middle initial, no gazetteer needed
    ("follow up with patricia desrosiers next week", "patricia desrosiers"),  # lowercase, both names known
    ("Why is Katrine so impulsive?", "Katrine"),  # a given name from Faker's Danish list
    ("directed by Wacława Adamska and others", "Wacława Adamska"),  # a Polish family-name ending
    ("ติดต่อ ชื่อ สมชาย ใจดี อีเมล a@b.co", "สมชาย ใจดี"),  # after ชื่อ (name), the full name
    ("担当者は中村 聡太郎です。", "中村 聡太郎"),
])
def test_person_names_from_gazetteers(text, name):
    assert values(text, "PERSON") == [name]


def test_person_coreference_and_firms():
    assert values("Ask Maciej Borkowski. Borkowski knows.", "PERSON") == ["Maciej Borkowski", "Borkowski"]
    assert values("Mclean, Ward and Wright signed the agreement.", "PERSON") == []  # a firm's name
    assert values("The Princess Royal visited Marina Fort.", "PERSON") == []


@pytest.mark.parametrize("text, names", [
    # names not in any gazetteer, found by their position alone
    ("Ubul: What a wife.\nNicole: Really?", ["Ubul", "Nicole"]),  # speaker labels of a dialogue
    ("Our 3 founders: Kónya, Becker and Vasquez.", ["Kónya", "Becker", "Vasquez"]),  # a list after "founders:"
    ("Trivo lives on Main Street.", ["Trivo"]),  # a name then a person verb, also at the start of a line
    ("I'd like to join accounts with ms. Quinzia", ["Quinzia"]),  # a lowercase title
    ("What's your name? Shintarou Hamaguchi", ["Shintarou Hamaguchi"]),
])
def test_person_names_in_strong_positions(text, names):
    assert values(text, "PERSON") == names


@pytest.mark.parametrize("text", [
    "Note: restart the service after the upgrade.",  # one label line is not a dialogue
    "Warning: Disk almost full\nError: Write failed",  # log levels, not speakers
    "Dear customer,\nStatus: shipped\nCarrier: ground",
    "Our partners: Barnett, Melton and Garcia handle the case.",  # a firm after a noun that is not a person list
    "Kubernetes restarted the pod.\nNginx said nothing.",  # "said" after a product name at a line start
])
def test_strong_position_rules_leave_non_names(text):
    assert values(text, "PERSON") == []

@pytest.mark.parametrize("text, names", [
    # names in no gazetteer, each sentence missed before the second recall pass (issue #7)
    ("Quilla Vranckaerts\nSenior buyer\n+47 412 33 908\nquilla@fjord.example", ["Quilla Vranckaerts"]),  # a contact block's first line
    ("I'm Teodora K. Vrabcová and I run the lab.", ["Teodora K. Vrabcová"]),  # "I'm" is no part of the name
    ("Oskarine, can you send me the invoice?", ["Oskarine"]),  # addressed at the start of a request
    ("The report cites Havrilla's notes twice.", ["Havrilla"]),  # a possessive of a known family name
    ("The minutes were taken by Ysolde Brannagh last week.", ["Ysolde Brannagh"]),  # two words, neither English
    ("Is Zdravka coming to the review?", ["Zdravka"]),  # one non-English word inside a sentence
    ("please follow up with dorotea m. kvasnik about the refund", ["dorotea m. kvasnik"]),  # all-lowercase text
    ("my name is zorislava", ["zorislava"]),
    ("We asked Professor Ulbrecht twice.", ["Ulbrecht"]),  # a title other than Mr/Ms/Dr, not part of the name
    ("Thanks for the help.\nCheers,\nYlvane", ["Ylvane"]),  # the closing line of a letter
    ("Ask Anna and Quilvarsa, not Dashboards.", ["Anna", "Quilvarsa"]),  # "and" a name; not a plural noun
])
def test_person_names_without_gazetteer(text, names):
    assert values(text, "PERSON") == names


@pytest.mark.parametrize("text, address", [
    # each missed (or cut short) before the second recall pass (issue #7)
    ("Ship it to 4410 Kirkeveien 12\nLillehammer\n, NO\n 2609 please.", "4410 Kirkeveien 12\nLillehammer\n, NO\n 2609"),
    ("Our office: 88 Rua das Flores 120 Apt. 4\n, Braga\n, BR\n 4700", "88 Rua das Flores 120 Apt. 4\n, Braga\n, BR\n 4700"),
    ("Send the parcel to 3100 Lindenweg 14 Suite 2 Kerkrade.", "3100 Lindenweg 14 Suite 2 Kerkrade"),  # town ends it
    ("Address:\n77 Pine Hollow Road Apt. 3 Millbrook Dutchess.", "77 Pine Hollow Road Apt. 3 Millbrook Dutchess"),
    ("Her studio is at 14 rue des Lilas near the park.", "14 rue des Lilas"),  # number, street type, name
    ("meet me at 3021 havnegata 9, bergen, norway", "3021 havnegata 9, bergen, norway"),  # all-lowercase text
    ("• Ines Moravec\n• 55 Kastanienallee 3\n• Apt. 7\n• Görlitz\n• Germany 02826",
     "55 Kastanienallee 3\n• Apt. 7\n• Görlitz\n• Germany 02826"),  # bulleted lines
    ("3401 Plateia Eleftherias 9\n Suite 12\n ΛΕΜΕΣΟΣ (LIMASSOL)\n Cyprus (Greek) 3035",
     "3401 Plateia Eleftherias 9\n Suite 12\n ΛΕΜΕΣΟΣ (LIMASSOL)\n Cyprus (Greek) 3035"),  # Greek town, "(Greek)"
    ("Leave it at Corvin and Lindenweg 14.", "Corvin and Lindenweg 14"),  # an intersection without "corner of"
    ("Kasia Wrona\nBuyer\nBeata and ul. Miodowa 12", "Beata and ul. Miodowa 12"),  # ... on a line of its own
    ("It is 143 31 rue de la Hulotais Apt. 087 SAINT-PRIEST France",
     "143 31 rue de la Hulotais Apt. 087 SAINT-PRIEST France"),  # postcode, number, street type, name, unit
])
def test_address_forms_of_the_second_pass(text, address):
    assert values(text, "ADDRESS") == [address]


@pytest.mark.parametrize("text", [
    "Release 2.4 of Apache Tomcat ships today.",  # the second word of a product name is not a lone name
    "We loved it (But Secretly Hated It).",  # English words in a title-case phrase
    "Customer-focused dashboards went live.",  # hyphenated English words
    "Jenkins Agent restarted twice.",  # a surname naming software
    "Wide text: the café’s Wi-Fi is slow.",  # short hyphenated parts: a product word
    "card 4111 1111 1111 1112 on file",  # lowercase text: a number after a number is no postcode
    "I'm happy with the result.",
    "we drove 12 times on the way home",  # lowercase text capitalized for the search: sentence words stop it
    "The office in Lillehammer is closed.",  # a town after "in"
    "Why did the Canteen close?",  # an unknown word after an article is a thing
])
def test_second_pass_rules_leave_look_alikes(text):
    assert kinds(text) == []


@pytest.mark.parametrize("text, address", [
    # each missed (or cut short) before the fourth recall pass (issue #7)
    ("Sofie lives on 69 Av Sidi Lakhmi street.", "69 Av Sidi Lakhmi"),  # no street word but "street" after it
    ("Please return to Leon and Eyrarodda 66 in case of an issue.", "Leon and Eyrarodda 66"),  # an intersection
    ("The restaurant is at 9816 214 Pavlou Drandaki.", "9816 214 Pavlou Drandaki"),  # numbers, then a name
    ("The title refers to Árpád fejedelem útja 3. street", "Árpád fejedelem útja 3"),  # Hungarian street type
    ("I live at Dowergring 6987\n28343 Kamenz.", "Dowergring 6987\n28343 Kamenz"),  # a postcode on the next line
    ("Send it to Drubinstraße 47-26\n06690 Groß-Gerau today", "Drubinstraße 47-26\n06690 Groß-Gerau"),  # town after postcode
    ("Send it to 5, avenue Samson\n57583 LacroixBourg today", "5, avenue Samson\n57583 LacroixBourg"),
    ("Send it to pl. Narutowicza 08/37\n64-567 Pabianice today", "pl. Narutowicza 08/37\n64-567 Pabianice"),
    ("Send it to Strada Taliercio, 47 now", "Strada Taliercio, 47"),
    ("Send it to Via Elisa, 991 Appartamento 84\n39053, Cornedo (BZ).", "Via Elisa, 991 Appartamento 84\n39053, Cornedo (BZ)"),
    ("Send it to Gerritsingel 7\n1317 YB\nSchijf.", "Gerritsingel 7\n1317 YB\nSchijf"),  # Dutch postcode, town line
    ("Send it to Zelenjak 9a/0\n36625 Čakovec.", "Zelenjak 9a/0\n36625 Čakovec"),  # house number / flat
    ("Send it to 17 Jones Light\nNorth Holly\nS6 7LJ today", "17 Jones Light\nNorth Holly\nS6 7LJ"),  # weak suffix + tail
    ("Send it to 1777 Kramer Court\nJohnsonfurt, NS T2L 6K1 today", "1777 Kramer Court\nJohnsonfurt, NS T2L 6K1"),
    ("Send it to Salgótarjáni út 250.\nH-9063 Györgyfalu today", "Salgótarjáni út 250.\nH-9063 Györgyfalu"),
    ("Send it to 04862 Victor Hugo u. 49. Suite 638 today", "04862 Victor Hugo u. 49. Suite 638"),
    ("She lives on Baker Street.", "Baker Street"),  # a street without a house number
])
def test_address_forms_of_the_fourth_pass(text, address):
    assert values(text, "ADDRESS") == [address]


@pytest.mark.parametrize("text", [
    "go to Chapter 5 now", "set it to Zigbee 3 mode", "Upgrade to Python 3.12 today", "We meet at 5 Guys.",
    "The crash on Wall Street", "I was at 3 Kids Club.", "INCUBATE 24/7 NETWORKS", "The Spring 2024 release",
])
def test_fourth_pass_address_rules_leave_look_alikes(text):
    assert values(text, "ADDRESS") == []


@pytest.mark.parametrize("text, names", [
    # each missed before the fourth recall pass (issue #7)
    ("It may be that McDowell was influenced by Adam McDowell.", ["McDowell", "Adam McDowell"]),  # "Mc" coreference
    ("have you heard nijito asano speak yet?", ["nijito asano"]),  # lowercase, two words that are no English word
    ("Congratulations Dzhambek, well done!", ["Dzhambek"]),  # a greeting
    ("My wife Quionia is here.", ["Quionia"]),  # a relative
    ("Quionia grew up in Oslo.", ["Quionia"]),  # a verb only a person takes
    ("We asked Dr. Lodge twice.", ["Lodge"]),  # a title beats a street word
    ("directed by Brad L Isle", ["Brad L Isle"]),  # so does a given name with a middle initial
    ("The report was sent to Nowak yesterday.", ["Nowak"]),  # a lone family name that is no English word
])
def test_person_names_of_the_fourth_pass(text, names):
    assert values(text, "PERSON") == names


@pytest.mark.parametrize("text", ["Docker wants more memory.", "Welcome Kubernetes users", "Kubernetes is from Google",
                                  "the Jenkins job failed"])
def test_fourth_pass_person_rules_leave_products(text):
    assert values(text, "PERSON") == []


@pytest.mark.parametrize("text, names", [
    # each missed before the fifth recall pass (issue #7)
    ("Victoria is my sister.", ["Victoria"]),  # a given name that is also a place, then a relative
    ("Victoria's phone number is 555-0134.", ["Victoria"]),  # ... whose possession only a person has
    ("Brad will join us on Monday.", ["Brad"]),  # a small town somewhere, mostly a given name: no place any more
    ("Zorvana and I went to the store.", ["Zorvana"]),  # "<name> and I"
    ("Ilvetta told me the news.", ["Ilvetta"]),  # a verb with a person as object, at the start of a line
    ("He introduced himself as Tibrek.", ["Tibrek"]),
    ("I got a letter from Quellisa.", ["Quellisa"]),
    ("Good luck Dmarko!", ["Dmarko"]),
    ("Meet Austin, our new intern.", ["Austin"]),  # a city-named person where no city goes
    ("I told Florence the news.", ["Florence"]),
])
def test_person_names_of_the_fifth_pass(text, names):
    assert values(text, "PERSON") == names


@pytest.mark.parametrize("text", [
    "Switch to Zigbee 3.", "Upgrade the hub to Grafana 10.",  # a release after a verb of versions: no address
    "Roll back to Kafka 2.", "Mark the invoice as paid.",  # an imperative at the start: no name
    "Sydney's beaches are great.", "Paris is my favourite city.", "Docker and I do not get along.", "We visited Sydney.",
    # words + number after an address cue that are no street: a date, a sentence word inside, a part of a building
    "Deliver it on Monday 5 December.", "Send it on Friday 12 June please.", "Ship it to Berlin by 5 May.",
    "Meet me at Gate 12 at 5 pm.", "He lives on Floor 3.", "He scored 3 Goals in 2 Matches.",
])
def test_fifth_pass_rules_leave_look_alikes(text):
    assert [s for s in find_pii(text) if s.kind in ("PERSON", "ADDRESS")] == []


@pytest.mark.parametrize("text, address", [
    # each missed (or cut short) before the fifth recall pass (issue #7); forms from Faker's locales
    ("My address is 806 Tanya Triangle", "806 Tanya Triangle"),  # any words after "address is"
    ("My address is 08063 Avotiņš Pines", "08063 Avotiņš Pines"),  # Latin Extended-A letters in a US-style street
    ("I live at Jens-Drubin-Straße 47-26.", "Jens-Drubin-Straße 47-26"),  # a hyphenated German street
    ("Ship it to ulica Mokra 58 today.", "ulica Mokra 58"),  # a lowercase Polish street type
    ("Send it to Rua República da Colômbia, 408 today.", "Rua República da Colômbia, 408"),  # "da" inside the name
    ("Send it to Incrocio Raffaele, 47 today.", "Incrocio Raffaele, 47"),  # more Italian, Spanish, Romanian types
    ("Send it to Intrarea Ababei Nr. 90 Bl. 96 Sc. 43 Ap. 860 today.", "Intrarea Ababei Nr. 90 Bl. 96 Sc. 43 Ap. 860"),
    ("I live at Circuito Carvajal 776 Interior 317.", "Circuito Carvajal 776 Interior 317"),  # Spanish unit words
    ("The office is located at Apt. 704 9 Holland Crossing\nNorth Kaylee, QLD, 2998.",
     "Apt. 704 9 Holland Crossing\nNorth Kaylee, QLD, 2998"),  # the unit first, as in Australia and the UK
    ("Please ship it to Flat 9\nSingh Loaf before Friday.", "Flat 9\nSingh Loaf"),
    ("My address is 31/06 Lawson Walk\nSt. Josephbury, NSW, 2940", "31/06 Lawson Walk\nSt. Josephbury, NSW, 2940"),
    ("I live at 92 Leland Street D24 6P57 Demi Ville.", "92 Leland Street D24 6P57 Demi Ville"),  # an Eircode
    ("Send it to 1 Bishell Terrace\nRD 9\nMatthewsside 5374 today.", "1 Bishell Terrace\nRD 9\nMatthewsside 5374"),
    ("I live at rue de Cosendey 8.", "rue de Cosendey 8"),  # a lowercase French street type
    ("Please ship it to Kurelčeva 4b/0 before Friday.", "Kurelčeva 4b/0"),  # a flat after the house number
    ("My address is Λιμνών 577-104", "Λιμνών 577-104"),  # a Greek street after "address is"
])
def test_address_forms_of_the_fifth_pass(text, address):
    assert values(text, "ADDRESS") == [address]


def test_street_corner_addresses():
    text = "What is your address? it is the corner of Dalbraut 99 and Frederikke Coves"
    assert values(text, "ADDRESS") == ["the corner of Dalbraut 99 and Frederikke Coves"]
    assert values("I sat in the corner of the room and Anna laughed.", "ADDRESS") == []  # lowercase: not streets

def test_generated_gold_and_hard_negatives():
    """Quality floor on our own generated sets (bench/pii.py reports the full numbers)."""
    docs = multilingual_gold(per_lang=30)
    gold = {(i, s, e, k) for i, d in enumerate(docs) for s, e, k in d["spans"]}
    got = {(i, s.start, s.end, s.kind) for i, d in enumerate(docs) for s in find_pii(d["text"])}
    assert len(gold & got) / len(gold) >= 0.85
    assert len(gold & got) / len(got) >= 0.85
    persons = [s.value for t in hard_negatives() for s in find_pii(t) if s.kind == "PERSON"]
    assert len(persons) <= 5, persons


# --------------------------------------------------------------------------------------------- masking


TEXT = ("Hi, I am Maria Lopez (maria.lopez@corp.example, +1 415-555-0134). Card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, born on March 3, 1985, host 10.1.2.3, "
        "living at 1600 Pennsylvania Avenue NW, profile https://intranet.example.com/users/mlopez, "
        "マイナンバー 1234 5678 9018, เลขประจำตัวประชาชน 1-1017-00230-70-8.")


def test_mask_replaces_every_kind_and_reports_originals():
    masked, spans = mask(TEXT)
    assert {s.kind for s in spans} == set(KINDS)
    for s in spans:
        assert TEXT[s.start : s.end] == s.value  # spans point into the original text
        assert s.value not in masked
        assert f"[{s.kind}]" in masked
    assert masked.startswith("Hi, I am [PERSON] ([EMAIL], [PHONE]). Card [CARD]")


def test_keep_leaves_text_alone():
    kept, spans = mask(TEXT, "keep")
    assert kept == TEXT and len(spans) == len(KINDS)


def test_pseudonyms_are_consistent_valid_and_keyed():
    a1, spans = mask(TEXT, "pseudonymize", key=b"k1")
    a2, _ = mask(TEXT, "pseudonymize", key=b"k1")
    b, _ = mask(TEXT, "pseudonymize", key=b"k2")
    assert a1 == a2 and a1 != b
    for s in spans:
        assert s.value not in a1
    # the same person in another text gets the same pseudonym
    assert pseudonym("PERSON", "Maria Lopez", b"k1") in mask("Later, Maria Lopez called.", "pseudonymize", key=b"k1")[0]
    # fakes stay valid and keep their shape
    card = pseudonym("CARD", "4111 1111 1111 1111", b"k1")
    assert luhn_ok(card.replace(" ", "")) and len(card) == 19 and card[0] == "4" and card.count(" ") == 3
    assert iban_ok(pseudonym("IBAN", "DE89 3704 0044 0532 0130 00", b"k1"))
    assert pseudonym("PHONE", "+1 415-555-0134", b"k1").startswith("+1 ")
    assert pseudonym("EMAIL", "maria.lopez@corp.example", b"k1").split("@")[1].startswith("example.")
    assert pseudonym("IP", "10.1.2.3", b"k1").startswith("10.")


def test_bad_action_is_refused():
    with pytest.raises(ValueError, match="mask, pseudonymize or keep"):
        mask("x", "redact")


_FRAGMENTS = [
    "anna@corp.example", "+1 415-555-0134", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "123-45-6789",
    "192.168.0.1", "Mr. John Smith", "78876 Jesse Drive", "DOB: 1990-07-14", "turn on the kitchen light",
    "THE MANUAL", "version 2.1.0", "order 12345", "Contact Support", "東京の山田太郎様", "โทร 081-234-5678", ", ", ". ", " ",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12))
def test_spans_are_sorted_disjoint_and_exact(parts):
    text = " ".join(parts)
    spans = find_pii(text)
    for s, t in zip(spans, spans[1:]):
        assert s.end <= t.start
    for s in spans:
        assert text[s.start : s.end] == s.value and s.kind in KINDS
    masked, _ = mask(text)
    expected, pos = "", 0
    for s in spans:
        expected += text[pos : s.start] + f"[{s.kind}]"
        pos = s.end
    assert masked == expected + text[pos:]
    # nothing checksummed survives masking (the tags hold no digits that could re-form a number)
    assert not [s for s in find_pii(masked) if s.kind in ("EMAIL", "CARD", "IBAN", "SSN", "IP")]


def test_import_light_and_fast():
    """serve masks every request log line with this module: no Faker (or anything heavy) on import or mask."""
    code = ("import sys, stillhouse.pii as p; p.mask('call +1 415-555-0134, Mr. John Smith'); "
            "heavy = [m for m in ('faker', 'torch', 'transformers', 'datasketch', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    lines = [f"ticket {i}: Mr. John Smith called +1 415-555-{i % 10000:04d} about order {i}" for i in range(2000)]
    t = time.perf_counter()
    for line in lines:
        mask(line)
    assert time.perf_counter() - t < 5.0  # ~0.3 s here; generous for slow CI


def test_bench_presidio_rules_merge_adjacent_spans(monkeypatch):
    """bench/pii.py's SpanEvaluator-rules scorer (the one comparable to Presidio's published F2): a gold address
    split into pieces by punctuation is one span there, and several predictions may cover one gold span."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pii.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: bench/ is on sys.path (bench/_docs.py)
    spec = importlib.util.spec_from_file_location("bench_pii", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = "Send it to 4 Main St, Suite 5 today, Anna Berg"
    doc = {"text": text, "spans": [(11, 20, "ADDRESS"), (22, 29, "ADDRESS"), (37, 46, "PERSON")]}
    pred = [Span(s, e, k, text[s:e]) for s, e, k in [(11, 29, "ADDRESS"), (37, 41, "PERSON"), (42, 46, "PERSON")]]
    strict = bench.score([doc], [pred], 0.7)
    assert strict["ADDRESS"] == {"fp": 1, "fn": 2} and strict["PERSON"]["tp"] == 0
    overall, by_kind = bench.score_presidio([doc], [pred], 0.7)
    assert overall == {"tp": 2} and by_kind["ADDRESS"] == {"tp": 1}
    overall, _ = bench.score_presidio([doc], [pred[:1]], 0.7)
    assert overall == {"tp": 1, "fn": 1}
