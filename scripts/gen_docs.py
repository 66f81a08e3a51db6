"""Generate the documentation pages that must not drift from their sources.

- docs/benchmarks.md from bench/results/*.json: one section per JSON (what it measures, the command
  that reproduces it, its provenance, its numbers as tables), rendered generically: a new JSON needs
  no code here.
- docs/spec.md from the pipeline spec's pydantic models (`PipelineConfig.model_json_schema()`, read
  at run time) and the plugin registries (teachers, students, losses, evaluators and their `Params`).

    python scripts/gen_docs.py          # write both pages
    python scripts/gen_docs.py --check  # write nothing; exit 1 naming each page that is stale

tests/test_docs.py runs the check, so a page that differs from its sources fails the tests.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import json
import math
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REGEN = "python scripts/gen_docs.py"

# ---------------------------------------------------------------------------------------- Markdown helpers


def code(text: Any) -> str:
    """`text` as an inline code span (a longer fence when the text holds backticks)."""
    s = str(text)
    if "`" not in s:
        return f"`{s}`"
    return f"`` {s} ``"


def prose(text: str) -> str:
    """Text from a source (a docstring, a description, a JSON string) made safe for Markdown: `<` and
    a `<` that could open a tag escaped outside code spans (so `<metric>` is not taken for an HTML tag),
    RST ``code`` as `code`."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(
        p if p.startswith("`") and p.endswith("`") and len(p) > 1 else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p)
        for p in parts
    )


def cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paragraph(text: str) -> str:
    return " ".join(text.split())


