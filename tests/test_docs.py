"""The documentation stays runnable: every command in README.md and docs/*.md names a script that exists and
only flags that script accepts, and every relative link points to a file (and heading) that exists.

Commands are taken from the ```bash blocks and from inline code spans that start a command (`python x.py ...`).
Each script's flags are read once from its own `--help`, run offline."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
    ROOT / "benchmarks" / "quality" / "README.md",
]
GENERATED = ("outputs",)  # folders the documented commands write (the quick start's figure is linked there)

ENTRY_POINTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]  # name -> "module:function"
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
HELP_FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def bash_blocks(text):
    return [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "shell")]


def prose(text):
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def split_commands(script):
    """Shell text -> one token list per simple command: continuations joined, comments dropped, split at
    `&`, `&&`, `;`, `|`, with leading VAR=value assignments removed."""
    lexer = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if set(token) <= set("&;|()") or token == "\n":
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for tokens in commands:
        while tokens and ENV_ASSIGNMENT.match(tokens[0]):
            tokens = tokens[1:]
        if tokens:
            out.append(tokens)
    return out


def invocation(tokens):
    """(script, flags) for a command that runs one of this repository's scripts or entry points, else None.
    script is a path relative to the repository root, or an entry-point name."""
    if tokens[0] in ENTRY_POINTS:
        return tokens[0], flags_of(tokens[1:])
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return tokens[1], flags_of(tokens[2:])
    if tokens[:2] == ["accelerate", "launch"]:
        for i, token in enumerate(tokens[2:], start=2):
            if token.endswith(".py"):
                return token, flags_of(tokens[i + 1 :])
    return None


def flags_of(arguments):
    return [a.split("=", 1)[0] for a in arguments if a.startswith("--") and len(a) > 2]


def commands_in(text):
    """Every invocation in a Markdown text: the bash blocks line by line, and inline spans that start one."""
    found = []
    for block in bash_blocks(text):
        # a line per command: newlines end commands, except after a continuation
        for line in block.replace("\\\n", " ").splitlines():
            found += [inv for tokens in split_commands(line) if (inv := invocation(tokens))]
    for span in INLINE.findall(prose(text)):
        span = " ".join(span.split())
        try:
            commands = split_commands(span)
        except ValueError:  # an unbalanced quote: not a command
            continue
        if commands and (inv := invocation(commands[0])):
            found.append(inv)
    return found


# Every --help would import torch and transformers again (several seconds each); instead one interpreter imports
# them once and forks a child per script, which runs it as `python SCRIPT --help` would (its folder first on
# sys.path, __main__, its own exit status), output to a file.
HELP_RUNNER = r"""
import json, os, runpy, sys
import importlib, pkgutil
import torch, transformers, datasets, accelerate  # noqa: F401  (the shared, slow imports)
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: F401
import transformers_cim
for module in pkgutil.walk_packages(transformers_cim.__path__, "transformers_cim."):
    try:
        importlib.import_module(module.name)
    except Exception:  # an optional dependency missing: the script that needs it will say so itself
        pass
entry_points, out_dir, scripts = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
children = {}
for i, script in enumerate(scripts):
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.path.join(out_dir, str(i)), os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 1), os.dup2(fd, 2)
        code = 0
        try:
            if script in entry_points:
                module, function = entry_points[script].split(":")
                sys.argv = [script, "--help"]
                code = __import__(module, fromlist=[function]).__dict__[function]()
            else:
                sys.argv = [script, "--help"]
                sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
                runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
    children[pid] = i
status = {}
for _ in scripts:
    pid, code = os.wait()
    status[children[pid]] = os.waitstatus_to_exitcode(code)
