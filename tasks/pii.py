"""PII scrubbing: e-mail addresses, IPv4/IPv6 addresses, phone numbers and CPF numbers
are replaced by typed placeholders (<EMAIL>, <IP>, <PHONE>, <CPF>).

Rules are regular expressions plus checks that keep look-alikes (version strings,
ISBNs, DOIs, dates, year ranges, prices) untouched. Placeholders hold no digits or '@',
so scrubbing twice changes nothing.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
CPF_FORMATTED = re.compile(r"(?<![\w.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\w-])")
CPF_PLAIN = re.compile(r"(?<![\w.,/-])\d{11}(?!\w|[.,/-]\d)")
PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?)(?:[ .-]?\d{2,5}){1,4}(?![\w-])")
# Local numbers start with 2-9 (landlines) or 9 + four digits (mobiles).
PHONE_BR = re.compile(r"(?<![\w/.,-])(?:\(\d{2}\) ?|\d{2} )?(?:9 ?\d{4}|[2-9]\d{3})[- ]\d{4}(?![\w-]|[.,]\d)")
# Words that make a dotted quad a version number, not an address.
_VERSION_BEFORE = re.compile(
    r"(?:\bv|vers[aã]o|version|release|kernel|pacote|package|build|se[cç][aã]o|section|tabela|table|figura|figure|"
    r"cap[ií]tulo|chapter|item)\s*$", re.I)
_YEAR = re.compile(r"^(19|20)\d\d$")


def cpf_valid(digits: str) -> bool:
    """The two CPF check digits (mod 11) hold, and it is not one repeated digit."""
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    for n in (9, 10):
        total = sum(int(d) * w for d, w in zip(digits[:n], range(n + 1, 1, -1)))
        if int(digits[n]) != (total * 10 % 11) % 10:
            return False
    return True


def _ipv6(m: re.Match) -> bool:
    try:
        ipaddress.IPv6Address(m.group(0))
    except ValueError:
        return False
    return m.group(0).count(":") >= 2 and any(c.isdigit() or c in "abcdefABCDEF" for c in m.group(0))


def _ipv4(m: re.Match) -> bool:
    return not _VERSION_BEFORE.search(m.string[max(0, m.start() - 16) : m.start()])


def _phone_br(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    halves = re.split(r"[- ]", m.group(0).strip())
    if len(halves) == 2 and _YEAR.match(halves[0]):  # "1999-2006", "2023-0001": years, not bare phones
        return False
    return 8 <= len(digits) <= 13


def _phone_intl(m: re.Match) -> bool:
    return 8 <= len(re.sub(r"\D", "", m.group(0))) <= 15


RULES: list[tuple[str, re.Pattern, object]] = [
    ("EMAIL", EMAIL, None),
    ("IP", IPV6, _ipv6),
    ("IP", IPV4, _ipv4),
    ("CPF", CPF_FORMATTED, None),
    ("CPF", CPF_PLAIN, lambda m: cpf_valid(m.group(0))),
    ("PHONE", PHONE_INTL, _phone_intl),
    ("PHONE", PHONE_BR, _phone_br),
]


def scrub(text: str) -> tuple[str, Counter]:
    """text with PII replaced by <TYPE> placeholders, and how many of each were replaced."""
    counts: Counter = Counter()
    for kind, pattern, check in RULES:
        def repl(m: re.Match, kind=kind, check=check) -> str:
            if check is not None and not check(m):
                return m.group(0)
            counts[kind] += 1
            return f"<{kind}>"

        text = pattern.sub(repl, text)
    return text, counts
