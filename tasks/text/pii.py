"""PII scrubbing: e-mail addresses, IPv4/IPv6 addresses, phone numbers and CPF numbers are
replaced by typed placeholders (<EMAIL>, <IP>, <PHONE>, <CPF>).

Each kind is found in two steps: a loose regular expression proposes a candidate, then a
structural check decides, so look-alikes fail on the rules of the thing itself rather than
on a list of examples:
  IP     the address must parse (ipaddress): IPv4 octets <= 255 without leading zeros, so
         `2.147.483.648` (a Brazilian thousands-separated number) is not one; IPv6 needs a digit, so C++ scopes
         such as `decaf::bad` are not; `::ffff:1.2.3.4` is taken whole
  CPF    the two mod-11 check digits must hold, in any spacing (`529 982 247 25`,
         `529982247-25`); only the canonical `123.456.789-09` shape is taken unchecked,
         since nothing else is written that way and a mistyped CPF is still one
  PHONE  Brazil's numbering plan (Anatel): a valid area code (DDD), subscriber numbers of 8
         digits starting 2-9 or 9 digits starting 9, an optional +55/0055/55 or 0/0xx trunk
         prefix; 0300/0500/0800/0900 and 300x/400x non-geographic numbers; wa.me links.
         A number written without an area code must look like one (`3456-7890`), and is not
         a phone after a standard or page marker (ISO 9001-2015, pp. 2301-2315) or when it
         reads as a range (2022-2027); other countries' numbers need a leading +
CNPJ (company ids), CEPs, dates, amounts and version numbers are left alone. The hits
never overlap (the order of RULES decides), and placeholders hold no digits or '@', so
scrubbing twice changes nothing.
"""
from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from typing import Callable, NamedTuple

# Area codes of Anatel's numbering plan (Plano Geral de Códigos Nacionais).
DDDS = frozenset({11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 24, 27, 28, 31, 32, 33, 34, 35, 37, 38,
                  41, 42, 43, 44, 45, 46, 47, 48, 49, 51, 53, 54, 55, 61, 62, 63, 64, 65, 66, 67, 68, 69,
                  71, 73, 74, 75, 77, 79, 81, 82, 83, 84, 85, 86, 87, 88, 89, 91, 92, 93, 94, 95, 96, 97, 98, 99})

# Not inside a word or a longer number: no letter/digit just before, nor a digit and a separator.
_START = r"(?<![\w.,/+@-])(?<!\d[ ])"
_END = r"(?![\w@]|[.,/-]?\d)(?! \d)"

EMAIL = re.compile(r"(?<![\w.+%-])\w[\w.%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
                  r"(?:%[0-9A-Za-z_.-]+)?(?![\w:]|\.\d)")
IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|[.,]\d)")
CPF = re.compile(_START + r"\d{3}([. ]?)\d{3}\1\d{3}(?:[-./ ]|\s?-\s?)?\d{2}" + _END)
CPF_CANONICAL = re.compile(r"\d{3}\.\d{3}\.\d{3}-\d{2}")
NON_GEOGRAPHIC = re.compile(_START + r"0[3589]00[ .-]?\d{3}[ .-]?\d{4}" + _END)
PHONE_BR = re.compile(
    r"(?:(?<=wa\.me/)|(?<=phone=)|" + _START + r")"
    r"(?P<cc>(?:\+ ?|00)?55[ .-]?(?=\(?0?(?:xx)?\d\d\)?[ .-]?9?[ .-]?\d{4}[ .-]?\d{4}(?!\d)))?"  # 55 only before a DDD
    r"(?:\((?P<trunk1>0(?:xx)?)? ?(?P<ddd1>\d\d)\) ?|(?P<trunk2>0(?:xx)?)?(?P<ddd2>\d\d)(?P<dsep>[ .-]?))?"
    r"(?P<sub>9[ .-]?\d{4}|\d{4})(?P<sep>[ .-]?)\d{4}" + _END)
PHONE_INTL = re.compile(r"(?<![\w+])\+(?!55)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?)(?:[ .-]?\d{2,5}){1,4}(?![\w-]|[.,]\d)")

# Words that make a dotted quad a version number, not an address ("kernel 2.6.32.1", "versão para 1.2.3.4").
_VERSION_BEFORE = re.compile(
    r"(?:\bv|vers[aã]o|version|release|kernel|pacote|package|build|firmware|se[cç][aã]o|section|tabela|table|"
    r"figura|figure|cap[ií]tulo|chapter|item)(?:\s+(?:para|de|do|da|em|[eé]|to|is))?\s*$", re.I)
# Markers after which "9001-2015" or "2301-2315" is a standard or a page range.
_NOT_PHONE_BEFORE = re.compile(
    r"(?:\b(?:ISO|IEC|NBR|ABNT|NM|EN|DIN|RFC|IEEE|ASTM)(?:/\w+)?|\bpp?\.|\bp[áa]g(?:inas?|s?\.)|\bfls?\.|\bfolhas?|"
    r"\bart(?:igos?|s?\.)|§)\s*$", re.I)
