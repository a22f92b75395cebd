"""docs/design.md against the code it describes.

The operations, error codes, request and reply fields, wire types, default ports,
checkpoint contents and import directions named in the design notes are read here
from the sources themselves (with ``ast`` and regular expressions, importing neither
torch nor zmq, so the whole file runs in well under a second). Renaming or adding any
of them without updating the notes fails a test below.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"
PROTOCOL = ROOT / "distbelief" / "protocol.py"
SOURCE_DIRS = ("distbelief", "server", "workers")
BACKTICKED = re.compile(r"`([^`]+)`")

# the ways the code names an error code it answers or raises
ERROR_CODE_USES = (
    re.compile(r'ProtocolError\(\s*"(\w+)"'),
    re.compile(r'error_reply\(\s*\w+\s*,\s*"(\w+)"'),
    re.compile(r'_reject\(\s*"(\w+)"'),
    re.compile(r'ServerRefused\(\s*[^"()]*?,\s*"(\w+)"'),  # raised by the client itself
)


# -- the code --------------------------------------------------------------------------


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def _constant(path: Path, name: str) -> ast.expr:
    """The value assigned to the module-level ``name`` in ``path``."""
    for node in _tree(path).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            return node.value
    raise AssertionError(f"{path.name} no longer defines {name}")


def _string_keys(node: ast.expr) -> list[str]:
    assert isinstance(node, ast.Dict), ast.dump(node)[:80]
    return [k.value for k in node.keys if isinstance(k, ast.Constant)]


def code_ops() -> tuple[str, ...]:
    return ast.literal_eval(_constant(PROTOCOL, "OPS"))


def code_errors() -> tuple[str, ...]:
    return ast.literal_eval(_constant(PROTOCOL, "ERRORS"))


def code_request_fields() -> dict[str, list[str]]:
    table = _constant(PROTOCOL, "REQUEST_FIELDS")
    assert isinstance(table, ast.Dict)
    return {k.value: _string_keys(v) for k, v in zip(table.keys, table.values, strict=True)}


def code_dtypes() -> list[str]:
    return _string_keys(_constant(PROTOCOL, "DTYPES"))


def code_error_uses() -> dict[str, set[str]]:
    """Every error code a source file names, with the files naming it."""
    uses: dict[str, set[str]] = {}
    for path in _sources():
        text = path.read_text()
        for pattern in ERROR_CODE_USES:
            for code in pattern.findall(text):
                uses.setdefault(code, set()).add(str(path.relative_to(ROOT)))
    return uses


def _methods(path: Path) -> dict[str, ast.FunctionDef]:
    return {
        f.name: f
        for cls in _tree(path).body
        if isinstance(cls, ast.ClassDef)
        for f in cls.body
        if isinstance(f, ast.FunctionDef)
    }


def _reply_keywords(func: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "protocol.reply":
            names |= {k.arg for k in node.keywords if k.arg}
        # optional reply fields gathered in a local dict first (hello's shm_token,
        # shm_error); not stores into attributes such as self.counts["pulls"]
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            names.add(node.slice.value)
    return names


def code_handlers() -> dict[str, dict[str, set[str]]]:
    """server file -> op -> the reply fields its ``_on_<op>`` answers (one call deep)."""
    out: dict[str, dict[str, set[str]]] = {}
    for path in sorted((ROOT / "server").glob("*.py")):
        methods = _methods(path)
        for name, func in methods.items():
            if not name.startswith("_on_"):
                continue
            fields = _reply_keywords(func)
            for node in ast.walk(func):  # helpers such as self._push_reply
                if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("self."):
                    helper = methods.get(ast.unparse(node.func)[len("self.") :])
                    if helper is not None:
                        fields |= _reply_keywords(helper)
            out.setdefault(path.name, {})[name[len("_on_") :]] = fields
    return out


def code_default_ports() -> set[int]:
    """Default ports as the CLI, the server configs and ``up`` define them."""
    cli = "\n".join(p.read_text() for p in sorted((ROOT / "distbelief" / "cli").glob("*.py")))
    ports = {
        int(p)
        for p in re.findall(r'@option\(\s*"--(?:[\w-]*-)?port"[^@]*?default=(\d+)', cli, re.S)
    }
    ports |= {int(p) for p in re.findall(r'default="tcp://[\w.]+:(\d+)"', cli)}
    for path in (ROOT / "server" / "shard.py", ROOT / "server" / "averager.py"):
        ports |= {int(p) for p in re.findall(r"^\s+\w*port: int = (\d+)", path.read_text(), re.M)}
    launcher = (ROOT / "distbelief" / "launcher.py").read_text()
    ports |= {int(p) for p in re.findall(r"_ports\(\s*[\w.]+\s*,\s*(\d+)\s*\)", launcher)}
    return ports - {0}  # 0: an endpoint that is off


def code_checkpoint_meta() -> dict[str, list[str]]:
    """The metadata keys the shard's and the averager's ``save`` write."""
    out = {}
    for path in (ROOT / "server" / "checkpoints.py", ROOT / "server" / "averager.py"):
        save = _methods(path)["save"]
        metas = [
            n.value
            for n in ast.walk(save)
            if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "meta"
        ]
        assert len(metas) == 1, f"{path.name}: save() no longer builds one `meta` map"
        out[path.name] = _string_keys(metas[0])
    return out


def code_state_tensors() -> set[str]:
    """Tensor names a shard checkpoint gets from the rules' and policies' ``state()``."""
    names = set()
    for path, prefix in (
        (ROOT / "server" / "rules.py", "state."),
        (ROOT / "server" / "staleness.py", "policy."),
    ):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef) and node.name == "state":
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Dict):
                        names |= {prefix + k for k in _string_keys(sub)}
                    if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store):
                        names.add(prefix + sub.slice.value)
    return names


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, leaving out ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    package = {"server": "distbelief.server", "workers": "distbelief.workers"}.get(
        path.parent.name, path.parent.name
    )
    out = set()
    for node in ast.walk(_tree(path)):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = f"{package}." if node.level == 1 else ""
            out.add(base + (node.module or ""))
    return out


# -- the notes -------------------------------------------------------------------------


@cache
def doc() -> str:
    return DOC.read_text()


def section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading of its level or above."""
    lines = doc().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"(#+) (.*)", line)
        if match and match.group(2).strip() == title:
            level = len(match.group(1))
            body = []
            for rest in lines[i + 1 :]:
                heading = re.match(r"(#+) ", rest)
                if heading and len(heading.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"docs/design.md has no heading {title!r}")


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in ``text`` (header rows left out), as cells."""
    lines = [line.strip() for line in text.splitlines()]
    rows = []
    for i, line in enumerate(lines):
        is_separator = re.fullmatch(r"\|[-| :]+\|", line)
        is_header = i + 1 < len(lines) and re.fullmatch(r"\|[-| :]+\|", lines[i + 1])
        if line.startswith("|") and not is_separator and not is_header:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def keyed_rows(title: str) -> dict[str, list[str]]:
    """First-column name (in backticks) -> that row's cells, for the tables under ``title``."""
    out = {}
    for row in table_rows(section(title)):
        names = BACKTICKED.findall(row[0])
        assert names, f"under {title!r} a row names nothing in backticks: {row[0]!r}"
        name = names[0]
        assert name not in out, f"{name} has two rows under {title!r}"
        out[name] = row
    return out


