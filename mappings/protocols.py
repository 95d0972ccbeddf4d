"""Protocols: the YAML authoring format in, its FHIR form out (orchestration/PROTOCOLS.md).

`validate_protocol` lists every problem with its line; `compile_protocol` gives the
PlanDefinition, one ActivityDefinition per stage, and a transaction Bundle that PUTs them.
Pure: the caller reads the file and sends the Bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mappings.protocol_checks import check_protocol
from mappings.protocol_fhir import activity_definition, plan_definition
from mappings.protocol_model import (
    After,
    Duration,
    EndsBefore,
    OnFailure,
    Problem,
    Protocol,
    ProtocolError,
    Ref,
    Role,
    Stage,
)
from mappings.protocol_yaml import read_protocol

__all__ = [
    "After", "CompiledProtocol", "Duration", "EndsBefore", "OnFailure", "Problem", "Protocol",
    "ProtocolError", "Ref", "Role", "Stage", "compile_protocol", "parse_protocol",
    "validate_protocol",
]


@dataclass(frozen=True)
class CompiledProtocol:
    """A protocol's FHIR form: the PlanDefinition and its ActivityDefinitions (document
    order, sub-stages after their parent)."""

    protocol: Protocol
    plan_definition: dict[str, Any]
    activity_definitions: tuple[dict[str, Any], ...]

    @property
    def id(self) -> str:
        return self.protocol.id

    def resources(self) -> list[dict[str, Any]]:
        return [self.plan_definition, *self.activity_definitions]

    def bundle(self) -> dict[str, Any]:
        """A transaction Bundle that PUTs every resource by id: loading it twice leaves
        one of each."""
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": resource,
             "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}
            for resource in self.resources()]}


def _read(text: str) -> tuple[Protocol | None, list[Problem]]:
    protocol, problems = read_protocol(text)
    if protocol is not None:
        problems = problems + check_protocol(protocol)
    return protocol, sorted(set(problems))


def validate_protocol(text: str, source: str = "<protocol>") -> list[Problem]:
    """Every problem in the protocol `text`, by line; empty when it compiles. `source`
    names the text in messages, as in `ProtocolError`; problems carry only the line."""

    return _read(text)[1]


def parse_protocol(text: str, source: str = "<protocol>") -> Protocol:
    """The protocol in `text` as typed values; ProtocolError lists every problem."""
    protocol, problems = _read(text)
    if problems or protocol is None:
        raise ProtocolError(problems, source)
    return protocol


def compile_protocol(text: str, source: str = "<protocol>") -> CompiledProtocol:
    """The FHIR form of the protocol `text`; ProtocolError lists every problem."""
    protocol = parse_protocol(text, source)
    return CompiledProtocol(
        protocol=protocol,
        plan_definition=plan_definition(protocol),
        activity_definitions=tuple(activity_definition(protocol, stage)
                                   for stage in protocol.all_stages()),
    )
