"""Summarizes a Schemathesis NDJSON event report for tests/e2e/spec_fuzz.rs.

Usage: spec_fuzz_summary.py NDJSON QUIRKS_JSONL OUT_JSON

Writes one JSON object: test cases and requests (total, per operation, per
phase), response statuses by origin (the gate's own answers carry no
`Server: Synapse/…` header), the gate's errcodes, the check failures
grouped by check, origin and status (with one reproducible example each), engine errors, the
known quirks the checks excused (from st_hooks.py), and the gate refusals
that carry no CORS header.
"""

import base64
import collections
import json
import sys


def decode(body):
    if isinstance(body, dict) and "$base64" in body:
        return base64.b64decode(body["$base64"]).decode("utf-8", "replace")
    if body is None:
        return ""
    return body if isinstance(body, str) else json.dumps(body)


def origin(response) -> str:
    servers = response.get("headers", {}).get("server", [])
    return "synapse" if any(s.startswith("Synapse/") for s in servers) else "gate"


def main() -> None:
    ndjson_path, quirks_path, out_path = sys.argv[1:4]
    cases = {}
    case_phase = {}
    case_operation = {}
    interactions = {}
    failures = {}
    errors = []
    engine = {}
    warnings = []
    for line in open(ndjson_path, encoding="utf-8"):
        event = json.loads(line)
        (kind, data), = event.items()
        if kind == "ScenarioFinished":
            recorder = data["recorder"]
            label = recorder["label"]
            for case_id, case in recorder.get("cases", {}).items():
                cases[case_id] = case["value"]
                case_phase[case_id] = data.get("phase", "?")
                case_operation[case_id] = label
            for case_id, interaction in recorder.get("interactions", {}).items():
                interactions[case_id] = interaction
            for case_id, checks in recorder.get("checks", {}).items():
                for check in checks:
                    if check.get("status") == "success":
                        continue
                    failure = (check.get("failure_info") or {}).get("failure") or {}
                    response = (interactions.get(case_id) or {}).get("response") or {}
                    request = (interactions.get(case_id) or {}).get("request") or {}
                    key = (
                        check["name"],
                        failure.get("code"),
                        label,
                        response.get("status_code"),
                        (failure.get("message") or "").split("\n")[0],
                    )
                    if key in failures:
                        failures[key]["count"] += 1
                        continue
                    failures[key] = {
                        "check": check["name"],
                        "code": failure.get("code"),
                        "title": failure.get("title"),
                        "message": failure.get("message"),
                        "operation": label,
                        "case_id": case_id,
                        "phase": data.get("phase"),
                        "status": response.get("status_code"),
                        "origin": origin(response) if response else None,
                        "response_body": decode(response.get("content"))[:400],
                        "request": f"{request.get('method')} {request.get('uri')} "
                        f"{decode(request.get('body'))[:400]}".strip(),
                        "count": 1,
                    }
        elif kind in ("NonFatalError", "FatalError", "Interrupted"):
            errors.append({"kind": kind, "detail": json.dumps(data)[:1000]})
        elif kind == "EngineFinished":
            engine = {"running_time": data.get("running_time"), "stop_reason": data.get("stop_reason")}
        elif kind == "SchemaAnalysisWarnings":
            warnings.append(json.dumps(data)[:500])

    by_operation = collections.defaultdict(lambda: {"cases": 0, "requests": 0})
    by_phase = collections.Counter()
    statuses = {"gate": collections.Counter(), "synapse": collections.Counter()}
    gate_errcodes = collections.Counter()
    no_cors = 0
    no_cors_example = None
    requests = 0
    no_response = 0
    for case_id in cases:
        by_operation[case_operation[case_id]]["cases"] += 1
        by_phase[case_phase[case_id]] += 1
    for case_id, interaction in interactions.items():
        response = interaction.get("response")
        if not response:
            no_response += 1
            continue
        requests += 1
        by_operation[case_operation.get(case_id, "?")]["requests"] += 1
        who = origin(response)
        status = str(response.get("status_code"))
        statuses[who][status] += 1
        if who == "gate":
            try:
                body = json.loads(decode(response.get("content")))
                gate_errcodes[f"{status} {body.get('errcode')}"] += 1
            except ValueError:
                gate_errcodes[f"{status} (not JSON)"] += 1
            if "access-control-allow-origin" not in response.get("headers", {}):
                no_cors += 1
                if no_cors_example is None:
                    request = interaction.get("request") or {}
                    no_cors_example = f"{request.get('method')} {request.get('uri')} -> {status}"

    quirks = {}
    try:
        for line in open(quirks_path, encoding="utf-8"):
            quirk = json.loads(line)
            entry = quirks.setdefault(
                quirk["quirk"], {"count": 0, "why": quirk["why"], "checks": set(), "example": None}
            )
            entry["count"] += 1
            entry["checks"].add(quirk["check"])
            if entry["example"] is None:
                entry["example"] = f"{quirk['operation']} -> {quirk['status']} {quirk['body'][:160]}"
    except FileNotFoundError:
        pass
    for entry in quirks.values():
        entry["checks"] = sorted(entry["checks"])

    groups = {}
    for failure in failures.values():
        key = (failure["check"], failure["code"], failure["origin"], failure["status"])
        group = groups.setdefault(
            key,
            {
                "check": failure["check"],
                "code": failure["code"],
                "title": failure["title"],
                "origin": failure["origin"],
                "status": failure["status"],
                "count": 0,
                "operations": set(),
                "example": failure,
            },
        )
        group["count"] += failure["count"]
        group["operations"].add(failure["operation"])
    for group in groups.values():
        group["operations"] = sorted(group["operations"])

    out = {
        "test_cases": len(cases),
        "requests": requests,
        "no_response": no_response,
        "by_operation": dict(sorted(by_operation.items())),
        "by_phase": dict(by_phase),
        "statuses": {k: dict(sorted(v.items())) for k, v in statuses.items()},
        "gate_errcodes": dict(sorted(gate_errcodes.items())),
        "failure_groups": list(groups.values()),
        "distinct_failures": len(failures),
        "errors": errors,
        "engine": engine,
        "quirks": quirks,
        "gate_refusals_without_cors": no_cors,
        "gate_refusal_without_cors_example": no_cors_example,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
