#!/usr/bin/env python3
"""Generates envelope v1 test vectors: phi-types/tests/vectors/envelope-v1.json.

The vectors are a published contract (DESIGN.md, "Envelope format v1"):
any AES-256-GCM library opens the valid ones from the format description
alone, and must refuse the invalid ones.

    envelope = 0xF1 ‖ 0x01 ‖ u32be(dek_version) ‖ nonce(12) ‖ ciphertext ‖ tag(16)
    aad      = envelope[0..6] ‖ u16be(len owner) ‖ owner
                              ‖ u16be(len scope) ‖ scope
                              ‖ u16be(len row)   ‖ row

owner, scope and row are UTF-8 bytes; row is empty when the model has no row
key. Keys and nonces are fixed (derived from labels with SHA-256), so the
output is byte-for-byte reproducible: run `python3 generate.py` and the JSON
file must not change. `check.py` re-opens every vector independently.

Requires the `cryptography` package.
"""

import hashlib
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = 0xF1
FORMAT_V1 = 0x01
NONCE_LEN = 12
TAG_LEN = 16

OUT = Path(__file__).resolve().parent / "envelope-v1.json"


def derive(label: str, length: int) -> bytes:
    """Fixed test material: SHA-256 of a label, truncated."""
    return hashlib.sha256(("phi envelope-v1 test vector: " + label).encode()).digest()[:length]


def header(dek_version: int) -> bytes:
    return bytes([MAGIC, FORMAT_V1]) + struct.pack(">I", dek_version)


def field(data: bytes) -> bytes:
    assert len(data) <= 0xFFFF
    return struct.pack(">H", len(data)) + data


def aad(head: bytes, owner: str, scope: str, row: str) -> bytes:
    return head[:6] + field(owner.encode()) + field(scope.encode()) + field(row.encode())


def seal(dek: bytes, dek_version: int, nonce: bytes, owner: str, scope: str, row: str,
         plaintext: bytes) -> bytes:
    head = header(dek_version)
    sealed = AESGCM(dek).encrypt(nonce, plaintext, aad(head, owner, scope, row))
    return head + nonce + sealed  # sealed = ciphertext ‖ tag


def vector(name, dek, dek_version, owner, scope, row, plaintext, envelope, valid):
    return {
        "name": name,
        "dek_hex": dek.hex(),
        "dek_version": dek_version,
        "owner": owner,
        "scope": scope,
        "row": row,
        "plaintext_hex": plaintext.hex(),
        "envelope_hex": envelope.hex(),
        "valid": valid,
    }


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


DEK_A = bytes(range(32))  # 00 01 02 … 1f
DEK_B = derive("dek B", 32)
DEK_C = derive("dek C", 32)

# A 64-byte value with readable content.
NOTE_64 = b"Patient reports mild headache; follow up in 2 weeks. BP 120/80.."
assert len(NOTE_64) == 64


def valid_cases():
    """(name, dek, dek_version, owner, scope, row, plaintext)."""
    long_scope = "clinic_archive_2019." + "x" * 280  # 300 bytes
    assert len(long_scope.encode()) > 256

    # AAD sizes straddling 256 bytes (one stack buffer of 256 in phi-types).
    owner, row = "provider-17", "C-1001"
    fixed = 6 + 2 + len(owner) + 2 + 2 + len(row)
    scope_256 = "cases." + "n" * (256 - fixed - len("cases."))
    scope_257 = scope_256 + "n"
    assert len(aad(header(1), owner, scope_256, row)) == 256
    assert len(aad(header(1), owner, scope_257, row)) == 257

    return [
        ("empty-plaintext", DEK_A, 1, "provider-17", "cases.notes", "C-1001", b""),
        ("plaintext-16-bytes", DEK_A, 1, "provider-17", "cases.insurer_id", "C-1001",
         b"INS-0000-1234567"),
        ("plaintext-64-bytes", DEK_A, 1, "provider-17", "cases.notes", "C-1001", NOTE_64),
        ("plaintext-1-KiB", DEK_B, 3, "provider-17", "cases.notes", "C-1002",
         bytes((i * 7 + 3) % 256 for i in range(1024))),
        ("utf8-multibyte-name", DEK_A, 1, "provider-17", "cases.patient_last", "C-1003",
         "Zoë Ñúñez-Øster 李小龍 🩺".encode()),
        ("date-1980-01-15", DEK_A, 1, "provider-17", "cases.date_of_birth", "C-1003",
         b"1980-01-15"),
        ("i64-big-endian", DEK_A, 1, "provider-17", "cases.balance_cents", "C-1003",
         struct.pack(">q", -1234567890123)),
        ("non-ascii-owner", DEK_B, 2, "prøvider-ü-17 医院", "cases.patient_first", "C-1004",
         b"Jane"),
        ("empty-row", DEK_A, 1, "provider-17", "patients.ssn", "", b"078-05-1120"),
        ("long-scope-aad-over-256-bytes", DEK_B, 1, "provider-17", long_scope, "C-1005",
         b"archived value"),
        ("aad-exactly-256-bytes", DEK_A, 1, owner, scope_256, row, b"boundary"),
        ("aad-257-bytes", DEK_A, 1, owner, scope_257, row, b"boundary"),
        ("dek-version-0x01020304", DEK_C, 0x01020304, "tenant-a", "cases.insurer", "C-1006",
         b"Acme Health"),
        ("dek-version-max", DEK_C, 0xFFFFFFFF, "tenant-a", "cases.insurer", "C-1006",
         b"Acme Health"),
        ("uuid-row-key", DEK_B, 1, "user-7f3a", "deleted_cases.patient_last",
         "6f1c2a4e-8b5d-4e1f-9a7c-3d2b1e0f4a5c", b"Roe"),
    ]


