"""Build gateway/r4_definitions.json from the FHIR R4 (4.0.1) definitions.

Input: the specification's `search-parameters.json`, `profiles-resources.json` and
`valuesets.json` (published by HL7 under CC0 in the R4 definitions package). Output: a
compact table of resource types; per type, each search parameter's type, FHIRPath
expression and reference targets; and the codes allowed for every `code` element with a
required binding (Task.status, CarePlan.intent…). Run:
python tools/gen_r4_definitions.py DEFS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "gateway" / "r4_definitions.json"
SUPPORTED_TYPES = {"string", "token", "reference", "date", "number", "quantity", "uri"}


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath union at top level (outside parentheses and quotes)."""
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def root_of(part: str) -> str:
    return part.lstrip("(").split(".", 1)[0].split(" ", 1)[0]


def concept_codes(concepts: list[dict]) -> list[str]:
    codes = []
    for concept in concepts:
        codes.append(concept["code"])
        codes.extend(concept_codes(concept.get("concept", [])))
    return codes


def valueset_codes(url: str, valuesets: dict, codesystems: dict) -> list[str] | None:
    """Codes of a value set built from whole code systems or listed codes; else None."""
    vs = valuesets.get(url.split("|")[0])
    if vs is None or "compose" not in vs:
        return None
    codes: list[str] = []
    for include in vs["compose"]["include"]:
        if "filter" in include or "valueSet" in include:
            return None
        if "concept" in include:
            codes.extend(c["code"] for c in include["concept"])
        elif include.get("system") in codesystems:
            codes.extend(concept_codes(codesystems[include["system"]].get("concept", [])))
        else:
            return None
    return sorted(set(codes)) or None


def required_codes(profiles: dict, defs: Path) -> dict[str, list[str]]:
    entries = json.loads((defs / "valuesets.json").read_text())["entry"]
    valuesets = {e["resource"]["url"]: e["resource"] for e in entries
                 if e["resource"]["resourceType"] == "ValueSet"}
    codesystems = {e["resource"]["url"]: e["resource"] for e in entries
                   if e["resource"]["resourceType"] == "CodeSystem"}
    out: dict[str, list[str]] = {}
    for entry in profiles["entry"]:
        sd = entry["resource"]
        if sd["resourceType"] != "StructureDefinition" or sd.get("kind") != "resource":
            continue
        for element in sd.get("snapshot", {}).get("element", []):
            binding = element.get("binding", {})
            types = [t["code"] for t in element.get("type", [])]
            if binding.get("strength") != "required" or types != ["code"]:
                continue
            codes = valueset_codes(binding.get("valueSet", ""), valuesets, codesystems)
            if codes and "[x]" not in element["path"]:
                out[element["path"]] = codes
    return dict(sorted(out.items()))


def main(defs: Path) -> None:
    profiles = json.loads((defs / "profiles-resources.json").read_text())
    types = sorted(
        e["resource"]["name"]
        for e in profiles["entry"]
        if e["resource"]["resourceType"] == "StructureDefinition"
        and e["resource"].get("kind") == "resource"
        and e["resource"].get("derivation") == "specialization"
    )
    bundle = json.loads((defs / "search-parameters.json").read_text())
    params: dict[str, dict[str, dict]] = {}
    for entry in bundle["entry"]:
        sp = entry["resource"]
        if sp["type"] not in SUPPORTED_TYPES or not sp.get("expression"):
            continue
        parts = split_union(sp["expression"])
        for base in sp["base"]:
            own = [p for p in parts if root_of(p) == base]
            if not own:
                continue
            row = {"type": sp["type"], "expression": " | ".join(own)}
            if sp.get("target"):
                row["target"] = sorted(sp["target"])
            params.setdefault(base, {})[sp["code"]] = row
    out = {
        "source": "FHIR R4 4.0.1 search-parameters.json (HL7, CC0)",
        "resourceTypes": types,
        "params": {k: params[k] for k in sorted(params)},
        "requiredCodes": required_codes(profiles, defs),
    }
    OUT.write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(types)} types, {sum(map(len, params.values()))} parameters)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
