"""Natural English text available offline, from two sources that never overlap (fit / held out).

RULER's haystacks are essays downloaded at run time; nothing here downloads. Both sources ship with
CPython itself, so every machine with Python 3.11 builds the same haystacks:

* ``"reference"``: the prose paragraphs of the Python Language Reference's topics
  (``pydoc_data.topics``, what ``help("if")`` prints): ~190K characters.
* ``"docstrings"``: the prose paragraphs of the docstrings of a fixed list of standard-library modules
  (their classes, functions and methods): ~220K characters.

A paragraph counts as prose when it has no indented, quoted-code or list lines and at least 88% of its
characters are letters or spaces; its lines are joined into one line.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import textwrap

SOURCES = ("reference", "docstrings")

#: Standard-library modules whose docstrings form the ``"docstrings"`` source (fixed: the text must
#: not depend on what else is installed).
DOCSTRING_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "bz2", "calendar", "cmd", "code", "codecs", "collections",
    "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "email.parser", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json",
    "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "queue", "random", "re", "sched", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)

_CODE_STARTS = (" ", "\t", ">>>", "...", "*", "-", "+", "|", "=")


def prose(paragraph: str) -> str | None:
    """The paragraph as one line if it is prose (see the module docstring), else None."""
    paragraph = textwrap.dedent(paragraph).strip("\n")
    if len(paragraph) < 150:
        return None
    lines = paragraph.splitlines()
    if any(line.startswith(_CODE_STARTS) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    if sum(c.isalpha() or c.isspace() for c in text) / len(text) < 0.88:
        return None
    return text


def _paragraphs(documents) -> list[str]:
    seen: set[str] = set()
    out = []
    for document in documents:
        for paragraph in re.split(r"\n\s*\n", document or ""):
            text = prose(paragraph)
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def _docstrings() -> list[str]:
    documents = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        documents.append(inspect.getdoc(module))
        for attribute, value in sorted(vars(module).items()):
            if attribute.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                documents.append(inspect.getdoc(value))
            if inspect.isclass(value):
                documents.extend(inspect.getdoc(member) for key, member in sorted(vars(value).items())
                                 if not key.startswith("_") and inspect.isfunction(member))
    return documents


@functools.cache
def paragraphs(source: str) -> tuple[str, ...]:
    """The prose paragraphs of ``source`` ("reference" or "docstrings"), in a fixed order."""
    if source == "reference":
        from pydoc_data.topics import topics

        return tuple(_paragraphs(topics[key] for key in sorted(topics)))
    if source == "docstrings":
        return tuple(_paragraphs(_docstrings()))
    raise ValueError(f"text source {source!r} is not one of {', '.join(map(repr, SOURCES))}")


def sentences(source: str) -> tuple[str, ...]:
    """The sentences of ``source``'s paragraphs, in order (split after '.', '!' or '?' and a space)."""
    return tuple(s for paragraph in paragraphs(source) for s in re.split(r"(?<=[.!?])\s+", paragraph) if s)
