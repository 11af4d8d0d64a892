"""The docs say what the code does: every method option is a field of its schema and is documented on its
method's page, and every `kdexp-train` command of the README composes with the current configs."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import DictConfig

from kdexp.config import CONFIG_DIR, validate_config
from kdexp.run import compose_config, resolve_method

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
METHODS_INDEX = DOCS / "methods" / "README.md"
README = REPO / "README.md"
NOT_OPTIONS = ("name", "_target_")


def method_configs() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def method_pages() -> dict[str, Path]:
    """method config -> its docs page, from the table of docs/methods/README.md (`| [page](page) | `a`, `b` |`)."""
    pages: dict[str, Path] = {}
    for line in METHODS_INDEX.read_text(encoding="utf-8").splitlines():
        row = re.match(r"\|\s*\[[^\]]+\]\(([^)]+)\)\s*\|(.*)\|\s*$", line)
        if row:
            for method in re.findall(r"`([a-z0-9_]+)`", row.group(2)):
                pages[method] = METHODS_INDEX.parent / row.group(1)
    return pages


def option_paths(cfg: DictConfig, options: object, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, the schema object holding it, its field name) for every key of a method's config."""
    found = []
    for key in cfg:
        if not prefix and key in NOT_OPTIONS:
            continue
        found.append((prefix + str(key), options, str(key)))
        value = cfg[key]
        nested = getattr(options, str(key), None)
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(nested):
            found += option_paths(value, nested, f"{prefix}{key}.")
    return found


def code_spans(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # inline spans only, not fenced blocks
    return re.findall(r"`([^`\n]+)`", text)


def mentioned(key: str, spans: list[str]) -> bool:
    """`key` (dotted from the method, e.g. `queries.eda.style`) appears whole inside an inline code span:
    `alpha`, `method.alpha=0.5`, `queries.eda.style` (but not `kd_alpha` for `alpha`)."""
    pattern = re.compile(rf"(?<![\w]){re.escape(key)}(?![\w])")
    return any(pattern.search(span) for span in spans)


def test_every_method_config_has_a_docs_page() -> None:
    pages = method_pages()
    missing = [name for name in method_configs() if name not in pages]
    assert not missing, f"method configs missing from the table of {METHODS_INDEX}: {missing}"
    for name, page in pages.items():
        assert page.is_file(), f"{METHODS_INDEX}: the page of {name}, {page}, does not exist"
        assert name in method_configs(), f"{METHODS_INDEX} lists {name}, which has no conf/method/{name}.yaml"


@pytest.mark.parametrize("name", method_configs())
def test_every_key_of_a_method_config_is_a_field_of_its_options_and_on_its_page(name: str) -> None:
    cfg = compose_config([f"method={name}"]).method  # its defaults composed (dbkd_authors: dbkd's keys too)
    cls, options = resolve_method(cfg)
    keys = option_paths(cfg, options)
    if options is None:
        assert not keys, f"{name}: {cls.__name__} takes no options, but its YAML sets {[k for k, _, _ in keys]}"
        return
    for key, holder, field in keys:
        fields = {f.name for f in dataclasses.fields(holder)}  # type: ignore[arg-type]
        assert field in fields, f"method.{key} of {name}.yaml is no field of {type(holder).__name__} ({sorted(fields)})"
    page = method_pages().get(name)
    assert page is not None, f"method={name} has no row in the table of {METHODS_INDEX.relative_to(REPO)}"
    spans = code_spans(page)
    undocumented = [key for key, _, _ in keys if not mentioned(key, spans)]
    assert not undocumented, f"{page.relative_to(REPO)} does not mention these keys of method={name}: {undocumented}"


# --------------------------------------------------------------------------- README commands


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)


def kdexp_train_commands(text: str, variables: dict[str, str] | None = None) -> list[str]:
    """Every command line of the code blocks of `text` that runs kdexp-train (continuations joined, comments
    and what precedes `kdexp-train` dropped: `VAR=value`, `time`), with the shell variables `NAME="..."` set earlier in the
    same block, or given in `variables`, expanded."""
    commands = []
    for block in shell_blocks(text):
        names = dict(variables or {})
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            assignment = re.match(r'^([A-Z_][A-Z0-9_]*)="([^"]*)"$', line)
            if assignment:
                names[assignment.group(1)] = assignment.group(2)
                continue
            for name, value in names.items():
                line = line.replace("$" + name, value)
            words = shlex.split(line) if "kdexp-train" in line and not line.startswith("#") else []
            if "kdexp-train" in words:  # after `VAR=value`, `time`, `env ...`: the command itself
                commands.append(shlex.join(words[words.index("kdexp-train") :]))
    return commands


