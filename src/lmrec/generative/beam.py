"""Constrained beam search over semantic IDs.

The constraint is a prefix tree over all item codes stored as arrays (CSR): at depth ``d`` every prefix
is a node, its children are a contiguous range of the next depth's nodes, each child carries the token of
its code. One step gathers, for all beams at once, the log-probabilities of their children's tokens
(padded to the largest fan-out, padding = -inf), adds the beam scores and keeps the best ``beams`` per
user — no per-beam Python callback. Fewer valid continuations than beams leave -inf beams, dropped at the
end. Scores are sums of log-probabilities (softmax over the whole vocabulary).

A non-finite log-probability (NaN from a diverged model) ranks below every finite one — ``torch.topk``
ranks NaN as the largest value, so a NaN model would otherwise fill every beam — and its beam keeps the
NaN score: such beams come back as item -1 (never recommended, never a hit) with a NaN score, which tells
the caller that the model produced non-finite values for that user."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


class SidTrie:
    def __init__(self, codes: np.ndarray, level_token_ids: list[list[int]]):
        codes = np.asarray(codes, dtype=np.int64)
        n, L = codes.shape
        order = np.lexsort(codes.T[::-1])
        sc = codes[order]
        self.depth = L
        self.node_of_row = []  # per depth d (0..L): node id of each sorted row's prefix of length d
        for d in range(L + 1):
            if d == 0:
                ids = np.zeros(n, dtype=np.int64)
            else:
                change = np.ones(n, dtype=bool)
                change[1:] = (sc[1:, :d] != sc[:-1, :d]).any(1)
                ids = np.cumsum(change) - 1
            self.node_of_row.append(ids)
        if len(np.unique(self.node_of_row[L])) != n:
            raise ValueError("item codes are not unique")
        self.start, self.end, self.token = [], [], []
        for d in range(L):
            parent, child = self.node_of_row[d], self.node_of_row[d + 1]
            n_par = parent.max() + 1
            start = np.full(n_par, np.iinfo(np.int64).max)
            end = np.zeros(n_par, dtype=np.int64)
            np.minimum.at(start, parent, child)
            np.maximum.at(end, parent, child + 1)
            n_child = child.max() + 1
            code = np.zeros(n_child, dtype=np.int64)
            code[child] = sc[:, d]
            tok = np.asarray(level_token_ids[d], dtype=np.int64)[code]
            self.start.append(torch.as_tensor(start))
            self.end.append(torch.as_tensor(end))
            self.token.append(torch.as_tensor(tok))
        self.fanout = [int((e - s).max()) for s, e in zip(self.start, self.end)]
        leaf_item = np.zeros(n, dtype=np.int64)
        leaf_item[self.node_of_row[L]] = order
        self.leaf_item = torch.as_tensor(leaf_item)
        self.level_tokens = [np.asarray(t, dtype=np.int64) for t in level_token_ids]
        del self.node_of_row  # needed while building only

    def insert(self, codes: np.ndarray, items: np.ndarray) -> None:
        """Add items (rows of ``codes``, item indices ``items``) to the tree in place: each new node goes at the
        end of its parent's children, so children stay a contiguous range (their order within it does not
        matter to the search). One ``np.insert`` per new node per array — a memory move, no sort: at 1M items
        about a thousandth of rebuilding the tree, which is what the service did for every batch of added
        items before. A path that is already an item is an error (codes are unique)."""
        start = [x.numpy().copy() for x in self.start]
        end = [x.numpy().copy() for x in self.end]
        token = [x.numpy().copy() for x in self.token]
        leaf = self.leaf_item.numpy().copy()
        for row, item in zip(np.asarray(codes, dtype=np.int64), np.asarray(items, dtype=np.int64)):
            node, new = 0, False
            for d in range(self.depth):
                tok = self.level_tokens[d][row[d]]
                s, e = start[d][node], end[d][node]
                hit = np.flatnonzero(token[d][s:e] == tok) if not new else []
                if len(hit):
                    node = s + int(hit[0])
                    continue
                new, p = True, e  # a new child at the end of the parent's range; later nodes move one up
                token[d] = np.insert(token[d], p, tok)
                end[d][node] += 1
                start[d][node + 1:] += 1
                end[d][node + 1:] += 1
                if d + 1 < self.depth:  # the new node's own (empty) range of children, where they will go
                    at = end[d + 1][p - 1] if p > 0 else 0
                    start[d + 1] = np.insert(start[d + 1], p, at)
                    end[d + 1] = np.insert(end[d + 1], p, at)
                else:
                    leaf = np.insert(leaf, p, item)
                node = p
            if not new:
                raise ValueError(f"item codes are not unique: {row.tolist()} is already an item")
        self.start, self.end, self.token = ([torch.from_numpy(x) for x in xs] for xs in (start, end, token))
        self.leaf_item = torch.from_numpy(leaf)
        self.fanout = [int((e - s).max()) for s, e in zip(start, end)]
        self.__dict__.pop("_copies", None)  # copies on other devices are stale

    def on(self, device: torch.device) -> SidTrie:
        """This trie with its arrays on ``device`` (a copy made once per device and kept): decoding on a GPU
        then never copies between host and device from one level to the next."""
        device = torch.device(device)
        if self.leaf_item.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            t = object.__new__(SidTrie)
            t.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_copies"})
            t.start, t.end, t.token = ([x.to(device) for x in xs] for xs in (self.start, self.end, self.token))
            t.leaf_item = self.leaf_item.to(device)
            copies[device] = t
        return copies[device]

    def children(self, d: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nodes,) at depth d → child node ids (nodes, C), their tokens, validity mask."""
        s, e = self.start[d][nodes], self.end[d][nodes]
        idx = s[:, None] + torch.arange(self.fanout[d], device=s.device)[None]
        valid = idx < e[:, None]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        return idx, self.token[d][idx], valid


