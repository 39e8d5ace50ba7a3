"""The one place that lists config options (studies, models, datasets, launchers) over Hydra's whole
search path, the packaged pkg://bnlab.conf first and then the user's config folders, and that reads
a study's header (Question, Run, Report, Size). cli.py, describe.py and the report ask it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BUILTIN = "pkg://bnlab.conf"  # Hydra's primary config source: bnlab/conf as package data
ENV = "BNLAB_CONFIG_DIR"  # the user's config folders (os.pathsep between several), before <project>/conf
HEADER_KEYS = ("Question", "Run", "Report", "Size")


def builtin_dir() -> Path:
    """The packaged config folder (bnlab/conf)."""
    return Path(__file__).resolve().parent / "conf"


def _as_source(entry: str) -> str:
    """A folder (relative to the working directory), file://FOLDER or pkg://module as a search-path URL."""
    if entry.startswith("pkg://"):
        return entry
    path = entry[len("file://"):] if entry.startswith("file://") else entry
    return "file://" + str(Path(path).expanduser().resolve())


def user_sources() -> List[str]:
    """The user's config sources in Hydra's search order: $BNLAB_CONFIG_DIR (bnlab-train puts its
    --config-dir and hydra.searchpath there), then <project>/conf when it exists. The packaged folder
    itself never counts twice."""
    from bnlab.store import project_home

    entries = [e for e in os.environ.get(ENV, "").split(os.pathsep) if e.strip()]
    default = project_home() / "conf"
    if default.is_dir():
        entries.append(str(default))
    out: List[str] = []
    for e in entries:
        src = _as_source(e.strip())
        if src not in out and src not in (BUILTIN, "file://" + str(builtin_dir())):
            out.append(src)
    return out


def search_path() -> List[str]:
    """Every config source bnlab composes from, first match wins (Hydra's rule)."""
    return [BUILTIN] + user_sources()


def _folder(source: str, group: str):
    """The group's folder in a source (a Path or an importlib Traversable), or None."""
    if source.startswith("pkg://"):
        import importlib.resources

        module = source[len("pkg://"):].replace("/", ".")
        try:
            root = importlib.resources.files(module)
        except (ModuleNotFoundError, TypeError):
            return None
    else:
        root = Path(source[len("file://"):])
    folder = root.joinpath(*group.split("/")) if group else root
    return folder if folder.is_dir() else None


def _names(source: str, group: str) -> List[str]:
    folder = _folder(source, group)
    if folder is None:
        return []
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml") and p.is_file())


def options(group: str) -> List[str]:
    """Every option of a config group (study, model, data, hydra/launcher) over the whole search path."""
    names = {n for src in search_path() for n in _names(src, group)}
    return sorted(names)


def where(group: str, name: str) -> Optional[str]:
    """The source whose file Hydra composes for group/name (the first on the search path), or None."""
    for src in search_path():
        if name in _names(src, group):
            return src
    return None


def describe_source(source: str, group: str, name: str) -> str:
    """The file's path (a folder source) or pkg://module/group/name.yaml, for messages."""
    rel = "/".join([p for p in (group, f"{name}.yaml") if p])
    return f"{source[len('file://'):]}/{rel}" if source.startswith("file://") else f"{source}/{rel}"


def text(group: str, name: str) -> Optional[str]:
    """The YAML text Hydra composes for group/name, or None when no source has it."""
    src = where(group, name)
    if src is None:
        return None
    return _folder(src, group).joinpath(f"{name}.yaml").read_text()


def shadowing(group: str, name: str) -> Optional[str]:
    """The user file that has the name of a built-in config (Hydra would silently compose the
    built-in one: its search path cannot shadow a packaged file), or None."""
    if name not in _names(BUILTIN, group):
        return None
    for src in user_sources():
        if name in _names(src, group):
            return describe_source(src, group, name)
    return None


def parse_header(yaml_text: str) -> Dict[str, str]:
    """The `# Key: text` comment lines at the top of a study file (Question, Run, Report, Size),
    continuation lines (`#   ...`) joined."""
    out: Dict[str, str] = {}
    key = None
    for line in yaml_text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        head, sep, rest = body.strip().partition(":")
        if sep and head in HEADER_KEYS and not body.startswith("   "):
            key = head
            out[key] = rest.strip()
        elif key and body.startswith("   "):
            out[key] += " " + body.strip()
        else:
            key = None
    return out


def header(study: str) -> Dict[str, str]:
    """The header of study `study` wherever it is on the search path; {} for an unknown study."""
    t = text("study", study)
    return parse_header(t) if t is not None else {}


def run_size(study: str) -> Tuple[str, str]:
    """(question, size): the size is what the Run line says in parentheses (e.g. '54 runs, ...')."""
    h = header(study)
    run = h.get("Run", "")
    size = run[run.index("(") + 1:run.rindex(")")] if "(" in run and ")" in run else ""
    return h.get("Question", ""), size


def installed_location(path: Path) -> Optional[str]:
    """What `path` lies inside, if it is an installed package (bnlab's own folder or a
    site-packages), a place where generated files never go; None otherwise."""
    import site
    import sysconfig

    path = Path(path).resolve()
    roots = [Path(__file__).resolve().parent] + [Path(p) for p in
                                                   {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                    *site.getsitepackages()}]
    for root in roots:
        try:
            path.relative_to(root.resolve())
        except (ValueError, OSError):
            continue
        return f"the installed package folder {root}"
    return None
