"""Dye vocabulary: which Cell Painting stain a channel or file name stands for.

Channel names come from many places (OME metadata, a Harmony index, an ImageXpress
``.HTD``, LoadData column names, file names such as ``Hoechst.tif``).  A name is mapped
to one of the five Cell Painting stains only when it names a *dye or compartment*
unambiguously:

========  =======================================================================
stain     names (case, spaces, ``_``/``-`` and camel case ignored)
========  =======================================================================
DNA       Hoechst (33342, 33258), DAPI, DRAQ5, DNA, nuclei / nucleus / nuclear
ER        concanavalin A, ConA, ER, endoplasmic (reticulum)
RNA       SYTO 14 (any SYTO), RNA, nucleoli
AGP       phalloidin, WGA (wheat germ agglutinin), golgi, actin, AGP, plasma membrane
Mito      MitoTracker (Deep Red, …), mito, mitochondria
========  =======================================================================

The Bray et al. Cell Painting data (cpg0012, BBBC022, and CLOOME, which is built on it)
names its five channels by dye: ``Hoechst`` (DNA), ``ERSyto`` (ER: concanavalin A, the
488 nm channel, with some SYTO 14 signal), ``ERSytoBleed`` (RNA: the SYTO 14 channel,
with ER bleed-through), ``Ph_golgi`` (AGP: phalloidin + WGA) and ``Mito``.  That data set's
own CellProfiler tables load ``ERSyto`` as ``OrigER`` and ``ERSytoBleed`` as ``OrigRNA``,
so these two names map to ER and RNA.  Any *other* name containing "bleed" is a
bleed-through channel of unknown content and stays unmapped (an extra channel, never
merged into a stain).

Fluorophore or filter names ("Alexa 488", "AF647", "FITC", "Cy5", "488 nm") are **never**
mapped: the same fluorophore carries different stains in different experiments.  Names
that match two stains ("ER/RNA") stay unmapped too.
"""

from __future__ import annotations

import re

STAINS = ("DNA", "ER", "RNA", "AGP", "Mito")

#: whole names (lower case, letters and digits only) with a fixed meaning
EXACT = {
    "ersyto": "ER",            # Bray / cpg0012 / CLOOME: concanavalin A channel
    "ersytobleed": "RNA",      # Bray / cpg0012 / CLOOME: SYTO 14 channel
    "phgolgi": "AGP",          # Bray: phalloidin + WGA
    "cona": "ER",
    "concanavalina": "ER",
    "syto14": "RNA",
    "hoechst33342": "DNA",
    "hoechst33258": "DNA",
    "wgaphalloidin": "AGP",
    "phalloidinwga": "AGP",
    "plasmamembrane": "AGP",
    "endoplasmicreticulum": "ER",
}

#: words of a name → stain
TOKENS = {
    "DNA": ("dna", "hoechst", "dapi", "draq5", "nuclei", "nucleus", "nuclear"),
    "ER": ("er", "cona", "concanavalin", "endoplasmic"),
    "RNA": ("rna", "syto", "syto14", "nucleoli", "nucleolus"),
    "AGP": ("agp", "phalloidin", "wga", "golgi", "actin", "agglutinin"),
    "Mito": ("mito", "mitotracker", "mitochondria", "mitochondrial", "mitochondrion"),
}
_TOKEN_TO_STAIN = {tok: stain for stain, toks in TOKENS.items() for tok in toks}
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def _words(name: str) -> set[str]:
    parts = [p for p in re.split(r"[^0-9A-Za-z]+", name) if p]
    words = {p.lower() for p in parts}
    for p in parts:
        words.update(w.lower() for w in _CAMEL.findall(p))
    return words


def canonical_stain(name) -> str | None:
    """The Cell Painting stain ``name`` stands for, or None when it is not an unambiguous dye name.

    >>> canonical_stain("Hoechst 33342"), canonical_stain("ERSytoBleed"), canonical_stain("Alexa 488")
    ('DNA', 'RNA', None)
    """
    text = str(name).strip()
    text = re.sub(r"^Orig(?=[A-Z_])", "", text)  # a LoadData column's stain part: OrigDNA
    flat = re.sub(r"[^0-9a-z]", "", text.lower())
    if not flat:
        return None
    if flat in EXACT:
        return EXACT[flat]
    for stain in STAINS:
        if flat == stain.lower():
            return stain
    words = _words(text)
    if "bleed" in words:
        return None
    found = {_TOKEN_TO_STAIN[w] for w in words if w in _TOKEN_TO_STAIN}
    return found.pop() if len(found) == 1 else None


def stain_label(name) -> str:
    """A column-safe label for a channel name that is kept as it is ("Alexa 488" -> "Alexa488")."""
    return re.sub(r"[^0-9A-Za-z]+", "", str(name))


def describe(mapping, names) -> str:
    """``"ch1 'Hoechst 33342' → DNA, ch2 'ConA' → ER"`` for ``{1: 'DNA', …}`` and ``{1: 'Hoechst 33342', …}``."""
    return ", ".join(f"ch{i} {names[i]!r} → {mapping[i]}" for i in sorted(mapping) if i in names)
