"""memory.drop_library_pages: resident pages of a library's read-only mappings go, and the
library still works (its pages come back from the page cache when touched)."""

from __future__ import annotations

import sys

import pytest
import torch

from scalellm.memory import drop_library_pages


def _resident_kib(fragment: str) -> int:
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                counting = len(head) == 6 and fragment in head[5] and "w" not in head[1]
            elif counting and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
def test_drop_library_pages_frees_resident_code_and_the_library_still_runs():
    a = torch.randn(64, 64)
    expected = a @ a
    before = _resident_kib("libtorch_cpu")
    assert before > 1024
    assert drop_library_pages("libtorch_cpu") > 0
    after = _resident_kib("libtorch_cpu")
    assert after < before / 2
    assert torch.equal(a @ a, expected)  # code pages fault back in
    assert drop_library_pages("no-such-library-anywhere") == 0
