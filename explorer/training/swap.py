"""Gendered-word swap for the training-data intervention: masculine → feminine, and back.

Unlike the original Pythia intervention code (which replaced only " he ", " him ", " his " with
spaces on both sides), this swap matches whole words whatever surrounds them (punctuation,
line ends, quotes, contractions such as "he's"), keeps case (he/He/HE), and covers the common
gendered nouns, not only pronouns. Words that merely contain a pronoun ("the", "then",
"Heather", "shell") are never touched.

Two words have no one-to-one counterpart and are resolved by their context:
- masculine → feminine, "his": "her" before a noun phrase ("his book" → "her book"); "hers"
  when it stands alone ("the book is his." → "the book is hers.").
- feminine → masculine, "her": "his" before a noun phrase ("her book" → "his book"); "him"
  otherwise ("I saw her.", "gave her the book", "told her that") → "him".
  "Before a noun phrase" means: the next word is not a function word (articles, prepositions,
  conjunctions, pronouns, common adverbs; see ``_NOT_A_NOUN_PHRASE``) and no punctuation
  comes between. The rule errs on sentences like "I saw her yesterday" only when the next
  word is an adverb missing from that list; audit samples show such cases for review.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from explorer.core.results import Result, array, sized

# (masculine, feminine); singular and plural listed separately. Ambiguous words (his, her)
# are handled by context below and so appear only in one direction here.
PAIRS: tuple[tuple[str, str], ...] = (
    ("he", "she"), ("him", "her"), ("himself", "herself"),
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"), ("sons", "daughters"),
    ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"), ("husbands", "wives"),
    ("king", "queen"), ("kings", "queens"), ("mr", "mrs"), ("sir", "madam"),
    ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("nephews", "nieces"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("boyfriend", "girlfriend"),
    ("boyfriends", "girlfriends"), ("grandfather", "grandmother"), ("grandfathers", "grandmothers"),
    ("grandson", "granddaughter"), ("grandsons", "granddaughters"), ("grandpa", "grandma"),
    ("dad", "mom"), ("dads", "moms"), ("daddy", "mommy"), ("stepfather", "stepmother"),
    ("stepson", "stepdaughter"), ("male", "female"), ("males", "females"),
    ("prince", "princess"), ("princes", "princesses"), ("duke", "duchess"), ("dukes", "duchesses"),
    ("emperor", "empress"), ("actor", "actress"), ("actors", "actresses"),
    ("waiter", "waitress"), ("waiters", "waitresses"), ("steward", "stewardess"),
    ("godfather", "godmother"), ("widower", "widow"), ("fiance", "fiancee"),
    ("monk", "nun"), ("monks", "nuns"), ("schoolboy", "schoolgirl"), ("schoolboys", "schoolgirls"),
    ("businessman", "businesswoman"), ("businessmen", "businesswomen"),
    ("chairman", "chairwoman"), ("chairmen", "chairwomen"), ("spokesman", "spokeswoman"),
    ("spokesmen", "spokeswomen"), ("congressman", "congresswoman"), ("sportsman", "sportswoman"),
    ("policeman", "policewoman"), ("policemen", "policewomen"), ("fireman", "firewoman"),
    ("masculine", "feminine"), ("manhood", "womanhood"), ("boyhood", "girlhood"),
    ("fatherhood", "motherhood"), ("brotherhood", "sisterhood"), ("paternal", "maternal"),
)

# Words after which "his"/"her" is not a determiner of a following noun phrase.
_NOT_A_NOUN_PHRASE = frozenset("""
a an the this that these those and or but nor so yet for to of in on at by with from into onto
upon about as than then if when while because although though since until unless whether
i you he she it we they me him her us them my your our their its who whom whose which what
is are was were be been being am do does did has have had will would shall should can could
may might must not no never also too very just only even still already again once twice
there here now today tonight tomorrow yesterday later soon back up down out off away home
over under around through after before alone well all both each either neither any some
""".split())

_FORWARD = {m: f for m, f in PAIRS}
_BACKWARD = {f: m for m, f in PAIRS if f != "her"}
_BACKWARD.update({"hers": "his"})


def _keep_case(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[0].isupper():
        return word[0].upper() + word[1:]
    return word


def _pattern(words: Iterable[str]) -> re.Pattern:
    alternation = "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
    return re.compile(rf"\b({alternation})\b", re.IGNORECASE)


_FORWARD_RE = _pattern(list(_FORWARD) + ["his"])
_BACKWARD_RE = _pattern(list(_BACKWARD) + ["her"])
_NEXT_WORD = re.compile(r"[ \t]*([A-Za-z][A-Za-z'-]*)")


def _before_noun_phrase(text: str, end: int) -> bool:
    """True when the word after position ``end`` (same clause, no punctuation) starts a noun phrase."""
    m = _NEXT_WORD.match(text, end)
    return bool(m) and m.group(1).lower() not in _NOT_A_NOUN_PHRASE


def _replacements(text: str, direction: str) -> list[tuple[int, int, str, str]]:
    """(start, end, source word, replacement) for every gendered word in ``text``."""
    if direction not in ("m2f", "f2m"):
        raise ValueError("direction must be 'm2f' or 'f2m'")
    forward = direction == "m2f"
    table = _FORWARD if forward else _BACKWARD
    out = []
    for m in (_FORWARD_RE if forward else _BACKWARD_RE).finditer(text):
        src = m.group(1)
        low = src.lower()
        if low == "his" and forward:
            new = "her" if _before_noun_phrase(text, m.end()) else "hers"
        elif low == "her" and not forward:
            new = "his" if _before_noun_phrase(text, m.end()) else "him"
        else:
            new = table[low]
        out.append((m.start(), m.end(), src, _keep_case(src, new)))
    return out


def swap_with_counts(text: str, direction: str = "m2f") -> tuple[str, Counter]:
    """Swap gendered words; return the new text and a count per (source → target) word pair."""
    pieces, counts, last = [], Counter(), 0
    for start, end, src, new in _replacements(text, direction):
        pieces += [text[last:start], new]
        counts[f"{src.lower()}→{new.lower()}"] += 1
        last = end
    pieces.append(text[last:])
    return "".join(pieces), counts


def swap_text(text: str, direction: str = "m2f") -> str:
    """The text with gendered words swapped (``m2f``: masculine → feminine; ``f2m``: back)."""
    return swap_with_counts(text, direction)[0]


@dataclass(frozen=True, eq=False)
class SwapAudit(Result):
    """What a corpus swap changed: counts per word pair, token counts, and sample diffs."""

    direction: str
    n_documents: int
    n_changed_documents: int
    pairs: tuple[str, ...] = sized("P")      # "he→she", ... sorted by count, highest first
    counts: np.ndarray = array("P", "int64")
    tokens_before: int              # -1 when no tokenizer was given
    tokens_after: int
    samples: tuple[str, ...]        # the first changes, each in its context

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def count(self, pair: str) -> int:
        return int(self.counts[self.pairs.index(pair)]) if pair in self.pairs else 0


def _snippets(text: str, direction: str, limit: int, context: int = 40) -> list[str]:
    """Each change shown in place with some context: '…the minister said [he→she] would…'."""
    out = []
    for start, end, src, new in _replacements(text, direction)[:limit]:
        left = text[max(0, start - context):start].replace("\n", " ")
        right = text[end:end + context].replace("\n", " ")
        out.append(f"…{left}[{src}→{new}]{right}…")
    return out


def audit_swap(
    documents: Iterable[str],
    direction: str = "m2f",
    count_tokens: Callable[[str], int] | None = None,
    n_samples: int = 5,
) -> SwapAudit:
    """Swap every document (streamed, never held whole) and tally what changed."""
    total: Counter = Counter()
    n_docs = changed = tok_before = tok_after = 0
    samples: list[str] = []
    for doc in documents:
        new, counts = swap_with_counts(doc, direction)
        n_docs += 1
        if counts:
            changed += 1
            total.update(counts)
            if len(samples) < n_samples:
                samples.extend(_snippets(doc, direction, n_samples - len(samples)))
        if count_tokens is not None:
            tok_before += count_tokens(doc)
            tok_after += count_tokens(new) if counts else count_tokens(doc)
    ranked = total.most_common()
    return SwapAudit(
        direction=direction, n_documents=n_docs, n_changed_documents=changed,
        pairs=tuple(p for p, _ in ranked), counts=np.array([c for _, c in ranked], dtype=np.int64),
        tokens_before=tok_before if count_tokens else -1, tokens_after=tok_after if count_tokens else -1,
        samples=tuple(samples),
    )
