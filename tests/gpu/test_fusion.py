"""The fused model (an ID model × the generative model) on CUDA: both models run their forward passes on the
device, the fusion's arithmetic on the CPU; its metrics and recommendations equal the CPU's."""

import pytest

from tests.generative.test_learning import shop  # noqa: F401  (fixtures shared with the CPU tests)
from tests.test_fusion import two_models  # noqa: F401


def test_a_fused_model_on_cuda_ranks_as_on_cpu(shop, two_models, tmp_path):  # noqa: F811
    import lmrec
    from lmrec.fusion import FusedRecommender, fuse

    sas, gen = two_models
    fuse(shop / "data", sas.model_dir, gen.model_dir, shop / "sids", tmp_path / "fused", beams=10, ks=[10],
         log=lambda m: None)
    cpu = lmrec.api.evaluate(tmp_path / "fused", shop / "data", ks=[10], device="cpu")
    gpu = lmrec.api.evaluate(tmp_path / "fused", shop / "data", ks=[10], device="cuda")
    assert gpu["ndcg@10"] == pytest.approx(cpu["ndcg@10"], abs=0.01)  # near-ties may swap between devices
    rec_cpu = FusedRecommender.load(tmp_path / "fused", device="cpu")
    rec_gpu = FusedRecommender.load(tmp_path / "fused", device="cuda")
    first = rec_cpu.item_ids[:2]
    top_cpu = [i for i, _, _ in rec_cpu.recommend(first, k=5)]
    top_gpu = [i for i, _, _ in rec_gpu.recommend(first, k=5)]
    assert len(set(top_cpu) & set(top_gpu)) >= 4, (top_cpu, top_gpu)