UUID_OWNER = "0b7e4a52-3c1d-4f6e-8a9b-2c3d4e5f6a7b"
UUID_ROW = "6f1c2a4e-8b5d-4e1f-9a7c-3d2b1e0f4a5c"


def typed_cases():
    """Encodings of later value and key types (appended, so that the earlier
    vectors keep their place in the file).

    A UUID owner or row key is bound as its lowercase hyphenated text; a
    DateTime<Utc> is RFC 3339 text in UTC with nine fraction digits and `Z`;
    a serde_json::Value is compact JSON text.
    """
    return [
        ("uuid-owner-and-row-key", DEK_B, 1, UUID_OWNER, "notes.body", UUID_ROW, b"Roe"),
        ("datetime-utc-2024-03-01", DEK_A, 1, "provider-17", "cases.admitted_at", "C-1007",
         b"2024-03-01T08:30:00.000000000Z"),
        ("datetime-utc-nanoseconds", DEK_A, 1, "provider-17", "cases.admitted_at", "C-1007",
         b"1980-01-15T23:59:59.123456789Z"),
        ("json-value-compact", DEK_A, 1, "provider-17", "cases.vitals", "C-1007",
         '{"allergies":["penicillin","latex"],"name":"Zoë","weight_kg":72.5}'.encode()),
    ]


def build():
    vectors = []
    for name, dek, version, owner, scope, row, plaintext in valid_cases():
        nonce = derive("nonce " + name, NONCE_LEN)
        env = seal(dek, version, nonce, owner, scope, row, plaintext)
        vectors.append(vector(name, dek, version, owner, scope, row, plaintext, env, True))

    # Invalid cases: a valid envelope, tampered or presented under another binding.
    name, dek, version, owner, scope, row, pt = (
        "base", DEK_A, 7, "provider-17", "cases.notes", "C-2001", NOTE_64)
    base = seal(dek, version, derive("nonce invalid base", NONCE_LEN), owner, scope, row, pt)
    ct_at = 6 + NONCE_LEN
    tag_at = len(base) - TAG_LEN

    def bad(case, envelope, **changes):
        fields = dict(dek=dek, dek_version=version, owner=owner, scope=scope, row=row)
        fields.update(changes)
        assert envelope != base or changes, case
        return vector("invalid-" + case, fields["dek"], fields["dek_version"], fields["owner"],
                      fields["scope"], fields["row"], pt, envelope, False)

    relabelled = header(version + 1) + base[6:]
    vectors += [
        bad("tag-bit-flipped", flip_bit(base, tag_at + 5, 3)),
        bad("ciphertext-bit-flipped", flip_bit(base, ct_at + 10, 0)),
        # The header names version 8 while the key is version 7.
        bad("header-key-version-changed", relabelled),
        # The same, with the key presented as version 8 too: only the header's
        # place in the associated data catches it.
        bad("header-key-version-changed-key-relabelled", relabelled, dek_version=version + 1),
        bad("nonce-changed", flip_bit(base, 6 + 4, 7)),
        bad("copied-to-another-owner", base, owner="provider-18"),
        bad("copied-to-another-scope", base, scope="deleted_cases.notes"),
        bad("copied-to-another-row", base, row="C-2002"),
        bad("row-key-dropped", base, row=""),
        bad("wrong-key-same-version", base, dek=DEK_B),
        bad("truncated-tag", base[:-1]),
        bad("format-version-changed", bytes([MAGIC, 0x02]) + base[2:]),
    ]

    for name, dek, version, owner, scope, row, plaintext in typed_cases():
        nonce = derive("nonce " + name, NONCE_LEN)
        env = seal(dek, version, nonce, owner, scope, row, plaintext)
        vectors.append(vector(name, dek, version, owner, scope, row, plaintext, env, True))
    # A UUID bound in another spelling (upper case) is another row.
    uuid_env = vectors[-len(typed_cases())]
    assert uuid_env["name"] == "uuid-owner-and-row-key"
    vectors.append(vector("invalid-uuid-row-key-upper-case", DEK_B, 1, UUID_OWNER, "notes.body",
                          UUID_ROW.upper(), b"Roe", bytes.fromhex(uuid_env["envelope_hex"]),
                          False))
    return vectors


def main():
    vectors = build()
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "duplicate vector names"
    text = json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
    if "--check" in sys.argv[1:]:
        if OUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUT.name} is stale: run python3 {Path(__file__).name}")
        print(f"{OUT.name} is up to date ({len(vectors)} vectors)")
        return
    OUT.write_text(text, encoding="utf-8")
    valid = sum(v["valid"] for v in vectors)
    print(f"wrote {OUT.name}: {valid} valid, {len(vectors) - valid} invalid")


if __name__ == "__main__":
    main()