print(json.dumps([status[i] for i in range(len(scripts))]))
"""
_HELP = {}


def load_help(scripts, tmp_dir):
    """Run the --help of every script not read yet (one interpreter, a fork each); fills _HELP."""
    todo = [s for s in dict.fromkeys(scripts) if s not in _HELP]
    if not todo:
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    result = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(ENTRY_POINTS), str(tmp_dir), *todo],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for i, (script, code) in enumerate(zip(todo, json.loads(result.stdout.splitlines()[-1]))):
        text = (Path(tmp_dir) / str(i)).read_text()
        assert code == 0, f"`{script} --help` exited with {code}:\n{text[-2000:]}"
        _HELP[script] = frozenset(HELP_FLAG.findall(text))


@pytest.fixture(scope="module")
def help_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("help")


def accepted_flags(script, tmp_dir):
    load_help([script], tmp_dir)
    return _HELP[script]


def problems(script, flags, tmp_dir):
    """What is wrong with one invocation: a missing script, or flags its --help does not list."""
    if script not in ENTRY_POINTS and not (ROOT / script).is_file():
        return [f"{script}: no such script"]
    known = accepted_flags(script, tmp_dir)
    return [f"{script}: {flag} is not accepted" for flag in flags if flag not in known]


def all_invocations():
    return [(doc, script, flags) for doc in DOCS for script, flags in commands_in(doc.read_text())]


def test_extractor_on_a_planted_block():
    text = """
```bash
# W: a work dir
W=/tmp/w
OMP_NUM_THREADS=1 python run_pretraining.py --output_dir $W/a \\
    --max_steps 5 --made_up_flag 3 &   # runs in the background
python benchmarks/bench_step.py --size=small; cim-export-encoder $W/a "$W/b"
accelerate launch --multi_gpu --num_processes 8 run_pretraining.py \\
    --bf16 --output_dir out
wait
python -m pytest -m slow
```
And inline: `python run_image_classification.py --do_eval --linear_probe`, but not `--max_steps`.
"""
    assert commands_in(text) == [
        ("run_pretraining.py", ["--output_dir", "--max_steps", "--made_up_flag"]),
        ("benchmarks/bench_step.py", ["--size"]),
        ("cim-export-encoder", []),
        ("run_pretraining.py", ["--bf16", "--output_dir"]),
        ("run_image_classification.py", ["--do_eval", "--linear_probe"]),
    ]


def test_every_documented_command_is_runnable(help_dir):
    invocations = all_invocations()
    assert len(invocations) > 20  # the extractor finds the docs' commands at all
    load_help(
        [script for _, script, _ in invocations if script in ENTRY_POINTS or (ROOT / script).is_file()], help_dir
    )
    found = [
        f"{doc.relative_to(ROOT)}: {p}"
        for doc, script, flags in invocations
        for p in problems(script, flags, help_dir)
    ]
    assert not found, "\n".join(found)


def test_checker_rejects_a_made_up_flag_and_a_missing_script(help_dir):
    ((script, flags),) = commands_in("```bash\npython run_pretraining.py --output_dir o --made_up_flag 1\n```\n")
    assert problems(script, flags, help_dir) == ["run_pretraining.py: --made_up_flag is not accepted"]
    assert problems("benchmarks/no_such_bench.py", [], help_dir) == ["benchmarks/no_such_bench.py: no such script"]


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if re.match(r"#{1,6} ", line)}


def broken_links(doc, root=ROOT):
    """The relative links of a Markdown file whose file, or heading, does not exist."""
    broken = []
    for target in LINK.findall(INLINE.sub("", prose(doc.read_text()))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if file.is_relative_to(root) and file.relative_to(root).parts[:1] in [(g,) for g in GENERATED]:
            continue
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    return broken


def test_link_checker_on_planted_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## CamVid, CIM vs random init (a `real`, small run)\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/a.md), [ok](docs/a.md#camvid-cim-vs-random-init-a-real-small-run), [web](https://x.org/y),\n"
        "[figure](outputs/run/maps.png), [gone](docs/b.md), [bad](docs/a.md#camvid), `[code](docs/c.md)`\n"
    )
    assert broken_links(doc, root=tmp_path.resolve()) == [
        "docs/b.md (no such file)",
        "docs/a.md#camvid (no such heading)",
    ]


def test_relative_links_point_to_existing_files():
    broken = [f"{doc.relative_to(ROOT)}: {link}" for doc in DOCS for link in broken_links(doc)]
    assert not broken, "\n".join(broken)
