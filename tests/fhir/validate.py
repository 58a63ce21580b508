#!/usr/bin/env python3
"""Validates FHIR Bundles that onkos rendered.

Usage: python validate.py [--codes codes.json] FILE_OR_DIR...

Each JSON file (a directory stands for the *.json files under it) must be a Bundle that the
`fhir.resources` R4B models accept (R4B's DiagnosticReport, Observation and Device take onkos's R4
content). Those models check structure and types, not terminology, so this script also checks:

* every Coding has a system listed in codes.json, a code listed under it and, when it has a
  display, the display listed there;
* every Quantity with a code has the UCUM system and a UCUM code listed in codes.json (a Quantity
  with only a human-readable `unit` is allowed);
* the codes of the required bindings onkos fills (statuses, Bundle.type, deviceName.type) are
  from FHIR R4's value sets (codes.json `required`), and an Observation or component has either a
  value or a dataAbsentReason, not both (obs-6);
* every reference names a resource type FHIR R4 allows there, every `urn:uuid:` reference names
  an entry of the same Bundle, no two entries share a fullUrl, and no property is JSON null.

Prints one OK line per valid file; otherwise lists every problem and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.resource import Resource
from pydantic import BaseModel, ValidationError

UCUM = "http://unitsofmeasure.org"

# FHIR R4's allowed targets of the references onkos fills, by resource and element.
TARGETS = {
    "DiagnosticReport": {
        "subject": {"Patient", "Group", "Device", "Location"},
        "specimen": {"Specimen"},
        "performer": {"Practitioner", "PractitionerRole", "Organization", "CareTeam"},
        "result": {"Observation"},
    },
    "Observation": {
        "subject": {"Patient", "Group", "Device", "Location"},
        "specimen": {"Specimen"},
        "performer": {"Practitioner", "PractitionerRole", "Organization", "CareTeam", "Patient", "RelatedPerson"},
        "device": {"Device", "DeviceMetric"},
        "derivedFrom": {"DocumentReference", "ImagingStudy", "Media", "QuestionnaireResponse", "Observation", "MolecularSequence"},
    },
    "Device": {"parent": {"Device"}},
}


def files(args: list[str]) -> list[pathlib.Path]:
    found: list[pathlib.Path] = []
    for arg in args:
        path = pathlib.Path(arg)
        if path.is_dir():
            found.extend(sorted(path.rglob("*.json")))
        else:
            found.append(path)
    return found


def check_coding(c: dict, where: str, table: dict, problems: list[str]) -> None:
    system, code, display = c.get("system"), c.get("code"), c.get("display")
    if system not in table:
        problems.append(f"{where}: coding system {system!r} is not one onkos uses")
    elif code not in table[system]:
        problems.append(f"{where}: code {code!r} is not in the table for {system}")
    elif display is not None and display != table[system][code]:
        problems.append(
            f"{where}: {system}|{code} has display {display!r}, the table says {table[system][code]!r}"
        )


def check_quantity(q: dict, where: str, table: dict, problems: list[str]) -> None:
    system, code = q.get("system"), q.get("code")
    if code is None and system is None:
        return  # a unit as text only: allowed
    if system != UCUM:
        problems.append(f"{where}: quantity system {system!r} is not UCUM")
    elif code not in table[UCUM]:
        problems.append(f"{where}: UCUM code {code!r} is not in the table")


def walk_model(m: object, where: str, table: dict, problems: list[str]) -> None:
    """Every Coding and Quantity (Age, Duration, … included) of the parsed model."""
    if isinstance(m, list):
        for i, item in enumerate(m):
            walk_model(item, f"{where}[{i}]", table, problems)
        return
    if not isinstance(m, BaseModel):
        return
    if isinstance(m, Coding):
        check_coding(m.model_dump(exclude_none=True), where, table, problems)
    elif isinstance(m, Quantity):
        check_quantity(m.model_dump(exclude_none=True), where, table, problems)
    if isinstance(m, Resource) and where != "Bundle":
        where = f"{where}<{m.__resource_type__}>"
    for name in type(m).model_fields:
        value = getattr(m, name, None)
        if value is not None:
            walk_model(value, f"{where}.{name}", table, problems)


def walk_json(v: object, where: str, table: dict, problems: list[str], refs: list[tuple[str, str]]) -> None:
    """The raw document: `urn:uuid:` references, and (when the models refused the file, so that
    no problem hides behind another) every coding and value quantity."""
    if v is None:
        problems.append(f"{where}: null (FHIR JSON has no nulls: leave the property out)")
    elif isinstance(v, list):
        for i, item in enumerate(v):
            walk_json(item, f"{where}[{i}]", table, problems, refs)
    elif isinstance(v, dict):
        for key, item in v.items():
            here = f"{where}.{key}"
            if key == "reference" and isinstance(item, str) and item.startswith("urn:uuid:"):
                refs.append((here, item))
            if table is not None and key == "coding" and isinstance(item, list):
                for i, c in enumerate(item):
                    if isinstance(c, dict):
                        check_coding(c, f"{here}[{i}]", table, problems)
            if table is not None and key.startswith("value") and key.endswith("Quantity") and isinstance(item, dict):
                check_quantity(item, here, table, problems)
            walk_json(item, here, table, problems, refs)


def as_list(v: object) -> list:
    return v if isinstance(v, list) else [] if v is None else [v]


def check_resource(r: dict, where: str, kinds: dict[str, str], required: dict, problems: list[str]) -> None:
    """Required bindings, obs-6 and reference targets of one entry's resource."""
    kind = r.get("resourceType")
    allowed = required.get(f"{kind}.status")
    if allowed is not None and "status" in r and r["status"] not in allowed:
        problems.append(f"{where}: status {r.get('status')!r} is not one of {kind}.status's codes")
    for i, name in enumerate(as_list(r.get("deviceName"))):
        if isinstance(name, dict) and name.get("type") not in required["Device.deviceName.type"]:
            problems.append(f"{where}.deviceName[{i}]: type {name.get('type')!r} is not a DeviceNameType code")
    if kind == "Observation":
        for part, here in [(r, where)] + [(c, f"{where}.component[{i}]") for i, c in enumerate(as_list(r.get("component")))]:
            has_value = any(k.startswith("value") for k in part)
            if has_value and "dataAbsentReason" in part:
                problems.append(f"{here}: obs-6: a dataAbsentReason beside a value")
    for element, targets in TARGETS.get(kind, {}).items():
        for i, ref in enumerate(as_list(r.get(element))):
            if not isinstance(ref, dict):
                continue
            literal = ref.get("reference")
            if isinstance(literal, str) and literal.startswith("urn:uuid:"):
                target = kinds.get(literal)
            elif isinstance(literal, str) and "/" in literal:
                target = literal.rstrip("/").split("/")[-2]
            else:
                target = ref.get("type")
            if target is not None and target not in targets:
                problems.append(f"{where}.{element}[{i}]: a {target} where FHIR R4 allows {sorted(targets)}")