def fenced(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def compact_json(value: Any) -> str:
    """JSON on one line when it is short, indented when not."""
    one = json.dumps(value, ensure_ascii=False)
    return one if len(one) <= 120 else json.dumps(value, indent=2, ensure_ascii=False)


def anchor(*parts: str) -> str:
    return "-".join(p for p in (re.sub(r"[^a-z0-9]+", "-", str(x).lower()).strip("-") for x in parts) if p)


def first_sentence(text: str) -> str:
    text = paragraph(text)
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, as one line."""
    if not doc:
        return ""
    import inspect

    doc = inspect.cleandoc(doc)
    text = paragraph(doc.split("\n\n", 1)[0])
    return text[:-1] + "." if text.endswith(":") else text


@functools.cache
def module_docstring(path: Path) -> str | None:
    try:
        return ast.get_docstring(ast.parse(path.read_text()))
    except (OSError, SyntaxError, ValueError):
        return None


# ====================================================================================== docs/benchmarks.md

MAX_COLS = 10  # columns of a table before it is turned (one row per field)
MAX_WIDTH = 170  # characters of a table row before it is turned, or its entries cut
MAX_ROWS = 15  # rows before a table is cut to its first HEAD_ROWS
HEAD_ROWS = 5
MAX_TURNED = 6  # entries shown side by side in a turned table
MAX_FIELDS = 40  # fields of an entry shown in a table
LIST_INLINE = 8  # values of a list shown whole in a cell; longer lists: first few, …, last
MAX_CELL = 200  # characters of a string shown in a cell; longer: a paragraph of its own
MAX_TEXT_LINES = 30  # lines of a multi-line string shown before it is cut

DESCRIPTION_KEYS = ("description", "what", "experiment")
COMMAND_KEYS = ("command", "commands")
COMMIT_KEYS = ("commit", "refs")
DATE_KEYS = ("when", "date", "time")
HOST_KEYS = ("host", "hostname", "machine")
NOT_WRITERS = {"__init__.py", "common.py", "run_all.py"}  # helpers, and the script that runs every benchmark
ACRONYMS = {"lm": "LM", "gpu": "GPU", "cpu": "CPU", "minilm": "MiniLM", "kd": "KD", "ce": "CE", "mlp": "MLP"}

SECONDS_KEY = re.compile(r"(^|_)(s|secs?|seconds)(_|$)")
RATE_KEY = re.compile(r"(^|_)per(_|$)|/s\b")

Path_ = tuple[str, ...]


def is_seconds(keys: Path_) -> bool:
    """Whether a number is in seconds, from its key, else from the nearest enclosing key that has a
    unit (`stages_s: {teach: 6.9}` is seconds; `rows_per_s: {cached: …}` is a rate)."""
    for k in reversed(keys):
        k = str(k).lower()
        if RATE_KEY.search(k):
            return False
        if SECONDS_KEY.search(k):
            return True
    return False


def fmt_number(v: int | float, seconds: bool = False) -> str:
    """4 significant digits; seconds with 2 decimals (2 significant digits below 0.1 s)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    a = abs(v)
    if seconds:
        return f"{v:.2f}" if a >= 0.1 else f"{v:.2g}"
    if 1e4 <= a < 1e12:
        return f"{v:.0f}"
    if a >= 1e-4:
        s = f"{v:.4g}"  # 4 significant digits (no trailing zeros: 0.227 stays 0.227)
        return f"{v:.0f}" if "e" in s else s
    return f"{v:.3e}"


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def fmt_scalar(v: Any, keys: Path_) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return prose(v) if v else '""'
    return fmt_number(v, is_seconds(keys))


def fmt_list(values: list[Any], keys: Path_) -> str:
    if not values:
        return "[]"
    shown = [fmt_scalar(v, keys) for v in values]
    if len(values) <= LIST_INLINE:
        return ", ".join(shown)
    return f"{len(values)} values: {', '.join(shown[:3])}, …, {shown[-1]}"


def is_cell(v: Any, keys: Path_ = ()) -> bool:
    """Whether a value fits in one table cell: a scalar, a short one-line string, a list of those, {}."""
    if isinstance(v, str):
        return "\n" not in v and len(v) <= MAX_CELL
    if is_scalar(v):
        return True
    if isinstance(v, dict):
        return not v
    if isinstance(v, list):
        return (
            all(is_scalar(x) and not (isinstance(x, str) and "\n" in x) for x in v)
            and len(fmt_list(v, keys)) <= MAX_CELL
        )
    return False


def fmt_cell(v: Any, keys: Path_) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return fmt_list(v, keys)
    return fmt_scalar(v, keys)


def flatten(d: dict[str, Any], prefix: Path_ = ()) -> dict[Path_, Any] | None:
    """A dict of cells (nested dicts of cells allowed) as {key path: cell}; None when it holds more."""
    out: dict[Path_, Any] = {}
    for k, v in d.items():
        key = prefix + (str(k),)
        if isinstance(v, dict) and v:
            sub = flatten(v, key)
            if sub is None:
                return None
            out.update(sub)
        elif is_cell(v, key):
            out[key] = v
        else:
            return None
    return out


def path_text(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def keys_of(path: tuple[Any, ...]) -> Path_:
    return tuple(str(p) for p in path if not isinstance(p, int))


@functools.lru_cache(maxsize=1)
def script_texts() -> dict[Path, str]:
    """The scripts that may write a result, and their source."""
    return {
        p: p.read_text()
        for p in sorted(ROOT.glob("bench/*.py")) + sorted(ROOT.glob("scripts/*.py"))
        if p.name not in NOT_WRITERS and p.resolve() != Path(__file__).resolve()
    }


class BenchPage:
    """One JSON's section."""

    def __init__(self, name: str, data: Any) -> None:
        self.name = name
        self.file = f"bench/results/{name}.json"
        self.data = data

    # ---------------------------------------------------------------- layout of the numbers

    def heading(self, path: tuple[Any, ...], depth: int) -> str:
        return f"{'#' * min(6, 3 + depth)} {code(path_text(path))}"

    def cut_note(self, shown: int, total: int, path: tuple[Any, ...], what: str = "entries") -> str:
        where = f", key {code(path_text(path))}" if path else ""
        return f"*{total} {what}; the first {shown} are shown. All of them: {code(self.file)}{where}.*"

    def node(self, value: Any, path: tuple[Any, ...], depth: int) -> list[str]:
        if isinstance(value, dict):
            return self.mapping(value, path, depth)
        if isinstance(value, list):
            return self.sequence(value, path, depth)
        if isinstance(value, str):
            return self.text(value, path)
        return [table(["key", "value"], [[path_text(path) or "value", fmt_cell(value, keys_of(path))]])]

    def mapping(self, d: dict[str, Any], path: tuple[Any, ...], depth: int) -> list[str]:
        if path and d and all(isinstance(v, dict) for v in d.values()):  # the top level: a section per key
            flat = [flatten(v) for v in d.values()]
            if all(f is not None for f in flat):
                label = str(path[-1]) if path and not isinstance(path[-1], int) else "key"
                return self.records(label, [str(k) for k in d], list(d.values()), flat, path, depth)  # type: ignore[arg-type]
        blocks: list[str] = []
        cells = [(k, v) for k, v in d.items() if is_cell(v, keys_of(path + (k,)))]
        if cells or not d:
            rows = [[str(k), fmt_cell(v, keys_of(path + (k,)))] for k, v in cells]
            blocks.append(table(["key", "value"], rows) if rows else "*(empty)*")
        for k, v in d.items():
            if is_cell(v, keys_of(path + (k,))):
                continue
            if isinstance(v, str):
                blocks += self.text(v, path + (k,))
            else:
                blocks.append(self.heading(path + (k,), depth))
                blocks += self.node(v, path + (k,), depth + 1)
        return blocks

    def sequence(self, items: list[Any], path: tuple[Any, ...], depth: int) -> list[str]:
        if items and all(isinstance(x, dict) for x in items):
            flat = [flatten(x) for x in items]
            if all(f is not None for f in flat):
                return self.records("#", [str(i) for i in range(len(items))], items, flat, path, depth)  # type: ignore[arg-type]
            blocks = []
            for i, x in enumerate(items):
                blocks.append(self.heading(path + (i,), depth))
                blocks += self.node(x, path + (i,), depth + 1)
            return blocks
        if all(isinstance(x, str) for x in items):
            blocks = []
            for i, x in enumerate(items):
                blocks += self.text(x, path + (i,))
            return blocks
        if all(is_scalar(x) for x in items):  # a list too long for a cell
            return [table(["key", "value"], [[path_text(path), fmt_list(items, keys_of(path))]])]
        return [fenced(compact_json(items), "json")]

    def text(self, s: str, path: tuple[Any, ...]) -> list[str]:
        label = f"**{code(path_text(path))}**"
        if "\n" not in s:
            return [f"{label}: {prose(s)}" if s else f'{label}: ""']
        lines = s.rstrip("\n").splitlines()
        note = ""
        if len(lines) > MAX_TEXT_LINES:
            keep = 15
            if lines[0].startswith("Traceback"):
                lines = ["…"] + lines[-keep:]
                note = (
                    f"*{len(s.splitlines())} lines; the last {keep} are shown. All of them: "
                    f"{code(self.file)}, key {code(path_text(path))}.*"
                )
            else:
                lines = lines[:keep] + ["…"]
                note = self.cut_note(keep, len(s.splitlines()), path, "lines")
        body = "\n".join(lines)
        is_md_table = any(re.fullmatch(r"\|[\s:|-]+\|", line.strip()) for line in lines) and not note
        if is_md_table:
            return [f"{label} (a Markdown table stored in the JSON):", body]
        return [f"{label}:", fenced(body, "text")] + ([note] if note else [])

    def records(
        self,
        label: str,
        labels: list[str],
        items: list[Any],
        flat: list[dict[Path_, Any]],
        path: tuple[Any, ...],
        depth: int,
    ) -> list[str]:
        """Like mappings as one table: one row per entry, one column per field; turned (one row per field,
        one column per entry) when that is too wide. A few entries too wide either way get a section each;
        many are cut to their first ones, with a note saying where the rest are."""
        cols: list[Path_] = []
        for f in flat:
            cols += [c for c in f if c not in cols]
        base = keys_of(path)
        n = len(flat)

        def text(i: int, c: Path_) -> str:
            return fmt_cell(flat[i][c], base + (labels[i],) + c) if c in flat[i] else ""

        def width(header: list[str], rows: list[list[str]]) -> int:
            return sum(max(len(r[j]) for r in [header] + rows) + 3 for j in range(len(header)))

        def turned(shown: int, fields: int) -> tuple[list[str], list[list[str]]]:
            header = ["field"] + [f"{label} {labels[i]}" if label == "#" else labels[i] for i in range(shown)]
            return header, [[".".join(c)] + [text(i, c) for i in range(shown)] for c in cols[:fields]]

        header = [label] + [".".join(c) for c in cols]
        rows = [[labels[i]] + [text(i, c) for c in cols] for i in range(n)]

        def plain() -> list[str]:
            if n > MAX_ROWS:
                return [table(header, rows[:HEAD_ROWS]), self.cut_note(HEAD_ROWS, n, path)]
            return [table(header, rows)]

        if len(cols) <= MAX_COLS and width(header, rows) <= MAX_WIDTH:
            return plain()
        if n <= MAX_TURNED and len(cols) <= MAX_FIELDS:
            th, tr = turned(n, len(cols))
            if width(th, tr) <= MAX_WIDTH:
                return [table(th, tr)]
        if len(cols) <= MAX_COLS:
            return plain()  # wide, but whole
        if n <= MAX_TURNED:
            blocks: list[str] = []
            for lab, item in zip(labels, items):
                sub = path + ((int(lab),) if label == "#" else (lab,))
                blocks.append(self.heading(sub, depth))
                blocks += self.mapping(item, sub, depth + 1)
            return blocks
        shown = 3
        while shown > 1 and width(*turned(shown, min(len(cols), MAX_FIELDS))) > MAX_WIDTH:
            shown -= 1
        th, tr = turned(shown, min(len(cols), MAX_FIELDS))
        out = [table(th, tr), self.cut_note(shown, n, path)]
        if len(cols) > MAX_FIELDS:
            out.append(f"*The entries have {len(cols)} fields; the first {MAX_FIELDS} are shown.*")
        return out

    # ---------------------------------------------------------------- what, how, where from

    def commands(self) -> list[str]:
        d = self.data if isinstance(self.data, dict) else {}
        out = [d["command"]] if isinstance(d.get("command"), str) else []
        if isinstance(d.get("commands"), list):
            out += [c for c in d["commands"] if isinstance(c, str) and c not in out]
        return out

    def writer(self) -> tuple[str | None, str]:
        """The script that writes this JSON, and how that was found."""
        texts = script_texts()
        scripts = list(texts)
        rel = {p: p.relative_to(ROOT).as_posix() for p in scripts}
        for cmd in self.commands():
            m = re.search(r"((?:bench|scripts)/\w+\.py)", cmd)
            if m and (ROOT / m.group(1)).is_file():
                return m.group(1), "command"
        d = self.data if isinstance(self.data, dict) else {}
        if isinstance(d.get("bench"), str) and (ROOT / "bench" / f"{d['bench']}.py").is_file():
            return f"bench/{d['bench']}.py", "bench"
        for p, t in texts.items():
            if re.search(rf"""save\(\s*["']{re.escape(self.name)}["']""", t):
                return rel[p], "save"
        for p in texts:
            if f"bench/results/{self.name}.json" in (module_docstring(p) or ""):
                return rel[p], "docstring"
        for p, t in texts.items():
            if re.search(rf"""["']{re.escape(self.name)}\.json["']""", t):
                return rel[p], "literal"
        prefixed = [p for p in scripts if p.parent.name == "bench" and self.name.startswith(p.stem + "_")]
        if prefixed:
            return rel[max(prefixed, key=lambda p: len(p.stem))], "prefix"
        return None, ""

    @staticmethod
    def normalise_command(cmd: str) -> str:
        """A recorded command with the checkout's absolute paths made relative (`/x/y/.kdpipe/t` -> `.kdpipe/t`)."""
        words = []
        for w in cmd.split():
            m = re.search(r"/((?:\.kdpipe|bench|pipelines|scripts)(?:/\S*)?)$", w) if w.startswith("/") else None
            words.append(m.group(1) if m else w)
        return " ".join(words)

    def title(self) -> str:
        words = [ACRONYMS.get(w.lower(), w) for w in re.split(r"[_\-]+", self.name) if w]
        if words and words[0] == words[0].lower():
            words[0] = words[0][:1].upper() + words[0][1:]
        return " ".join(words)

    def render(self) -> str:
        head = [f'<a id="{anchor(self.name)}"></a>', f"## {self.title()} — {code(self.name + '.json')}"]
        if not isinstance(self.data, dict):
            return "\n\n".join(
                [
                    "\n".join(head),
                    f"*{code(self.file)} is not a JSON object; shown as stored.*",
                    fenced(compact_json(self.data), "json"),
                ]
            )
        d = dict(self.data)
        used: set[str] = set()
        script, how = self.writer()

        what = next((k for k in DESCRIPTION_KEYS if isinstance(d.get(k), str) and d[k].strip()), None)
        if what:
            used.add(what)
            measures = prose(paragraph(d[what]))
        elif script:
            measures = prose(first_paragraph(module_docstring(ROOT / script))) or "(the script has no docstring)"
        else:
            measures = "(no `description` in the JSON, and no script in bench/ or scripts/ names this file)"

        cmds = self.commands()
        runnable = [c for c in cmds if re.match(r"\S*python3?\s+(bench|scripts)/\S+\.py", c)]
        if runnable:
            reproduce = code(self.normalise_command(runnable[0]))
            if "command" in d and d["command"] == runnable[0]:
                used.add("command")
        elif script:
            reproduce = code(f"python {script}")
        else:
            reproduce = "(no script found)"
        lines = [f"**What it measures:** {measures}", "", f"**Reproduce:** {reproduce}"]
        if script:
            found = {"prefix": " (inferred from the file name)"}.get(how, "")
            lines.append(f"\n**Written by:** {code(script)}{found}")

        prov = [["file", code(self.file)]]
        commits = [k for k in COMMIT_KEYS if k in d]
        used.update(commits)
        for k in commits:
            v = d[k]
            prov.append([k, ", ".join(f"{a} {x}" for a, x in v.items()) if isinstance(v, dict) else self.host(v, (k,))])
        if not commits:
            nested = sorted(set(self.nested("commit")))
            prov.append(["commit", f"per entry: {', '.join(nested)}" if nested else "not recorded"])
        date = next((k for k in DATE_KEYS if isinstance(d.get(k), str)), None)
        if date:
            used.add(date)
        prov.append(["date", d[date] if date else "not recorded"])
        hosts = [k for k in HOST_KEYS if k in d]
        used.update(hosts)
        prov += [[k, self.host(d[k], (k,))] for k in hosts] or [["host", "not recorded"]]

        rest = {k: v for k, v in d.items() if k not in used}
        blocks = ["\n".join(head), "\n".join(lines), table(["provenance", "value"], prov)]
        if rest:
            blocks += self.mapping(rest, (), 0)
        return "\n\n".join(blocks)

    def host(self, v: Any, keys: Path_) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt_cell(x, keys + (k,)) if is_cell(x) else json.dumps(x)}" for k, x in v.items())
        return fmt_cell(v, keys) if is_cell(v) else json.dumps(v, ensure_ascii=False)

    def nested(self, key: str) -> list[str]:
        found: list[str] = []

        def walk(x: Any) -> None:
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == key and isinstance(v, str):
                        found.append(v)
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)

        walk(self.data)
        return found


