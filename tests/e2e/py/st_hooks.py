"""Schemathesis checks for the gate (loaded through SCHEMATHESIS_HOOKS).

Responses are attributed by origin: Synapse marks every answer with
`Server: Synapse/…` and the gate forwards it unchanged, while an answer the
gate makes itself carries no `Server` header.

Checks defined here:

- `gate_refusal_shape`: every answer the gate makes itself is a Matrix
  error: a 4xx (or the gate's 502/504), `Content-Type: application/json`, a
  JSON object with a string `errcode` the gate uses and a string `error`; a
  429 also carries a positive integer `retry_after_ms` and a whole-second
  `Retry-After`. No exceptions.
- `matrix_status_code_conformance` (instead of `status_code_conformance`):
  a status is conformant when the operation documents it, or when it is a
  Matrix standard error that the spec lets every endpoint return (400
  M_MISSING_PARAM / M_INVALID_PARAM / M_NOT_JSON / M_BAD_JSON, 404 and 405
  M_UNRECOGNIZED, 413 M_TOO_LARGE, 429 M_LIMIT_EXCEEDED) with its errcode.
- `not_a_server_error_except_known`, `positive_data_acceptance_except_known`,
  `negative_data_rejection_except_known`: the built-in checks, run as they
  are, except that a failure matching one entry of KNOWN_QUIRKS below (a
  Synapse bug or a rule of the spec, each with its exact trigger) is
  excused. `matrix_status_code_conformance` uses the same table.

Excused failures are appended, one JSON object a line, to the file named by
`MGK_ST_QUIRKS` (if set), so the test can report how often each was seen.
"""

import json
import os
import threading
from dataclasses import dataclass
from typing import Callable

import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

GATE_ERRCODES = {
    "M_INVALID_USERNAME",
    "M_USER_IN_USE",
    "M_BAD_JSON",
    "M_NOT_JSON",
    "M_UNRECOGNIZED",
    "M_FORBIDDEN",
    "M_MISSING_PARAM",
    "M_INVALID_PARAM",
    "M_TOO_LARGE",
    "M_LIMIT_EXCEEDED",
    # 408 (slow body), 502 and 504 (homeserver unreachable or silent)
    "M_UNKNOWN",
}

STANDARD_ERRORS = {
    (400, "M_MISSING_PARAM"),
    (400, "M_INVALID_PARAM"),
    (400, "M_NOT_JSON"),
    (400, "M_BAD_JSON"),
    (404, "M_UNRECOGNIZED"),
    (405, "M_UNRECOGNIZED"),
    (413, "M_TOO_LARGE"),
    (429, "M_LIMIT_EXCEEDED"),
}

REGISTER = "POST /_matrix/client/v3/register"
MSISDN = "POST /_matrix/client/v3/register/msisdn/requestToken"
VALIDITY = "GET /_matrix/client/v1/register/m.login.registration_token/validity"


def from_gate(response) -> bool:
    return not any(v.startswith("Synapse/") for v in response.headers.get("server", []))


def json_body(response):
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def errcode_and_error(response):
    body = json_body(response)
    if not isinstance(body, dict):
        return None, ""
    error = body.get("error")
    return body.get("errcode"), error if isinstance(error, str) else ""


def not_a_string(value) -> bool:
    return value is not None and not isinstance(value, str)


# === known quirks ===


@dataclass(frozen=True)
class Quirk:
    name: str
    checks: frozenset
    applies: Callable
    why: str


def _guest_body_ignored(case, response) -> bool:
    meta = case.meta
    query = case.query or {}
    body = case.body
    return (
        case.operation.label == REGISTER
        and query == {"kind": "guest"}
        and 200 <= response.status_code < 300
        and meta is not None
        and meta.is_negative_at(ParameterLocation.BODY)
        and not any(
            meta.is_negative_at(location)
            for location in ParameterLocation
            if location != ParameterLocation.BODY
        )
        and isinstance(body, dict)
        and not not_a_string(body.get("initial_device_display_name"))
    )


def _synapse_msisdn_crash(case, response) -> bool:
    body = case.body
    return (
        case.operation.label == MSISDN
        and not from_gate(response)
        and response.status_code == 500
        and isinstance(body, dict)
        and any(
            k in body and not isinstance(body[k], str)
            for k in ("client_secret", "country", "phone_number")
        )
    )


def _synapse_non_ascii_token(case, response) -> bool:
    token = (case.query or {}).get("token")
    errcode, error = errcode_and_error(response)
    return (
        case.operation.label == VALIDITY
        and not from_gate(response)
        and (response.status_code, errcode) == (400, "M_UNKNOWN")
        and "must be ascii" in error
        and isinstance(token, str)
        and not token.isascii()
    )