def _select(trie: SidTrie, d: int, logits: torch.Tensor, nodes: torch.Tensor, score: torch.Tensor, B: int,
            width: int, beams: int):
    """One beam step at depth d: (B*width, V) logits → new nodes, tokens, scores (B*beams) and the parent beam
    of each new beam (B, beams)."""
    device = logits.device
    lp = torch.log_softmax(logits.float(), dim=-1)
    child, tok, valid = trie.children(d, nodes)
    cand = lp.gather(1, tok).masked_fill(~valid, float("-inf"))
    cand = score[:, None] + cand  # (B*width, C)
    C = cand.shape[1]
    k = min(beams, width * C)
    flat = cand.view(B, width * C)
    # NaN (and +inf, which log_softmax gives only beside NaN) below every finite score, above invalid children
    key = torch.where(torch.isnan(flat) | (flat == float("inf")), torch.finfo(flat.dtype).min, flat)
    arg = key.topk(k, dim=1).indices
    top = flat.gather(1, arg)
    if k < beams:  # fewer continuations than beams: pad with -inf beams
        top = torch.cat([top, top.new_full((B, beams - k), float("-inf"))], 1)
        arg = torch.cat([arg, arg[:, :1].expand(B, beams - k)], 1)
    parent = arg // C
    rows = (torch.arange(B, device=device)[:, None] * width + parent).reshape(-1)
    pick = (arg % C).reshape(-1)
    return child[rows, pick], tok[rows, pick], top.reshape(-1), parent


