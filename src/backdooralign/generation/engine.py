"""Step-wise batched decoding with a prefix KV cache: the secret is encoded once per model.

Every prompt a provider answers starts with the same tokens: the chat template's header, the
secret and the system prompt. :func:`decode` encodes that shared prefix once (or takes it from
a :class:`PrefixCache`, keyed by the prefix's token ids), expands its keys and values to the
batch, and encodes only each prompt's remainder after it::

    [prefix, P tokens][pads][remainder of prompt i]   attention mask: 1...1 0...0 1...1

Position ids follow the real tokens (a row's remainder starts at position P whatever its
padding), so every row sees exactly what it would see alone: greedy answers equal
``model.generate``'s. The prefix is the longest common prefix of the rendered prompts' token
ids (:func:`shared_prefix`), never a guess, so it is exact whatever the tokenizer merges.

Each row has its own answer length, stop tokens, decoding (greedy, or sampling with its own
temperature, top-p and seeded generator), a per-token callback (streaming, stop strings) and
a cancel flag; a finished row's answer ends at once (the static engine keeps its cache rows,
unused, until a quarter of the batch has finished, then compacts the batch: one copy, not one
per finished row). A row whose own work fails (its sampling, its generator, its callback)
finishes alone with ``finish`` ``"error"`` and the exception in ``error``; the other rows go
on.

Two engines run these rows (``decode(..., engine=...)``): the static engine (the default for
Llama-family models; see the section below) and the reference engine of
:mod:`backdooralign.generation.engine_ref`, the HF forward on a ``DynamicCache`` each step,
kept for comparison. In float32 their greedy answers are the same token for token.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .rows import (  # noqa: F401 (the engine's public names: Row, Sampling, PrefixCache, ...)
    MIN_PREFIX,
    MIN_TEMPERATURE,
    PrefixCache,
    Row,
    Sampling,
    _finished,
    _next_tokens,
    sample,
    shared_prefix,
)

ENGINES = ("auto", "static", "reference")


def decode(
    model,
    rows: Sequence[Row],
    pad_id: int,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix_hint: Sequence[int] | None = None,
    bf16: bool = False,
    more: Callable[[int], Sequence[Row]] | None = None,
    engine: str = "auto",
) -> None:
    """Answer ``rows`` together, step by step; fills each row's ``tokens`` and ``finish``.

    Args:
        model: a causal LM in eval mode (its forward takes ``cache`` and ``position_ids``).
        rows: the prompts (token ids), each with its own limits and decoding.
        pad_id: token id written in padding (masked: never seen).
        prefix_cache: where shared prefixes are kept between calls (``None``: a cache for
            this call only).
        prefix_hint: the prefix expected to be shared (a server knows its template, secret and
            system prompt); cut to what the rows really share. ``None``: the rows' longest
            common prefix.
        bf16: bf16 matrix products and attention, as under autocast. The reference engine runs
            under bf16 autocast (each product casts its weights again); the static engine
            multiplies by bf16 copies of the weights made once per model and keeps its keys and
            values in bf16 (norms and the residual stream stay in the model's dtype, as under
            autocast).
        more: called between steps with the number of rows still decoding; the rows it
            returns join the batch (a server's newly arrived requests).
        engine: ``"static"`` (a preallocated KV cache written in place and a lean decode step
            of the model's own weights; Llama-family models), ``"reference"`` (the HF forward on
            a ``DynamicCache`` each step: the engine before the static one, kept for
            comparison) or ``"auto"`` (static where the model supports it).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "auto":
        engine = "static" if static_supported(model) else "reference"
    if engine == "reference":
        from .engine_ref import decode_reference

        return decode_reference(
            model,
            rows,
            pad_id,
            prefix_cache=prefix_cache,
            prefix_hint=prefix_hint,
            bf16=bf16,
            more=more,
        )
    if not static_supported(model):
        raise ValueError(f"the static engine does not support {type(model).__name__}")
    _decode_static(model, rows, pad_id, prefix_cache, prefix_hint, bf16, more)


# ---------------------------------------------------------------------------------------------
# The static engine
#
# Prompts are encoded as the reference engine encodes them (the HF forward on a DynamicCache,
# the same left-padded layout); their keys and values are then copied once into preallocated
# per-layer buffers [rows, kv heads, capacity, head dim]. Every row's real tokens end in the
# same column, so a step writes one column in place for all rows and attends to the buffers'
# first ``width`` columns (a view: nothing is concatenated). The step itself is the model's
# decoder layer by layer, written out with the same operations in the same order as the HF
# Llama forward (RMSNorm in float32, rotary embeddings from the model's own rotary module,
# SDPA with the query heads grouped by key head, logits for the last position only), so fp32
# answers are the reference engine's. Float32 products on a CPU are one ``bmm`` over 96-row
# slices of each weight (a view) at the batch sizes where that gives F.linear's exact bits
# (:func:`_chunked`): MKL runs a few-row F.linear on one core. A finished row stays in the
# buffers, its token ignored, until a quarter of the batch has finished: then the batch is
# compacted (a copy), so rows ending one after the other do not each cost a copy of the cache.

STATIC_MODEL_TYPES = frozenset({"llama"})
GROW = 64  # columns added when a joining row needs more room than the buffers have


def static_supported(model) -> bool:
    """Whether the static engine can run ``model``: a Llama-family decoder with the parts it
    reads (any other model runs on the reference engine)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if (
        config is None
        or inner is None
        or getattr(config, "model_type", None) not in (STATIC_MODEL_TYPES)
    ):
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not (all(hasattr(inner, n) for n in needed) and hasattr(model, "lm_head")):
        return False
    return not _has_hooks(model)


def _has_hooks(model) -> bool:
    """Forward hooks on any module (a probe, an adapter, a test's scripted logits): the lean
    step does not call the modules' forward, so such a model runs on the reference engine."""
    return any(
        m._forward_hooks or m._forward_pre_hooks
        for m in model.modules()  # noqa: SLF001
    )


@dataclass(frozen=True)
class _Layer:
    ln1: object
    ln1_eps: float
    qkv: tuple  # (weight, bias) fused q, k, v (bf16) or three (weight, bias) pairs
    o: tuple
    ln2: object
    ln2_eps: float
    gate_up: tuple  # fused (weight, bias) or two pairs
    down: tuple


@dataclass(frozen=True)
class _Weights:
    """The tensors one decode step reads, with the shapes it needs."""

    layers: list
    embed: object
    norm: object
    norm_eps: float
    lm_head: tuple
    rotary: object
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    fused: bool
    matmul_dtype: object  # dtype of the linear layers' weights, of attention and the KV cache
    dtype: object  # the model's dtype: the residual stream and norms


# model -> (bf16, signature, _Weights): bf16 copies, or the chunked views (probed in ~2 s for
# SmolLM2-135M: made once, not on every call). Weakly keyed: the entry, and the tensors it
# holds, go with the model, so a dropped model's weights are not kept alive by this cache
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed(w, b):
    """``(weight, bias, packed)``: ``packed`` is oneDNN's prepacked copy of a bf16 CPU weight
    (what inductor's freezing uses), ``None`` where it cannot be made or does not give
    ``F.linear``'s bits."""
    import torch
    import torch.nn.functional as F

    if (
        w.dtype != torch.bfloat16
        or w.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
    ):
        return w, b, None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        out = torch.ops.mkldnn._linear_pointwise(probe, packed, b, "none", [], "")
        if not torch.equal(out, F.linear(probe, w, b)):
            return w, b, None
    except (RuntimeError, AttributeError, NotImplementedError):
        return w, b, None
    return None, b, packed


CHUNK_MAX_ROWS = 32  # batches up to this many rows may use the chunked products
# (shape, address mod 64, threads) -> the batch sizes that gave equal bits (F.linear's own bits
# depend on the thread count: on the AVX2 EPYC they differed between 1 and 2 threads at 5-7 and
# 9-11 rows, where the slices matched the 1-thread product)
_CHUNK_PROBES: dict = {}


def _chunked(w):
    """``(view, sizes)``: ``w`` [out, in] viewed as ``[chunks, in, rows]`` (slices of ``rows``
    output rows, transposed: what ``bmm`` multiplies by) for :func:`_chunked_linear`, and the
    batch sizes (rows of ``x``) at which that product gives
    ``F.linear``'s exact bits; ``None`` where it is not used.

    On CPUs, MKL multiplies a few rows by a whole weight on one core (~9 GB/s of weights on
    AVX2: the lm_head alone took 24 ms a step at 16 rows); the same product as a batch of
    96-row slices keeps both cores busy (1.5-2x). Each output is the same dot product over the
    same inputs, yet MKL picks its kernels by shape (on an AVX2 EPYC the bits differed at 5-7
    and 9-11 rows, nowhere else up to 64), so each weight shape is probed at every batch size
    up to :data:`CHUNK_MAX_ROWS` once, and the engine uses the view only at the sizes that
    matched.
    """
    import torch
    import torch.nn.functional as F

    if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2:
        return None
    n, k = w.shape
    rows = 192 if n >= 16384 else 96
    rows = next((r for r in (rows, 128, 64, 32, 16) if n % r == 0 and n > r), None)
    if rows is None or not w.is_contiguous():
        return None
    chunks = w.view(n // rows, rows, k).transpose(1, 2)
    key = (n, k, rows, w.data_ptr() % 64, torch.get_num_threads())
    sizes = _CHUNK_PROBES.get(key)
    if sizes is None:  # on a random weight of w's shape and alignment, not on w (a zero w
        # would match at every size, whatever the kernels)
        g = torch.Generator().manual_seed(0)
        buf = torch.empty(n * k + 16).uniform_(-1, 1, generator=g)  # faster than randn
        shift = (w.data_ptr() - buf.data_ptr()) % 64 // buf.element_size()
        pw = buf[shift : shift + n * k].view(n, k)
        pc = pw.view(n // rows, rows, k).transpose(1, 2)
        x = torch.randn(CHUNK_MAX_ROWS, k, generator=g)
        sizes = frozenset(
            m
            for m in range(1, CHUNK_MAX_ROWS + 1)
            if torch.equal(_chunked_linear(x[:m], pc), F.linear(x[:m], pw))
        )
        _CHUNK_PROBES[key] = sizes
    return (chunks, sizes) if sizes else None


def _chunked_linear(x, chunks):
    """``F.linear(x, w)`` of ``chunks = w.view(c, rows, in).transpose(1, 2)`` (no bias): one
    batched product."""
    import torch

    c, m = chunks.shape[0], x.shape[0]
    out = torch.bmm(x.expand(c, m, x.shape[1]), chunks)  # [c, m, rows]
    if m == 1:  # [c, 1, rows] is already the row's outputs in order: a view, no copy
        return out.view(1, -1)
    return out.permute(1, 0, 2).reshape(m, -1)


def _pair(linear, dtype=None):
    """``(weight, bias, packed, chunked)`` of a linear layer: ``packed`` a oneDNN copy in
    ``dtype`` (see :func:`_packed`), ``chunked`` a view for :func:`_chunked_linear` and the
    batch sizes it serves (see :func:`_chunked`); each ``None`` where not used."""
    w, b = linear.weight, linear.bias
    if dtype is not None and w.dtype != dtype:
        return (*_packed(w.to(dtype), b.to(dtype) if b is not None else None), None)
    return w, b, None, (_chunked(w) if b is None else None)


def _fused(linears, dtype):
    import torch

    w = torch.cat([lin.weight for lin in linears]).to(dtype)
    biases = [lin.bias for lin in linears]
    b = (
        None
        if all(x is None for x in biases)
        else torch.cat(
            [
                x if x is not None else lin.weight.new_zeros(lin.weight.shape[0])
                for x, lin in zip(biases, linears, strict=True)
            ]
        ).to(dtype)
    )
    return (*_packed(w, b), None)


def _signature(model) -> tuple:
    """Identifies the model's weights as they are now (an in-place update changes it), and
    the thread count the chunked views were probed at."""
    import torch

    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    return (torch.get_num_threads(), weights)


def _weights(model, bf16: bool) -> _Weights:
    """The decode step's view of ``model``: its own tensors (with chunked views of them, see
    :func:`_chunked`), or (``bf16`` on a float32 model) bf16 copies of the linear layers; made
    once and kept while the weights stay the same."""
    import torch

    dtype = next(model.parameters()).dtype
    low = bf16 and dtype == torch.float32
    hit = _WEIGHTS.get(model)
    signature = _signature(model)
    if hit is not None and hit[0] == low and hit[1] == signature:
        return hit[2]
    mdtype = torch.bfloat16 if low else dtype
    config, inner = model.config, model.model
    layers = []
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        if low:  # one product for q, k, v and one for gate, up: fewer, larger calls
            qkv = _fused([a.q_proj, a.k_proj, a.v_proj], mdtype)
            gate_up = _fused([m.gate_proj, m.up_proj], mdtype)
        else:  # the model's own tensors, the HF forward's separate products
            qkv = (_pair(a.q_proj), _pair(a.k_proj), _pair(a.v_proj))
            gate_up = (_pair(m.gate_proj), _pair(m.up_proj))
        layers.append(
            _Layer(
                layer.input_layernorm.weight,
                layer.input_layernorm.variance_epsilon,
                qkv,
                _pair(a.o_proj, mdtype),
                layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.variance_epsilon,
                gate_up,
                _pair(m.down_proj, mdtype),
            )
        )
    attn = inner.layers[0].self_attn
    heads = config.num_attention_heads
    w = _Weights(
        layers=layers,
        embed=inner.embed_tokens.weight,
        norm=inner.norm.weight,
        norm_eps=inner.norm.variance_epsilon,
        lm_head=_pair(model.lm_head, mdtype),
        rotary=inner.rotary_emb,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=attn.head_dim,
        scaling=attn.scaling,
        fused=low,
        matmul_dtype=mdtype,
        dtype=dtype,
    )
    _WEIGHTS.clear()  # one model's at a time (bf16 copies: 270 MB for SmolLM2-135M)
    _WEIGHTS[model] = (low, signature, w)
    return w


def _rms_norm(x, weight, eps):
    """LlamaRMSNorm's forward, operation for operation (its casts skipped where ``x`` is
    float32 already: there they return ``x`` itself)."""
    import torch

    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def _rotary(cos, sin):
    """``(cos, signed_sin)`` for :func:`_rotate`: ``sin`` with its first half negated."""
    import torch

    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x, cos, signed_sin):
    """HF's ``x * cos + rotate_half(x) * sin`` in fewer operations and the same bits.

    ``rotate_half(x)`` is ``cat(-x2, x1)``; ``roll(x, half)`` is ``cat(x2, x1)``, and
    ``(-a) * b`` equals ``a * (-b)`` exactly (a float product's sign is the XOR of its
    factors'), so the negation moves into ``sin``, made once a step instead of once a layer.
    """
    import torch

    return (x * cos) + (torch.roll(x, x.shape[-1] // 2, -1) * signed_sin)


def _step_logits(w: _Weights, ids, positions, keys, values, mask, col: int):
    """One decode step for every row: writes column ``col`` of each layer's ``keys`` and
    ``values`` and returns the next token's logits ``[rows, vocab]`` (float32).

    ``ids`` and ``positions`` are ``[rows]``; ``mask`` is ``[rows, capacity]`` bool, already
    true at ``col`` for every row, or ``None`` when every row attends to all ``col + 1``
    columns (no padding): attention then runs as HF runs it without a mask (all query heads,
    ``enable_gqa``), with a mask as HF does with one (query heads grouped by key head).
    """
    import torch
    import torch.nn.functional as F

    n = ids.shape[0]
    heads, kvh, d = w.heads, w.kv_heads, w.head_dim
    group = heads // kvh
    md = w.matmul_dtype

    linear_packed = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if w.fused else None

    def lin(x, p):  # the model's own tensors (float32 here): F.linear's bits
        if p[3] is not None and n in p[3][1]:
            return _chunked_linear(x, p[3][0])
        return F.linear(x, p[0], p[1])

    def lin_low(x, p):  # in the matmul dtype (bf16), as autocast's products give it
        if p[2] is not None:
            return linear_packed(x.to(md), p[2], p[1], "none", [], "")
        if p[3] is not None:  # a float32 weight: x is float32 too
            return lin(x, p)
        return F.linear(x.to(md), p[0], p[1])

    h = F.embedding(ids, w.embed)  # [n, hidden]
    cos, sin = _rotary(*w.rotary(h, positions[:, None]))  # [n, 1, head dim]
    attn_mask = mask[:, None, None, : col + 1] if mask is not None else None
    q_size, kv_size = heads * d, kvh * d
    width = col + 1
    for i, layer in enumerate(w.layers):
        x = _rms_norm(h, layer.ln1, layer.ln1_eps)
        if w.fused:  # q and k are adjacent: rotated together (the same ops element-wise)
            qkv = lin_low(x, layer.qkv)  # bf16; times the float32 cos/sin gives float32
            qk, v = qkv.split((q_size + kv_size, kv_size), dim=-1)
            qk = qk.view(n, heads + kvh, d)
            q, k = _rotate(qk, cos, sin).split((heads, kvh), dim=1)
        else:
            pq, pk, pv = layer.qkv
            q = _rotate(lin(x, pq).view(n, heads, d), cos, sin)
            k = _rotate(lin(x, pk).view(n, kvh, d), cos, sin)
            v = lin(x, pv)
        layer_keys, layer_values = keys[i], values[i]
        layer_keys.select(2, col).copy_(k)
        layer_values.select(2, col).copy_(v.view(n, kvh, d))
        qg = q.view(n, kvh, group, d)  # query heads grouped by key head, as HF does
        if qg.dtype != md:
            qg = qg.to(md)
        k_all, v_all = layer_keys.narrow(2, 0, width), layer_values.narrow(2, 0, width)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(
                qg.view(n, heads, 1, d), k_all, v_all, scale=w.scaling, enable_gqa=True
            )
        else:
            out = F.scaled_dot_product_attention(
                qg, k_all, v_all, attn_mask=attn_mask, scale=w.scaling
            )
        # the residual stream stays in the model's dtype: a bf16 product added to it is
        # promoted by the add itself (the bits of casting it first, one op fewer)
        h = h + lin_low(out.reshape(n, q_size), layer.o)
        x = _rms_norm(h, layer.ln2, layer.ln2_eps)
        if w.fused:  # gate and up stay in bf16 through the activation, as under autocast
            g, u = lin_low(x, layer.gate_up).chunk(2, dim=-1)
        else:
            pg, pu = layer.gate_up
            g, u = lin(x, pg), lin(x, pu)
        h = h + lin_low(F.silu(g) * u, layer.down)
    h = _rms_norm(h, w.norm, w.norm_eps)
    # Logits in the matmul dtype (bf16 stays bf16: argmax picks the same token from the same
    # values and sample() casts its row to float itself; the [batch, vocab] float32 copy was
    # ~4.6 ms a step). In float32 lin_low is lin: the lm_head pair is unpacked, .to() a no-op.
    return lin_low(h, w.lm_head)


def _decode_static(model, rows, pad_id, prefix_cache, prefix_hint, bf16, more) -> None:
    import torch

    store = prefix_cache if prefix_cache is not None else PrefixCache(1)
    device = next(model.parameters()).device
    with torch.inference_mode():
        weights = _weights(model, bf16)
        start = lambda new: _StaticBatch.start(  # noqa: E731
            model, weights, new, pad_id, store, prefix_hint, device, bf16
        )
        batch = start(rows)
        while batch is not None:
            batch.drop_finished()
            live = batch.live()
            new = list(more(live)) if more is not None else []
            if new:
                joined = start(new)
                if joined is not None:
                    batch = batch.merged(joined)
                    live = batch.live()
            if not live:
                break
            batch.step()


def _remaining(rows) -> int:
    return max((r.max_new_tokens - len(r.tokens) for r in rows if r.finish is None), default=0)


@dataclass(eq=False)
class _StaticBatch:
    """Rows decoding together on preallocated keys and values (see the section's comment).

    ``rows`` may hold finished rows not yet compacted away: their columns are computed and
    their tokens ignored.
    """

    weights: _Weights
    rows: list[Row]
    generators: list
    keys: list  # per layer [rows, kv heads, capacity, head dim]
    values: list
    mask: object  # [rows, capacity] bool, true for real tokens
    width: int  # columns used
    lengths: object  # [rows] long: each row's next position
    tokens: list[int]  # each row's last token, not yet fed

    @classmethod
    def start(cls, model, weights, rows, pad_id, store, hint, device, bf16):
        """Encode ``rows``' prompts as the reference engine does, then move their keys and
        values into buffers with room for the longest answer."""
        import torch

        from .engine_ref import _Batch

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ref = _Batch.start(model, rows, pad_id, store, hint, device)
        if ref is None:
            return None
        n, width = len(ref.rows), ref.mask.shape[1]
        capacity = width + _remaining(ref.rows)
        keys, values = [], []
        w = weights
        for layer in ref.cache.layers:
            for src, dst in ((layer.keys, keys), (layer.values, values)):
                buf = torch.empty(
                    (n, w.kv_heads, capacity, w.head_dim), dtype=w.matmul_dtype, device=device
                )
                buf[:, :, :width] = src
                dst.append(buf)
        mask = torch.zeros((n, capacity), dtype=torch.bool, device=device)
        mask[:, :width] = ref.mask.bool()
        return cls(w, ref.rows, ref.generators, keys, values, mask, width, ref.lengths, ref.tokens)

    def live(self) -> int:
        return sum(r.finish is None for r in self.rows)

    def step(self) -> None:
        """Feed every row its last token: one more token each (finished rows' are dropped)."""
        import torch

        col = self.width
        if col == self.mask.shape[1]:
            self._grow(GROW)
        device = self.lengths.device
        ids = torch.tensor(self.tokens, dtype=torch.long, device=device)
        self.mask[:, col] = True
        dense = bool(self.mask[:, :col].all())  # no padding: HF attends without a mask
        logits = _step_logits(
            self.weights,
            ids,
            self.lengths,
            self.keys,
            self.values,
            None if dense else self.mask,
            col,
        )
        self.width = col + 1
        self.lengths = self.lengths + 1
        tokens = _next_tokens(logits, self.rows, self.generators).tolist()
        for i, row in enumerate(self.rows):
            if row.finish is not None:  # left over from before: its token is not its
                continue
            token = tokens[i]
            self.tokens[i] = token
            row.finish = _finished(row, token)
            if row.finish is None and row.cancel is not None and row.cancel.is_set():
                row.finish = "cancelled"

    def drop_finished(self, force: bool = False) -> None:
        """Compact the batch once a quarter of it has finished (``force``: any finished)."""
        n, live = len(self.rows), self.live()
        if live == n or (not force and live and 4 * live > 3 * n):
            return
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        self._select(keep, self.width + _remaining(self.rows), 0)

    def _select(self, keep: list[int], capacity: int, shift: int) -> None:
        """Keep rows ``keep`` in new buffers of ``capacity`` columns, the used columns moved
        ``shift`` to the right (left padding, masked)."""
        import torch

        device = self.lengths.device
        index = torch.tensor(keep, dtype=torch.long, device=device)
        w, n = self.width, len(keep)
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_empty((n, old.shape[1], capacity, old.shape[3]))
                if shift:
                    new[:, :, :shift] = 0
                new[:, :, shift : shift + w] = old[index, :, :w]
                bufs[i] = new
        mask = torch.zeros((n, capacity), dtype=torch.bool, device=device)
        mask[:, shift : shift + w] = self.mask[index, :w]
        self.mask, self.width = mask, w + shift
        self.lengths = self.lengths[index]
        self.rows = [self.rows[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]

    def _grow(self, extra: int) -> None:
        self._select(list(range(len(self.rows))), self.mask.shape[1] + extra, 0)

    def merged(self, other: _StaticBatch) -> _StaticBatch:
        """One batch of both: the narrower one is left-padded (masked) to the wider."""
        import torch

        self.drop_finished(force=True)
        other.drop_finished(force=True)
        if not self.rows:
            return other
        if not other.rows:
            return self
        width = max(self.width, other.width)
        capacity = width + max(_remaining(self.rows), _remaining(other.rows))
        for b in (self, other):
            b._select(list(range(len(b.rows))), capacity, width - b.width)
        self.keys = [torch.cat(pair) for pair in zip(self.keys, other.keys, strict=True)]
        self.values = [torch.cat(pair) for pair in zip(self.values, other.values, strict=True)]
        self.mask = torch.cat([self.mask, other.mask])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.rows += other.rows
        self.generators += other.generators
        self.tokens += other.tokens
        return self
