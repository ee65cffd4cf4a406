"""Synapse's own username functions, in one batch, for the username corpus.

Usage: username_oracle.py NAMES_JSON OUT_JSON

Reads a JSON array of names and writes one JSON object:

- "lower": `str.lower()` of every name, in order (Synapse lowercases a
  desired username with exactly this before checking it);
- "accepted_codepoints": every code point c (surrogates excluded) for which
  Synapse's character check accepts `("x" + chr(c)).lower()`, using Synapse's
  own `contains_invalid_mxid_characters` from the installed package;
- "changed": {code point: lower()} for every code point whose `lower()`
  differs from itself;
- "unicode_version": the Unicode database version of this Python.
"""

import json
import sys
import unicodedata

from synapse.types import contains_invalid_mxid_characters


def main() -> None:
    names_path, out_path = sys.argv[1:3]
    with open(names_path, encoding="utf-8") as f:
        names = json.load(f)
    accepted = []
    changed = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        lower = c.lower()
        if lower != c:
            changed[str(cp)] = lower
        if not contains_invalid_mxid_characters(("x" + c).lower()):
            accepted.append(cp)
    out = {
        "lower": [name.lower() for name in names],
        "accepted_codepoints": accepted,
        "changed": changed,
        "unicode_version": unicodedata.unidata_version,
        "python": sys.version.split()[0],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True)


if __name__ == "__main__":
    main()
