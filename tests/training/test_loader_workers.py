"""train.dataloader_workers: collating in worker processes gives the batches the main process gives — the
MLM collator's masks included (seeded per batch) — so a run's numbers do not depend on the worker count."""

import torch

from lmrec.training.loop import data_loader, loader_workers


def test_worker_processes_give_the_same_masked_batches(tiny_backbone):
    from transformers import AutoTokenizer

    from lmrec.recformer.masking import WholeWordMasker
    from lmrec.recformer.pretrain_mlm import MlmCollator, chunk_corpus

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    lines = [f"title toy story {i} genres animation comedy year 1995 title goldeneye {i % 3}" for i in range(40)]
    chunks = chunk_corpus(tok, lines, 32)
    batches = [(b, chunks[i: i + 4]) for b, i in enumerate(range(0, len(chunks), 4))]
    collate = MlmCollator(WholeWordMasker(tok, 0.3), tok.pad_token_id, seed=3, epoch=1)
    main = list(data_loader(batches, seed=0, collate_fn=collate))
    workers = list(data_loader(batches, seed=0, collate_fn=collate, workers=2))
    assert len(main) == len(workers) == len(batches)
    for a, b in zip(main, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any((a["mlm_labels"] != -100).any() for a in main)  # something was masked


def test_the_default_is_no_workers_on_the_cpu_and_two_beside_an_accelerator():
    assert loader_workers(None, torch.device("cpu")) == 0
    assert loader_workers(None, torch.device("cuda")) == 2
    assert loader_workers(3, torch.device("cpu")) == 3