def backticked(text: str) -> set[str]:
    return set(BACKTICKED.findall(text))


# -- the tests -------------------------------------------------------------------------


def test_the_operations_table_lists_exactly_the_protocols_ops():
    ops = keyed_rows("Operations")
    assert list(ops) == list(code_ops()), (
        f"docs/design.md, Operations: rows {list(ops)}, protocol.OPS {list(code_ops())}"
    )
    assert set(code_request_fields()) == set(code_ops()), "REQUEST_FIELDS and OPS disagree"


def test_every_request_field_is_in_its_ops_row():
    ops = keyed_rows("Operations")
    for op, fields in code_request_fields().items():
        named = backticked(ops[op][1])
        missing = [f for f in fields if f not in named]
        assert not missing, f"request fields of {op} missing from its row: {missing}"


def test_every_reply_field_a_server_answers_is_in_its_ops_row():
    ops = keyed_rows("Operations")
    for server, handlers in code_handlers().items():
        for op, fields in handlers.items():
            assert op in ops, f"server/{server} answers {op!r}, which the notes do not list"
            named = backticked(ops[op][2])
            missing = sorted(fields - named)
            assert not missing, f"server/{server}: reply fields of {op} not in its row: {missing}"


def test_the_error_table_lists_exactly_the_protocols_error_codes():
    codes = keyed_rows("Error codes")
    assert set(codes) == set(code_errors()), (
        f"in the notes only: {sorted(set(codes) - set(code_errors()))}; "
        f"in protocol.ERRORS only: {sorted(set(code_errors()) - set(codes))}"
    )


def test_every_error_code_the_code_names_is_a_protocol_error_code_and_is_used():
    uses = code_error_uses()
    unknown = {c: sorted(files) for c, files in uses.items() if c not in code_errors()}
    assert not unknown, f"error codes named in the code but not in protocol.ERRORS: {unknown}"
    unused = [c for c in code_errors() if c not in uses]
    assert not unused, f"protocol.ERRORS entries nothing answers (the notes say when): {unused}"


def test_the_wire_types_table_lists_exactly_the_protocols_dtypes():
    rows = table_rows(section("Framing"))
    assert [BACKTICKED.findall(r[0])[0] for r in rows] == code_dtypes()


def test_the_ports_table_lists_exactly_the_default_ports():
    rows = table_rows(section("Ports"))
    in_doc = {int(p) for r in rows for p in re.findall(r"`(\d{4,5})`", r[1])}
    in_code = code_default_ports()
    assert in_code, "found no default ports in the code: the patterns above need updating"
    assert in_doc == in_code, (
        f"in the notes only: {sorted(in_doc - in_code)}; in the code only: "
        f"{sorted(in_code - in_doc)}"
    )


def test_checkpoint_metadata_keys_and_tensors_are_named():
    named = backticked(section("Checkpoint files"))
    for source, keys in code_checkpoint_meta().items():
        missing = [k for k in [*keys, "sha256"] if k not in named]
        assert not missing, f"server/{source} writes metadata the notes do not name: {missing}"
    missing = sorted(code_state_tensors() - named)
    assert not missing, f"shard checkpoint tensors the notes do not name: {missing}"
    assert "weights" in named


def test_the_import_directions_the_notes_state_hold():
    for path in sorted((ROOT / "server").glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(("distbelief.workers", "workers"))]
        assert not bad, f"{path.name} imports {bad}; the notes say server/ never imports workers/"
    for path in sorted((ROOT / "workers").glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(("distbelief.server", "server"))]
        assert not bad, f"{path.name} imports {bad}; the notes say workers/ does not, directly"
    checkpoints = ROOT / "server" / "checkpoints.py"
    assert "distbelief.server.shard" not in _imports(checkpoints), (
        "server/checkpoints.py now imports server/shard.py at run time: update the notes"
    )
    assert "distbelief.server.checkpoints" in _imports(ROOT / "server" / "shard.py")
