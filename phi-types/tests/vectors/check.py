#!/usr/bin/env python3
"""Re-opens every envelope v1 test vector with `cryptography`, independently
of generate.py: valid vectors must open to plaintext_hex, invalid ones must
fail. Exits non-zero on any disagreement.

    python3 check.py [path/to/envelope-v1.json]
"""

import json
import struct
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FIELDS = {"name", "dek_hex", "dek_version", "owner", "scope", "row", "plaintext_hex",
          "envelope_hex", "valid"}


class Refused(Exception):
    pass


def open_envelope(dek: bytes, dek_version: int, envelope: bytes, owner: str, scope: str,
                  row: str) -> bytes:
    """Opens an envelope v1 as a reader following DESIGN.md would."""
    if len(envelope) < 1 or envelope[0] != 0xF1:
        raise Refused("bad magic")
    if len(envelope) < 2 or envelope[1] != 0x01:
        raise Refused("unknown format version")
    if len(envelope) < 6 + 12 + 16:
        raise Refused("truncated")
    (key_version,) = struct.unpack(">I", envelope[2:6])
    if key_version != dek_version:
        raise Refused(f"header names key version {key_version}, the key is {dek_version}")
    nonce = envelope[6:18]
    aad = envelope[:6]
    for part in (owner.encode("utf-8"), scope.encode("utf-8"), row.encode("utf-8")):
        aad += struct.pack(">H", len(part)) + part
    try:
        # cryptography takes ciphertext ‖ tag, which is envelope[18:].
        return AESGCM(dek).decrypt(nonce, envelope[18:], aad)
    except InvalidTag as e:
        raise Refused("authentication failed") from e


def check(v) -> str | None:
    """None when the vector behaves as declared, else why not."""
    if set(v) != FIELDS:
        return f"fields {sorted(v)} != {sorted(FIELDS)}"
    dek = bytes.fromhex(v["dek_hex"])
    if len(dek) != 32:
        return "dek_hex is not 32 bytes"
    plaintext = bytes.fromhex(v["plaintext_hex"])
    envelope = bytes.fromhex(v["envelope_hex"])
    try:
        opened = open_envelope(dek, v["dek_version"], envelope, v["owner"], v["scope"], v["row"])
    except Refused as e:
        return None if not v["valid"] else f"valid vector refused: {e}"
    if not v["valid"]:
        return "invalid vector opened"
    if opened != plaintext:
        return "opened to another plaintext"
    if len(envelope) != 6 + 12 + len(plaintext) + 16:
        return "envelope length is not header + nonce + plaintext + tag"
    return None


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "envelope-v1.json"
    vectors = json.loads(path.read_text(encoding="utf-8"))
    passed = failed = 0
    for v in vectors:
        problem = check(v)
        if problem is None:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {v.get('name', '?')}: {problem}", file=sys.stderr)
    kinds = {v.get("valid") for v in vectors}
    if kinds != {True, False}:
        print("FAIL the file must hold both valid and invalid vectors", file=sys.stderr)
        failed += 1
    print(f"envelope-v1 vectors: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
