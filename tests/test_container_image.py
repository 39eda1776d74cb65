"""The KubeRay image definition (``cluster/Dockerfile``) and its build context (``.dockerignore``).

No Docker engine runs here, so these read the files: the instructions are parsed the way Docker
parses them (continuation lines, comments, shell and JSON forms) and the ignore patterns are
matched with Docker's rules, then checked against the project they package.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
WORKDIR = "/home/ray/pipemedic"


# --- Dockerfile ----------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction; a trailing backslash continues the line, and comment
    or blank lines inside a continued instruction are dropped, as Docker does."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    if pending:
        raise ValueError(f"{DOCKERFILE}: the last instruction ends in a line continuation")
    return instructions


def _copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """Flags, sources and destination of a COPY/ADD in shell or JSON form."""
    tokens = shlex.split(args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        name, _, value = tokens.pop(0)[2:].partition("=")
        flags[name] = value
    if tokens and tokens[0].startswith("["):
        tokens = json.loads(" ".join(tokens))
    return flags, tokens[:-1], tokens[-1]


def _pip_installs(args: str) -> list[list[str]]:
    """The arguments after ``install`` of each ``pip install`` in a RUN's shell command."""
    lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    installs = []
    for tokens in commands:
        for i, token in enumerate(tokens[:-1]):
            if token.endswith("pip") and tokens[i + 1] == "install":
                installs.append(tokens[i + 2 :])
    return installs


def _is_project_install(install_args: list[str]) -> bool:
    return any(arg in (".", "./") for arg in install_args)


