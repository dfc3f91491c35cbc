#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into corpus/<target>/.

Run from anywhere: python3 fuzz/seed_corpus.py. The seeds are small valid
inputs (the envelope test vectors, each value type's encoding, wrapped keys,
table descriptions) from which libFuzzer mutates; the files are committed.
"""

import base64
import hashlib
import json
import os
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "phi-types", "tests", "vectors", "envelope-v1.json")
# The order of VECTOR_KEYS in fuzz_targets/envelope_open.rs.
VECTOR_KEYS = [
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "3e34d402f959c04bb21c30e4363ce07e0c7d8b2baf909fafd30fe24aeae7df50",
    "43835e90feb7045387c3fbe8cbd859a688f3052d12411ce14211e68e2cc83c5e",
]
# The master key of fuzz_targets/kek_unwrap.rs.
KEK_MASTER = bytes([0xA5]) * 32
KEK_ID = b"fuzz-kek"


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def field(data):
    return struct.pack(">H", len(data)) + data


def main():
    vectors = json.load(open(VECTORS, encoding="utf-8"))
    for v in vectors:
        envelope = bytes.fromhex(v["envelope_hex"])
        name = v["name"]
        write("envelope_parse", name, envelope)
        key = VECTOR_KEYS.index(v["dek_hex"])
        binding = (
            field(v["owner"].encode())
            + field(v["scope"].encode())
            + field(v["row"].encode())
        )
        # Mode 0 (open with the vector's key), tampering with byte 20.
        write("envelope_open", "open-" + name, bytes([key << 1, 0, 20, 0x01]) + binding + envelope)
        # Mode 1 (seal the plaintext and tamper).
        if v["valid"]:
            write(
                "envelope_open",
                "seal-" + name,
                bytes([1, 0, 7, 0x80]) + binding + bytes.fromhex(v["plaintext_hex"]),
            )
    for name, data in [
        ("empty", b""),
        ("bad-magic", b"Doe"),
        ("truncated", bytes([0xF1, 0x01, 0, 0, 0, 1])),
        ("format-2", bytes([0xF1, 0x02]) + bytes(32)),
    ]:
        write("envelope_parse", name, data)

    for name, data in [
        ("string", "Zoë Doe-Smith".encode()),
        ("empty", b""),
        ("bytes", bytes([0, 1, 255])),
        ("i8", struct.pack(">b", -2)),
        ("i16", struct.pack(">h", -2)),
        ("i32", struct.pack(">i", 2**31 - 1)),
        ("i64", struct.pack(">q", -42)),
        ("bool", b"\x01"),
        ("date", b"1980-01-15"),
        ("datetime", b"1980-01-15T08:30:00"),
        ("datetime-micros", b"1980-01-15T08:30:05.123456"),
        ("date-far", b"+12345-06-07"),
        ("leap-second", b"2016-12-31T23:59:60"),
    ]:
        write("value_decode", name, data)

    aead = AESGCM(KEK_MASTER)
    for owner, version in [(b"provider-17", 1), (b"tenant-a", 0x01020304)]:
        aad = b"phi-dek-v1" + field(KEK_ID) + field(owner) + struct.pack(">I", version)
        nonce = hashlib.sha256(owner).digest()[:12]
        dek = hashlib.sha256(b"dek" + owner).digest()
        wrapped = nonce + aead.encrypt(nonce, dek, aad)
        head = struct.pack(">I", version) + bytes([0, 30, 0x04, len(owner)]) + owner
        write("kek_unwrap", "unwrap-" + owner.decode(), bytes([0]) + head + wrapped)
        write("kek_unwrap", "wrap-" + owner.decode(), bytes([1]) + head + dek)
    key_text = base64.b64encode(bytes(range(32)))
    write("kek_unwrap", "master-key", bytes([2, 0, 0, 0, 1, 0, 0, 0, 0]) + key_text + b"\n")
    write("kek_unwrap", "master-key-short", bytes([2, 0, 0, 0, 1, 0, 0, 0, 0]) + b"AAAA")

    for name, spec in [
        ("plain", "cases:user_id:case_id:patient_first,patient_last,patient_dob,ins_provider"),
        ("no-row-key", "notes:owner::body"),
        ("pinned-scope", "cases:user_id:case_id:patient_last,dob@cases.date_of_birth"),
        ("typed", "visits:user_id#i64:id#i64:reason,notes"),
        ("schema", "clinic.cases:user_id#text:case_id#u32: a , b@x.y "),
        ("bad-type", "t:o#i128:k:c"),
    ]:
        write("table_spec", name, spec.encode())

    for name, text in [
        ("name", " Doe "),
        ("accents", " ÉLISE "),
        ("titlecase", "ǅemal"),
        ("sigma", "ΟΔΥΣΣΕΥΣ"),
        ("dotted-i", "İstanbul"),
        ("date", "1980-01-15"),
    ]:
        write("blind_normalize", name, text.encode())
    write("blind_normalize", "not-utf8", bytes([0xFF, 0x20, 0x41]))


if __name__ == "__main__":
    main()
