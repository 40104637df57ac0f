"""Decode one Kafka message of biofeed.points.v1 with fastavro, using only the .avsc file.

Usage: decode_frame.py SCHEMA.avsc MESSAGE.bin  -> the frame as JSON on stdout.

The message is Avro single-object encoding: C3 01, the writer schema's CRC-64-AVRO fingerprint
(8 bytes, little-endian), then the body. The fingerprint is checked against the schema file.
"""

import io
import json
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form


def main(schema_path: str, message_path: str) -> None:
    with open(schema_path) as f:
        schema = fastavro.parse_schema(json.load(f))
    message = open(message_path, "rb").read()
    if message[:2] != b"\xc3\x01":
        sys.exit("not single-object encoding")
    expected = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    if message[2:10].hex() != expected:
        sys.exit(f"fingerprint {message[2:10].hex()} is not the schema's {expected}")
    body = io.BytesIO(message[10:])
    record = fastavro.schemaless_reader(body, schema)
    if body.read():
        sys.exit("bytes left after the record")
    json.dump(record, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
