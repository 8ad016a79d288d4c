"""containers/prune.def and every way pruneflow is started inside an image, checked without Apptainer.

Apptainer is not packaged for Debian bookworm, so the image is never built here. Instead the def file is
parsed, its shell sections are linted and then *executed* outside the image, the way Apptainer would run
them (under /bin/sh, %environment sourced first), with a `python` on PATH that is this test's interpreter:
%post installs the staged %files copy for real (made safe, see `installed`), %runscript answers --help and
runs the quickstart from that installed copy, %test runs its tiny study. The Slurm paths (submit
--container, slurm/sweep.sh with PRUNEFLOW_CONTAINER) run against a fake `apptainer` that records its
arguments. What no test here can show: that the base image pulls, that pip resolves inside it, that CUDA
works under --nv; see containers/README.md.
"""
import ast
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

from conftest import ROOT, assert_clean_error, run_module

# one worker runs this module, so its module-scoped fixtures (an install, a sweep) are built once
pytestmark = pytest.mark.xdist_group("container")

DEF = os.path.join(ROOT, "containers", "prune.def")
BUILD = os.path.join(ROOT, "containers", "build.sh")
IMAGE_ROOT = "/opt/pruneflow"  # where %files puts the repository inside the image
KNOWN_SECTIONS = {"setup", "files", "post", "environment", "runscript", "startscript", "test", "labels", "help"}
SHELL_SECTIONS = ("post", "environment", "runscript", "test")
COMMANDS = ("train", "prune", "sweep", "submit", "report", "infer", "export", "convert", "data")
# A study small enough for a test (dense + one L1 trial, one epoch each), as slurm/sweep.sh takes it.
SMALL_ARGS = ("--seeds [0] --prune.methods [l1] --prune.sparsities [0.5] --train.epochs 1 --finetune.epochs 1 "
              "--latency.trials 2 --control false --resources.device cpu")


# ---- the def file ---------------------------------------------------------------------------------------

def parse_def(text):
    """(header {key: value}, {section: body}) of an Apptainer definition file (one stage).

    Header lines (`Key: value`, comments, blank lines) come before the first `%section` line; a section's
    body runs to the next one. Unknown and repeated sections are errors here: Apptainer would append a
    repeated section, which is legal but makes the file harder to read than it needs to be."""
    header, sections, current = {}, {}, None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"%(\w+)\b(.*)$", line)
        if m:
            name = m.group(1)
            if name not in KNOWN_SECTIONS and not name.startswith("app"):
                raise ValueError(f"line {n}: unknown section %{name}")
            if name in sections:
                raise ValueError(f"line {n}: section %{name} appears twice")
            sections[name], current = [], name
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"line {n}: expected a `Key: value` header line, got {line!r}")
            if not header and key.strip() != "Bootstrap":
                raise ValueError(f"line {n}: Bootstrap must be the first header keyword")
            header[key.strip()] = value.strip()
    return header, {k: "\n".join(v).strip("\n") + "\n" for k, v in sections.items()}


@pytest.fixture(scope="module")
def definition():
    with open(DEF) as f:
        return parse_def(f.read())


def section(definition, name):
    return definition[1][name]


