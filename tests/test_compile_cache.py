"""``--fast`` keeps torch.compile's kernels in a folder that outlives ``/tmp`` (runtime/fast/compiled.py).

The first denoising step of a fresh process compiles the fast path's glue; Inductor's on-disk cache makes
the next process skip that work, but its default folder is under ``/tmp``. Here: which folder is chosen, that
Inductor reads it, and that a second process finds the first one's kernels there (on the CPU, where Inductor
compiles C++ instead of Triton kernels; the cache is the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir
from wan_trt.runtime.fast.compiled import (
    COMPILE_CACHE_ENV,
    INDUCTOR_CACHE_ENV,
    persistent_compile_cache_dir,
    use_persistent_compile_cache,
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, "")  # recorded, so that what the tests set is undone
    monkeypatch.delenv(INDUCTOR_CACHE_ENV)
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_the_cache_goes_under_the_users_cache_folder_and_inductor_reads_it(clean_env):
    folder = use_persistent_compile_cache()
    assert folder == clean_env / "xdg" / "wan-trt" / "torch-compile" and folder.is_dir()
    assert cache_dir() == str(folder.resolve())


def test_inductors_default_folder_set_by_an_import_is_replaced(clean_env, monkeypatch):
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, default_cache_dir())  # what `import torch._dynamo` does
    assert use_persistent_compile_cache() == clean_env / "xdg" / "wan-trt" / "torch-compile"


def test_a_folder_the_user_chose_wins(clean_env, monkeypatch):
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(clean_env / "mine"))
    assert persistent_compile_cache_dir() == clean_env / "mine"
    assert use_persistent_compile_cache() == clean_env / "mine"
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(clean_env / "torch's"))
    assert use_persistent_compile_cache() == clean_env / "torch's"  # torch's own setting wins over ours
    assert not (clean_env / "torch's").exists()  # and is left to torch


def test_an_unwritable_folder_keeps_inductors_default_and_says_so(clean_env, monkeypatch, caplog):
    blocker = clean_env / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(blocker / "cache"))
    assert use_persistent_compile_cache() is None
    assert INDUCTOR_CACHE_ENV not in os.environ
    assert COMPILE_CACHE_ENV in caplog.text and "cannot write" in caplog.text


def test_a_folder_that_exists_but_is_not_writable_keeps_inductors_default(clean_env, monkeypatch, caplog):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root can write anywhere: as another user would
    assert use_persistent_compile_cache() is None
    assert INDUCTOR_CACHE_ENV not in os.environ and "not writable" in caplog.text


PROBE = textwrap.dedent("""
    import torch
    import diffusers.models  # imports torch._dynamo, which sets Inductor's default folder, as infer's imports do
    from torch._dynamo.utils import counters
    from wan_trt.runtime.fast.compiled import compile_once, use_persistent_compile_cache

    use_persistent_compile_cache()
    double_silu = compile_once(lambda x: torch.nn.functional.silu(x) * 2)
    double_silu(torch.randn(8))
    print(sorted(counters["inductor"]))
""")


@pytest.mark.slow
def test_a_second_process_reuses_the_first_ones_kernels(clean_env):
    env = {k: v for k, v in os.environ.items() if k != INDUCTOR_CACHE_ENV}
    env["XDG_CACHE_HOME"] = str(clean_env / "xdg")

    def counters() -> str:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    assert "fxgraph_cache_miss" in counters()  # compiled, into the empty persistent folder
    assert any((clean_env / "xdg" / "wan-trt" / "torch-compile").rglob("*.so"))
    assert "fxgraph_cache_hit" in counters()  # found there by a fresh process