@torch.inference_mode()
def constrained_beam_search(model, trie: SidTrie, prompts: dict[str, torch.Tensor], beams: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (ending right before the first code token) → (B, beams) item indices (-1 = none)
    and scores, best first.

    Decoder-only models keep one copy of each prompt's keys/values: the beams of a user are decoded as a
    small token tree in the user's own row (every new token attends to the prompt, its ancestors and
    itself through a 4D mask, all at the same position), instead of copying the prompt cache per beam."""
    device = next(model.parameters()).device
    ids, mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
    B = ids.shape[0]
    trie = trie.on(device)
    nodes = torch.zeros(B, dtype=torch.long, device=device)  # root, one beam per user to start
    score = torch.zeros(B, device=device)
    if getattr(model.config, "is_encoder_decoder", False):
        return _seq2seq_search(model, trie, ids, mask, prompts["decoder_input_ids"].to(device), beams, nodes, score)
    with _tree_attention(model):
        return _tree_search(model, trie, ids, mask, beams, nodes, score)


@contextmanager
def _tree_attention(model):
    """The token tree is decoded with a key/value cache and a 4-D mask: sdpa and eager take both; a model set
    to another backend for training (varlen, flash attention: no 4-D mask) decodes with sdpa meanwhile."""
    from lmrec.training.attention import apply, current

    name = current(model)
    if name in ("sdpa", "eager"):
        yield
        return
    apply(model, "sdpa")
    try:
        yield
    finally:
        apply(model, name)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive mask every backend reads alike: eager adds the mask
    to the scores (a boolean would add +1/+0 and mask nothing), sdpa accepts either."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def _cache_argument(model) -> str:
    """The key/value cache's keyword: ``cache`` since transformers 5.2x (``past_key_values``, which older
    releases take, warns there and goes in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    """The output's cache, by its field's name (reading the old name on a new release warns)."""
    return out.get("cache") if "cache" in getattr(out, "__dataclass_fields__", {}) else out.get("past_key_values")


def _tree_search(model, trie, ids, mask, beams, nodes, score):
    device, B = ids.device, ids.shape[0]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[:, -1], _cache_of(out)
    cache_kw = _cache_argument(model)
    next_pos = pos[:, -1:] + 1
    W = beams
    prompt_keys = mask.bool()[:, None, None, :].expand(B, 1, W, mask.shape[1])
    own = torch.eye(W, dtype=torch.bool, device=device).expand(B, 1, W, W)
    ancestors: list[torch.Tensor] = []  # per fed level: (B, W) slot of each beam's ancestor in that block
    width = 1
    for d in range(trie.depth):
        nodes, tok, score, parent = _select(trie, d, logits, nodes, score, B, width, beams)
        width = beams
        if d + 1 == trie.depth:
            break
        ancestors = [a.gather(1, parent) for a in ancestors]
        blocks = [torch.nn.functional.one_hot(a, W).bool()[:, None] for a in ancestors]
        attn = torch.cat([prompt_keys, *blocks, own], dim=-1)
        ancestors.append(torch.arange(W, device=device).expand(B, W))
        out = model(input_ids=tok.view(B, W), attention_mask=_additive(attn, dtype),
                    position_ids=(next_pos + d).expand(B, W),
                    use_cache=True, **{cache_kw: cache})
        logits, cache = out.logits.reshape(B * W, -1), _cache_of(out)
    return _finish(trie, nodes, score, B, beams)


def _seq2seq_search(model, trie, ids, mask, dec, beams, nodes, score):
    B, device = ids.shape[0], ids.device
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
    logits = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
    user = torch.arange(B, device=device).repeat_interleave(beams)
    enc_rows = type(enc)(last_hidden_state=enc.last_hidden_state[user])
    width = 1
    for d in range(trie.depth):
        nodes, tok, score, parent = _select(trie, d, logits, nodes, score, B, width, beams)
        rows = (torch.arange(B, device=device)[:, None] * width + parent).reshape(-1)
        width = beams
        if d + 1 == trie.depth:
            break
        dec = torch.cat([dec[rows], tok[:, None]], 1)
        logits = model(encoder_outputs=enc_rows, attention_mask=mask[user], decoder_input_ids=dec).logits[:, -1]
    return _finish(trie, nodes, score, B, beams)


def _finish(trie, nodes, score, B, beams):
    items = trie.leaf_item[nodes].view(B, beams).cpu()
    score = score.view(B, beams).cpu()
    items[~torch.isfinite(score)] = -1  # -inf: fewer continuations than beams; NaN: non-finite log-probabilities
    return items, score
