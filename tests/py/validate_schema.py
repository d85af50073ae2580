#!/usr/bin/env python3
"""Validates JSON documents against a JSON Schema (draft 2020-12) with `jsonschema`.

    validate_schema.py SCHEMA DOC...

Checks the schema itself first, then each document (a file). Prints `OK <doc>` or
`INVALID <doc>: <first error>` per document; exits 1 when any is invalid, 2 on a bad schema.
"""

import json
import sys


def main() -> int:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    with open(sys.argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        print(f"BAD SCHEMA {sys.argv[1]}: {e.message}", flush=True)
        return 2
    validator = Draft202012Validator(schema)
    failed = False
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            failed = True
            e = errors[0]
            where = "/".join(str(p) for p in e.path)
            print(f"INVALID {path}: at /{where}: {e.message}", flush=True)
        else:
            print(f"OK {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