def split_sweep(value: str) -> list[str]:
    """`a,b,c` -> [a, b, c], leaving commas inside brackets alone (`[[0,1],[1,3]]`)."""
    parts, depth, current = [], 0, ""
    for char in value:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


# Hydra's flags that take a value (`--cfg job`, `-cn config`): the value is no override.
FLAGS_WITH_A_VALUE = (
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
)


def compositions(command: str) -> list[list[str]]:
    """The override lists a command's jobs compose: one per value of each swept key (others at their first)."""
    words = shlex.split(command)[1:]
    multirun = "-m" in words or "--multirun" in words
    overrides = []
    for i, word in enumerate(words):
        if word.startswith("-") or (i and words[i - 1] in FLAGS_WITH_A_VALUE):
            continue
        if word.startswith(("hydra.", "hydra/", "+hydra.")):
            continue  # the launcher's and sweeper's keys: Hydra's, composed by Hydra at launch
        assert "=" in word, f"{command!r}: {word!r} is no override"
        overrides.append(word)
    if not multirun:
        return [overrides]
    choices = []
    for word in overrides:
        key, value = word.split("=", 1)
        choices.append([f"{key}={v}" for v in split_sweep(value)])
    firsts = [c[0] for c in choices]
    jobs = [firsts]
    for i, values in enumerate(choices):
        jobs += [firsts[:i] + [v] + firsts[i + 1 :] for v in values[1:]]
    return jobs


README_COMMANDS = kdexp_train_commands(README.read_text(encoding="utf-8"))


def test_the_readme_has_kdexp_train_commands() -> None:
    assert len(README_COMMANDS) >= 10, README_COMMANDS


@pytest.mark.parametrize("command", README_COMMANDS)
def test_every_kdexp_train_command_of_the_readme_composes(command: str) -> None:
    if any(flag in shlex.split(command) for flag in ("--help", "-h", "-sc")):
        return  # Hydra's own flags: nothing to compose
    for overrides in compositions(command):
        cfg = compose_config(overrides)
        validate_config(cfg)
        resolve_method(cfg.method)


def test_the_command_parser_sees_sweeps_and_continuations() -> None:
    text = "```bash\nGLUE_DIR=x kdexp-train -m task=rte,mrpc \\\n  method=finetune hydra/launcher=joblib  # note\n```\n"
    assert not kdexp_train_commands("```text\ntrain.py  kdexp-train (the Hydra app)\n```\n")  # not a shell block
    [command] = kdexp_train_commands(text)
    assert compositions(command) == [["task=rte", "method=finetune"], ["task=mrpc", "method=finetune"]]
    assert split_sweep("[[0,1],[1,3]],last") == ["[[0,1],[1,3]]", "last"]
    assert list(itertools.chain(*compositions("kdexp-train task=sst2"))) == ["task=sst2"]
    assert compositions("kdexp-train experiment=quickstart --cfg job") == [["experiment=quickstart"]]


# --------------------------------------------------------------------------- results pages


def results_commands() -> list[tuple[str, str]]:
    """(page, command) for every kdexp-train command of docs/results, `$COMMON` as docs/results/README.md sets it."""
    index = (DOCS / "results" / "README.md").read_text(encoding="utf-8")
    variables = dict(re.findall(r'^([A-Z_][A-Z0-9_]*)="([^"]*)"$', index, flags=re.M))
    assert "COMMON" in variables, "docs/results/README.md no longer sets COMMON"
    return [
        (page.name, command)
        for page in sorted((DOCS / "results").glob("*.md"))
        for command in kdexp_train_commands(page.read_text(encoding="utf-8"), variables)
    ]


@pytest.mark.parametrize("page,command", results_commands())
def test_the_commands_behind_the_results_still_compose(page: str, command: str) -> None:
    """The commands that produced the recorded numbers still compose with today's configs; if a key is renamed,
    the page says so beside the command it recorded."""
    assert "$" not in command, f"docs/results/{page}: a shell variable is not set: {command}"
    for overrides in compositions(command):
        cfg = compose_config(overrides)
        validate_config(cfg)
        resolve_method(cfg.method)
