"""Docs that stay true: every relative link in every Markdown file resolves inside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files() -> list[Path]:
    """The Markdown files git tracks (a clone has exactly these)."""
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line and "node_modules" not in line]


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    keep, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            keep.append(line)
    return "\n".join(keep)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    text = prose(path.read_text())
    for m in re.finditer(r"(?<![\w/.])\.\./[\w./-]+", re.sub(r"\]\([^)]*\)", "]", text)):
        if ROOT not in (path.parent / m.group(0)).resolve().parents:  # named, linked or not
            problems.append(f"{m.group(0)}: outside the repository")
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of ours
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_the_checker_sees_each_kind_of_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## The `model` check\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](docs/b.md#the-model-check) [web](https://example.org/x) [self](#top)\n"
        "[out](../shared/SPEC.md) [gone](docs/c.md) [anchor](docs/b.md#nothing)\n"
        "see [`../shared/SPEC.md`] in the project\n"
        "```\n[in code](nowhere.md)\n```\n# Top\n"
    )
    assert broken_links(page) == [
        "../shared/SPEC.md: outside the repository",
        "../shared/SPEC.md: outside the repository",
        "docs/c.md: no such file",
        "docs/b.md#nothing: no heading #nothing in docs/b.md",
    ]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(path):
    assert broken_links(path) == []


# --------------------------------------------------------------------------- command lines

SCRIPTS = ("swc-service", "visloc-export", "visloc-triton", "visloc")


def parsers() -> dict:
    from devtools import triton_local
    from swc_service import config
    from visloc_client import cli as client_cli
    from visloc_export import cli as export_cli

    return {
        "swc-service": config.build_parser,
        "visloc": client_cli.build_parser,
        "visloc-export": export_cli.build_parser,
        "visloc-triton": triton_local.build_parser,
    }


def command_lines(text: str) -> list[str]:
    """Our scripts' command lines in a Markdown text's code blocks (continuations joined; an
    environment assignment, a prompt or a path before the script's name dropped; comments cut)."""
    block, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            block.append("")
            continue
        if fenced:
            block.append(line)
    found = []
    for line in re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines():
        if re.search(r"\[-", line):  # a usage synopsis ([--flag VALUE]), not a command
            continue
        words = re.split(r"\s+#|\s+(?:>|>>|\||&&|;)\s", line, maxsplit=1)[0].split()  # up to a redirection
        while words and (words[0] == "$" or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
            words = words[1:]
        if words and words[0].rsplit("/", 1)[-1] in SCRIPTS:
            found.append(" ".join([words[0].rsplit("/", 1)[-1], *words[1:]]))
    return found


def test_command_lines_are_found_where_they_are_written():
    text = (
        "```bash\nVISLOC_X=1 .venv/bin/visloc-export verify --bundle b \\\n   --checksums  # why\n"
        "kubectl -n visloc get pods\n$ swc-service --workers 2 > log\nvisloc [--tls] COMMAND\n```\n"
        "Mentioned in prose: `visloc evaluate`.\n"
    )
    assert command_lines(text) == ["visloc-export verify --bundle b --checksums", "swc-service --workers 2"]


def test_a_flag_shown_without_its_value_does_not_parse():
    """What the check catches: a value-taking flag written bare (as a switch), a flag that
    does not exist, a choice that is not one; a boolean switch written bare is fine."""
    parser = parsers()["swc-service"]()
    for wrong in (["--top-k"], ["--no-such-flag"], ["--model-precision", "fp64"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)
    assert parser.parse_args(["--allow-bundle-without-probes"]).allow_bundle_without_probes is True


def documented_commands() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), c) for p in markdown_files() for c in command_lines(p.read_text())]


@pytest.mark.parametrize(("where", "command"), documented_commands())
def test_every_documented_command_line_parses(where, command):
    import shlex

    script, *args = shlex.split(command.replace("...", "X"))
    parser = parsers()[script]()
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{command}` does not parse (exit {exc.code})")


# --------------------------------------------------------------------------- metrics

NOT_METRICS = {"visloc_client", "visloc_export"}  # package names


def exported_metrics() -> dict[str, set[str]]:
    """The service's metric families -> every series name they export (counter _total, histogram
    _bucket/_sum/_count ...), whether or not a sample was observed yet."""
    from prometheus_client import REGISTRY

    from swc_service import metrics  # noqa: F401  (defines them)

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "info": ("_info",)}  # fmt: skip
    out = {}
    for family in REGISTRY.collect():
        if family.name.startswith("visloc_"):
            out[family.name] = {family.name, *(family.name + s for s in suffixes.get(family.type, ("",)))}
    return out


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bvisloc_[a-z0-9_]+", text)) - NOT_METRICS


def where_metrics_are_named() -> list[Path]:
    globs = ("*.md", "deploy/prometheus/*.yml", "deploy/grafana/dashboards/*", "k8s/**/*.yaml", "k8s/**/*.json")
    out = subprocess.run(["git", "ls-files", *globs], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if line]


def test_every_metric_named_in_docs_alerts_and_dashboards_is_exported():
    exported = set().union(*exported_metrics().values())
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in where_metrics_are_named()
        for name in metric_names(path.read_text())
        if name not in exported
    }
    assert unknown == set()


def test_every_exported_metric_is_documented():
    text = (ROOT / "docs/service.md").read_text()
    undocumented = [family for family, names in exported_metrics().items() if not names & metric_names(text)]
    assert undocumented == []