def body_lines(text):
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_parser_rejects_unknown_and_repeated_sections():
    assert parse_def("Bootstrap: docker\nFrom: x\n%post\n  true\n%appinstall foo\n  true\n")[0]["From"] == "x"
    for text, needle in [("Bootstrap: docker\n%post\n true\n%postt\n", "unknown section %postt"),
                         ("Bootstrap: docker\n%post\n true\n%test\n true\n%post\n", "%post appears twice"),
                         ("From: x\nBootstrap: docker\n", "Bootstrap must be the first"),
                         ("Bootstrap docker\n", "Key: value")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            parse_def(text)


def test_def_header_and_sections(definition):
    header, sections = definition
    assert list(header)[:2] == ["Bootstrap", "From"] and header["Bootstrap"] == "docker"
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", header["From"]), header["From"]
    assert {"files", "post", "environment", "runscript", "test", "labels", "help"} <= set(sections)


def test_files_come_from_this_checkout(definition):
    pairs = [ln.split() for ln in body_lines(section(definition, "files"))]
    assert all(len(p) == 2 for p in pairs), pairs
    for src, dst in pairs:
        assert not os.path.isabs(src) and os.path.exists(os.path.join(ROOT, src)), src  # relative to the repo root
        assert dst == f"{IMAGE_ROOT}/{src}", (src, dst)
    assert {"pyproject.toml", "README.md", "pruneflow", "jobs", "slurm"} <= {src for src, _ in pairs}
    assert not re.search(r"\bgit (clone|fetch|checkout)\b|https?://\S+\.git\b", section(definition, "post"))


def test_labels_and_help(definition):
    labels = dict(ln.split(None, 1) for ln in body_lines(section(definition, "labels")))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version  # bump both together
    assert labels["org.opencontainers.image.title"] == "pruneflow"
    assert "org.opencontainers.image.source" in labels
    help_text = section(definition, "help")
    for needle in ("--nv", "--bind /scratch/data:/data", "--data.root /data", "/results", "--out",
                   "--container", "PRUNEFLOW_CONTAINER"):
        assert needle in help_text, needle


def test_post_keeps_the_base_images_torch(definition):
    installs = [ln for ln in body_lines(section(definition, "post")) if re.search(r"\bpip install\b", ln)]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0])
    assert words[:4] == ["python", "-m", "pip", "install"] and "--no-cache-dir" in words
    assert f"{IMAGE_ROOT}[hpc]" in words and "--constraint" in words
    assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed"} & set(words)
    assert not any(w.startswith(("torch", "--index-url", "--extra-index-url")) for w in words), words


@pytest.mark.parametrize("name", SHELL_SECTIONS)
def test_shell_sections_pass_sh_n_bash_n_and_shellcheck(definition, name, tmp_path):
    # Apptainer runs build-time and run-time sections with /bin/sh (dash on the Ubuntu base image).
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/sh\n" + section(definition, name))
    for cmd in (["sh", "-n", script], ["bash", "-n", script], ["shellcheck", "-s", "sh", script]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, (cmd[0], p.stdout + p.stderr)


# ---- running the sections outside the image -------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    """A directory for the front of PATH: `python` is this test's interpreter (a wrapper script: a symlink
    to a venv's python starts the base interpreter, without the venv's packages), and `apptainer` records
    its arguments (one a line) and then runs what follows `exec --nv IMAGE`."""
    d = tmp_path_factory.mktemp("bin")
    (d / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (d / "apptainer").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_APPTAINER_LOG"\nshift 3\nexec "$@"\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def container_env(fake_bin, **extra):
    """The environment the sections see: this one, with the fake `python` first on PATH; no Slurm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "PRUNEFLOW_"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", **extra)
    return env


