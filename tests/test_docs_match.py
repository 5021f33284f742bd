"""The docs and the code say the same thing: docs/layout.md lists every module and only paths that exist, every
command README.md and docs/*.md show runs (its --help exits 0), every preset is in README.md's presets table and
every `--preset NAME` shown is a real one, and every `make TARGET` shown is a Makefile target."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "training", "benchmarks", "tools")
LAYOUT = ROOT / "docs" / "layout.md"
PRESETS = ROOT / "training" / "presets"


def docs() -> dict[str, str]:
    """README.md and docs/**/*.md by repository path -> text; a missing README.md is a failure of its own."""
    assert (ROOT / "README.md").is_file(), "README.md is missing"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {str(page.relative_to(ROOT)): page.read_text() for page in pages}


def shown(pattern: str, texts: dict[str, str]) -> dict[str, list[str]]:
    """Each distinct first group of `pattern` in the texts -> the doc files that show it."""
    where: dict[str, list[str]] = {}
    for name, text in texts.items():
        for found in dict.fromkeys(m.group(1) for m in re.finditer(pattern, text)):
            where.setdefault(found, []).append(name)
    return where


def code(text: str) -> str:
    """The code in a markdown page: fenced blocks less their shell comments, and inline spans, one per line
    (prose says "make sure")."""
    fenced = [re.sub(r"(?:^|\s)#.*$", "", block, flags=re.M)
              for block in re.findall(r"^(?:```|~~~)[^\n]*\n(.*?)^(?:```|~~~)", text, flags=re.M | re.S)]
    rest = re.sub(r"^(?:```|~~~)[^\n]*\n.*?^(?:```|~~~)", "", text, flags=re.M | re.S)
    return "\n".join([*fenced, *re.findall(r"`([^`\n]+)`", rest)])


def modules() -> list[str]:
    """The tracked Python modules of the four packages, as repository paths (a glob where git is absent)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = [str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    found = sorted(p for p in listed if p.endswith(".py") and Path(p).name != "__init__.py")
    assert found, f"no modules found under {', '.join(PACKAGES)}"
    return found


def test_layout_names_every_module():
    assert LAYOUT.is_file(), "docs/layout.md is missing"
    layout = LAYOUT.read_text()
    missing = [path for path in modules() if f"`{path}`" not in layout]
    assert not missing, f"docs/layout.md does not name these modules (as `path`): {', '.join(missing)}"


def test_layout_names_only_paths_that_exist():
    assert LAYOUT.is_file(), "docs/layout.md is missing"
    paths = re.findall(r"`([^`\s]+/[^`\s]*\.(?:py|sh|yaml))`", LAYOUT.read_text())
    assert paths, "docs/layout.md names no repository paths in backticks"
    missing = [p for p in dict.fromkeys(paths)
               if not (any(ROOT.glob(p)) if any(c in p for c in "*?[") else (ROOT / p).is_file())]
    assert not missing, f"docs/layout.md names paths that do not exist: {', '.join(missing)}"


def commands(texts: dict[str, str]) -> dict[tuple[str, ...], list[str]]:
    """Each distinct script or module the docs run -> the doc files that show it. `torchrun ... SCRIPT` runs the
    same script as `python SCRIPT`, so it counts once."""
    packages = "|".join(PACKAGES)
    where: dict[tuple[str, ...], list[str]] = {}
    patterns = {r"\bpython3?\s+((?:%s)/[\w/]+\.py)\b" % packages: lambda s: (s,),
                r"\btorchrun\b[^\n`]*?\s((?:%s)/[\w/]+\.py)\b" % packages: lambda s: (s,),
                r"\bpython3?\s+-m\s+((?:%s)(?:\.\w+)+)\b" % packages: lambda s: ("-m", s)}
    for pattern, argv in patterns.items():
        for found, pages in shown(pattern, texts).items():
            for page in pages:
                where.setdefault(argv(found), [])
                if page not in where[argv(found)]:
                    where[argv(found)].append(page)
    return where


# Runs each command's --help in a child of one interpreter that has imported the heavy third-party libraries
# (torch alone takes seconds): each child starts as `python SCRIPT` or `python -m MODULE` would, sys.argv and
# sys.path[0] included, with none of the project's modules imported yet. Prints one JSON line of results.
FORKING_RUNNER = r"""
import importlib, json, os, runpy, sys, tempfile, time, traceback
for library in ("numpy", "PIL", "yaml", "rich", "torch", "torchvision", "timm", "torchmetrics"):
    try:
        importlib.import_module(library)
    except Exception:
        pass
root, results = os.getcwd(), []
for argv in json.loads(sys.argv[1]):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        code = 0
        try:
            if argv[0] == "-m":
                sys.argv, sys.path[0] = [argv[1], *argv[2:]], root
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.join(root, argv[0]))
                runpy.run_path(os.path.join(root, argv[0]), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline, status = time.monotonic() + 240, None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0); status = "timeout"
        else:
            time.sleep(0.05)
    out.seek(0); err.seek(0)
    results.append({"argv": argv, "rc": status, "stdout": out.read().decode(errors="replace"),
                    "stderr": err.read().decode(errors="replace")})
print(json.dumps(results))
"""


def test_every_command_the_docs_show_runs():
    """`--help` of each exits 0, from the repository root, as a reader would run it; the help must come from
    argparse (a usage line), not from a module that ignored its arguments."""
    where = commands(docs())
    assert where, "README.md and docs/*.md show no `python tools/...`, `python training/...` or `python -m benchmarks...`"
    failures = [f"`python {' '.join(argv)}` (shown in {', '.join(pages)}): no such file"
                for argv, pages in where.items() if argv[0] != "-m" and not (ROOT / argv[0]).is_file()]
    argvs = [[*argv, "--help"] for argv in sorted(where) if argv[0] == "-m" or (ROOT / argv[0]).is_file()]
    done = subprocess.run([sys.executable, "-c", FORKING_RUNNER, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for result in json.loads(done.stdout.splitlines()[-1]):
        argv = tuple(result["argv"][:-1])
        shown_as = f"`python {' '.join(argv)}` (shown in {', '.join(where[argv])})"
        if result["rc"] != 0 or "usage:" not in result["stdout"].lower():
            what = ("did not finish in 240 s" if result["rc"] == "timeout" else
                    "printed no usage line" if result["rc"] == 0 else f"exited {result['rc']}")
            failures.append(f"{shown_as}: --help {what}: {(result['stdout'] + result['stderr'])[-1500:]}")
    assert not failures, "\n".join(failures)


def test_every_preset_is_in_the_readme_table_and_every_one_shown_exists():
    texts = docs()
    presets = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert presets, "training/presets/ holds no presets"
    rows = set(re.findall(r"^\|\s*`([\w.-]+)`", texts["README.md"], flags=re.M))
    missing = [name for name in presets if name not in rows]
    assert not missing, f"README.md's presets table has no row (| `NAME` |) for: {', '.join(missing)}"
    unknown = [f"--preset {name} (in {', '.join(pages)})"
               for name, pages in shown(r"--preset[ =]([\w.-]+)", texts).items()
               if not name.isupper() and name not in presets]  # NAME, PRESET: placeholders
    assert not unknown, f"not presets in training/presets/: {'; '.join(unknown)}"


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"^([\w.$() -]+?)\s*::?(?!=)", line)
        if rule and not line.startswith("\t"):
            targets.update(rule.group(1).split())
    return targets


def test_every_make_target_the_docs_show_exists():
    targets, wanted = makefile_targets(), {}
    for page, text in docs().items():
        for line in code(text).splitlines():
            for invocation in re.finditer(r"(?:^|[\s;&|(])make((?:\s+[^\s#;&|)]+)*)", line):
                for word in invocation.group(1).split():
                    if not word.startswith("-") and "=" not in word:  # options and variables are not targets
                        wanted.setdefault(word, [])
                        if page not in wanted[word]:
                            wanted[word].append(page)
    missing = [f"make {target} (in {', '.join(pages)})" for target, pages in wanted.items() if target not in targets]
    assert not missing, f"not Makefile targets: {'; '.join(missing)}"