def validate(path: pathlib.Path, table: dict, required: dict) -> list[str]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"not readable as JSON: {e}"]
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        return ["not a Bundle"]
    problems: list[str] = []
    try:
        parsed = Bundle.model_validate(doc)
    except ValidationError as e:
        for err in e.errors():
            location = ".".join(str(p) for p in err["loc"])
            problems.append(f"R4B model: {location}: {err['msg']}")
        parsed = None
    if parsed is not None:
        walk_model(parsed, "Bundle", table, problems)
    refs: list[tuple[str, str]] = []
    walk_json(doc, "Bundle", None if parsed is not None else table, problems, refs)
    if doc.get("type") not in required["Bundle.type"]:
        problems.append(f"Bundle.type {doc.get('type')!r} is not a BundleType code")
    entries = [e for e in as_list(doc.get("entry")) if isinstance(e, dict)]
    urls = [e.get("fullUrl") for e in entries]
    kinds = {e.get("fullUrl"): (e.get("resource") or {}).get("resourceType") for e in entries}
    for i, e in enumerate(entries):
        if isinstance(e.get("resource"), dict):
            check_resource(e["resource"], f"Bundle.entry[{i}].resource", kinds, required, problems)
    for url in sorted({u for u in urls if u and urls.count(u) > 1}):
        problems.append(f"fullUrl {url} is used by more than one entry")
    for where, ref in refs:
        if ref not in urls:
            problems.append(f"{where}: {ref} is not an entry of the Bundle")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", default=pathlib.Path(__file__).with_name("codes.json"), type=pathlib.Path)
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    args = parser.parse_args()
    codes = json.loads(args.codes.read_text())
    table, required = codes["codes"], codes["required"]
    paths = files(args.paths)
    if not paths:
        print("no JSON files found in " + ", ".join(args.paths), file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        problems = validate(path, table, required)
        if problems:
            failed += 1
            print(f"FAIL {path}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        else:
            print(f"OK {path}")
    if failed:
        print(f"{failed} of {len(paths)} file(s) failed FHIR validation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
