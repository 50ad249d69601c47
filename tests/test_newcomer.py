"""The newcomer path: the package installs and imports from anywhere, docs tell CPU users how to avoid CUDA
wheels, the demo says what its numbers are, and third-party deprecation noise stays hidden."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_installed_package_imports_everywhere_and_the_readme_api_example_runs_on_it(tmp_path):
    """``pip install .`` ships the package (found, not listed by hand) and ``esci_dataset``, and no script. From an
    empty folder, on that installed copy, every module imports and the README's API example (the same in both
    languages) runs as written and prints its results. One process for both: each start imports torch."""
    wheel_dir, site, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "source"
    # a copy: pip builds in the source tree, and the checkout is not the test's to write into
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "outputs",
                                                                 "demo_out", "export", "wandb"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheel_dir), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
        shipped = {name for name in zf.namelist() if name.endswith(".py")}
    package = {f"tiny_reranker/{f}" for f in os.listdir(os.path.join(ROOT, "tiny_reranker")) if f.endswith(".py")}
    assert shipped == package | {"esci_dataset.py"}, shipped ^ (package | {"esci_dataset.py"})

    example = _api_example("README.md")
    assert example == _api_example("README_zh.md")
    modules = sorted(f"tiny_reranker.{os.path.basename(f)[:-3]}" for f in package if not f.endswith("__init__.py"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "example.py").write_text(example)
    code = (f"import importlib, os, runpy, tiny_reranker; [importlib.import_module(m) for m in {modules!r}]; "
            "print('package at', os.path.dirname(tiny_reranker.__file__)); runpy.run_path('example.py')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"package at {site / 'tiny_reranker'}" in proc.stdout  # the installed copy, not the checkout
    predicted, ranked = proc.stdout.strip().splitlines()[-2:]
    assert predicted.count("'pred_label'") == 2 and ranked.count("'index'") == 2, proc.stdout


def test_license_matches_the_declared_one():
    declared = tomllib.loads(read("pyproject.toml"))["project"]["license"]["text"]
    assert declared == "Apache-2.0" and read("LICENSE").lstrip().startswith("Apache License")


@pytest.mark.parametrize("readme", ["README.md", "README_zh.md"])
def test_quick_start_installs_the_cpu_torch_first_and_states_sizes(readme):
    text = read(readme)
    quick = text[text.index("```bash"):]
    quick = quick[:quick.index("```", 3)]
    lines = [line for line in quick.splitlines()[1:] if line.strip()]
    assert lines[0].startswith("git clone") and lines[1].startswith("python3 -m venv .venv")  # from nothing
    assert [line for line in lines if line.startswith("pip")][0].startswith(CPU_INSTALL)
    assert quick.index(CPU_INSTALL) < quick.index("pip install -r requirements.txt")
    assert "3 GB" in text and "1.6 GB" in text
    assert "about a minute" not in text and "约一分钟" not in text  # the demo takes minutes


def test_requirements_and_ci_say_how_torch_is_installed():
    assert CPU_INSTALL in read("requirements.txt")
    ci = read(".ci/run")
    assert "differs from the README" in ci and "pip install -r requirements-dev.txt && python -m pytest -q" in ci


def test_the_demo_says_its_numbers_come_from_a_random_tiny_model():
    assert re.search(r"echo .*random-init tiny Qwen3", read("scripts/run_demo.sh"))


def test_peft_deprecation_noise_is_hidden_and_the_filter_matches_the_real_warning(tiny_model_dir):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` on every adapter load."""
    from transformers import AutoModelForCausalLM

    from tiny_reranker import modeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:  # control: without our filter the warning is real
        warnings.simplefilter("always")
        model.is_gradient_checkpointing
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modeling.silence_third_party_warnings()  # what importing modeling does
        model.is_gradient_checkpointing
    assert not any("is_gradient_checkpointing" in str(w.message) for w in caught)


# Flags of other tools the READMEs show: pip, torchrun, vLLM.
OTHER_TOOLS_FLAGS = {"--index-url", "--no-deps", "--nproc_per_node", "--runner", "--task", "--hf-overrides"}


def _named_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))


def test_every_flag_the_readmes_name_exists_and_both_readmes_name_the_same_ones():


    import importlib.util

    ours = set()
    scripts = [name for name in sorted(os.listdir(ROOT)) if name.endswith(".py")]
    scripts += [f"scripts/{name}" for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))) if name.endswith(".py")]
    for name in scripts:
        if "def make_parser" in read(name):
            spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], os.path.join(ROOT, name))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            ours |= {flag for action in module.make_parser()._actions for flag in action.option_strings}
    english, chinese = _named_flags(read("README.md")), _named_flags(read("README_zh.md"))
    assert english - ours - OTHER_TOOLS_FLAGS == set()  # a renamed or removed flag the README still shows
    assert english == chinese  # one README changed without the other


def _api_example(readme: str) -> str:
    text = read(readme)
    section = text[text.index("### Python API" if readme == "README.md" else "### Python 接口"):]
    block = section[section.index("```python") + len("```python"):]
    return block[:block.index("```")]