def run_section(definition, name, scratch, args=(), env=None, cwd=None, replace=(), trace=False, timeout=600):
    """Run a section as Apptainer does: with /bin/sh, and for the run-time sections (%runscript, %test)
    after sourcing %environment (at build time, %post does not see it)."""
    body = section(definition, name)
    for old, new in replace:
        body = body.replace(old, new)
    script = os.path.join(scratch, f"{name}.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n" + body)
    command = f'exec sh {"-x " if trace else ""}{shlex.quote(script)} "$@"'
    if name != "post":
        environment = os.path.join(scratch, "environment.sh")
        with open(environment, "w") as f:
            f.write(section(definition, "environment"))
        command = f". {shlex.quote(environment)} && {command}"
    return subprocess.run(["sh", "-c", command, name, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def installed(definition, fake_bin, tmp_path_factory):
    """%files staged into a fake root (with `cp -fLr`, as Apptainer copies them), then %post run against it.

    Made safe by rewriting, not by copying the install line into this test: every absolute path %post
    touches (/opt/pruneflow, /results, /data) is moved under the fake root, and `pip install` gets
    `--no-deps --no-build-isolation --target DIR`. --target rather than --dry-run because the wheel is then
    really built from the staged copy and installed (which proves %files holds everything the build needs)
    and the installed copy can be run like the image's; --no-deps so nothing is downloaded and this
    virtualenv is left alone (torch & co. are already here); --no-build-isolation because an isolated build
    would download setuptools."""
    fake_root = tmp_path_factory.mktemp("image")
    for src, dst in (ln.split() for ln in body_lines(section(definition, "files"))):
        target = str(fake_root) + dst
        os.makedirs(os.path.dirname(target), exist_ok=True)
        subprocess.run(["cp", "-fLr", src, target], cwd=ROOT, check=True)
    site = fake_root / "site-packages"
    replace = [(IMAGE_ROOT, f"{fake_root}{IMAGE_ROOT}"), ("pip install", f"pip install --no-deps --no-build-isolation "
                                                                          f"--target {shlex.quote(str(site))}")]
    replace += [(f" {d}", f" {fake_root}{d}") for d in ("/results", "/data")]
    body = section(definition, "post")
    for old, new in replace:
        body = body.replace(old, new)
    # nothing may be left that writes outside the fake root (this runs as whoever runs the tests)
    assert not re.search(r"(?<![\w.-])/(opt|results|data|usr|etc)\b", "\n".join(body_lines(body))), body
    scratch = tmp_path_factory.mktemp("post")
    p = run_section(definition, "post", scratch, env=container_env(fake_bin, TMPDIR=str(scratch)), cwd="/",
                    replace=replace, trace=True)
    return dict(proc=p, root=fake_root, site=site, repo=f"{fake_root}{IMAGE_ROOT}")


def test_post_installs_the_staged_checkout(installed):
    p = installed["proc"]
    assert p.returncode == 0, p.stdout + p.stderr
    import importlib.metadata as md

    for pkg in ("torch", "torchvision"):  # the installed torch pinned (seen in the `sh -x` trace)
        assert f"echo {pkg}=={md.version(pkg)}" in p.stderr, p.stderr
    assert "pruneflow 0.1.0 on torch" in p.stdout
    site = installed["site"]
    assert (site / "pruneflow" / "__main__.py").exists() and (site / "pruneflow" / "errors.py").exists()
    direct_url = next(site.glob("pruneflow-*.dist-info")) / "direct_url.json"
    assert f'"file://{installed["repo"]}"' in direct_url.read_text()
    assert (site / "pruneflow" / "quickstart.yaml").is_file()  # package data: what bare `python -m pruneflow` runs
    assert (installed["root"] / "results").is_dir() and (installed["root"] / "data").is_dir()
    assert not (installed["root"] / "opt" / "pruneflow" / "build").exists()


def test_environment_sets_python_and_locale_and_leaves_slurm_alone(definition, tmp_path):
    body = section(definition, "environment")
    assert not re.search(r"SLURM_|SUBMITIT_", body)
    script = tmp_path / "env.sh"
    script.write_text(body)
    outer = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "42", "SLURM_ARRAY_TASK_ID": "3",
             "SUBMITIT_EXECUTOR": "slurm", "LANG": "de_DE.ISO-8859-1"}

    def env_after(source):
        cmd = (f". {shlex.quote(str(script))}; " if source else "") + "env -0"
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=outer, check=True).stdout
        return dict(x.split("=", 1) for x in out.split("\0") if "=" in x)

    before, after = env_after(False), env_after(True)
    assert after["PYTHONNOUSERSITE"] == "1" and after["LC_ALL"] == after["LANG"] == "C.UTF-8"
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} - {"_", "SHLVL"}
    assert changed == {"PYTHONNOUSERSITE", "LC_ALL", "LANG"}, changed