def _env_keys(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy form: ENV KEY value
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def copies(instructions) -> list[tuple[int, dict[str, str], list[str], str]]:
    """(instruction index, flags, sources, destination) of every COPY and ADD."""
    return [
        (i, *_copy_parts(args))
        for i, (keyword, args) in enumerate(instructions)
        if keyword in ("COPY", "ADD")
    ]


@pytest.fixture(scope="module")
def pip_installs(instructions) -> list[tuple[int, list[str]]]:
    return [
        (i, install)
        for i, (keyword, args) in enumerate(instructions)
        if keyword == "RUN"
        for install in _pip_installs(args)
    ]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned(pyproject: dict, pattern: str) -> str:
    for requirement in pyproject["project"]["dependencies"]:
        found = re.fullmatch(pattern, requirement.replace(" ", ""))
        if found:
            return found.group(1)
    raise AssertionError(f"pyproject.toml pins no dependency matching {pattern!r}")


def test_base_image_is_the_ray_version_and_python_pinned_in_pyproject(instructions, pyproject):
    ray_version = _pinned(pyproject, r"ray\[[a-z,]*\]==([^,;]+)")
    python = re.search(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"]).group(1)
    bases = [args for keyword, args in instructions if keyword == "FROM"]
    assert bases == [f"rayproject/ray:{ray_version}-py3{python}-cpu"], (
        f"every Ray node must run the pinned ray=={ray_version} on Python 3.{python}; "
        f"the Dockerfile builds FROM {bases}"
    )


def test_cpu_torch_is_installed_before_any_other_requirement(pip_installs, pyproject):
    torch_version = _pinned(pyproject, r"torch==([^,;]+)")
    assert torch_version == "2.13.0"
    first_index, first_install = pip_installs[0]
    assert f"torch=={torch_version}" in first_install, (
        f"the first pip install must be torch=={torch_version}, not {first_install}: "
        "otherwise another requirement pulls the CUDA build"
    )
    index = first_install[first_install.index("--index-url") + 1]
    assert index == CPU_TORCH_INDEX
    later = [i for i, install in pip_installs[1:] if _is_project_install(install)]
    assert later and min(later) > first_index, "the project must be installed after torch"


def test_project_is_installed_not_editable_and_pip_keeps_no_cache(pip_installs):
    project_installs = [install for _, install in pip_installs if _is_project_install(install)]
    assert len(project_installs) == 1, f"expected one `pip install .`, found {project_installs}"
    assert not {"-e", "--editable"} & set(project_installs[0])
    for _, install in pip_installs:
        assert "--no-cache-dir" in install, f"pip install without --no-cache-dir: {install}"


def test_code_and_configs_are_copied_into_the_workdir(instructions, copies):
    workdirs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "WORKDIR"]
    assert [args for _, args in workdirs] == [WORKDIR]
    workdir_index = workdirs[0][0]
    assert all(i > workdir_index for i, *_ in copies), "a COPY lands outside the WORKDIR"
    assert all(not dest.startswith("/") for *_, dest in copies), "COPY to an absolute path"
    destinations = {
        src.rstrip("/"): dest.rstrip("/") for _, _, sources, dest in copies for src in sources
    }
    assert destinations.get("configs") == "configs", "configs/ must be copied to ./configs"


def test_every_package_setuptools_installs_is_copied(copies, pyproject):
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {src.rstrip("/") for _, _, sources, _ in copies for src in sources}
    missing = packages - copied
    assert not missing, f"pip install . would not find these packages: {sorted(missing)}"
    assert {"pyproject.toml", "README.md"} <= copied, "the build needs pyproject.toml and README.md"


def test_every_copied_path_exists_in_the_repository(copies):
    for _, flags, sources, _ in copies:
        if "from" in flags:
            continue
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


def test_context_is_not_copied_wholesale_without_a_dockerignore(copies):
    wholesale = [src for _, _, sources, _ in copies for src in sources if src in (".", "./", "*")]
    if wholesale:
        assert DOCKERIGNORE.is_file(), "COPY . without .dockerignore bakes in .venv, store, .env"


def test_every_copy_is_owned_by_the_ray_user(copies):
    for _, flags, sources, _ in copies:
        assert flags.get("chown", "").split(":")[0] == "ray", f"COPY {sources} not --chown=ray"


def test_python_output_is_unbuffered(instructions):
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(_env_keys(args))
    assert env.get("PYTHONUNBUFFERED") == "1"


def test_no_data_reports_venv_or_credentials_are_baked_in(instructions, copies):
    for _, _, sources, _ in copies:
        for src in sources:
            top = Path(src).parts[0]
            assert top not in ("store", "reports", ".venv", "tests", ".git"), f"COPY {src}"
            assert not src.endswith(".env"), f"COPY {src}"
    secret_names = re.compile(r"^(AWS_|PIPEMEDIC_API_TOKEN)|SECRET|PASSWORD|TOKEN", re.IGNORECASE)
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG"):
            names = _env_keys(args) if keyword == "ENV" else {args.split("=")[0]: ""}
            leaked = [name for name in names if secret_names.search(name)]
            assert not leaked, f"{keyword} {leaked}: credentials come from a Kubernetes Secret"


# --- .dockerignore -------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (moby/patternmatcher) syntax: `*` and `?` stay within one path segment, `**`
    spans any number of segments (none included), `[...]` is a character class."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            out, i = out + pattern[i : end + 1], end + 1
            continue
        elif char == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
            continue
        else:
            out += re.escape(char)
        i += 1
    return re.compile(f"^{out}$")


def _ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per pattern; `!` re-includes. Patterns are cleaned paths relative to
    the context root (a leading or trailing slash means nothing)."""
    rules = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        excludes = not pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().strip("/")
        pattern = "/".join(part for part in pattern.split("/") if part not in ("", "."))
        rules.append((excludes, _pattern_regex(pattern)))
    return rules


def _ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether Docker leaves `path` out of the context: the last rule that matches the path or
    one of its parent folders decides (a folder pattern excludes everything under it)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for excludes, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = excludes
    return ignored


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        ("store", "store/tables/experience/part-0.parquet", True),
        ("*.env", "prod.env", True),
        ("*.env", "configs/prod.env", False),
        ("**/*.env", "configs/prod.env", True),
        ("**/*.env", "prod.env", True),
        ("store\n!store/keep.txt", "store/keep.txt", False),
        ("/reports/", "reports/demo/report.png", True),
        ("store", "storefront/app.py", False),
    ],
)
def test_ignore_matcher_follows_dockers_rules(patterns, path, ignored):
    assert _ignored(_ignore_rules(patterns), path) is ignored


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), "the build context needs a .dockerignore at the repository root"
    return _ignore_rules(DOCKERIGNORE.read_text())


@pytest.mark.parametrize(
    "path",
    [
        "store/tables/experience/part-0.parquet",
        "store/demo/policies/hierarchical/policy.json",
        "store/demo/checkpoints/_delta_log/00000000000000000000.json",
        "elsewhere/checkpoints/_delta_log/00000000000000000000.json",
        "elsewhere/policy/model.safetensors",
        "elsewhere/table/part-0.parquet",
        "reports/demo/report.json",
        ".venv/bin/python",
        ".git/HEAD",
        ".ci/run",
        "prod.env",
        ".env",
        "configs/prod.env",
        "secrets/aws-credentials.json",
        "cluster/secrets/token",
        "serve/__pycache__/app.cpython-311.pyc",
        "pipeline_medic.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        ".schemathesis/cache",
        "tests/test_training.py",
    ],
)
def test_dockerignore_keeps_data_environments_and_secrets_out_of_the_context(ignore_rules, path):
    assert _ignored(ignore_rules, path), f"{path} would be sent to the Docker build"


def test_dockerignore_keeps_everything_the_image_copies(ignore_rules, copies):
    for _, flags, sources, _ in copies:
        if "from" in flags:
            continue
        for src in sources:
            root = ROOT / src
            files = [root] if root.is_file() else sorted(root.rglob("*"))
            needed = [
                f.relative_to(ROOT).as_posix()
                for f in files
                if f.is_file() and f.suffix in (".py", ".yaml", ".yml", ".toml", ".md", ".typed")
            ]
            assert needed, f"COPY {src}: nothing to copy"
            dropped = [path for path in needed if _ignored(ignore_rules, path)]
            assert not dropped, f".dockerignore drops files the image needs: {dropped}"
