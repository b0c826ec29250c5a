"""Build checks: the extension links the shared libstdc++ (a static copy inside
_C.so crashes or garbles messages as soon as a std::string or stream crosses
into torch), error messages format cleanly in a fresh process, and setup.py's
compiler check catches a compiler that would link libstdc++ statically."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moe_routing
from moe_routing import _C

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
FIX_HINT = "CXX=/usr/bin/g++ CC=/usr/bin/gcc"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its helpers, without running a build."""
    path = ROOT / "setup.py"
    if not path.is_file():
        pytest.skip("setup.py is not beside the tests (installed package)")
    spec = importlib.util.spec_from_file_location("moe_routing_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_compiler(directory, name, prints):
    """A shell script that answers -print-file-name=libstdc++.so with `prints`."""
    script = Path(directory) / name
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for arg in "$@"; do
          case "$arg" in -print-file-name=*) echo '{prints}'; exit 0;; esac
        done
        exit 1
    """))
    script.chmod(0o755)
    return str(script)


# -- the built extension ----------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="ELF shared libraries")
def test_extension_links_shared_libstdcxx(setup_py):
    needed = setup_py.elf_needed(_C.__file__)
    assert any(name.startswith("libstdc++.so") for name in needed), (
        f"{_C.__file__} does not depend on the shared libstdc++ (DT_NEEDED: {needed}): "
        f"libstdc++ was linked statically. Rebuild with {FIX_HINT}."
    )


@pytest.mark.skipif(not LINUX or shutil.which("readelf") is None, reason="needs readelf")
def test_elf_needed_matches_readelf(setup_py):
    out = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True)
    assert setup_py.elf_needed(_C.__file__) == re.findall(r"\(NEEDED\).*\[(.+)\]", out.stdout)


def test_error_message_formats_numbers_in_fresh_process():
    """A bad input raises RuntimeError whose message names the op and holds the
    formatted shape; in a child process so that a crash shows as a signal."""
    child = textwrap.dedent("""\
        import re, torch, moe_routing
        try:
            moe_routing.route(torch.randn(6), 1)
        except RuntimeError as error:
            message = str(error)
            assert "moe_routing::route" in message, message
            assert "logits" in message and re.search(r"\\b6\\b", message), message
            print(moe_routing.__file__)
        else:
            raise AssertionError("route accepted a 1-D logits tensor")
    """)
    package_parent = str(Path(moe_routing.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    # cwd: `python -c` puts it first on sys.path, so the child finds this very package.
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=package_parent, timeout=300
    )
    assert result.returncode == 0, (
        f"child exited with {result.returncode} (negative: killed by a signal)\n{result.stderr}"
    )
    assert Path(result.stdout.strip()).resolve() == Path(moe_routing.__file__).resolve()


def test_submodules_are_attributes_after_a_plain_import():
    """`import moe_routing as mr; mr.hf.from_hf(...)`: the hf and parallel
    modules load on first use, in a fresh process (no test imported them)."""
    child = textwrap.dedent("""\
        import sys, moe_routing as mr
        assert "moe_routing.hf" not in sys.modules  # loaded lazily: it imports torch._dynamo
        assert callable(mr.hf.from_hf) and callable(mr.hf.patch) and callable(mr.parallel.set_stats_group)
        try:
            mr.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error), error
        else:
            raise AssertionError("an unknown attribute did not raise")
    """)
    package_parent = str(Path(moe_routing.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                            cwd=package_parent, timeout=300)
    assert result.returncode == 0, result.stderr


# -- setup.py's compiler check -----------------------------------------------

posix_only = pytest.mark.skipif(os.name != "posix", reason="fake compilers are shell scripts")


@posix_only
def test_compiler_naming_a_missing_libstdcxx_so_is_refused(setup_py, tmp_path):
    bad = fake_compiler(tmp_path, "g++", tmp_path / "lib" / "libstdc++.so")
    problem = setup_py.libstdcxx_problem(bad)
    assert problem is not None and "does not exist" in problem


@posix_only
def test_compiler_without_any_libstdcxx_so_is_refused(setup_py, tmp_path):
    # gcc echoes the bare name when no directory of its library path has it.
    bad = fake_compiler(tmp_path, "g++", "libstdc++.so")
    assert "found no libstdc++.so" in setup_py.libstdcxx_problem(bad)


@posix_only
def test_compiler_whose_libstdcxx_so_is_an_archive_is_refused(setup_py, tmp_path):
    archive = tmp_path / "libstdc++.so"
    archive.write_bytes(b"!<arch>\n" + b"\0" * 64)
    bad = fake_compiler(tmp_path, "g++", archive)
    assert "not a shared library" in setup_py.libstdcxx_problem(bad)


@posix_only
def test_broken_compiler_is_refused(setup_py, tmp_path):
    assert setup_py.libstdcxx_problem(str(tmp_path / "no-such-g++")) is not None


@posix_only
@pytest.mark.skipif(not LINUX, reason="ELF shared libraries")
def test_compiler_with_shared_libstdcxx_is_accepted(setup_py, tmp_path):
    good = fake_compiler(tmp_path, "g++", _C.__file__)  # any ELF shared object
    assert setup_py.libstdcxx_problem(good) is None
    script = tmp_path / "libstdc++-script.so"
    script.write_text("/* GNU ld script */\nINPUT(libstdc++.so.6)\n")
    assert setup_py.libstdcxx_problem(fake_compiler(tmp_path, "g++-script", script)) is None


@pytest.mark.skipif(not LINUX or not os.path.isfile("/usr/bin/g++"), reason="needs /usr/bin/g++")
def test_fallback_compiler_is_accepted(setup_py):
    assert setup_py.libstdcxx_problem("/usr/bin/g++") is None


@posix_only
@pytest.mark.skipif(not LINUX, reason="ELF shared libraries")
def test_static_compiler_is_replaced_by_a_fallback(setup_py, tmp_path):
    bad = fake_compiler(tmp_path, "bad-g++", tmp_path / "missing" / "libstdc++.so")
    good = fake_compiler(tmp_path, "good-g++", _C.__file__)
    environ = {"CXX": bad, "CC": "/opt/gcc/bin/gcc"}
    said = []
    assert setup_py.choose_cxx(environ, fallbacks=[str(tmp_path / "absent"), good], log=said.append) == good
    assert environ["CXX"] == good and environ["CC"] != "/opt/gcc/bin/gcc"
    assert len(said) == 1 and bad in said[0] and good in said[0]


@posix_only
def test_static_compiler_without_fallback_fails_clearly(setup_py, tmp_path):
    bad = fake_compiler(tmp_path, "bad-g++", tmp_path / "missing" / "libstdc++.so")
    also_bad = fake_compiler(tmp_path, "other-g++", "libstdc++.so")
    environ = {"CXX": bad}
    with pytest.raises(SystemExit) as exit_info:
        setup_py.choose_cxx(environ, fallbacks=[also_bad], log=pytest.fail)
    message = str(exit_info.value)
    assert f"CXX={bad}" in message and FIX_HINT in message and "static" in message
    assert environ == {"CXX": bad}


@posix_only
@pytest.mark.skipif(not LINUX, reason="ELF shared libraries")
def test_good_compiler_is_kept(setup_py, tmp_path):
    good = fake_compiler(tmp_path, "g++", _C.__file__)
    environ = {"CXX": good}
    assert setup_py.choose_cxx(environ, fallbacks=[], log=pytest.fail) is None
    assert environ == {"CXX": good}


# -- metadata ----------------------------------------------------------------


def test_pyproject_torch_floor_matches_setup(setup_py):
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    assert tuple(int(p) for p in floor.split(".")[:2]) == setup_py.MIN_TORCH