def test_runscript_lists_commands_and_runs_them(definition, fake_bin, tmp_path):
    env = container_env(fake_bin)
    p = run_section(definition, "runscript", tmp_path, ["--help"], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for c in COMMANDS:
        assert re.search(rf"^\s+{c}\s+\S", p.stdout, re.M), c
    p = run_section(definition, "runscript", tmp_path, ["infer", "--help"], env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "pruneflow.infer" in p.stdout + p.stderr and "--device" in p.stdout + p.stderr  # Fire: help on stderr


def test_test_section_runs_its_smoke_study(definition, fake_bin, tmp_path):
    """%test as `apptainer test` runs it, with /opt/pruneflow pointed at this checkout (~1 minute on 2 CPUs)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = container_env(fake_bin, TMPDIR=str(scratch))
    p = run_section(definition, "test", tmp_path, env=env, cwd=tmp_path, replace=[(IMAGE_ROOT, ROOT)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 done, 0 failed" in p.stdout and "l1-0.50-s0" in p.stdout
    assert "latency" in p.stdout and p.stdout.rstrip().endswith("pruneflow image OK")
    assert not list(scratch.glob("tmp.*"))  # its `mktemp -d` results directory was removed


# ---- Slurm: submitit's and sbatch's command lines ---------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_sh_run(fake_bin, tmp_path_factory):
    """slurm/sweep.sh run directly (not through sbatch) with PRUNEFLOW_CONTAINER and a fake `apptainer`."""
    d = tmp_path_factory.mktemp("sweep_sh")
    image, out, log = d / "prune.sif", d / "results", d / "apptainer-argv"
    image.write_text("stands in for the image")
    env = container_env(fake_bin, PRUNEFLOW_CONTAINER=str(image), PRUNEFLOW_OUT=str(out),
                        PRUNEFLOW_ARGS=SMALL_ARGS, FAKE_APPTAINER_LOG=str(log))
    p = subprocess.run(["bash", "slurm/sweep.sh", "jobs/quickstart.yaml"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    argv = log.read_text().splitlines() if log.exists() else None
    return dict(proc=p, argv=argv, image=str(image), out=str(out))


def test_sweep_sh_runs_the_sweep_inside_the_container(sweep_sh_run):
    p = sweep_sh_run["proc"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sweep_sh_run["argv"] == ["exec", "--nv", sweep_sh_run["image"], "python", "-u", "-m", "pruneflow.sweep",
                                    "jobs/quickstart.yaml", "--shard", "0/1", "--out", sweep_sh_run["out"],
                                    "--noprogress", *SMALL_ARGS.split()]
    assert "2 done, 0 failed" in p.stdout
    assert os.path.exists(os.path.join(sweep_sh_run["out"], "quickstart", "shard-0-of-1.h5"))


def test_submit_container_command_is_what_apptainer_expects(tmp_path):
    image = tmp_path / "my images" / "prune.sif"  # a space: the path must reach srun quoted
    image.parent.mkdir()
    image.write_text("stands in for the image")
    p = run_module("pruneflow.submit", "jobs/quickstart.yaml", "--container", image, "--dry-run",
                   "--out", tmp_path / "results")
    assert p.returncode == 0, p.stderr
    commands = [shlex.split(ln) for ln in p.stdout.splitlines() if ln.startswith("srun ")]
    assert len(commands) == 3, p.stdout  # train, sweep array, report
    for argv in commands:
        i = argv.index("apptainer")
        assert argv[i:i + 8] == ["apptainer", "exec", "--nv", str(image), "python", "-u", "-m",
                                 "submitit.core._submit"], argv
        assert argv[i + 8].startswith(str(tmp_path / "results" / "quickstart" / "slurm"))
    assert f"apptainer exec --nv {shlex.quote(str(image))} python -u -m submitit.core._submit" in p.stdout
    assert_clean_error(run_module("pruneflow.submit", "jobs/quickstart.yaml", "--container", tmp_path / "no.sif",
                                  "--dry-run", "--out", tmp_path / "results"), "no.sif does not exist", "build.sh")


# ---- python -m pruneflow -------------------------------------------------------------------------------

def test_help_lists_every_command_fast_and_without_torch():
    for word in ("--help", "-h", "help"):
        t0 = time.perf_counter()
        p = run_module("pruneflow", word)
        wall = time.perf_counter() - t0
        assert p.returncode == 0, p.stderr
        # "fast" is checked below as behaviour (no heavy import); this bound only catches a hang, since the
        # suite's other worker may be loading the same 2 cores
        assert wall < 10.0, f"python -m pruneflow {word} took {wall:.2f} s"
        for c in COMMANDS:
            assert re.search(rf"^\s+{c}\s+\S", p.stdout, re.M), c
    probe = ("import runpy, sys; sys.argv = ['pruneflow', '--help']; "
             "runpy.run_module('pruneflow', run_name='__main__'); "
             "heavy = {'torch', 'nni', 'ray', 'h5py', 'fire', 'submitit'} & set(sys.modules); assert not heavy, heavy")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_every_command_has_a_module_with_main():
    from pruneflow.__main__ import COMMANDS as table

    assert tuple(table) == COMMANDS
    for command, (module, text) in table.items():
        spec = importlib.util.find_spec(module)  # imports the parent package only
        assert spec and spec.origin, module
        with open(spec.origin) as f:
            tree = ast.parse(f.read())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module
        assert text and "\n" not in text


def test_unknown_command_is_one_clean_line():
    p = run_module("pruneflow", "nosuch")
    assert p.returncode == 2
    line = assert_clean_error(p, "unknown command 'nosuch'")
    assert all(c in line for c in COMMANDS)


def test_infer_help_through_the_dispatcher():
    p = run_module("pruneflow", "infer", "--help")
    assert p.returncode == 0, p.stderr
    text = p.stdout + p.stderr  # Fire prints help on stderr when it is not a terminal
    assert "pruneflow.infer" in text and "CKPT" in text and "--device" in text


def test_bare_runscript_runs_the_quickstart_of_the_installed_copy(definition, installed, sweep_sh_run, fake_bin,
                                                                  tmp_path):
    """`apptainer run prune.sif --out DIR ...`: the runscript with flags only, pruneflow imported from the
    non-editable %post install, the current directory without jobs/: the job file is the package's own
    (pruneflow/quickstart.yaml, package data). The results directory is the one
    sweep.sh just filled with the same study, so the sweep finds every trial done and returns at once."""
    assert installed["proc"].returncode == 0 and sweep_sh_run["proc"].returncode == 0
    env = container_env(fake_bin, PYTHONPATH=str(installed["site"]))
    probe = subprocess.run(["python", "-c", "import pruneflow; print(pruneflow.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert probe.stdout.startswith(str(installed["site"])), probe.stdout + probe.stderr
    p = run_section(definition, "runscript", tmp_path, ["--out", sweep_sh_run["out"], *SMALL_ARGS.split()], env=env,
                    cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job = os.path.join(str(installed["site"]), "pruneflow", "quickstart.yaml")
    assert f"running the quickstart study {job}" in p.stdout
    assert "2 skipped (already done)" in p.stdout
    assert f"results: {os.path.join(sweep_sh_run['out'], 'quickstart')}" in p.stdout


def test_bare_command_without_a_job_file_is_one_clean_line(monkeypatch, tmp_path, capsys):
    import pruneflow.__main__ as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "packaged_quickstart", lambda: None)
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no command given") and "quickstart.yaml" in err[0]


# ---- containers/build.sh ----------------------------------------------------------------------------------

def test_build_script_lints_and_builds_from_the_repo_root(fake_bin, tmp_path):
    for cmd in (["bash", "-n", BUILD], ["shellcheck", BUILD]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    assert os.access(BUILD, os.X_OK)
    # a fake apptainer that records where it ran and with what
    tools = tmp_path / "tools"
    tools.mkdir()
    log = tmp_path / "log"
    q = shlex.quote(str(log))
    (tools / "apptainer").write_text(f'#!/bin/sh\npwd > {q}\nprintf "%s\\n" "$@" >> {q}\n')
    (tools / "apptainer").chmod(0o755)
    env = dict(os.environ, PATH=f"{tools}{os.pathsep}/usr/bin:/bin")
    p = subprocess.run(["bash", BUILD, "out.sif", "--notest"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    where, *argv = log.read_text().splitlines()
    fakeroot = ["--fakeroot"] if os.geteuid() != 0 else []
    assert where == ROOT and argv == ["build", *fakeroot, "--notest", str(tmp_path / "out.sif"), "containers/prune.def"]
    if shutil.which("apptainer", path="/usr/bin:/bin") is None:
        p = subprocess.run(["bash", BUILD], capture_output=True, text=True, env=dict(os.environ, PATH="/usr/bin:/bin"))
        assert p.returncode == 2 and p.stderr.startswith("error: apptainer not found on PATH"), p.stderr
