"""The CUDA-graph runner's input staging (worker/cuda_graph.py), checked on CPU: a step of
n decodes fills the first n rows of the static buffers and pads the rest of its bucket
with rows that touch only the scratch block. (Capture and replay need a GPU:
tests/test_gpu.py.)"""

from __future__ import annotations

import torch

from scalellm.layers.paged_attention_triton import pack_block_tables
from scalellm.worker.cuda_graph import DecodeGraphs


def test_stage_fills_real_rows_and_pads_the_bucket_with_the_scratch_block():
    g = DecodeGraphs(None, [], max_batch=8, max_model_len=64, block_size=16, scratch_block=99,
                     device=torch.device("cpu"))
    assert g.buckets == [1, 2, 4, 8] and g.width == 4
    assert g.bucket_for(3) == 4 and g.bucket_for(9) is None
    assert g.fits(3, [[1, 2, 3, 4]]) and not g.fits(3, [[1, 2, 3, 4, 5]])
    g.stage([5, 6, 7], [17, 3, 40], [33, 51, 72], [18, 4, 41], [[2, 3], [3], [4, 5, 6]], 4)
    assert g.meta[:, :4].tolist() == [[5, 6, 7, 0], [17, 3, 40, 0], [33, 51, 72, 99 * 16], [18, 4, 41, 1]]
    assert g.tables[:4, :3].tolist() == [[2, 3, 99], [3, 99, 99], [4, 5, 6], [99, 99, 99]]
    g.stage([1], [0], [160], [1], [[10]], 1)  # a smaller step leaves the bucket's rows alone
    assert g.meta[:, 0].tolist() == [1, 0, 160, 1] and g.meta[0, 2] == 7


def test_pack_block_tables_pads_rows_and_columns():
    assert pack_block_tables([[1, 2], [3]]).tolist() == [[1, 2], [3, 0]]
    assert pack_block_tables([[4]], rows=3, fill=9).tolist() == [[4], [9], [9]]
    assert pack_block_tables([], rows=2, fill=7).tolist() == [[7], [7]]
