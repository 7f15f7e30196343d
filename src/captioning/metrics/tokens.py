"""The PTB tokenisation of the official COCO caption evaluation, in Python: the tokens every metric here counts."""

from __future__ import annotations

import re

# With `-lowerCase`, PTBTokenizer writes brackets as "-lrb-" etc.; pycocoevalcap only removes the upper-case
# spellings, so the official pipeline keeps these tokens. We keep them too, to give the same n-grams.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = frozenset({"'s", "'m", "'d", "'ll", "'re", "'ve", "n't"})
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
# Abbreviations whose final period PTBTokenizer keeps (besides letter-period runs such as "u.s." or "p.m.").
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. vs. etc. co. inc. no. mt. ltd. corp. bros. gen. gov. rev. sen. rep. "
    "jan. feb. mar. apr. aug. sep. sept. oct. nov. dec. ave. blvd. rd. ft. prof. capt. col. lt. sgt.".split()
)
_KEEP_TOKENS = frozenset(_BRACKETS.values()) | _CLITICS
_ACRONYM = re.compile(r"^(?:[^\W\d_]\.)+$")
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_QUOTES_RE = re.compile(r'["`]')
_SYMBOLS_RE = re.compile(r"([+=*~^|\\%]|[#$](?=\d))")
_COMMA_COLON_RE = re.compile(r"(?<!\d)[,:]|[,:](?!\d)|;")
_NT_RE = re.compile(r"(?<=\w)(n't)\b")
_CLITIC_RE = re.compile(r"(?<=\w)('s|'m|'d|'ll|'re|'ve)\b")
_PUNCT_ONLY_RE = re.compile(r"^(?:[.'`\-]+|[?!])$")
_LEADING_CLITIC_RE = re.compile(r"^(?:'s|'m|'d|'ll|'re|'ve)(?!\w)")
_TRAILING_EXCLAIM_RE = re.compile(r"^(.*?\w.*?)([?!]+)$")
_NEEDS_REWRITE_RE = re.compile(r"[()\[\]{}\"`+=*~^|\\%#$,:;']")  # most captions hold none of these


def tokenize(caption: str) -> list[str]:
    """Lower-case and split ``caption`` the way pycocoevalcap's ``PTBTokenizer`` + punctuation removal does.

    A fast, Java-free approximation of the official tokenisation, for validation: brackets become
    ``-lrb-``/``-rrb-``..., clitics are split (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``), the
    punctuation tokens pycocoevalcap removes (``. , ; : ? ! - -- ... ' '' ` ``) are dropped, while numbers
    (``3.5``, ``1,000``, ``5:30``), hyphenated words and abbreviations (``u.s.``, ``mr.``, ``etc.``) stay one
    token. It agrees with the Java tokenizer on ordinary captions (tests check a list against it); rare
    symbols may differ, so paper numbers come from :func:`coco_caption_eval`. Idempotent on its output.
    """
    if not isinstance(caption, str):
        raise TypeError(f"tokenize expects a caption string, got {type(caption).__name__}: {caption!r}")
    text = caption.lower()
    if _NEEDS_REWRITE_RE.search(text):
        text = _BRACKET_RE.sub(lambda m: f" {_BRACKETS[m.group()]} ", text)
        text = _QUOTES_RE.sub(" ", text)
        text = _SYMBOLS_RE.sub(r" \1 ", text)
        text = _COMMA_COLON_RE.sub(" ", text)
        text = _NT_RE.sub(r" \1", text)
        text = _CLITIC_RE.sub(r" \1", text)
    tokens: list[str] = []
    for word in text.split():
        if word.isalnum() and word not in _SPLIT_WORDS:
            tokens.append(word)
        else:
            tokens.extend(_clean_token(word))
    return tokens


def _clean_token(word: str) -> list[str]:
    """Strip the punctuation PTBTokenizer splits off one whitespace-delimited word (and pycocoevalcap drops)."""
    if word in _KEEP_TOKENS:
        return [word]
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if _PUNCT_ONLY_RE.match(word):
        return []
    tail: list[str] = []
    while True:
        before = word
        # a leading quote or dash is punctuation unless it starts a clitic or a year ("'90s")
        if word.startswith("'") and not _LEADING_CLITIC_RE.match(word) and not word[1:2].isdigit():
            word = word[1:]
        word = word.lstrip("-")
        if word.endswith("'") and word not in _CLITICS:
            word = word[:-1]
        word = word.rstrip("-")
        match = _TRAILING_EXCLAIM_RE.match(word)
        if match:
            word, marks = match.groups()
            if len(marks) > 1:  # "!!" and "?!" are not in pycocoevalcap's punctuation list
                tail.insert(0, marks)
        if word.endswith("."):
            stem = word.rstrip(".")
            # "..." is an ellipsis token of its own; "u.s.." is "u.s." plus a sentence-final period
            if stem and len(word) - len(stem) < 3 and (_ACRONYM.match(stem + ".") or (stem + ".") in _ABBREVIATIONS):
                word = stem + "."
                break
            word = stem
        if word == before:
            break
    if not word or _PUNCT_ONLY_RE.match(word):
        return tail
    return [word, *tail]
