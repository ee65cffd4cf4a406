"""Bundles the Matrix spec's registration OpenAPI files into one document.

Usage: bundle_spec.py SPEC_API_DIR BASE_URL OUT_JSON

SPEC_API_DIR is the spec's `data/api/client-server` directory. The files
`registration.yaml` and `registration_tokens.yaml` are read, every relative
`$ref` (to `definitions/…`, `../../identity/definitions/…`) is inlined, and
each path is prefixed with its own file's base path (`/_matrix/client/v3`
and `/_matrix/client/v1`, from each file's `servers` block), so that one
document with `servers: [{url: BASE_URL}]` describes every guarded route as
the gate serves it. Nothing is copied by hand: the document is generated
from the spec at test time.
"""

import json
import os
import sys

import yaml

FILES = ["registration.yaml", "registration_tokens.yaml"]


def load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def resolve(node, base_dir, stack):
    """Returns `node` with every relative file `$ref` inlined."""
    if isinstance(node, list):
        return [resolve(item, base_dir, stack) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        path = os.path.normpath(os.path.join(base_dir, ref.split("#", 1)[0]))
        if path in stack:
            raise SystemExit(f"circular $ref: {' -> '.join(stack + [path])}")
        target = resolve(load(path), os.path.dirname(path), stack + [path])
        siblings = {k: resolve(v, base_dir, stack) for k, v in node.items() if k != "$ref"}
        if not siblings:
            return target
        return {"allOf": [target, siblings]}
    return {k: resolve(v, base_dir, stack) for k, v in node.items()}


def base_path(document, name):
    try:
        return document["servers"][0]["variables"]["basePath"]["default"]
    except (KeyError, IndexError, TypeError):
        raise SystemExit(f"{name}: no servers[0].variables.basePath.default")


def main() -> None:
    api_dir, base_url, out_path = sys.argv[1:4]
    bundled = {
        "openapi": None,
        "info": {
            "title": "Matrix registration routes (bundled from the Matrix spec)",
            "version": "1.0.0",
        },
        "servers": [{"url": base_url}],
        "paths": {},
    }
    for name in FILES:
        path = os.path.join(api_dir, name)
        document = load(path)
        bundled["openapi"] = bundled["openapi"] or document["openapi"]
        prefix = base_path(document, name)
        resolved = resolve(document["paths"], api_dir, [path])
        for route, item in resolved.items():
            full = prefix + route
            if full in bundled["paths"]:
                raise SystemExit(f"duplicate path {full}")
            bundled["paths"][full] = item
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(bundled, f, indent=1, sort_keys=False)
    print(json.dumps({"paths": sorted(bundled["paths"])}))


if __name__ == "__main__":
    main()