KNOWN_QUIRKS = [
    Quirk(
        "spec: guest bodies are ignored",
        frozenset({"negative_data_rejection"}),
        _guest_body_ignored,
        "`POST /register?kind=guest` with a schema-invalid body field other than "
        "`initial_device_display_name` (or that field `null`) registers a guest (2xx): the spec "
        "says the server MUST ignore every guest body field but `initial_device_display_name`, "
        "the gate forwards only that field (`null` counts as absent, as in Synapse), and refuses "
        "a non-string one itself with 400 M_BAD_JSON.",
    ),
    Quirk(
        "Synapse bug: msisdn requestToken 500 on non-string fields",
        frozenset({"not_a_server_error", "matrix_status_code_conformance"}),
        _synapse_msisdn_crash,
        "Synapse 1.163.2 answers `POST /register/msisdn/requestToken` with 500 when "
        "`client_secret`, `country` or `phone_number` is present but not a string (`null` "
        "included; a TypeError in its "
        "client-secret check or in `phonenumbers.parse`); asked directly it does the same. The "
        "gate only re-serializes requestToken bodies and does not check their field types.",
    ),
    Quirk(
        "Synapse: non-ASCII registration token is 400 M_UNKNOWN",
        frozenset({"positive_data_acceptance", "matrix_status_code_conformance"}),
        _synapse_non_ascii_token,
        "Synapse refuses a non-ASCII `token` on the validity route with 400 M_UNKNOWN "
        "\"Query parameter 'token' must be ascii\" (the schema allows any string, the route "
        "documents no 400, and the standard code would be M_INVALID_PARAM). The gate forwards "
        "the token unchanged.",
    ),
]

_QUIRKS_LOCK = threading.Lock()


def excused(check: str, case, response) -> bool:
    for quirk in KNOWN_QUIRKS:
        if check in quirk.checks and quirk.applies(case, response):
            path = os.environ.get("MGK_ST_QUIRKS")
            if path:
                line = json.dumps(
                    {
                        "quirk": quirk.name,
                        "check": check,
                        "why": quirk.why,
                        "operation": case.operation.label,
                        "status": response.status_code,
                        "body": response.content[:200].decode("utf-8", "replace"),
                    }
                )
                with _QUIRKS_LOCK, open(path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            return True
    return False


def _except_known(name: str, builtin):
    def check(ctx, response, case):
        try:
            return builtin(ctx, response, case)
        except AssertionError:
            if excused(name, case, response):
                return None
            raise

    check.__name__ = f"{name}_except_known"
    check.__doc__ = f"`{name}`, minus the failures KNOWN_QUIRKS explains."
    return schemathesis.check(check)


not_a_server_error_except_known = _except_known("not_a_server_error", not_a_server_error)
positive_data_acceptance_except_known = _except_known(
    "positive_data_acceptance", positive_data_acceptance
)
negative_data_rejection_except_known = _except_known(
    "negative_data_rejection", negative_data_rejection
)


# === the gate's own answers ===


@schemathesis.check
def gate_refusal_shape(ctx, response, case):
    """The gate's own answers are well-formed Matrix errors."""
    if not from_gate(response):
        return None
    status = response.status_code
    content_type = response.headers.get("content-type", [""])[0]
    body = json_body(response)
    problems = []
    if not 400 <= status < 500 and status not in (502, 504):
        problems.append(f"status {status} is not a refusal")
    if content_type != "application/json":
        problems.append(f"Content-Type is {content_type!r}, not application/json")
    if not isinstance(body, dict):
        problems.append("body is not a JSON object")
    else:
        errcode = body.get("errcode")
        if not isinstance(errcode, str):
            problems.append("errcode is missing or not a string")
        elif errcode not in GATE_ERRCODES:
            problems.append(f"errcode {errcode!r} is not one the gate uses")
        if not isinstance(body.get("error"), str):
            problems.append("error is missing or not a string")
        if status == 429:
            retry = body.get("retry_after_ms")
            if not (isinstance(retry, int) and not isinstance(retry, bool) and retry > 0):
                problems.append(f"429 without a positive integer retry_after_ms ({retry!r})")
            header = response.headers.get("retry-after", [""])[0]
            if not header.isdigit() or int(header) < 1:
                problems.append(f"429 without a Retry-After in whole seconds ({header!r})")
    if problems:
        raise AssertionError(
            f"gate refusal {status} is malformed: {'; '.join(problems)}; "
            f"body {response.content[:300]!r}"
        )
    return None


@schemathesis.check
def matrix_status_code_conformance(ctx, response, case):
    """Documented status, or a Matrix standard error with its errcode."""
    if case.method.upper() != case.operation.method.upper():
        return None  # unsupported-method probes: `unsupported_method` judges those
    documented = {str(code).upper() for code in case.operation.responses.status_codes}
    status = response.status_code
    if "DEFAULT" in documented or str(status) in documented or f"{status // 100}XX" in documented:
        return None
    errcode, _ = errcode_and_error(response)
    if (status, errcode) in STANDARD_ERRORS:
        return None
    if excused("matrix_status_code_conformance", case, response):
        return None
    origin = "gate" if from_gate(response) else "Synapse"
    raise AssertionError(
        f"{origin} answered {status} {errcode}, neither documented for "
        f"{case.operation.label} ({', '.join(sorted(documented))}) nor a Matrix "
        "standard error"
    )
