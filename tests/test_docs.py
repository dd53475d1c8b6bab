"""The guide cannot rot: every Mosaic command shown in README.md, docs/*.md and the configs' comments parses
and passes every check a run makes before any work (``options.validate``), offline and without loading a
model; so does every ``Options(...)`` in the docs' Python code and every shipped run config (through
``--config``). Also: the docs' relative links resolve, and README.md stays short."""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
import shlex
from pathlib import Path

import pytest

from mosaic import runconfig
from mosaic.cli import parse_options
from mosaic.data import KNOWN, parse_mixture
from mosaic.options import Options, validate

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHELL = ("", "bash", "sh", "shell", "console")  # fenced blocks whose lines may be commands
OPERATORS = ("&&", "||", ";", "|", "&")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# a line that may hold a Mosaic command: python (any path to it) running main.py or -m mosaic, or a launcher
# (torchrun, accelerate launch) running main.py
MAYBE = re.compile(r"python3?\s+(?:\S*main\.py|-m\s+mosaic)\b|(?:torchrun|accelerate\s+launch)\s.*\bmain\.py")
LAUNCHERS = (("torchrun",), ("accelerate", "launch"))
README_MAX_LINES = 250
# the README's "Two commands": CI runs the second, so these two lines never change
TWO_COMMANDS = (
    "bash scripts/setup.sh && .venv/bin/python main.py --prune_method sparsegpt --sparsity_ratio 0.5 "
    "--nsamples 32 --seqlen 512 --eval_windows 16 --save runs/quickstart --overwrite\n"
    "bash scripts/setup.sh && .venv/bin/python -m pytest\n")
# pages whose code shows no Mosaic command, and why (keep this tiny)
NO_COMMANDS = {"testing.md": "about the test suite: its commands run pytest and the mutation check"}
DATA_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclasses.dataclass(frozen=True)
class Command:
    page: Path
    line: int
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _mosaic_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``python main.py`` / ``python -m mosaic`` in one shell command, else None."""
    while tokens and ENV.match(tokens[0]):
        tokens = tokens[1:]
    for launcher in LAUNCHERS:  # torchrun [options] main.py ..., accelerate launch [options] main.py ...
        if tuple(Path(t).name for t in tokens[:len(launcher)]) == launcher:
            entry = [i for i, t in enumerate(tokens) if Path(t).name == "main.py"]
            return tokens[entry[0] + 1:] if entry else None
    if len(tokens) < 2 or Path(tokens[0]).name not in ("python", "python3"):
        return None
    if Path(tokens[1]).name == "main.py":
        return tokens[2:]
    if tokens[1:3] == ["-m", "mosaic"]:
        return tokens[3:]
    return None


def _commands_in_line(text: str) -> list[list[str]]:
    """Every Mosaic command in one logical shell line (``&&``, ``;`` and ``|`` chains split; no comments)."""
    if not MAYBE.search(text):
        return []
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = list(lex)
    found, part = [], []
    for token in [*tokens, ";"]:
        if token in OPERATORS:
            argv = _mosaic_argv(part)
            if argv is not None:
                found.append(argv)
            part = []
        else:
            part.append(token)
    return found


def _logical_lines(block: str, first: int):
    """(line number, text) of a shell block, backslash continuations joined."""
    pending, start = "", first
    for i, raw in enumerate(block.split("\n")):
        if not pending:
            start = first + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def page_commands(page: Path) -> list[Command]:
    """Mosaic commands in a page's shell code blocks and inline code (and in a config's comments)."""
    text = page.read_text(encoding="utf-8")
    if page.suffix == ".yaml":  # a config's comment shows the command that uses it
        return [Command(page, n, tuple(argv)) for n, line in enumerate(text.split("\n"), 1)
                if line.startswith("#") for argv in _commands_in_line(line.lstrip("# "))]
    found = []
    for block in FENCE.finditer(text):
        if block.group(1).strip().lower() not in SHELL:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        for n, line in _logical_lines(block.group(2), first):
            found += [Command(page, n, tuple(argv)) for argv in _commands_in_line(line)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        n = prose.count("\n", 0, span.start()) + 1
        found += [Command(page, n, tuple(argv)) for argv in _commands_in_line(span.group(1))]
    return sorted(found, key=lambda c: c.line)


COMMANDS = [c for page in [*PAGES, *CONFIGS] for c in page_commands(page)]


def _value(argv: tuple[str, ...], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag V`` or ``--flag=V``)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _saved_config(command: Command) -> None:
    """A documented ``--config DIR/config.yaml`` that an earlier command of the same page writes (``--save
    DIR``): write it as that run would, from that command's options."""
    path = _value(command.argv, "--config")
    if path is None or Path(path).exists():
        return
    earlier = [c for c in COMMANDS if c.page == command.page and c.line < command.line
               and _value(c.argv, "--save") is not None
               and Path(_value(c.argv, "--save")) == Path(path).parent and Path(path).name == "config.yaml"]
    assert earlier, f"{command.where}: --config {path} exists nowhere, and no earlier command saves it"
    opts = parse_options(list(earlier[-1].argv))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    runconfig.write(path, {k: v for k, v in dataclasses.asdict(opts).items() if k != "extra"})


