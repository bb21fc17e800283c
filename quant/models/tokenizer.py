"""English character units for the conformer, in WeNet's conventions: blank = 0, sos = eos = the last id.

The vocabulary lives in quant/assets/units.txt (WeNet's `unit id` lines): <blank>, the word separator "▁",
the apostrophe, a..z, <sos/eos>. Text is normalized before encoding, so encode never sees an unknown character.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from quant.errors import ModelError
from quant.paths import ASSETS_DIR

UNITS_PATH = ASSETS_DIR / "units.txt"
BLANK = "<blank>"
SPACE = "▁"
SOS_EOS = "<sos/eos>"

_DROP = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase; keep a-z, apostrophe and single spaces; other characters become word breaks or vanish.

    Hyphens, slashes and whitespace separate words; other punctuation is dropped. Apostrophes that do not sit
    inside a word (quotes) are dropped too, so "'hello'" -> "hello" but "don't" stays.
    """
    lowered = text.lower().replace("-", " ").replace("/", " ")
    lowered = _SPACES.sub(" ", lowered)
    kept = _DROP.sub("", lowered)
    words = [word.strip("'") for word in kept.split(" ")]
    return " ".join(word for word in words if word)


def read_units(path: str | os.PathLike[str] = UNITS_PATH) -> list[str]:
    """Units in id order from a WeNet units.txt; ids must run 0..N-1."""
    file = Path(path)
    units: list[str] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) != len(units):
            raise ModelError(f"{file}:{number}: expected '<unit> {len(units)}', got {line!r}")
        units.append(parts[0])
    return units


class CharTokenizer:
    """Characters <-> ids. encode(normalize_text(s)) covers every character normalize_text keeps."""

    def __init__(self, units: Sequence[str] | None = None) -> None:
        self.units = list(units) if units is not None else read_units()
        if not self.units or self.units[0] != BLANK or self.units[-1] != SOS_EOS or SPACE not in self.units:
            raise ModelError(
                f"character units must start with {BLANK}, end with {SOS_EOS} and contain {SPACE}; "
                f"got {self.units[:3]}...{self.units[-2:]}"
            )
        self._ids = {unit: index for index, unit in enumerate(self.units)}

    @property
    def vocab_size(self) -> int:
        return len(self.units)

    @property
    def blank(self) -> int:
        return 0

    @property
    def sos_eos(self) -> int:
        return len(self.units) - 1

    def encode(self, text: str) -> list[int]:
        """Normalized text -> ids (spaces become the "▁" unit)."""
        clean = normalize_text(text)
        return [self._ids[SPACE if char == " " else char] for char in clean]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; blank and sos/eos are skipped, "▁" becomes a space, repeated spaces collapse."""
        chars = [self.units[i] for i in ids if 0 < int(i) < self.sos_eos]
        text = "".join(" " if char == SPACE else char for char in chars)
        return " ".join(text.split())


UNK = "<unk>"


def plain_text(text: str) -> str:
    """Whitespace collapsed to single spaces, nothing else changed (a spec's text_normalization = "none")."""
    return " ".join(text.split())


class UnitsTokenizer:
    """Ids -> text with any WeNet units.txt: characters (Chinese, English letters with "▁" as the space) or BPE pieces
    ("▁" starts a word). `blank`, `sos` and `eos` come from the spec's [task]; they, and `<unk>`, never reach the
    text. With quant's own units this decodes exactly as CharTokenizer does."""

    def __init__(self, units: Sequence[str], blank: int = 0, sos: int | None = None, eos: int | None = None) -> None:
        if not units:
            raise ModelError("the units list is empty; expected a WeNet units.txt with one '<unit> <id>' per line")
        self.units = list(units)
        last = len(self.units) - 1
        self._skipped = {blank, last if sos is None else sos, last if eos is None else eos}
        self._skipped.update(i for i, unit in enumerate(self.units) if unit == UNK)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], blank: int = 0, sos: int | None = None,
                  eos: int | None = None) -> "UnitsTokenizer":
        return cls(read_units(path), blank, sos, eos)

    @property
    def vocab_size(self) -> int:
        return len(self.units)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special ids are skipped, "▁" becomes a space, repeated spaces collapse."""
        pieces = [self.units[int(i)] for i in ids if int(i) not in self._skipped and 0 <= int(i) < len(self.units)]
        return plain_text("".join(pieces).replace(SPACE, " "))
