"""A paged KV cache for the `paged` layout: page pool, block table, lengths, and the append kernel.

The pool holds `num_pages` pages of `page_size` tokens; sequence b's token n lives in page
`block_table[b, n // page_size]`, slot `n % page_size` (the layout generated `paged` modules read).
Pages are handed out on the host from a free list, so appending never syncs with the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _append_kernel(Knew, Vnew, Kc, Vc, BlockTable, Start, CuNew, Seq,
                   stride_nt, stride_nh, stride_nd, stride_vt, stride_vh, stride_vd,
                   stride_kp, stride_ks, stride_kh, stride_kd, stride_cp, stride_cs, stride_ch, stride_cd,
                   stride_bt, D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_DK: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PAGE: tl.constexpr, WRITE_V: tl.constexpr):
    """One new token of one KV head: copy its k (and v) row into its page slot."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(Seq + t)
    pos = tl.load(Start + b) + (t - tl.load(CuNew + b))       # position in the sequence
    page = tl.load(BlockTable + b.to(tl.int64) * stride_bt + pos // PAGE).to(tl.int64)
    slot = pos % PAGE
    dk = tl.arange(0, BLOCK_DK)
    row = tl.load(Knew + t.to(tl.int64) * stride_nt + h * stride_nh + dk * stride_nd, mask=dk < D_K)
    tl.store(Kc + page * stride_kp + slot * stride_ks + h * stride_kh + dk * stride_kd, row, mask=dk < D_K)
    if WRITE_V:
        dv = tl.arange(0, BLOCK_DV)
        row = tl.load(Vnew + t.to(tl.int64) * stride_vt + h * stride_vh + dv * stride_vd, mask=dv < D_V)
        tl.store(Vc + page * stride_cp + slot * stride_cs + h * stride_ch + dv * stride_cd, row, mask=dv < D_V)


def append_kv(k_pages: torch.Tensor, v_pages: torch.Tensor | None, block_table: torch.Tensor,
              kv_lens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor | None,
              cu_new: torch.Tensor) -> None:
    """Write packed new tokens k_new/v_new [total, H_kv, D] of each sequence (rows cu_new[b]..cu_new[b+1])
    at positions kv_lens[b], kv_lens[b] + 1, ... Pages must already be in the block table.
    `v_pages=None` writes keys only (MLA: the values are a view of the keys). kv_lens is not changed."""
    total = k_new.shape[0]
    if total == 0:
        return
    B = block_table.shape[0]
    counts = cu_new[1:] - cu_new[:-1]
    seq = torch.repeat_interleave(torch.arange(B, device=k_new.device, dtype=torch.int32), counts,
                                  output_size=total)
    vn, vp = (v_new, v_pages) if v_pages is not None else (k_new, k_pages)
    _append_kernel[(total, k_new.shape[1])](
        k_new, vn, k_pages, vp, block_table, kv_lens, cu_new, seq, *k_new.stride(), *vn.stride(),
        *k_pages.stride(), *vp.stride(), block_table.stride(0), D_K=k_new.shape[2], D_V=vn.shape[2],
        BLOCK_DK=_pow2(k_new.shape[2]), BLOCK_DV=_pow2(vn.shape[2]),
        PAGE=k_pages.shape[1], WRITE_V=v_pages is not None)


def append_kv_reference(k_pages, v_pages, block_table, kv_lens, k_new, v_new, cu_new) -> None:
    """The same writes, one token at a time in PyTorch (the oracle for append_kv)."""
    page = k_pages.shape[1]
    for b in range(block_table.shape[0]):
        for i, t in enumerate(range(int(cu_new[b]), int(cu_new[b + 1]))):
            pos = int(kv_lens[b]) + i
            p, s = int(block_table[b, pos // page]), pos % page
            k_pages[p, s] = k_new[t]
            if v_pages is not None:
                v_pages[p, s] = v_new[t]


class PagedKVCache:
    """Pages for `batch` sequences of up to `max_len` tokens each.

    k_pages: [num_pages, page_size, kv_heads, head_dim]; v_pages likewise with v_head_dim, or, with
    `values_in_keys=True` (MLA's latent cache), a view of the first v_head_dim channels of k_pages.
    block_table: int32 [batch, max_pages]; kv_lens: int32 [batch] (device) and `lens` (host copy).
    """

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, *, page_size: int = 16,
                 v_head_dim: int | None = None, num_pages: int | None = None, values_in_keys: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda") -> None:
        if not 1 <= page_size <= 256:
            raise ValueError(f"page_size: expected 1..256, got {page_size}")
        v_head_dim = v_head_dim or head_dim
        if values_in_keys and v_head_dim > head_dim:
            raise ValueError(f"values_in_keys: v_head_dim ({v_head_dim}) must not exceed head_dim ({head_dim})")
        self.page_size, self.max_pages = page_size, _cdiv(max_len, page_size)
        num_pages = num_pages or batch * self.max_pages
        self.k_pages = torch.empty(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.values_in_keys = values_in_keys
        self.v_pages = self.k_pages[..., :v_head_dim] if values_in_keys else \
            torch.empty(num_pages, page_size, kv_heads, v_head_dim, dtype=dtype, device=device)
        self.block_table = torch.zeros(batch, self.max_pages, dtype=torch.int32, device=device)
        self.kv_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.lens = [0] * batch
        self._free = list(range(num_pages - 1, -1, -1))
        self._owned: list[list[int]] = [[] for _ in range(batch)]

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor | None = None, lengths: list[int] | None = None):
        """Append k_new/v_new, [batch, n, kv_heads, D] (n new tokens each) or packed [total, kv_heads, D]
        with `lengths` (a host list: tokens per sequence). Returns self."""
        if k_new.dim() == 4:
            lengths = [k_new.shape[1]] * k_new.shape[0]
            k_new = k_new.reshape(-1, *k_new.shape[2:])
            v_new = v_new.reshape(-1, *v_new.shape[2:]) if v_new is not None else None
        if lengths is None or len(lengths) != len(self.lens):
            raise ValueError(f"lengths: expected {len(self.lens)} counts (one per sequence), got {lengths}")
        if (v_new is None) != self.values_in_keys:
            raise ValueError("v_new: give values unless the cache keeps them inside the keys (values_in_keys)")
        for b, n in enumerate(lengths):
            need = _cdiv(self.lens[b] + n, self.page_size)
            if need > self.max_pages:
                raise ValueError(f"sequence {b}: {self.lens[b] + n} tokens exceed max_len "
                                 f"({self.max_pages * self.page_size})")
            while len(self._owned[b]) < need:
                if not self._free:
                    raise RuntimeError("PagedKVCache: out of pages")
                self._owned[b].append(self._free.pop())
        table = torch.tensor([o + [0] * (self.max_pages - len(o)) for o in self._owned], dtype=torch.int32)
        self.block_table.copy_(table, non_blocking=True)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.kv_lens.device)
        append_kv(self.k_pages, None if self.values_in_keys else self.v_pages, self.block_table, self.kv_lens,
                  k_new, v_new, cu)
        self.lens = [n + m for n, m in zip(self.lens, lengths)]
        self.kv_lens.copy_(torch.tensor(self.lens, dtype=torch.int32), non_blocking=True)
        return self

    def release(self, b: int) -> None:
        """Free sequence b's pages (it restarts empty)."""
        self._free.extend(reversed(self._owned[b]))
        self._owned[b] = []
        self.lens[b] = 0
        self.kv_lens[b] = 0
