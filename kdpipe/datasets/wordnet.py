"""WordNet 3.0 glosses (Debian's `wordnet-base`) as real, offline English text with a real label.

Each synset line of ``data.{noun,verb,adj,adv}`` holds its lexicographer file number (one of 45
categories such as ``noun.animal`` or ``verb.motion``: the label), its lemmas and, after ``|``,
its gloss: definitions, then quoted examples. A row is ``{"text": definition, "label": lexfile,
"word": first lemma}``; `kdpipe.data` keeps ``text`` and ``label``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdpipe.spec import SourceConfig

WORDNET_DIR = Path(os.environ.get("KDPIPE_WORDNET_DIR", "/usr/share/wordnet"))
POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

# WordNet's lexnames file: lexicographer file number -> name (the 45 labels).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()


class WordNetMissingError(FileNotFoundError):
    """The WordNet data files are not installed."""


def parse_synset(line: str) -> dict[str, Any] | None:
    """One ``data.*`` line -> {"text", "label", "word"}; None for license/header lines or empty glosses."""
    if not line or line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    lexfile = int(fields[1])
    n_words = int(fields[3], 16)
    word = fields[4]
    if word.endswith(")") and "(" in word:  # adjective position markers: able(a), galore(ip)
        word = word[: word.index("(")]
    definition = gloss.strip()
    quote = definition.find('"')  # examples are quoted and come after the definitions
    if quote > 0:
        definition = definition[:quote]
    definition = definition.strip().rstrip(";").strip()
    if not definition or n_words < 1:
        return None
    return {"text": definition, "label": lexfile, "word": word.replace("_", " ")}


def read_wordnet(cfg: SourceConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """All synsets (nouns, verbs, adjectives, adverbs), or a deterministic, evenly spread subset of
    `cfg.limit` of them (every n-th synset), so small runs still cover every part of speech."""
    root = Path(cfg.path) if cfg.path else WORDNET_DIR
    files = [root / f for f in POS_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WordNetMissingError(
            f"source kind 'wordnet' needs the WordNet 3.0 data files, missing: {', '.join(missing)}. "
            "`make install` installs them (Debian package wordnet-base: "
            "`apt-get update && apt-get install -y wordnet-base`), or set source.path to a directory holding "
            f"{', '.join(POS_FILES)}"
        )
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                row = parse_synset(line)
                if row is not None:
                    rows.append(row)
    if cfg.limit and cfg.limit < len(rows):
        step = len(rows) / cfg.limit
        rows = [rows[int(i * step)] for i in range(cfg.limit)]
    return rows, [str(f) for f in files]