_YEAR = re.compile(r"(?:19|20)\d\d$")


class Hit(NamedTuple):
    start: int
    end: int
    kind: str


def cpf_valid(digits: str) -> bool:
    """The two CPF check digits (mod 11) hold, and it is not one repeated digit."""
    if len(digits) != 11 or not digits.isdigit() or len(set(digits)) == 1:
        return False
    for n in (9, 10):
        total = sum(int(d) * w for d, w in zip(digits[:n], range(n + 1, 1, -1)))
        if int(digits[n]) != (total * 10 % 11) % 10:
            return False
    return True


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _ipv6(m: re.Match) -> bool:
    try:
        ipaddress.IPv6Address(m.group(0))
    except ValueError:
        return False
    return any(c.isdigit() for c in m.group(0).split("%")[0])  # "decaf::bad" is a C++ scope, not an address


def _ipv4(m: re.Match) -> bool:
    try:  # octets <= 255 and no leading zeros: 2.147.483.648 and 1.236.002.153 are thousands separators
        ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    return not _VERSION_BEFORE.search(m.string[max(0, m.start() - 24) : m.start()])


def _cpf(m: re.Match) -> bool:
    value = m.group(0)
    if CPF_CANONICAL.fullmatch(value):
        return len(set(_digits(value))) > 1
    return cpf_valid(_digits(value))


def _phone_br(m: re.Match) -> bool:
    sub = _digits(m.group("sub"))
    first = sub[0]
    if (len(sub) == 5 and first != "9") or (len(sub) == 4 and first in "01"):
        return False  # mobiles are 9 + 8 digits; landlines never start with 0 or 1
    ddd = m.group("ddd1") or m.group("ddd2")
    if ddd is not None and int(ddd) not in DDDS:
        return False
    if m.group("cc") and ddd is None:
        return False
    before = m.string[max(0, m.start() - 16) : m.start()]
    if _NOT_PHONE_BEFORE.search(before) and not m.group("cc") and not m.group("ddd1"):
        return False
    if ddd is None:  # bare local number: only the written-as-a-phone shapes, and not a range
        capitals = re.match(r"[34]00\d", sub) is not None
        if m.group("sep") != "-" and not capitals:
            return False
        head, tail = sub, _digits(m.group(0))[len(sub):]
        if len(head) == 4 and not capitals and (_YEAR.match(head) or 0 < int(tail) - int(head) <= 200):
            return False  # 2022-2027, 2301-2315: a year-numbered id or a range (pages rarely span more)
    elif not m.group("cc") and not m.group("ddd1") and len(_digits(m.group(0))) == 10 and not m.group("trunk2"):
        if m.group("dsep") == "" and m.group("sep") == "" and " " not in m.group("sub"):
            return False  # ten bare digits: as likely an id as a landline
    return True


def _phone_intl(m: re.Match) -> bool:
    return 8 <= len(_digits(m.group(0))) <= 15


RULES: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("EMAIL", EMAIL, None),
    ("IP", IPV6, _ipv6),
    ("IP", IPV4, _ipv4),
    ("CPF", CPF, _cpf),
    ("PHONE", NON_GEOGRAPHIC, None),
    ("PHONE", PHONE_BR, _phone_br),
    ("PHONE", PHONE_INTL, _phone_intl),
]


def _matches(pattern: re.Pattern, check, text: str):
    """Every candidate that passes its check; after a rejected one the search goes on from its
    next character, so a rejected long reading does not hide a valid shorter one inside it."""
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        if check is None or check(m):
            yield m
            pos = max(m.end(), m.start() + 1)
        else:
            pos = m.start() + 1


def find(text: str) -> list[Hit]:
    """The PII spans in text, in order, never overlapping (earlier RULES win)."""
    hits: list[Hit] = []  # sorted and disjoint, so only the neighbours of a new span can overlap it
    for kind, pattern, check in RULES:
        for m in _matches(pattern, check, text):
            i = bisect.bisect_left(hits, (m.start(),))
            if (i > 0 and hits[i - 1].end > m.start()) or (i < len(hits) and hits[i].start < m.end()):
                continue
            hits.insert(i, Hit(m.start(), m.end(), kind))
    return hits


def scrub(text: str) -> tuple[str, Counter]:
    """text with PII replaced by <TYPE> placeholders, and how many of each were replaced."""
    hits = find(text)
    if not hits:
        return text, Counter()
    parts, last = [], 0
    for h in hits:
        parts += [text[last : h.start], f"<{h.kind}>"]
        last = h.end
    parts.append(text[last:])
    return "".join(parts), Counter(h.kind for h in hits)