FIRST_PERSON = re.compile(r"\b(I|I'm|I've|me|my|mine|we|we're|we've|us|our|ours)\b")


def first_person(data: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """JSON strings written in the first person (reported, so the JSON can be reworded at its source)."""
    out: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += first_person(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += first_person(v, path + (i,))
    elif isinstance(data, str):
        words = FIRST_PERSON.findall(re.sub(r"`[^`]*`", "", data))  # code spans are not prose
        if words and not data.lstrip().startswith("Traceback"):
            out.append(f"{path_text(path)}: {', '.join(sorted(set(words)))}")
    return out


def load_results(results: Path = RESULTS) -> list[tuple[str, Any]]:
    out = []
    for f in sorted(results.glob("*.json")):
        text = f.read_text()
        try:
            out.append((f.stem, json.loads(text)))
        except json.JSONDecodeError as e:
            out.append((f.stem, _Unreadable(text, str(e))))
    return out


class _Unreadable:
    def __init__(self, text: str, error: str) -> None:
        self.text, self.error = text, error


def render_one(name: str, data: Any) -> str:
    page = BenchPage(name, data)
    if isinstance(data, _Unreadable):
        return "\n\n".join(
            [
                f'<a id="{anchor(name)}"></a>\n## {page.title()} — {code(name + ".json")}',
                f"*{code(page.file)} is not valid JSON ({prose(data.error)}); shown as stored.*",
                fenced(data.text, "json"),
            ]
        )
    try:
        return page.render()
    except Exception as e:  # noqa: BLE001 - a JSON the renderer cannot lay out is shown whole, never skipped
        return "\n\n".join(
            [
                f'<a id="{anchor(name)}"></a>\n## {page.title()} — {code(name + ".json")}',
                f"*Not laid out as tables ({type(e).__name__}: {prose(str(e))}); the JSON as stored:*",
                fenced(compact_json(data), "json"),
            ]
        )


def render_benchmarks(results: Path = RESULTS) -> str:
    items = load_results(results)
    toc = [f"- [{BenchPage(n, d).title()}](#{anchor(n)}) — {code(n + '.json')}" for n, d in items]
    intro = [
        f"*Generated by `scripts/gen_docs.py` from `bench/results/*.json`: do not edit by hand; after a "
        f"benchmark writes its JSON, run `{REGEN}`.*",
        "# Benchmark results",
        paragraph("""One section per JSON file in `bench/results/`: what the benchmark measures (the JSON's own
        description, else the docstring of the script that writes it), the command that reproduces it, its
        provenance (commit, date and host, as recorded in the JSON) and its numbers. Floats show 4 significant
        digits; numbers whose key names seconds (`_s`, `seconds`) show 2 decimals (2 significant digits below
        0.1 s). Mappings of like entries are tables with one row per entry (turned, one row per field, when
        that is too wide); lists longer than 8 values show their first values and the last; cut tables and
        texts say how much the JSON holds and where."""),
        "\n".join(toc),
    ]
    return "\n\n".join(intro + [render_one(n, d) for n, d in items]) + "\n"


# ============================================================================================ docs/spec.md

MAX_DEFAULT = 100  # characters of a default shown whole
SIMPLE = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null"}


def yaml_value(v: Any) -> str:
    """A default as it is written in YAML (flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v) if (v == "" or v.strip() != v or re.search(r"[:#{}\[\],&*!|>'\"%@`]", v)) else v
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v, default=str)


def model_classes(root: Any) -> dict[str, Any]:
    """Every pydantic model reachable from `root`'s field annotations, by class name (the schema's $defs keys)."""
    from pydantic import BaseModel

    out: dict[str, Any] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in out:
                return
            out[tp.__name__] = tp
            for f in tp.model_fields.values():
                visit(f.annotation)
        for a in typing.get_args(tp):
            visit(a)

    visit(root)
    return out


class SchemaPage:
    """Tables of a pydantic model's JSON schema: one per model, following $refs to nested models."""

    def __init__(self, schema: dict[str, Any], models: dict[str, Any], anchor_prefix: str, base_level: int) -> None:
        self.schema = schema
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.models = models
        self.prefix = anchor_prefix
        self.base_level = base_level
        self.pending: list[tuple[str, str, int]] = []  # (path, def name, depth) of nested models to render
        self.see: dict[str, tuple[str, str]] = {}  # key path -> (title, anchor) of the section that explains it

    def ref(self, s: dict[str, Any]) -> str | None:
        if "$ref" in s:
            return s["$ref"].rsplit("/", 1)[-1]
        if len(s.get("allOf", [])) == 1 and "$ref" in s["allOf"][0]:
            return s["allOf"][0]["$ref"].rsplit("/", 1)[-1]
        return None

    def link(self, name: str, path: str, depth: int) -> str:
        if not any(p == path for p, _, _ in self.pending):
            self.pending.append((path, name, depth))
        return f"mapping ([{code(path)}](#{anchor(self.prefix, path)}))"

    @staticmethod
    def constraints(s: dict[str, Any]) -> list[str]:
        out = []
        for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if key in s:
                out.append(f"{sym} {s[key]}")
        if "minItems" in s:
            out.append(f"at least {s['minItems']} item{'s' if s['minItems'] != 1 else ''}")
        if "maxItems" in s:
            out.append(f"at most {s['maxItems']} items")
        if "minLength" in s:
            out.append(f"at least {s['minLength']} character{'s' if s['minLength'] != 1 else ''}")
        if "maxLength" in s:
            out.append(f"at most {s['maxLength']} characters")
        if "pattern" in s:
            out.append(f"matching {code(s['pattern'])}")
        return out

    def simple(self, s: dict[str, Any]) -> str | None:
        """A plain type in Python notation (`list[str]`, `dict[str, list[int]]`), or None when it is not plain."""
        if self.ref(s) or "anyOf" in s or "oneOf" in s or "enum" in s or "const" in s or self.constraints(s):
            return None
        t = s.get("type")
        if isinstance(t, str) and t in SIMPLE:
            return SIMPLE[t]
        if t == "array":
            inner = self.simple(s.get("items", {})) if s.get("items") else "any"
            return f"list[{inner}]" if inner else None
        if t == "object" and "properties" not in s:
            extra = s.get("additionalProperties", True)
            inner = "any" if extra in (True, {}) else self.simple(extra) if isinstance(extra, dict) else None
            return f"dict[str, {inner}]" if inner else None
        if not s:
            return "any"
        return None

    def type_of(self, s: dict[str, Any], path: str, depth: int) -> str:
        name = self.ref(s)
        if name:
            return self.link(name, path, depth)
        plain = self.simple(s)
        if plain:
            return code(plain)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return " or ".join(self.type_of(x, path, depth) for x in s[key])
        if "enum" in s:
            if len(s["enum"]) == 1:
                return f"{code(yaml_value(s['enum'][0]))} (the only value)"
            return "one of " + ", ".join(code(yaml_value(v)) for v in s["enum"])
        if "const" in s:
            return f"{code(yaml_value(s['const']))} (the only value)"
        extra = self.constraints(s)
        base = {
            k: v
            for k, v in s.items()
            if k
            not in (
                "minimum",
                "exclusiveMinimum",
                "maximum",
                "exclusiveMaximum",
                "minItems",
                "maxItems",
                "minLength",
                "maxLength",
                "pattern",
            )
        }
        t = base.get("type")
        if t == "array":
            items = base.get("items", {})
            inner = self.simple(items)
            if inner:
                text = code(f"list[{inner}]")
            elif self.ref(items):
                text = f"list of mappings ({self.type_of(items, path + '[]', depth).removeprefix('mapping (')}"
            elif "enum" in items:
                text = "list, each " + self.type_of(items, path + "[]", depth)
            else:
                text = f"list of {self.type_of(items, path + '[]', depth)}"
        elif base != s:
            text = self.type_of(base, path, depth)
        elif t == "object" and isinstance(base.get("additionalProperties"), dict):
            text = f"mapping of names to {self.type_of(base['additionalProperties'], path + '.<name>', depth)}"
        else:
            text = code(json.dumps(base))
        return f"{text} ({', '.join(extra)})" if extra else text

    def default_of(self, model: str | None, key: str, s: dict[str, Any], required: bool) -> str:
        if required:
            return "required"
        if "default" in s:
            return self.show_default(self.ref(s) or self.ref_in(s), s["default"])
        cls = self.models.get(model or "")
        field = getattr(cls, "model_fields", {}).get(key) if cls is not None else None
        if field is not None:
            try:
                from pydantic_core import to_jsonable_python

                value = to_jsonable_python(field.get_default(call_default_factory=True))
            except Exception:  # noqa: BLE001 - a factory that needs the other fields' values
                return "computed"
            return self.show_default(self.ref(s) or self.ref_in(s), value)
        return "—"

    def show_default(self, name: str | None, value: Any) -> str:
        if name and isinstance(value, dict) and value == self.defaults_of(name):
            return "each key's own default"
        text = yaml_value(value)
        if len(text) > MAX_DEFAULT and isinstance(value, list) and value:
            return f"{len(value)} entries, the first: {code(yaml_value(value[0]))}"
        if len(text) > MAX_DEFAULT:
            return code(text[: MAX_DEFAULT - 1] + "…")
        return code(text)

    def ref_in(self, s: dict[str, Any]) -> str | None:
        """The nested model of a field that is optional (`X | None`)."""
        refs = [self.ref(x) for x in s.get("anyOf", []) if self.ref(x)]
        return refs[0] if len(refs) == 1 else None

    def defaults_of(self, name: str) -> dict[str, Any]:
        """The mapping a nested model's defaults make (None when some key has no default)."""
        cls = self.models.get(name)
        if cls is not None:
            try:
                from pydantic_core import to_jsonable_python

                return to_jsonable_python(cls())
            except Exception:  # noqa: BLE001 - a model with required keys
                return {}
        props = self.defs.get(name, {}).get("properties", {})
        return {k: v["default"] for k, v in props.items() if "default" in v}

    def model_table(self, s: dict[str, Any], model: str | None, path: str, depth: int) -> list[str]:
        props: dict[str, Any] = s.get("properties", {})
        required = set(s.get("required", []))
        rows = []
        for key, p in props.items():
            sub = f"{path}.{key}" if path else key
            desc = p.get("description") or self.defs.get(self.ref(p) or self.ref_in(p) or "", {}).get("description", "")
            desc = prose(first_sentence(desc) if not p.get("description") else paragraph(desc))
            see = self.see.get(sub)
            if see:
                desc = f"{desc} (see [{see[0]}](#{see[1]}))".strip()
            rows.append(
                [code(key), self.type_of(p, sub, depth + 1), self.default_of(model, key, p, key in required), desc]
            )
        blocks = [table(["key", "type", "default", "description"], rows)] if rows else ["No keys."]
        extra = s.get("additionalProperties")
        if extra is True or isinstance(extra, dict) and props:
            see = self.see.get(path + ".*")
            blocks.append(
                "Other keys are accepted too"
                + (
                    f": {self.type_of(extra, path + '.<key>', depth + 1)}."
                    if isinstance(extra, dict)
                    else f": the params of the named plugin (see [{see[0]}](#{see[1]}))."
                    if see
                    else "."
                )
            )
        return blocks

    def heading(self, path: str, depth: int) -> str:
        level = min(6, self.base_level + depth)
        return f'<a id="{anchor(self.prefix, path)}"></a>\n{"#" * level} {code(path)}'

    def nested(self) -> list[str]:
        """The sections of the nested models linked so far (and of those they link), depth first."""
        blocks: list[str] = []
        done: set[str] = set()
        while self.pending:
            path, name, depth = self.pending.pop(0)
            if path in done:
                continue
            done.add(path)
            s = self.defs.get(name, {})
            before = list(self.pending)
            self.pending = []
            blocks.append(self.heading(path, depth))
            if s.get("description"):
                blocks.append(prose(paragraph(s["description"])))
            blocks += self.model_table(s, name, path, depth)
            self.pending += before  # children first (depth first), then this model's siblings
        return blocks


EXAMPLES = [
    (
        "A CSV file whose feature columns share a prefix:",
        """\
source:
  kind: csv                      # or parquet
  path: data/sensors.csv         # relative to this spec's folder
  id_column: reading_id          # stable ids across formats; a repeated id is a bad row
  features: {prefix: sensor_, exclude: [sensor_99]}   # or a list of columns, or {regex: ...}
  label: machine_state           # integer ids, or class names (mapped to ids, saved with the model)
  on_bad_rows: skip              # quarantine bad rows under storage: and go on""",
    ),
    (
        "A folder of Parquet files, feature columns listed by name, labels given as class names:",
        """\
source:
  kind: parquet
  path: data/readings/           # a file, a folder or a glob (data/readings/*.parquet); or a URI
  id_column: reading_id
  features: [temperature, pressure, vibration_rms, rpm]   # the numeric feature columns
  label: machine_state           # null or empty: an unlabeled row
  classes: [idle, running, fault]  # names in id order (default: the sorted distinct names)
  split: {val: 0.15, test: 0.25}   # by a hash of each row's id; labeled_fraction: 1.0 keeps every label
  on_bad_rows: fail              # stop at the first bad row, naming its file, row and reason""",
    ),
]


def check_examples() -> None:
    """The preamble's examples must be accepted by the code (they are part of the generated page)."""
    import yaml
    from pydantic import ValidationError

    from kdpipe.spec import SourceConfig

    for _, text in EXAMPLES:
        try:
            SourceConfig.model_validate(yaml.safe_load(text)["source"])
        except ValidationError as e:
            raise SystemExit(
                f"scripts/gen_docs.py: an example `source:` section (EXAMPLES) is rejected by "
                f"kdpipe.spec.SourceConfig; update it to what the code accepts:\n{text}\n{e}"
            ) from None


def preamble(schema: dict[str, Any]) -> list[str]:
    props = schema.get("properties", {})
    defs = schema.get("$defs", {})
    storage_default = props.get("storage", {}).get("default")
    split = defs.get("SplitConfig", {}).get("properties", {})
    labeled = split.get("labeled_fraction", {}).get("default")
    open_paths = []  # sections that accept keys they do not list
    for key, p in props.items():
        s = p.get("items", p)
        name = s.get("$ref", "").rsplit("/", 1)[-1]
        if defs.get(name, {}).get("additionalProperties") is True:
            open_paths.append(f"{key}[]" if "items" in p else key)
    storage = f" (default {code(storage_default)})" if storage_default else ""
    paths = [
        "## Paths",
        paragraph("""- **Data paths** that a spec names, `source.path` and `teachers[].path`, are relative to the
        folder of the spec file (not to the working directory). Absolute paths and URIs (`s3://bucket/data/*.parquet`)
        are used as written."""),
        paragraph(f"""- **kdpipe's own artefacts**, the teacher caches, the teachers kdpipe trains, Ray Train
        checkpoints, the row index and the quarantine of bad rows, live under the storage root `storage:`{storage},
        which is relative to the working directory. On a cluster it is a URI every node reaches, such as
        `s3://bucket/kdpipe`, or a folder on a shared filesystem."""),
        paragraph(
            "- A key that a section does not list is an error that names it"
            + (
                f", except in {', '.join(code(p) for p in open_paths)} entries, whose other keys are the "
                "loss's params (see [Losses](#plugins-losses))"
                if open_paths
                else ""
            )
            + "."
        ),
    ]
    ex = [
        "## Two `source:` sections for a table of one's own",
        paragraph(f"""A wide table: one row per example, one column per feature, an optional label column.
        Rows whose label is null or empty are unlabeled (the teachers still teach them); every non-null label is
        used, since `source.split.labeled_fraction` defaults to {labeled}. Integer labels are class ids; class
        names are mapped to ids (in `classes:` order, by default the sorted distinct names) and the mapping is
        saved with the model. tests/test_docs.py validates both examples with `kdpipe.spec.SourceConfig`."""),
    ]
    for caption, text in EXAMPLES:
        ex += [caption, fenced(text, "yaml")]
    return paths + ex


REGISTRY_SECTIONS = [
    # (registry, its module, heading, anchor, the key that names a plugin, the key path of its params
    #  (`.*`: the other keys of the same mapping), how the params are given)
    (
        "TEACHERS",
        "teachers",
        "Teacher kinds",
        "plugins-teachers",
        "teachers[].kind",
        "teachers[].params",
        "`teachers[].params`",
    ),
    ("STUDENTS", "students", "Student kinds", "plugins-students", "student.kind", "student.params", "`student.params`"),
    (
        "LOSSES",
        "kdpipe.losses",
        "Losses",
        "plugins-losses",
        "losses[].name",
        "losses[].*",
        "the other keys of the same `losses[]` entry",
    ),
    ("EVALUATORS", "kdpipe.evaluate", "Evaluators", "plugins-evaluators", "evaluate.task", None, None),
]


def import_plugins() -> None:
    """Every module that registers plugins (kdpipe.plugins knows them), so each registry is complete."""
    try:
        from kdpipe.plugins import REGISTRIES
    except ImportError:
        return
    for _, modules in REGISTRIES.values():
        for m in modules:
            importlib.import_module(m)


def plugin_summary(obj: Any) -> str:
    """The first paragraph of the plugin module's docstring, then of the plugin's own."""
    mod = sys.modules.get(getattr(obj, "__module__", ""))
    texts = [first_paragraph(getattr(mod, "__doc__", None)), first_paragraph(getattr(obj, "__doc__", None))]
    return prose(" ".join(dict.fromkeys(t for t in texts if t)))


def render_plugins() -> list[str]:
    sys.path.insert(0, str(ROOT))
    import_plugins()
    blocks = [
        "## Plugins",
        paragraph("""Every plugin registered in the installed code, with its own params
    (checked by its `Params` model when a spec is loaded). `kdpipe plugins` lists the same names."""),
    ]
    for var, module, heading, anc, where, params_key, params_how in REGISTRY_SECTIONS:
        registry = getattr(importlib.import_module(module), var)
        names = registry.names()
        blocks.append(f'<a id="{anc}"></a>\n### {heading}')
        intro = (
            f"Named by {code(where)}"
            + (f"; params: {params_how}" if params_how else "")
            + f". Registered: {', '.join(code(n) for n in names)}."
        )
        blocks.append(intro)
        seen: dict[int, str] = {}
        if params_key is None and not any(hasattr(registry.get(n), "Params") for n in names):
            blocks.append(table(["name", "what it does"], [[code(n), plugin_summary(registry.get(n))] for n in names]))
            continue
        for n in names:
            obj = registry.get(n)
            blocks.append(f'<a id="{anchor(anc, n)}"></a>\n#### {code(n)}')
            if id(obj) in seen:
                blocks.append(f"The same plugin as {code(seen[id(obj)])}: the same params.")
                continue
            seen[id(obj)] = n
            summary = plugin_summary(obj)
            if summary:
                blocks.append(summary)
            outputs = getattr(obj, "supported_outputs", None)
            if isinstance(outputs, (set, frozenset, list, tuple)) and outputs:
                blocks.append(f"Outputs it can cache (`outputs:`): {', '.join(code(o) for o in sorted(outputs))}.")
            params = getattr(obj, "Params", None)
            if params is None or not hasattr(params, "model_json_schema"):
                blocks.append("No params.")
                continue
            sp = SchemaPage(params.model_json_schema(), model_classes(params), anchor(anc, n), 4)
            blocks += sp.model_table(
                params.model_json_schema(), params.__name__, (params_key or where).removesuffix(".*"), 0
            )
            blocks += sp.nested()
    return blocks


def render_spec() -> str:
    sys.path.insert(0, str(ROOT))
    from kdpipe.spec import PipelineConfig

    check_examples()
    schema = PipelineConfig.model_json_schema()
    page = SchemaPage(schema, model_classes(PipelineConfig), "spec", 2)
    for _, _, heading, anc, where, params_key, _ in REGISTRY_SECTIONS:
        page.see[where] = (heading, anc)
        if params_key:
            page.see[params_key] = (heading, anc)
    blocks = [
        f"*Generated by `scripts/gen_docs.py` from `kdpipe.spec.PipelineConfig` (its JSON schema) and the plugin "
        f"registries: do not edit by hand; after a change to the spec's models or to a plugin's params, run `{REGEN}`.*",
        "# Pipeline spec reference",
        paragraph("""A pipeline is one YAML file (`pipelines/*.yaml`), checked against the models below before
        anything runs (`kdpipe validate SPEC`); errors name the key, as in `teachers[0].params.hidden`."""),
    ]
    blocks += preamble(schema)
    blocks += ['<a id="spec-top-level-keys"></a>\n## Top-level keys']
    if schema.get("description"):
        blocks.append(prose(paragraph(schema["description"])))
    blocks += page.model_table(schema, PipelineConfig.__name__, "", -1)
    blocks += page.nested()
    blocks += render_plugins()
    return "\n\n".join(blocks) + "\n"


# ================================================================================================== main

# ---------------------------------------------------------------------------------------- README's pipelines table


def _table_value(text: str, row: str) -> str:
    """The value of `row` in a fixed-width results table stored as text (`model  test_acc` lines)."""
    for line in text.splitlines():
        if line.startswith(row):
            return line[len(row) :].split()[-1]
    raise KeyError(row)


def _rows(pipeline: str, *names: str) -> Callable[[Any], list[str]]:
    """`rows[name]['text']` of a `bench/compare_methods.py` pipeline in methods.json."""
    return lambda d: [d["pipelines"][pipeline]["rows"][n]["text"] for n in names]


def _minilm(kind: str) -> Callable[[Any], list[str]]:
    return lambda d: [
        f"{d['results'][kind]['student']['test_cosine']:.3f}",
        f"{d['results'][kind]['twin']['test_cosine']:.3f}",
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# pipeline -> (what it does, the JSON its numbers come from, numbers, how they read)
HEADLINES: dict[str, tuple[str, str, Callable[[Any], list[str]], str]] = {
    "digits_kd": (
        "the default: an MLP teacher → a 32-unit MLP, 10 % of the labels",
        "demo_time",
        lambda d: [
            _table_value(d["tables"]["after"], "student (kd+ce)"),
            _table_value(d["tables"]["after"], "baseline twin (ce)"),
        ],
        "test accuracy {0}, its label-only twin {1}",
    ),
    "digits_fusion": (
        "dynamic logit fusion of three partial teachers",
        "methods",
        _rows("digits_fusion", "student <- dynamic fusion", "student <- best single teacher (generalist)"),
        "student {0} vs {1} from the best single teacher (test accuracy, 3 seeds)",
    ),
    "digits_aspects": (
        "multi-aspect KD: yes/no aspect answers as soft targets",
        "methods",
        _rows("digits_aspects", "ce + aspects", "ce + aspects: twin (ce)"),
        "test accuracy {0} vs {1} without aspects (3 seeds)",
    ),
    "digits_selfdistill": (
        "multi-exit self-distillation",
        "methods",
        _rows(
            "digits_selfdistill",
            "kd + exit CE + self-distillation [exit 0]",
            "kd + exit CE + self-distillation: twin (kd+exit-ce) [exit 0]",
        ),
        "shallowest exit {0} vs {1} without exit-to-exit KL (3 seeds)",
    ),
    "minilm_distill": (
        "all-MiniLM-L6-v2 → a 3-layer encoder on WordNet glosses",
        "minilm_quality",
        _minilm("distil"),
        "test cosine to the teacher {0} vs {1} for the twin",
    ),
    "minilm_m2mkd": (
        "module-to-module KD of the same teacher",
        "minilm_quality",
        _minilm("m2mkd"),
        "test cosine {0} vs {1} trained end to end",
    ),
    "minilm_narrow": (
        "a narrower encoder student with a learned projection",
        "minilm_narrow",
        lambda d: [f"{d['results']['narrow']['student']['test_cosine']:.3f}"],
        "test cosine {0}",
    ),
    "text_classifier_distill": (
        "a fine-tuned 6-layer classifier → a 2-layer student, 45 classes",
        "text_classifier",
        lambda d: [
            f"{_mean(d['rows']['KD student']['test_acc']):.4f}",
            f"{_mean(d['rows']['twin: labels only']['test_acc']):.4f}",
        ],
        "test accuracy {0} vs {1} for the label-only twin (mean of 3 seeds)",
    ),
    "text_classifier_hierarchical": (
        "self-distillation between the exits of one classifier",
        "text_classifier_hierarchical",
        lambda d: [f"{_mean(d['rows']['exit 0']['student']):.4f}", f"{_mean(d['rows']['exit 0']['twin']):.4f}"],
        "1-layer exit {0} vs {1} without exit-to-exit KL (mean of 3 seeds)",
    ),
    "lm_distill": (
        "a causal LM pretrained once → a smaller one, compressed top-64 token cache",
        "lm_methods",
        lambda d: [
            f"{d['shipped_recipe_seed0']['metrics']['test_ppl']:.0f}",
            f"{d['shipped_recipe_seed0']['metrics']['test_teacher_agreement']:.3f}",
        ],
        "test perplexity {0}, top-1 agreement with the teacher {1}",
    ),
    "lm_fusion": (
        "token-level fusion of a noun and a verb expert",
        "lm_fusion",
        lambda d: [
            f"{_mean(d['rows']['student ← dynamic fusion']['test_ppl']):.1f}",
            f"{_mean(d['rows']['teacher: noun expert']['test_ppl']):.1f}",
        ],
        "student test perplexity {0} vs {1} for the better expert (mean of 3 seeds)",
    ),
}

BEGIN, END = "<!-- generated:pipelines (scripts/gen_docs.py; do not edit by hand) -->", "<!-- /generated:pipelines -->"


def render_pipelines(results: Path = RESULTS) -> str:
    rows = []
    for name, (what, source, numbers, template) in HEADLINES.items():
        data = json.loads((results / f"{source}.json").read_text())
        headline = template.format(*(v.strip() for v in numbers(data)))
        rows.append([code(name), what, f"{headline} ([{source}](docs/benchmarks.md#{anchor(source)}))"])
    return table(["pipeline", "what", "headline"], rows)


def render_readme(root: Path = ROOT) -> str:
    """README.md with its pipelines table regenerated between the markers."""
    text = (root / "README.md").read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render_pipelines()}\n{END}{tail}"


PAGES: dict[str, Callable[[], str]] = {
    "docs/benchmarks.md": render_benchmarks,
    "docs/spec.md": render_spec,
    "README.md": render_readme,
}


def stale_pages(root: Path = ROOT, pages: dict[str, Callable[[], str]] | None = None) -> list[str]:
    """The pages on disk that differ from what would be generated (a missing page is stale)."""
    out = []
    for rel, render in (pages or PAGES).items():
        path = root / rel
        if not path.is_file() or path.read_text() != render():
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each page that is stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for rel in stale:
            print(f"{rel} is stale: it differs from what its sources generate; run `{REGEN}`", file=sys.stderr)
        return 1 if stale else 0
    for rel, render in PAGES.items():
        path = ROOT / rel
        text = render()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {rel}")
        else:
            print(f"{rel} is up to date")
    for name, data in load_results():
        for hit in first_person(data):
            print(f"note: bench/results/{name}.json {hit}: first person in the JSON (shown as data)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