def _data_files(opts: Options) -> None:
    """Texts the docs name by a relative file path (``chat.jsonl``): created, since only their existence is
    checked before any work."""
    specs = [opts.calib_dataset, opts.distill_dataset]
    names = [s.name for spec in specs if spec for s in parse_mixture(spec)]
    names += [n.strip() for n in opts.eval_datasets.split(",")]
    for name in names:
        path = Path(name)
        if name not in KNOWN and name != "none" and path.suffix in DATA_SUFFIXES and not path.exists():
            assert not path.is_absolute(), f"{name}: documented data files are relative paths"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"text": "A documented text."}\n', encoding="utf-8")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch working directory that sees the repository's inputs (maps, configs), offline."""
    for name in ("benchmark", "configs"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _no_warnings(caplog, where: str) -> None:
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and r.name.startswith("mosaic")]
    assert not warned, f"{where}: {warned}"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_validates(command, workdir, caplog, capsys):
    argv = list(command.argv)
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exit_:
            parse_options(argv)
        assert exit_.value.code == 0, command.where
        assert "--prune_method" in capsys.readouterr().out
        return
    _saved_config(command)
    caplog.set_level(logging.INFO)
    opts = parse_options(argv)
    _data_files(opts)
    validate(opts)
    _no_warnings(caplog, command.where)


def _options_calls(page: Path):
    """(line, keyword arguments) of every ``Options(...)`` call in the page's Python code blocks."""
    text = page.read_text(encoding="utf-8")
    for block in FENCE.finditer(text):
        if block.group(1).strip().lower() != "python":
            continue
        first = text.count("\n", 0, block.start(2))
        for node in ast.walk(ast.parse(block.group(2))):
            name = getattr(node, "func", None)
            name = getattr(name, "id", None) or getattr(name, "attr", None)
            if isinstance(node, ast.Call) and name == "Options":
                yield first + node.lineno, {k.arg: ast.literal_eval(k.value) for k in node.keywords}


CALLS = [(page, line, kw) for page in PAGES for line, kw in _options_calls(page)]


@pytest.mark.parametrize("page, line, kwargs", CALLS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in CALLS])
def test_documented_python_options_validate(page, line, kwargs, workdir, caplog):
    caplog.set_level(logging.INFO)
    opts = Options(**kwargs)
    _data_files(opts)
    validate(opts)
    _no_warnings(caplog, f"{page.name}:{line}")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_validates(config, workdir, caplog):
    """Each config through the real --config path, with the outputs a run gives it; a map it names exists,
    so that it is applied (a missing one would be written instead: another model)."""
    caplog.set_level(logging.INFO)
    opts = parse_options(["--config", f"configs/{config.name}", "--save", "out", "--save_model", "out-ckpt"])
    assert opts.extra["config"]["options"], f"{config.name} sets no option"
    plan = validate(opts)
    _no_warnings(caplog, config.name)
    if opts.allocation_file:
        assert plan.allocation_file is not None, f"{config.name}: {opts.allocation_file} does not exist"
    for name in ("save", "save_model", "overwrite", "resume"):
        assert name not in opts.extra["config"]["options"], f"{config.name}: give {name} on the command line"


def test_every_config_is_a_row_of_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(CONFIGS) >= 5
    for config in CONFIGS:
        assert f"--config configs/{config.name}" in readme, config.name


def test_commands_are_found_on_every_page():
    """The extraction finds the commands (a broken pattern would pass every test above vacuously)."""
    assert len(COMMANDS) >= 40
    for page in PAGES:
        if page.name not in NO_COMMANDS:
            assert any(c.page == page for c in COMMANDS) or any(p == page for p, _, _ in CALLS), page.name
    readme = [c for c in COMMANDS if c.page.name == "README.md"]
    assert any(c.argv[:2] == ("--prune_method", "sparsegpt") for c in readme)
    assert _commands_in_line("A=1 python main.py --seed 1 # && python -m mosaic") == [["--seed", "1"]]
    assert _commands_in_line("x && .venv/bin/python main.py --save 'a b' | tee log") == [["--save", "a b"]]
    assert _commands_in_line("torchrun --nproc_per_node 2 main.py --seed 1") == [["--seed", "1"]]
    assert _commands_in_line("accelerate launch --num_processes 2 main.py --seed 2") == [["--seed", "2"]]


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert f"```bash\n{TWO_COMMANDS}```" in readme


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "INSTALL.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in set(_anchors(file)), f"{page.name}: {target}"
