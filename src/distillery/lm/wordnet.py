"""WordNet glosses with their lexicographer-file categories, read from the Debian package.

The encoder demo needs a few thousand real, varied English sentences that exist offline on
every machine the project runs on; WordNet's glosses (definitions plus usage examples) are
that, and each synset carries a coarse topic label (``noun.animal``, ``verb.motion``, ...)
for free.  Files: ``/usr/share/wordnet/data.{noun,verb,adj,adv}`` from ``wordnet-base``.

Line format (WordNet 3.0, ``wndb(5WN)``)::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss

``lex_filenum`` is a two-digit index into the 45 lexicographer files of ``lexnames(5WN)``.
The files open with the Princeton licence, whose lines begin with two spaces.
"""
from __future__ import annotations

from pathlib import Path

from distillery.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")

# lexnames(5WN), WordNet 3.0: the position in this tuple is the lex_filenum.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)


def parse_data_line(line: str) -> tuple[str, str] | None:
    """(gloss, category) of one ``data.*`` line; None for licence-header and blank lines."""
    if line.startswith("  ") or not line.strip():
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 3 or not fields[1].isdigit():
        raise DataError(f"not a WordNet data line (expected 'offset lex_filenum ss_type ... | gloss'): {line[:80]!r}")
    lex_filenum = int(fields[1])
    if lex_filenum >= len(LEXNAMES):
        raise DataError(f"lex_filenum {lex_filenum} is outside the 45 lexicographer files: {line[:80]!r}")
    return gloss.strip(), LEXNAMES[lex_filenum]


def load_glosses(path: str | Path | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """All WordNet glosses as ``(gloss text, category name)``, nouns, verbs, adjectives, adverbs in turn.

    ``path`` is a directory holding ``data.noun`` etc. (default ``/usr/share/wordnet``) or one
    ``data.*`` file.  ``limit`` stops after that many glosses (file order, not a sample: the
    caller shuffles).  Synsets with identical gloss text keep one copy, so a held-out split
    cannot contain a training sentence verbatim.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of glosses or None, got {limit}")
    root = Path(path) if path is not None else WORDNET_DIR
    files = [root] if root.is_file() else [root / f"data.{pos}" for pos in PARTS_OF_SPEECH]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"WordNet data files not found: {', '.join(missing)}. Install them with "
            "`apt-get install wordnet-base` (or pass the directory that holds data.noun, data.verb, ...)"
        )
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                item = parse_data_line(line)
                if item is None or item[0] in seen:
                    continue
                seen.add(item[0])
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
    return out
