"""Whether a FHIRPath expression parses (https://hl7.org/fhirpath/N1/), without evaluating it.

fhirpathpy.compile never fails: its ANTLR parser recovers silently from syntax errors and
stops at the first token it cannot use. So we run fhirpathpy's generated grammar with a
listener that keeps the errors, and require the whole text to be consumed.
"""

from __future__ import annotations

from typing import Any

import fhirpathpy
from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser


class _Errors(ErrorListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.found: list[tuple[int, str]] = []

    def syntaxError(self, recognizer: Any, offendingSymbol: Any, line: int,  # noqa: N802
                    column: int, msg: str, e: Any) -> None:
        self.found.append((column, msg))


def syntax_error(expression: str) -> str | None:
    """None when `expression` is valid FHIRPath, else what is wrong and at which column
    (1-based)."""
    errors = _Errors()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(errors)
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    parser.expression()
    if errors.found:
        column, message = errors.found[0]
        return f"at column {column + 1}: {_plain(message)}"
    rest = tokens.LT(1)
    if rest.type != Token.EOF:
        return f"at column {rest.column + 1}: unexpected '{rest.text}'"
    try:
        fhirpathpy.compile(expression)
    except Exception as exc:  # noqa: BLE001 - any failure to build the tree is a syntax error
        return f"does not compile ({type(exc).__name__})"
    return None


def _plain(message: str) -> str:
    """ANTLR's message without the long list of tokens it expected."""
    if message.startswith("mismatched input '<EOF>'"):
        return "the expression ends too early"
    message = message.replace("token recognition error at:", "cannot read")
    return message.split(" expecting ")[0].replace("'<EOF>'", "the end")
