"""The on-disk cache of generated data: the built-in benchmark's splits come back bit for bit, a changed generator
or argument misses the cache, a torn file is regenerated, and ``ROBUSTFT_CACHE_DIR=off`` turns it off."""

from __future__ import annotations

import torch

from robustft.data import digits_shift
from robustft.data.generated_cache import cache_directory, cached_tensors

CALLS: list[int] = []


def small_generator(seed: int) -> dict:
    CALLS.append(seed)
    generator = torch.Generator().manual_seed(seed)
    return {"train": (torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8, generator=generator), torch.arange(4))}


def test_the_built_in_benchmark_comes_back_from_the_cache_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFT_CACHE_DIR", str(tmp_path))
    generated = cached_tensors(digits_shift.build_splits, ("scikit-learn",))()  # generates and stores
    files = list((tmp_path / "generated").glob("*.safetensors"))
    assert len(files) == 1 and "digits_shift.build_splits" in files[0].name
    calls = []
    monkeypatch.setattr(digits_shift, "handwritten_digits", lambda *a: calls.append(a))  # would break generation
    again = cached_tensors(digits_shift.build_splits, ("scikit-learn",))()
    assert calls == []  # served from the file, not generated
    assert list(again) == list(generated)
    for name, (images, labels) in generated.items():
        assert torch.equal(again[name][0], images), name
        assert torch.equal(again[name][1], labels) and again[name][0].dtype == torch.uint8, name


def test_other_arguments_miss_the_cache_and_a_torn_file_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFT_CACHE_DIR", str(tmp_path))
    CALLS.clear()
    cached = cached_tensors(small_generator)
    first = cached(1)
    assert torch.equal(cached(1)["train"][0], first["train"][0]) and CALLS == [1]
    other = cached(2)
    assert CALLS == [1, 2] and not torch.equal(other["train"][0], first["train"][0])
    for path in (tmp_path / "generated").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:20])  # torn by a crash or a full disk
    assert torch.equal(cached(1)["train"][0], first["train"][0]) and CALLS == [1, 2, 1]
    assert torch.equal(cached(1)["train"][0], first["train"][0]) and CALLS == [1, 2, 1]  # rewritten whole


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFT_CACHE_DIR", "off")
    assert cache_directory() is None
    CALLS.clear()
    cached_tensors(small_generator)(3)
    cached_tensors(small_generator)(3)
    assert CALLS == [3, 3]
    monkeypatch.delenv("ROBUSTFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_directory() == tmp_path / "robustft" / "generated"
