"""The CUDA build cache on the CPU: nvcc is faked, so what is checked is the command and the cache key."""
import os
import stat

from lowbit.kernels import cuda_build


def test_nvcc_flags_reach_the_command_and_the_cache_key(tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    fake = tmp_path / "nvcc"
    # records its arguments, writes the -o target
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nwhile [ "$1" != "-o" ]; do shift; done\necho lib > "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cuda_build, "_arch", lambda: "90a")
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: str(fake))
    monkeypatch.setattr(cuda_build.ctypes, "CDLL", lambda path: path)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_build, "_LOADED", {})  # the fake libraries never reach the real table
    built = []
    for flags in ("", "-DLOWBIT_PAGED_MINBLOCKS=3", ""):
        monkeypatch.setenv("LOWBIT_NVCC_FLAGS", flags)
        cuda_build._LOADED.clear()
        built.append(cuda_build.load("kivi_paged"))
    assert built[0] == built[2] and built[0] != built[1]  # flags are part of the key; the plain build is reused
    calls = log.read_text().splitlines()
    assert len(calls) == 2  # the third load found the cached library
    assert "-DLOWBIT_PAGED_MINBLOCKS=3" in calls[1].split() and "-DLOWBIT_PAGED_MINBLOCKS=3" not in calls[0]
    assert all(os.path.exists(p) for p in built)
